"""The HTTP backend: `run(request) -> Result` on an intervention server
(`core.interventions.server`), on this machine or a GPU host.

The client keeps its own results store (the cache directory it reads run stores
from): a result already there is returned without asking the server, and every
result the server returns is saved there.
"""

import json
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from core.interventions import archive
from core.interventions.backend import Progress, check_model, open_run
from core.interventions.result import Result
from core.interventions.spec import ExperimentRequest, content_hash
from core.store import StoreError

MAX_ERRORS_SHOWN = 3


class ServerError(RuntimeError):
    """The server cannot be reached, refused the request, or the job failed; str() is one line."""


def one_line(text: str) -> str:
    """Returns `text` on one line (whitespace runs collapsed)."""
    return " ".join(str(text).split())


def describe_validation_error(exc: ValidationError) -> str:
    """Returns pydantic's error list as one readable line: `loc.path: message; ...`."""
    parts = []
    for err in exc.errors()[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = exc.error_count() - MAX_ERRORS_SHOWN
    return one_line("; ".join(parts) + (f" (and {more} more)" if more > 0 else ""))


class HttpBackend:
    """A backend whose model lives in an intervention server at `url`."""

    def __init__(self, url: str, token: str | None, cache_dir: str | Path, timeout: float = 10) -> None:
        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HttpBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the intervention server at {self.url}: "
                              f"{one_line(exc) or type(exc).__name__}") from None
        if response.status_code == 401:
            raise ServerError(f"the server refused the token (401 from {self.url}); give the server's token "
                              "(--token-file or $WORKBENCH_TOKEN)")
        try:
            body = json.loads(response.text)  # json.loads: results carry NaN
        except ValueError:
            body = None
        if response.status_code >= 400:
            detail = body.get("detail") if isinstance(body, dict) else None
            if not isinstance(detail, str):
                detail = f"the server answered {response.status_code} {response.reason_phrase}" + (
                    f": {detail}" if detail else "")
            raise ServerError(one_line(detail))
        if not isinstance(body, dict | list):
            raise ServerError(f"{self.url}{path} did not answer JSON; is it an intervention server?")
        return body

    def health(self) -> dict:
        return self._call("GET", "/health")

    def fingerprint(self) -> dict:
        return self.health()["model"]

    def submit(self, request: ExperimentRequest) -> dict:
        """Queues `request`; returns `{id, hash, status}`."""
        return self._call("POST", "/experiments", content=request.model_dump_json(),
                          headers={"Content-Type": "application/json"})

    def job(self, job_id: str) -> dict:
        """Returns the job's `{id, hash, status, progress, stage, error, result}`."""
        return self._call("GET", f"/experiments/{job_id}")

    def experiments(self, run: str) -> list[dict]:
        """Returns the server's finished experiments of `run` (`archive.list_results`)."""
        return self._call("GET", f"/runs/{run}/experiments")

    def run(self, request: ExperimentRequest, progress: Progress | None = None, poll_s: float = 0.5) -> Result:
        """Returns the result of `request`: from the local results store if there, else
        from the server (then saved locally). Raises InterventionError when the local
        run was built with another model than the server's, ServerError otherwise."""
        saved = archive.load(self.cache_dir, request.run, content_hash(request))
        if saved is not None:
            return saved
        served = self.fingerprint()
        try:
            store = open_run(self.cache_dir, request.run)
        except StoreError:
            store = None  # not here: the server checks its own copy
        if store is not None:
            check_model(store, served)
        job = self.submit(request)
        while True:
            if progress is not None and "progress" in job:
                progress(float(job["progress"]), str(job.get("stage", "")))
            if job["status"] == "done" and job.get("result") is not None:
                try:
                    result = Result.model_validate(job["result"])
                except ValidationError as exc:
                    raise ServerError(f"the server's result does not parse: {describe_validation_error(exc)}") \
                        from None
                archive.save(result, self.cache_dir)
                return result
            if job["status"] == "failed":
                raise ServerError(one_line(job.get("error") or "the job failed"))
            time.sleep(poll_s)
            try:
                job = self.job(job["id"])
            except ServerError as exc:
                if "unknown job" in str(exc):
                    raise ServerError(f"the server no longer knows job {job['id']} (restarted?); "
                                      "submit the experiment again") from None
                raise
