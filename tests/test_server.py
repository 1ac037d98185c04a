"""The intervention server, its HTTP client, and the CLI's serve / intervene / export /
build --max-seeds, on tiny-random-llama: real uvicorn servers on 127.0.0.1 (one in a
subprocess, as `python -m cache_builder serve` starts it; others in a thread)."""

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from cache_builder.build import BuildSpec, build
from cache_builder.cli import main
from core.interventions import archive
from core.interventions.backend import LocalBackend, fingerprint
from core.interventions.client import HttpBackend, ServerError
from core.interventions.result import METRICS
from core.interventions.server import Limits, create_app, is_loopback
from core.interventions.spec import ExperimentRequest, InterventionError, content_hash
from core.store import RunStore
from support import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
ALIGNED = "tiny-random-llama__friedman2__n4__aligned"
NATURAL = "tiny-random-llama__friedman2__n4__natural"
ABLATION = {"kind": "ablation", "method": "zero", "sites": [{"kind": "resid_pre", "layers": [0, 1]}],
            "positions": ["final"], "seeds": [0, 1], "pair": ["truth", "linear"]}
PATCHING = {"kind": "patching", "direction": "denoising", "sites": [{"kind": "head", "layers": [1], "heads": [0, 3]}],
            "positions": ["final"], "pairs": [[0, 1], [2, 3]]}


def request(experiment: dict, run: str = ALIGNED) -> ExperimentRequest:
    return ExperimentRequest.model_validate({"run": run, "experiment": experiment})


def linked_cache(tmp: Path, *runs: str, source: Path) -> Path:
    """A cache directory of its own (own results store) over the same run stores."""
    tmp.mkdir(parents=True, exist_ok=True)
    for run in runs:
        (tmp / f"{run}.zarr").symlink_to(source / f"{run}.zarr")
    return tmp


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def stores(cache, tiny):
    """The aligned store (build()) and the natural one (the CLI, in two sessions: --max-seeds 2, then the rest)."""
    build(BuildSpec("tiny-random-llama", "friedman2", 4, [0, 1, 2, 3], regressors=["linear", "mean"], batch_size=4),
          cache, progress=False, model=tiny)
    args = ["build", "--model", "tiny-random-llama", "--dataset", "friedman2", "--n-examples", "4", "--seeds", "0-3",
            "--format", "natural", "--regressors", "linear,mean", "--batch-size", "2", "--out", str(cache), "--quiet"]
    assert main([*args, "--max-seeds", "2"]) == 0
    partial = RunStore.open(cache / f"{NATURAL}.zarr").done().tolist()
    assert main(args) == 0
    return SimpleNamespace(cache=cache, natural_partial=partial)


@pytest.fixture(scope="module")
def server(cache, token_file, request):
    """`python -m cache_builder serve` in a subprocess, with a token; its URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cache_builder", "serve", "--model", "tiny-random-llama",
                             "--cache", str(cache), "--port", str(port), "--token-file", str(token_file)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    request.getfixturevalue("stores")  # built while the server starts
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not answer /health"
            time.sleep(0.2)
        yield url
    finally:
        stop(proc, timeout=20)


@contextmanager
def thread_server(backend, token: str | None = TOKEN, limits: Limits = Limits()):
    """A real uvicorn server on a free loopback port, in a thread of this process."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(backend, token, limits), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the in-thread server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait(url: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        job = httpx.get(f"{url}/experiments/{job_id}", headers=auth()).json()
        if job["status"] in ("done", "failed"):
            return job
        assert time.time() < deadline, f"job {job_id} did not finish: {job}"
        time.sleep(0.1)


def assert_one_line(text: str) -> None:
    assert isinstance(text, str) and text and "\n" not in text and "Traceback" not in text, text


def test_health_is_open_and_shows_the_model(server, stores):
    health = httpx.get(f"{server}/health").json()
    store = RunStore.open(stores.cache / f"{ALIGNED}.zarr")
    assert health["status"] == "ok" and health["model"]["spec"] == "tiny-random-llama"
    assert health["model"]["config_hash"] == fingerprint(store.attrs["model"])["config_hash"]
    assert health["busy"] in (True, False) and isinstance(health["queued"], int)
    assert health["clean_forward_s"] is None or health["clean_forward_s"] > 0


@pytest.mark.parametrize("headers", [{}, auth("wrong-token"), {"Authorization": TOKEN}, auth(TOKEN + "x")],
                         ids=["none", "wrong", "no-scheme", "longer"])
def test_every_route_but_health_needs_the_token(server, headers):
    body = request(ABLATION).model_dump_json()
    for method, path in [("POST", "/experiments"), ("GET", "/experiments/abc"), ("GET", f"/runs/{ALIGNED}/experiments")]:
        response = httpx.request(method, server + path, headers=headers, content=body if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert_one_line(response.json()["detail"])
    assert httpx.get(f"{server}/experiments/abc", headers=auth()).status_code == 404


BAD = {
    "unknown key": ({**ABLATION, "sites": [{"kind": "resid_pre", "layers": [0], "colour": "red"}]}, ALIGNED,
                    "experiment.ablation.sites.0.colour: Extra inputs are not permitted"),
    "unknown kind": ({**ABLATION, "kind": "surgery"}, ALIGNED, "experiment"),
    "layer out of range": ({**ABLATION, "sites": [{"kind": "mlp_out", "layers": [2]}]}, ALIGNED, "layer 2"),
    "head out of range": ({**PATCHING, "sites": [{"kind": "head", "layers": [0], "heads": [4]}]}, ALIGNED, "head 4"),
    "seed not in the run": ({**ABLATION, "seeds": [0, 17]}, ALIGNED, "seed 17"),
    "unknown position": ({**ABLATION, "positions": ["y[9]"]}, ALIGNED, "y[9]"),
    "patching a natural run": (PATCHING, NATURAL, "positions"),
    "unknown run": (ABLATION, "no-such-run", "no-such-run"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_are_422_with_one_line(server, stores, case):
    experiment, run, expected = BAD[case]
    if run == NATURAL:  # the case is meant: the natural run's prompts differ in length
        assert len(set(RunStore.open(stores.cache / f"{NATURAL}.zarr").root["positions/n_tokens"][:].tolist())) > 1
    body = json.dumps({"schema_version": 1, "run": run, "experiment": experiment})
    response = httpx.post(f"{server}/experiments", headers=auth(), content=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert_one_line(detail)
    assert expected in detail


def test_malformed_and_oversized_bodies(server):
    response = httpx.post(f"{server}/experiments", headers=auth(), content=b"{not json")
    assert response.status_code == 422
    assert_one_line(response.json()["detail"])
    response = httpx.post(f"{server}/experiments", headers=auth(), content=b" " * (257 * 1024))
    assert response.status_code == 413
    assert_one_line(response.json()["detail"])


def test_round_trip_equals_the_local_backend(server, stores, tiny, token_file, tmp_path):
    req = request(ABLATION)
    client_cache = linked_cache(tmp_path / "client", ALIGNED, source=stores.cache)
    seen = []
    with HttpBackend(server, TOKEN, client_cache) as remote:
        got = remote.run(req, progress=lambda f, s: seen.append((f, s)), poll_s=0.05)
    assert seen and all(0 <= f <= 1 for f, _ in seen)
    assert archive.load(client_cache, ALIGNED, got.hash) is not None  # saved on the client's side
    local_cache = linked_cache(tmp_path / "local", ALIGNED, source=stores.cache)
    want = LocalBackend(tiny, local_cache).run(req)
    assert got.hash == want.hash == content_hash(req)
    a, b = got.frame(), want.frame()
    assert len(a) == 4 and list(a["cell_label"]) == list(b["cell_label"])
    for metric in METRICS:
        np.testing.assert_allclose(a[metric].to_numpy(float), b[metric].to_numpy(float), rtol=1e-4, equal_nan=True)
    assert np.isfinite(a["logprob_diff"]).all()
    assert list(a["decoded_text"]) == list(b["decoded_text"])

    # The client answers a saved result without the server; the server lists it.
    with HttpBackend(f"http://127.0.0.1:{free_port()}", TOKEN, client_cache) as dead:
        assert dead.run(req).hash == got.hash
    listed = httpx.get(f"{server}/runs/{ALIGNED}/experiments", headers=auth()).json()
    assert got.hash in [r["hash"] for r in listed]
    assert httpx.get(f"{server}/health").json()["clean_forward_s"] > 0


def test_client_errors_are_one_line(server, stores, tmp_path):
    client_cache = linked_cache(tmp_path / "client", ALIGNED, source=stores.cache)
    req = request({**ABLATION, "seeds": [3]})
    with pytest.raises(ServerError, match="refused the token"):
        HttpBackend(server, "wrong", client_cache).run(req)
    with pytest.raises(ServerError, match="cannot reach the intervention server at http://127.0.0.1"):
        HttpBackend(f"http://127.0.0.1:{free_port()}", TOKEN, client_cache, timeout=2).run(req)
    with pytest.raises(ServerError, match="seed 17"):
        HttpBackend(server, TOKEN, client_cache).run(request({**ABLATION, "seeds": [17]}))


def test_a_server_of_another_model_refuses_the_run(stores, tiny, tmp_path):
    other = SimpleNamespace(info={**tiny.info, "name": "another model", "d_model": 128})
    with thread_server(LocalBackend(other, stores.cache)) as url:
        response = httpx.post(f"{url}/experiments", headers=auth(), content=request(ABLATION).model_dump_json())
        assert response.status_code == 422
        assert_one_line(response.json()["detail"])
        assert "another model" in response.json()["detail"] and "was built with" in response.json()["detail"]
        # The client refuses before submitting: its own copy of the run names the model.
        client_cache = linked_cache(tmp_path / "client", ALIGNED, source=stores.cache)
        with pytest.raises(InterventionError, match="was built with"):
            HttpBackend(url, TOKEN, client_cache).run(request(ABLATION))


def test_a_job_out_of_memory_fails_alone(stores, tiny, tmp_path, monkeypatch):
    import core.interventions.executor as executor

    real, calls = executor.execute, []

    def flaky(model, store, req, progress=None):
        calls.append(req)
        if len(calls) == 1:
            progress(0.0, "clean runs")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\n(GPU 0; 79 GiB total)")
        return real(model, store, req, progress)

    monkeypatch.setattr(executor, "execute", flaky)
    server_cache = linked_cache(tmp_path / "server", ALIGNED, source=stores.cache)
    with thread_server(LocalBackend(tiny, server_cache)) as url:
        first = request({**ABLATION, "seeds": [2], "sites": [{"kind": "mlp_out", "layers": [1]}]})
        second = request({**ABLATION, "seeds": [3], "sites": [{"kind": "attn_out", "layers": [0]}]})
        ids = [httpx.post(f"{url}/experiments", headers=auth(), content=r.model_dump_json()).json()["id"]
               for r in (first, second)]
        failed, done = wait(url, ids[0]), wait(url, ids[1])
        assert failed["status"] == "failed" and failed["result"] is None
        assert_one_line(failed["error"])
        assert "out of memory" in failed["error"]
        assert done["status"] == "done" and done["error"] is None and done["progress"] == 1.0
        assert done["result"]["hash"] == content_hash(second)
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and not health["busy"] and health["queued"] == 0
        # The failed experiment is not poisoned: submitted again, it runs.
        again = httpx.post(f"{url}/experiments", headers=auth(), content=first.model_dump_json()).json()
        assert wait(url, again["id"])["status"] == "done"
        assert archive.load(server_cache, ALIGNED, content_hash(first)) is not None


def test_limits(stores, tiny):
    limits = Limits(max_body_bytes=4096, max_units=2, max_clean_forwards=3)
    with thread_server(LocalBackend(tiny, stores.cache), limits=limits) as url:
        post = lambda exp: httpx.post(f"{url}/experiments", headers=auth(),  # noqa: E731
                                      content=request(exp).model_dump_json())
        response = post({**ABLATION, "seeds": [0, 1, 2]})
        assert response.status_code == 422 and "at most 2" in response.json()["detail"]
        response = post({**ABLATION, "positions": ["all"], "sites": [{"kind": "resid_pre", "layers": "all"}]})
        assert response.status_code == 422 and "clean forward passes" in response.json()["detail"]
        response = post({**ABLATION, "positions": ["final"] * 600})
        assert response.status_code == 413


def test_no_token_binds_only_loopback(cache, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("127.5.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    code = main(["serve", "--model", "tiny-random-llama", "--cache", str(cache), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: refusing to serve on 0.0.0.0 without a token")
    assert_one_line(err)


def test_intervene_cli(stores, server, token_file, tmp_path, capsys):
    spec = tmp_path / "patching.json"
    spec.write_text(json.dumps(PATCHING))
    own = linked_cache(tmp_path / "cache", ALIGNED, NATURAL, source=stores.cache)
    assert main(["intervene", ALIGNED, str(spec), "--cache", str(own), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "head L1H0 @ final" in out and "head L1H3 @ final" in out and "normalized [95% CI]" in out
    saved = archive.list_results(own, ALIGNED)
    assert len(saved) == 1 and f"result: {archive.result_dir(own, ALIGNED, saved[0]['hash'])}" in out

    # Through the server, into the client's own results store.
    remote = linked_cache(tmp_path / "remote", ALIGNED, source=stores.cache)
    spec.write_text(json.dumps(ABLATION))
    assert main(["intervene", ALIGNED, str(spec), "--cache", str(remote), "--server", server,
                 "--token-file", str(token_file), "--quiet"]) == 0
    remote_out = capsys.readouterr().out
    assert "resid_pre L1 @ final" in remote_out and f"result: {remote / 'experiments'}" in remote_out
    assert archive.load(remote, ALIGNED, content_hash(request(ABLATION))) is not None

    # The exports read the results store.
    assert main(["export", ALIGNED, "experiments", "--cache", str(own)]) == 0
    assert saved[0]["hash"] in capsys.readouterr().out
    assert main(["export", ALIGNED, "experiment-summary", "--experiment", saved[0]["hash"][:8],
                 "--cache", str(own)]) == 0
    assert "normalized_low" in capsys.readouterr().out
    assert main(["export", ALIGNED, "experiment-rows", "--experiment", saved[0]["hash"], "--cache", str(own)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2 * 2  # header + cells x pairs

    # Bad input: one line, exit 2, before any model is loaded.
    for text, expected in [("{oops", "is not JSON"), (json.dumps({**ABLATION, "colour": 1}), "colour"),
                           (json.dumps({**ABLATION, "sites": [{"kind": "resid_pre", "layers": [7]}]}), "layer 7")]:
        spec.write_text(text)
        assert main(["intervene", ALIGNED, str(spec), "--cache", str(own)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err
        assert_one_line(err)
    assert main(["export", ALIGNED, "experiment-rows", "--cache", str(own)]) == 2
    assert "--experiment" in capsys.readouterr().err


def test_max_seeds_builds_that_many_then_a_rerun_finishes(stores):
    assert stores.natural_partial == [True, True, False, False]
    store = RunStore.open(stores.cache / f"{NATURAL}.zarr")
    assert store.done().all()
    assert [s["seeds_built"] for s in store.attrs["build"]["sessions"]] == [2, 2]
    assert "max_seeds" not in store.attrs["params"]
