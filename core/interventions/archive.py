"""The results store: every finished experiment under `<cache>/experiments/<run>/<hash>/`.

A result is `result.json` (spec, provenance, per-cell per-unit values) and
`summary.csv`, written into a temporary directory that is renamed into place: a
killed job leaves no directory that looks finished. Never inside a run store.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from core.interventions.result import Result

EXPERIMENTS = "experiments"


def result_dir(cache_dir: str | Path, run: str, hash_: str) -> Path:
    return Path(cache_dir) / EXPERIMENTS / run.removesuffix(".zarr") / hash_


def save(result: Result, cache_dir: str | Path) -> Path:
    """Writes `result` (atomically: a temporary directory renamed into place); returns its directory."""
    final = result_dir(cache_dir, result.request.run, result.hash)
    if (final / "result.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{result.hash}-", dir=final.parent))
    try:
        (tmp / "result.json").write_text(result.model_dump_json())
        result.summary().to_csv(tmp / "summary.csv", index=False)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "result.json").exists():
            raise
    return final


def load(cache_dir: str | Path, run: str, hash_: str) -> Result | None:
    """Returns the saved result of that run and hash, or None."""
    path = result_dir(cache_dir, run, hash_) / "result.json"
    return Result.model_validate_json(path.read_text()) if path.exists() else None


def list_results(cache_dir: str | Path, run: str) -> list[dict]:
    """Returns the run's finished experiments, newest first: hash, kind, cells, units, when."""
    root = Path(cache_dir) / EXPERIMENTS / run.removesuffix(".zarr")
    out = []
    for path in root.glob("*/result.json") if root.is_dir() else []:
        data = json.loads(path.read_text())
        exp = data["request"]["experiment"]
        out.append({"hash": data["hash"], "kind": exp["kind"],
                    "method": exp.get("method") or exp.get("direction") or ", ".join(
                        dict.fromkeys(e["op"] for e in exp.get("edits", []))), "cells": len(data["cells"]),
                    "units": len(data["baselines"]["unit"]), "finished": data["provenance"].get("finished", ""),
                    "device": data["provenance"].get("device", "")})
    return sorted(out, key=lambda r: r["finished"], reverse=True)
