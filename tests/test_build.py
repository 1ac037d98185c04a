"""The cache builder on tiny-random-llama: store contents, bad input, resume after kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import KNeighborsRegressor

from cache_builder.build import BuildSpec, build
from cache_builder.cli import main, parse_seeds
from core.store import RunStore, every_array

ROOT = Path(__file__).resolve().parents[1]
REGS = ["linear", "knn", "mean", "gd-k10"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    spec = BuildSpec("tiny-random-llama", "friedman2", 6, [3, 4, 5, 6, 7], regressors=REGS, batch_size=2)
    return RunStore.open(build(spec, out, progress=False))


def test_regressors_fit_exactly_the_values_in_the_prompt(tiny_store, tokenizer):
    store = tiny_store
    preds = store.predictions()
    col = {c: i for i, c in enumerate(store.columns)}
    assert store.columns == ["model", *REGS]
    for i in range(len(store.seeds)):
        ids = list(store.tokens(i))
        xs = store.array("positions/x")[i]
        ys = store.array("positions/y")[i]
        read = lambda span: float(tokenizer.decode(ids[span[0]:span[1]]))  # noqa: E731
        x = np.array([[read(s) for s in row] for row in xs])  # what the model reads
        y = np.array([read(s) for s in ys])
        np.testing.assert_allclose(x[:-1], store.array("x_train")[i])
        np.testing.assert_allclose(y, store.array("y_train")[i])
        lin = LinearRegression().fit(x[:-1], y).predict(x[-1:])[0]
        knn = KNeighborsRegressor().fit(x[:-1], y).predict(x[-1:])[0]
        assert preds[i, col["linear"]] == pytest.approx(lin, rel=1e-9)
        assert preds[i, col["knn"]] == pytest.approx(knn, rel=1e-9)
        assert preds[i, col["mean"]] == pytest.approx(y.mean())
    assert store.done().all()
    a = store.attrs
    assert a["schema_version"] == 2 and a["seeds"] == [3, 4, 5, 6, 7]
    assert a["model"]["n_layers"] == 2 and a["model"]["compatibility_mode"] is False
    assert a["dataset"] == {"name": "friedman2", "n_features": 4, "n_examples": 6,
                            "description": a["dataset"]["description"]}
    assert a["build"]["finished"] and a["build"]["command"] == ""
    assert set(a["prompt"]) >= {"template", "format", "int_digits", "n_tokens"}


def test_model_column_is_greedy_decoding_of_the_raw_hf_model(tiny_store, tokenizer):
    import torch

    from core.models import tiny_random_llama_hf
    from core.prompts import parse_number

    hf = tiny_random_llama_hf()  # an independent instance with the same weights
    texts = tiny_store.llm_text()
    for i in range(len(tiny_store.seeds)):
        ids = torch.as_tensor(tiny_store.tokens(i), dtype=torch.long)[None]
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=len(texts[i]) + 2, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        reference = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert reference.startswith(texts[i]) and len(texts[i]) > 0
        stored = tiny_store.predictions()[i, 0]
        assert np.isnan(stored) == np.isnan(parse_number(texts[i]))


def test_batched_left_padded_decoding_equals_one_by_one(tiny, tokenizer):
    from core.datasets import DATASETS
    from core.generation import greedy_answers
    from core.prompts import build_prompts, choose_format

    samples = [DATASETS["linear-ni22"].sample(s, 4) for s in range(3)]
    prompts = build_prompts(samples, choose_format("natural", samples, tokenizer), tokenizer)
    assert len({len(p.tokens) for p in prompts}) > 1
    batched = greedy_answers(tiny, [p.tokens for p in prompts], 6).texts
    single = [greedy_answers(tiny, [p.tokens], 6).texts[0] for p in prompts]
    assert batched == single


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args,message", [
    (["--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["--dataset", "friedman9"], "unknown dataset 'friedman9'"),
    (["--regressors", "linear,xgboost"], "unknown regressor 'xgboost'"),
    (["--seeds", "5-2"], "seed range '5-2' does not parse"),
    (["--seeds", "a-b"], "does not parse"),
    (["--n-examples", "120"], "tokens; tiny-random-llama holds 4096"),
    (["--format", "fancy"], "invalid choice"),
    (["--model", "no-such-org/no-such-model"], "is not in the local Hugging Face cache"),
    (["--shard", "2/2"], "shard 2/2 is out of range"),
    (["--shard", "x"], "shard 'x' does not parse"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    base = {"--model": "tiny-random-llama", "--dataset": "friedman2", "--n-examples": "3",
            "--seeds": "0-1", "--out": str(tmp_path)}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["build"] + [a for k, v in {**base, **flags}.items() for a in (k, v)] + ["--quiet"]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.startswith("error: ") and "\n" not in err


def test_unwritable_output_and_missing_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "build", "--model", "tiny-random-llama", "--dataset", "friedman2",
                        "--n-examples", "3", "--seeds", "0", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot be written" in err and "\n" not in err
    code, err = run_cli(capsys, "leaderboard", str(tmp_path / "nothing.zarr"))
    assert code == 2 and "no run store" in err


def test_other_parameters_are_refused_and_nothing_is_lost(tmp_path, capsys):
    args = ["build", "--model", "tiny-random-llama", "--dataset", "original1", "--n-examples", "3",
            "--regressors", "mean,last", "--out", str(tmp_path), "--quiet"]
    assert main(args + ["--seeds", "0-2"]) == 0
    path = next(tmp_path.glob("*.zarr"))
    before = RunStore.open(path).predictions()
    code, err = run_cli(capsys, *args, "--seeds", "0-3")
    assert code == 2 and "built with other parameters (seeds" in err and "\n" not in err
    code, err = run_cli(capsys, *args[:-3], "--regressors", "mean", "--out", str(tmp_path), "--seeds", "0-2")
    assert code == 2 and "regressors" in err
    after = RunStore.open(path)
    assert after.done().all()
    np.testing.assert_array_equal(after.predictions(), before)
    # A store from another schema version is refused with one line.
    zarr.open_group(str(path), mode="r+").attrs["schema_version"] = 99
    code, err = run_cli(capsys, "info", str(path))
    assert code == 2 and "schema version 99" in err


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("0,5,10-11") == [0, 5, 10, 11]


def _children(pid: int) -> list[int]:
    """Returns the PIDs of the live processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_pipelined_build_resumes_to_the_serial_builds_store(tmp_path):
    argv = [sys.executable, "-m", "cache_builder", "build", "--model", "tiny-random-llama",
            "--dataset", "friedman2", "--n-examples", "4", "--seeds", "0-7", "--batch-size", "2",
            "--regressors", "linear,mlp-10,random-forest,random", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    build(BuildSpec("tiny-random-llama", "friedman2", 4, list(range(8)), batch_size=2,
                    regressors=["linear", "mlp-10", "random-forest", "random"], regressor_workers=0, write_workers=0),
          ref_dir, progress=False)  # in this process: one interpreter start-up less
    argv += ["--regressor-workers", "1", "--write-workers", "2"]
    ref = next(ref_dir.glob("*.zarr"))
    path = dir_ / ref.name
    kills, orphans = 0, []
    for wait_done in (0, 3):  # kill during start-up, then after some seeds are done
        proc = subprocess.Popen(argv + ["--out", str(dir_)], env=env, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                done = zarr.open_group(str(path), mode="r")["done"][:].sum() if path.exists() else 0
            except Exception:
                done = 0
            if (wait_done == 0 and path.exists()) or (wait_done and done >= wait_done):
                break
            time.sleep(0.05)
        if proc.poll() is None:
            orphans += _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    # The killed builds' regressor processes end by themselves.
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in orphans):
        time.sleep(0.2)
    assert not [pid for pid in orphans if Path(f"/proc/{pid}").exists()]
    subprocess.run(argv + ["--out", str(dir_)], check=True, env=env, cwd=ROOT)
    a, b = every_array(ref), every_array(path)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert len(RunStore.open(path).attrs["build"]["sessions"]) >= 1


def test_pipelined_build_equals_the_serial_build_array_for_array(tmp_path):
    common = dict(model="tiny-random-llama", dataset="friedman2", n_examples=5, seeds=list(range(7)),
                  regressors=["linear", "knn", "mlp-10"], batch_size=2)
    serial = build(BuildSpec(**common, regressor_workers=0, write_workers=0), tmp_path / "serial", progress=False)
    piped = build(BuildSpec(**common, regressor_workers=2, write_workers=3), tmp_path / "piped", progress=False)
    a, b = every_array(Path(serial)), every_array(Path(piped))
    assert a.keys() == b.keys() and "acts/attn_rows" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    (session,) = RunStore.open(piped).attrs["build"]["sessions"]
    assert (session["regressor_workers"], session["write_workers"], session["seeds_built"]) == (2, 3, 7)


def test_sharded_build_in_two_processes_equals_one_process(tmp_path):
    common = ["--model", "tiny-random-llama", "--dataset", "linear-ni22", "--n-examples", "4",
              "--seeds", "0-6", "--batch-size", "2", "--regressors", "linear,mlp-10", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    one = tmp_path / "one"
    build(BuildSpec("tiny-random-llama", "linear-ni22", 4, list(range(7)), regressors=["linear", "mlp-10"],
                    batch_size=2), one, progress=False)
    url = f"file://{tmp_path / 'sharded'}"  # an fsspec URL, as for s3://
    procs = [subprocess.Popen([sys.executable, "-m", "cache_builder", "build", *common, "--out", url,
                               "--shard", f"{i}/2"], env=env, cwd=ROOT) for i in (1, 0)]
    assert [p.wait() for p in procs] == [0, 0]
    ref = next(one.glob("*.zarr"))
    got = tmp_path / "sharded" / ref.name
    a, b = every_array(ref), every_array(got)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    store = RunStore.open(got)
    sessions = store.attrs["build"]["sessions"]
    assert sorted(s["shard"] for s in sessions) == ["0/2", "1/2"]
    assert sum(s["seeds_built"] for s in sessions) == 7
    assert store.attrs["build"]["finished"]


def test_disk_full_keeps_finished_seeds_and_resumes(tmp_path, capsys, monkeypatch):
    import errno

    from core.store import RunStore as Store

    real = Store.write_seed
    calls = {"n": 0}

    def failing(self, index, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", "acts/resid")
        return real(self, index, *args)

    monkeypatch.setattr(Store, "write_seed", failing)
    args = ["build", "--model", "tiny-random-llama", "--dataset", "original1", "--n-examples", "3",
            "--seeds", "0-4", "--batch-size", "1", "--regressors", "mean", "--out", str(tmp_path), "--quiet"]
    code, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: disk full") and "\n" not in err
    path = next(tmp_path.glob("*.zarr"))
    assert RunStore.open(path).done().tolist() == [True, True, False, False, False]
    monkeypatch.setattr(Store, "write_seed", real)
    assert main(args) == 0
    assert RunStore.open(path).done().all()


@pytest.mark.parametrize("failure, message", [
    (lambda: torch.AcceleratorError("CUDA error: unspecified launch failure\nCUDA kernel errors might be "
                                     "asynchronously reported"), "error: the device cpu failed mid-build (CUDA error: "),
    (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0; 79 GiB total)"),
     "error: out of memory on cpu in a batch of 1 seeds (CUDA out of memory."),
])
def test_a_device_failing_mid_build_keeps_finished_seeds_and_resumes_to_the_same_store(
        tmp_path, capsys, monkeypatch, failure, message):
    """A GPU that falls off the bus (or runs out of memory) in the third batch: one line, exit 2, the
    two finished seeds kept; the same command then resumes to the store of an uninterrupted build."""
    from cache_builder.build import BatchRunner

    args = ["build", "--model", "tiny-random-llama", "--dataset", "original1", "--n-examples", "3",
            "--seeds", "0-3", "--batch-size", "1", "--regressors", "mean", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = BatchRunner.__call__, {"n": 0}

    def failing(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise failure()
        return real(self, batch)

    monkeypatch.setattr(BatchRunner, "__call__", failing)
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "failed"))
    assert code == 2 and err.startswith(message) and "\n" not in err, err
    assert "2 of 4 seeds are finished and kept" in err
    path = next((tmp_path / "failed").glob("*.zarr"))
    assert RunStore.open(path).done().tolist() == [True, True, False, False]
    monkeypatch.setattr(BatchRunner, "__call__", real)
    assert main([*args, "--out", str(tmp_path / "failed")]) == 0
    a, b = every_array(next((tmp_path / "whole").glob("*.zarr"))), every_array(path)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_half_created_store_is_refused_for_reading_and_rebuilt(tmp_path, capsys):
    args = ["build", "--model", "tiny-random-llama", "--dataset", "original1", "--n-examples", "3",
            "--seeds", "0-1", "--regressors", "mean", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    path = next(tmp_path.glob("*.zarr"))
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    params = group.attrs["params"]
    del group.attrs["params"]  # as if killed while being set up: no seed done yet
    group["done"][:] = False
    zarr.consolidate_metadata(str(path))
    code, err = run_cli(capsys, "info", str(path))
    assert code == 2 and "half-created" in err
    assert main(args) == 0
    assert RunStore.open(path).attrs["params"] == params
