"""The build's host side, overlapped with the model: regressors in worker processes fed as
soon as a batch's samples are known, summaries computed on the device, the device-to-host
copy asynchronous into pinned buffers, compression and writes in a thread pool while the
next batch runs.

Zero workers run a stage inline, in the order the serial build ran it: the same code path
with every overlap turned off, which the tests and `bench/bench_pipeline.py` compare against.
"""

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.capture import Captured
from core.prompts import Prompt
from core.store import ACT_ARRAYS
from core.summary import seed_summary


class Inline(Executor):
    """An executor that runs each task at once, in the caller's thread."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever calls result()
            future.set_exception(exc)
        return future


def default_workers(device: torch.device) -> tuple[int, int]:
    """Returns (regressor processes, writer threads): on a GPU host, every core but the one
    that drives the GPU; on the CPU, where the model already uses every core, one writer
    thread (compression releases the GIL) and the regressors inline."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, cores - 1), min(8, max(1, cores - 1))
    return 0, 1


def regressor_pool(workers: int) -> Executor:
    # spawn, not fork: the parent holds torch's thread pools (and maybe a CUDA context).
    if workers == 0:
        return Inline()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """Starts a watch that ends this worker once its build is gone: a killed build (kill -9)
    never shuts its pool down, and the workers, holding their queue's both ends, would wait forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def writer_pool(workers: int) -> Executor:
    return Inline() if workers == 0 else ThreadPoolExecutor(workers, thread_name_prefix="store-writer")


@dataclass
class HostActs:
    """One batch's activations in the store's dtypes, on their way to (or already on) the host."""

    arrays: dict[str, Tensor]
    ready: "torch.cuda.Event | None"

    def numpy(self) -> dict[str, np.ndarray]:
        """Waits for the copy; returns the arrays as numpy views."""
        if self.ready is not None:
            self.ready.synchronize()
        return {name: t.numpy() for name, t in self.arrays.items()}


def store_dtypes(c: Captured, dtypes: dict[str, str]) -> dict[str, Tensor]:
    """Returns a batch's activations converted to the store's dtypes, on their device
    (half the bytes to copy for a float32 model; what the summaries are computed from)."""
    return {name: getattr(c, name).to(getattr(torch, dtypes[name])) for name in ACT_ARRAYS}


def batch_summaries(acts: dict[str, Tensor], prompts: list[Prompt], pads: list[int]) -> dict[str, np.ndarray]:
    """Returns every seed's `seed_summary`, stacked over the batch on the host; computed on the
    device, where the activations are, so the host gets a few kB per seed instead of scoring
    the attention rows in numpy (row j's prompt is left-padded by pads[j])."""
    per_seed = [seed_summary({name: t[j] for name, t in acts.items()}
                             | {"attn_rows": acts["attn_rows"][j, ..., pad:]}, prompt)
                for j, (prompt, pad) in enumerate(zip(prompts, pads))]
    return {name: torch.stack([s[name] for s in per_seed]).cpu().numpy() for name in per_seed[0]}


class Copier:
    """Copies a batch's activations to the host, asynchronously into pinned buffers reused
    batch after batch (the caller drains a batch's writes before the next copy)."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, converted: dict[str, Tensor]) -> HostActs:
        if converted["resid"].device.type != "cuda":
            return HostActs({name: t.contiguous() for name, t in converted.items()}, None)
        out = {}
        for name, t in converted.items():
            buf = self.buffers.get(name)
            if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
                buf = self.buffers[name] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            out[name] = buf[: t.numel()].view(t.shape)
            out[name].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return HostActs(out, ready)
