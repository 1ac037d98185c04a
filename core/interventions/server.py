"""The intervention server: one model, one job at a time, experiments as JSON over HTTP.

```
python -m cache_builder serve --model smollm2-135m --cache cache [--host 127.0.0.1] [--port 8765] [--token-file F]
```

Routes (all but /health need `Authorization: Bearer <token>` when a token is set):
- `GET /health`: the served model's fingerprint, whether a job runs, how many wait,
  and the measured seconds of one clean forward pass of one prompt;
- `POST /experiments` (an `ExperimentRequest`): validated at once against the run
  store and the limits (422 / 413 with a one-line reason), then queued: 202 `{id, hash, status}`;
- `GET /experiments/{id}`: status, progress, stage, error, and the result when done;
- `GET /runs/{run}/experiments`: the run's finished experiments.

A single worker thread runs the jobs in order through `LocalBackend`, which saves
every result in the results store; a job that raises (out of memory included) fails
alone with its reason and the server goes on. Without a token the server binds only
a loopback address.
"""

import gc
import hmac
import ipaddress
import json
import os
import queue
import socket
import stat
import sys
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core.interventions import archive
from core.interventions.backend import LocalBackend, check_model, open_run
from core.interventions.client import describe_validation_error, one_line
from core.interventions.spec import ExperimentRequest, InterventionError, content_hash
from core.store import StoreError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
KEEP_FINISHED = 256  # finished jobs kept in memory (their results stay in the results store)


class ServeError(RuntimeError):
    """The server cannot start as asked; str() is one line (CLI exit 2)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 256 * 1024
    max_units: int = 64  # seeds (ablation) or pairs (patching)
    max_clean_forwards: float = 20000  # cost in clean forward passes of one prompt


@dataclass
class Job:
    id: str
    hash: str
    request: ExperimentRequest
    clean_forwards: float
    status: str = "queued"  # queued | running | done | failed
    progress: float = 0.0
    stage: str = "queued"
    error: str | None = None
    result_json: str | None = None
    created: float = field(default_factory=time.time)

    def envelope(self) -> str:
        """Returns the job's status as JSON, the result embedded as the results store
        writes it (NaN included, which Starlette's JSONResponse refuses)."""
        head = {"id": self.id, "hash": self.hash, "run": self.request.run, "status": self.status,
                "progress": self.progress, "stage": self.stage, "error": self.error}
        return json.dumps(head)[:-1] + ', "result": ' + (self.result_json or "null") + "}"


def _reason(exc: BaseException) -> str:
    """Returns a failed job's one-line reason."""
    text = one_line(str(exc))
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({type(exc).__name__}): {text or 'no detail'}; try fewer seeds, cells or positions"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Worker:
    """One thread running the queued jobs one after another."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.seconds = 0.0  # job seconds and clean forwards of the jobs computed so far
        self.forwards = 0.0
        self.thread = threading.Thread(target=self._loop, name="intervention-worker", daemon=True)
        self.thread.start()

    def submit(self, request: ExperimentRequest, hash_: str, clean_forwards: float) -> Job:
        """Queues a job; an identical one already queued or running is returned instead."""
        with self.lock:
            for job in self.jobs.values():
                if job.hash == hash_ and job.status in ("queued", "running"):
                    return job
            job = Job(uuid.uuid4().hex, hash_, request, clean_forwards)
            self.jobs[job.id] = job
            self._forget_old()
        self.queue.put(job)
        return job

    def finished(self, request: ExperimentRequest, hash_: str, result_json: str) -> Job:
        """Records a job answered from the results store."""
        job = Job(uuid.uuid4().hex, hash_, request, 0.0, status="done", progress=1.0, stage="done",
                  result_json=result_json)
        with self.lock:
            self.jobs[job.id] = job
            self._forget_old()
        return job

    def _forget_old(self) -> None:
        done = [k for k, j in self.jobs.items() if j.status in ("done", "failed")]
        for key in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self.jobs[key]

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            queued = sum(j.status == "queued" for j in self.jobs.values())
            per_forward = self.seconds / self.forwards if self.forwards > 0 else None
            return {"busy": self.current is not None, "queued": queued, "clean_forward_s": per_forward}

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            with self.lock:
                self.current, job.status, job.stage = job, "running", "starting"
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - the worker outlives any job
                job.error, job.status, job.stage = _reason(exc), "failed", "failed"
            finally:
                with self.lock:
                    self.current = None

    def _run(self, job: Job) -> None:
        def progress(fraction: float, stage: str) -> None:
            job.progress, job.stage = min(1.0, max(0.0, float(fraction))), str(stage)

        cached = (archive.result_dir(self.backend.cache_dir, job.request.run, job.hash) / "result.json").exists()
        t0 = time.perf_counter()
        try:
            result = self.backend.run(job.request, progress)
            result_json = result.model_dump_json()
        except Exception as exc:  # noqa: BLE001 - a job fails alone, whatever it raised
            job.error, job.status, job.stage = _reason(exc), "failed", "failed"
            _release_memory()
            return
        seconds = time.perf_counter() - t0
        with self.lock:
            # A prompt edit's time is mostly decoding and regressor refits: it would skew the
            # per-forward time the app estimates activation experiments with.
            if not cached and job.clean_forwards > 0 and job.request.experiment.root.kind != "edit":
                self.seconds += seconds
                self.forwards += job.clean_forwards
            job.result_json, job.progress, job.stage, job.status = result_json, 1.0, "done", "done"


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after a failed job
        pass


def _validate(backend: LocalBackend, limits: Limits, body: bytes) -> tuple[ExperimentRequest, str, float]:
    """Returns the request, its hash and its cost, or raises InterventionError / StoreError."""
    try:
        request = ExperimentRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InterventionError(describe_validation_error(exc)) from None
    from core.interventions.plan import plan

    store = open_run(backend.cache_dir, request.run)
    check_model(store, backend.fingerprint())
    p = plan(store, request, backend.model.info)
    n_units = p.units if isinstance(p.units, int) else len(p.units)
    if n_units > limits.max_units:
        raise InterventionError(f"the experiment has {n_units} seeds or pairs; this server runs at most "
                                f"{limits.max_units} per experiment (split it)")
    if p.clean_forwards > limits.max_clean_forwards:
        raise InterventionError(f"the experiment costs about {p.clean_forwards:.0f} clean forward passes; this "
                                f"server runs at most {limits.max_clean_forwards:.0f} per experiment (fewer cells, "
                                "positions or units)")
    return request, content_hash(request), float(p.clean_forwards)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = HTTPException(413, f"the request is larger than this server's limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(backend: LocalBackend, token: str | None, limits: Limits = Limits()) -> FastAPI:
    """Returns the server's app over `backend` (routes: the module docstring)."""
    worker = Worker(backend)
    expected = token.encode() if token else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title="intervention server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {_reason(exc)}"}, status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": backend.fingerprint(), **worker.stats()}

    @app.post("/experiments", status_code=202, dependencies=[Depends(authorize)])
    async def submit(request: Request) -> JSONResponse:
        body = await _read_body(request, limits.max_body_bytes)
        try:
            req, hash_, cost = await run_in_threadpool(_validate, backend, limits, body)
        except (InterventionError, StoreError) as exc:
            raise HTTPException(422, one_line(str(exc))) from None
        saved = archive.result_dir(backend.cache_dir, req.run, hash_) / "result.json"
        if saved.exists():
            job = worker.finished(req, hash_, saved.read_text())
        else:
            job = worker.submit(req, hash_, cost)
        return JSONResponse({"id": job.id, "hash": job.hash, "status": job.status}, status_code=202)

    @app.get("/experiments/{job_id}", dependencies=[Depends(authorize)])
    def job_status(job_id: str) -> Response:
        job = worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id}")
        return Response(job.envelope(), media_type="application/json")

    @app.get("/runs/{run}/experiments", dependencies=[Depends(authorize)])
    def experiments(run: str) -> list[dict]:
        if ".." in run or "/" in run or "\\" in run:
            raise HTTPException(422, f"bad run name {run!r}")
        return archive.list_results(backend.cache_dir, run)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path) -> str:
    """Returns the token in `token_file` (surrounding whitespace stripped)."""
    path = Path(token_file)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ServeError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise ServeError(f"token file {path} must hold one token (no spaces)")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: token file {path} is readable by others; chmod 600 it", file=sys.stderr)
    return token


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(model_spec: str, cache_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          token_file: str | Path | None = None, device: str = "auto", dtype: str = "auto",
          limits: Limits = Limits()) -> None:
    """Loads `model_spec` once and serves it until interrupted; raises ServeError (one line)
    when it cannot start: a non-loopback `host` without a token, a bad token file, a
    missing cache directory, a port in use."""
    token = read_token(token_file) if token_file else None
    if token is None and not is_loopback(host):
        raise ServeError(f"refusing to serve on {host} without a token: bind 127.0.0.1 or give --token-file")
    if not Path(cache_dir).is_dir():
        raise ServeError(f"cache directory {cache_dir} does not exist")
    _check_port(host, port)
    import uvicorn

    from core.models import load_model

    model = load_model(model_spec, device, dtype)
    backend = LocalBackend(model, cache_dir)
    fp = backend.fingerprint()
    app = create_app(backend, token, limits)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {fp['name']} ({fp['config_hash']}, {fp['device']}) on http://{shown}:{port} over {cache_dir}; "
          f"{'token required' if token else 'no token (loopback only)'}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
