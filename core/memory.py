"""Process memory settings for long builds."""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Makes glibc serve every allocation above `nbytes` by mmap; returns whether it could.

    glibc raises its mmap threshold each time a large block is freed, after which large
    tensors come from the heap, which fragments and is never given back: a build's
    resident memory then grows about 1 GB past its working set. Pinned, a build of the
    embedded model peaks about 0.6 GB above the loaded model instead of 1-1.5 GB, for
    page faults that make the prefill slower (measured in bench/bench_acts.py).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
