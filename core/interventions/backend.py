"""One interface, two backends: `run(request) -> Result` in this process (the CLI,
the tests, the server) or over HTTP to an intervention server (`core.interventions.client`).

A backend serves one model, named by its fingerprint; a run store records the model
it was built with, and a backend refuses a run of another model.
"""

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from core.interventions import archive
from core.interventions.result import Result
from core.interventions.spec import ExperimentRequest, InterventionError, content_hash
from core.store import RunStore, StoreError

Progress = Callable[[float, str], None]  # (fraction done, what is running)
# The fields that name a model's weights and shape; dtype and device may differ
# (a store built in float32 on a CPU, a server in bfloat16 on a GPU).
FINGERPRINT_KEYS = ("spec", "name", "architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head",
                    "d_vocab")


def fingerprint(info: dict) -> dict:
    """Returns a model's fingerprint from its info (a `LoadedModel.info` or a store's `model` attr)."""
    shape = {k: info.get(k) for k in FINGERPRINT_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": info.get("name"), "spec": info.get("spec"), "config_hash": digest,
            "dtype": info.get("dtype"), "device": info.get("device")}


def check_model(store: RunStore, served: dict) -> None:
    """Raises InterventionError when the backend's model is not the store's."""
    want = fingerprint(store.attrs["model"])
    if want["config_hash"] != served["config_hash"]:
        raise InterventionError(f"the server serves {served['name']!r} ({served['config_hash']}); run "
                                f"{store.name} was built with {want['name']!r} ({want['config_hash']})")


class Backend(Protocol):
    def fingerprint(self) -> dict: ...

    def run(self, request: ExperimentRequest, progress: Progress | None = None) -> Result: ...


def open_run(cache_dir: str | Path, run: str) -> RunStore:
    """Returns the run store `run` (a name under `cache_dir`, with or without .zarr)."""
    path = Path(cache_dir) / f"{run.removesuffix('.zarr')}.zarr"
    if "/" in run or ".." in run or not path.is_dir():
        raise StoreError(f"no run store {run!r} under {cache_dir}")
    return RunStore.open(path)


class LocalBackend:
    """Runs experiments in this process on a loaded model; results go to `cache_dir`'s
    results store, and a saved result is returned without running anything."""

    def __init__(self, model, cache_dir: str | Path) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir)

    def fingerprint(self) -> dict:
        return fingerprint(self.model.info)

    def run(self, request: ExperimentRequest, progress: Progress | None = None) -> Result:
        from core.interventions.executor import execute
        from core.interventions.prompt_edits import execute_edits
        from core.interventions.spec import PromptEdit

        hash_ = content_hash(request)
        saved = archive.load(self.cache_dir, request.run, hash_)
        if saved is not None:
            return saved
        store = open_run(self.cache_dir, request.run)
        check_model(store, self.fingerprint())
        t0 = time.time()
        runner = execute_edits if isinstance(request.experiment.root, PromptEdit) else execute
        result = runner(self.model, store, request, progress)
        result.provenance.update(seconds=round(time.time() - t0, 3))
        archive.save(result, self.cache_dir)
        return result
