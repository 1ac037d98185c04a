"""Attribution patching sweeps (`core.interventions.attribution`) against independent paths:
the executor's exact patching, finite differences of the metric under plain Hugging Face
forwards with hooks, and hooked query / key patches for the AtP* QK fix."""

import json
import types

import numpy as np
import pytest
import torch

from cache_builder.build import BuildSpec, build
from cache_builder.cli import main as cli
from core.interventions import attribution as atp
from core.interventions.spec import InterventionError
from core.store import RunStore

# Seed 11's true output is 1110.30, the others' 0xxx.xx: pairs with it differ at the answer's
# first token, the only one the last layer's final position can change.
TINY = BuildSpec("tiny-random-llama", "friedman2", 4, [0, 1, 2, 3, 11], regressors=["linear"], batch_size=5)
SMOL = BuildSpec("smollm2-135m", "linear-ni11", 3, [0, 1, 2, 3], regressors=["linear"], batch_size=4)
PAIRS = [(11, 0), (1, 11)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("atp")
    build(TINY, out, progress=False)
    return out


@pytest.fixture(scope="module")
def store(cache):
    return RunStore.open(next(cache.glob("*friedman2*.zarr")))


def _rms_norm(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def tiny64(linear_head: bool = False):
    """A fresh float64 tiny model (the session's `tiny` stays untouched); `linear_head`: the final
    norm removed and the unembedding scaled, so log p(A_0) - log p(B_0) is linear in the last residual."""
    from core.models import load_model

    model = load_model("tiny-random-llama", dtype="float32")
    hf = model.hf_model.double()
    for norm in [m for m in hf.modules() if type(m).__name__ == "LlamaRMSNorm"]:
        norm.forward = types.MethodType(_rms_norm, norm)  # HF's computes in float32 whatever the dtype
    if linear_head:
        hf.model.norm = torch.nn.Identity()
        hf.lm_head.weight = torch.nn.Parameter(hf.model.embed_tokens.weight.detach().clone() * 300)
    return model


# --- plain Hugging Face forwards with hooks: the independent path -----------------------------------------------------

def site_hook(hf, kind: str, layer: int, head: int, edit):
    """Registers a hook that calls `edit(x)` on the site's activation ([b, s, d] or, for a head,
    [b, s, dh]: a view, edits write through)."""
    layers = hf.model.layers
    if kind == "resid_pre" and layer == len(layers):
        return hf.model.norm.register_forward_pre_hook(lambda m, a: edit(a[0]))
    if kind == "resid_pre":
        return layers[layer].register_forward_pre_hook(
            lambda m, a, k: edit(a[0] if a else k["hidden_states"]), with_kwargs=True)
    if kind == "attn_out":
        return layers[layer].self_attn.register_forward_hook(lambda m, a, r: edit(r[0]))
    if kind == "mlp_out":
        return layers[layer].mlp.register_forward_hook(lambda m, a, r: edit(r))
    d_head = layers[layer].self_attn.head_dim
    return layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: edit(a[0].view(*a[0].shape[:2], -1, d_head)[:, :, head]))


def metric(hf, prompt: np.ndarray, a: list[int], b: list[int], hooks=()) -> float:
    """log p(a) - log p(b) after `prompt`, teacher-forced, as two ordinary sequences."""
    t = len(prompt)
    seqs = [np.concatenate([prompt, a[:-1]]), np.concatenate([prompt, b[:-1]])]
    ids = torch.zeros((2, max(map(len, seqs))), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)  # right padding: causal, so it changes no earlier position
    handles = [h() for h in hooks]
    try:
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids).logits.double(), -1)
    finally:
        for h in handles:
            h.remove()
    lp = lambda r, ans: sum(float(logp[r, t - 1 + k, tok]) for k, tok in enumerate(ans))  # noqa: E731
    return lp(0, a) - lp(1, b)


def activation(hf, prompt: np.ndarray, kind: str, layer: int, head: int) -> torch.Tensor:
    got = {}
    handle = site_hook(hf, kind, layer, head, lambda x: got.__setitem__("x", x[0].clone()))
    try:
        with torch.no_grad():
            hf(input_ids=torch.as_tensor(prompt[None], dtype=torch.long))
    finally:
        handle.remove()
    return got["x"]


def cell(sw: atp.Sweep, label: str) -> int:
    labels = sw.cells["label"]
    assert label in labels, label
    return labels.index(label)


# --- 1. a linear toy: the estimate is the exact effect ----------------------------------------------------------------

def test_estimate_equals_the_executors_exact_effect_where_the_metric_is_linear(store):
    """Without the final norm, log p(A) - log p(B) moves with the last residual at the final position
    only through the first answer token's logit difference: linear in resid_pre L and in the last
    MLP's output there. The estimate must equal the executor's exact effect; the other cells
    go through a MLP and a softmax and need not."""
    model = tiny64(linear_head=True)
    g = atp.grid(model, store, PAIRS, ["resid_pre"], ["final"], answers="truth")
    assert all(a[0] != b[0] for a, b in g.answers)  # else the first token's difference is 0 either way
    sw = atp.sweep(model, store, PAIRS, kinds=["resid_pre", "attn_out", "mlp_out"], positions=["final", "y[1]"],
                   answers="truth")
    checked = atp.verify(model, store, sw, top_k=100, n_random=0)
    df = checked.frame().set_index("label")
    assert (df["status"] == "verified").all()
    assert checked.verification["baseline_max_abs_diff"] < 1e-4  # the same metric on two code paths
    exact_pairs = checked.per_pair("exact_per_pair")
    for label in ("resid_pre L2 @ final", "mlp_out L1 @ final"):
        i = cell(checked, label)
        assert np.abs(exact_pairs[i]).min() > 2e-3, (label, exact_pairs[i])
        # the executor and the sweep are two code paths: their effects differ by rounding, ~1e-5
        np.testing.assert_allclose(checked.per_pair()[i], exact_pairs[i], rtol=1e-3, atol=2e-5, err_msg=label)
    # Where the metric is not linear the first-order estimate is off, by far more than that tolerance.
    nonlinear = df.loc[["resid_pre L1 @ final", "attn_out L0 @ final", "attn_out L1 @ final", "resid_pre L1 @ y[1]"]]
    assert (np.abs(nonlinear["estimate"] - nonlinear["exact"]) > 1e-4).all(), nonlinear


# --- 3. the gradient: finite differences under plain forwards ---------------------------------------------------------

@pytest.fixture(scope="module")
def double_sweep(store):
    model = tiny64()
    sw = atp.sweep(model, store, [PAIRS[0]], positions=["final", "slot[2]", "y[1]", "x[3][0]"], answers="truth")
    return model, sw


@pytest.mark.parametrize("kind,layer,head,name", [
    ("resid_pre", 1, -1, "y[1]"), ("resid_pre", 2, -1, "final"), ("attn_out", 0, -1, "slot[2]"),
    ("mlp_out", 1, -1, "final"), ("head", 1, 2, "final"), ("head", 0, 1, "x[3][0]"),
])
def test_estimate_is_the_directional_derivative_of_the_metric(double_sweep, store, kind, layer, head, name):
    """(a_clean - a_corrupt) . grad against (m(a + eps d) - m(a - eps d)) / 2 eps, the metric
    computed by a plain Hugging Face forward with a hook adding eps d at the site."""
    model, sw = double_sweep
    hf = model.hf_model
    g = atp.grid(model, store, [PAIRS[0]], ["resid_pre"], [name], answers="truth")
    (clean_row, corrupt_row), (a, b) = g.rows[0], g.answers[0]
    pos = torch.as_tensor(g.tokens[name])
    prompt = store.tokens(corrupt_row)
    d = (activation(hf, store.tokens(clean_row), kind, layer, head)
         - activation(hf, prompt, kind, layer, head))[pos]
    assert d.abs().max() > 0

    def shifted(eps: float) -> float:
        def edit(x):
            x[:, pos] += eps * d
        return metric(hf, prompt, a, b, [lambda: site_hook(hf, kind, layer, head, edit)])

    eps = 1e-4  # central differences: O(eps^2) off, the rest float64 rounding
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    label = f"{kind} L{layer}" + (f"H{head}" if head >= 0 else "") + f" @ {name}"
    estimate = sw.per_pair()[cell(sw, label), 0]
    assert abs(fd) > 1e-7
    assert estimate == pytest.approx(fd, rel=1e-4, abs=1e-10)
    assert sw.baselines["m_corrupt"][0] == pytest.approx(metric(hf, prompt, a, b), abs=1e-9)


# --- AtP* QK fix: the exact softmax, against hooked query / key patches -----------------------------------------------

def _qkv_hook(hf, layer: int, which: str, edit):
    proj = getattr(hf.model.layers[layer].self_attn, f"{which}_proj")
    return proj.register_forward_hook(lambda m, a, r: edit(r))


@pytest.mark.parametrize("which", ["q", "k"])
def test_qk_fix_is_the_exact_change_of_the_heads_output_and_enters_the_sweep(double_sweep, store, which):
    """Patching head 2's query (or the keys of its key-value group) at y[1] of layer 1 in a hooked
    forward changes its output z by exactly what `HeadAttention` computes; the sweep's head_q /
    head_k estimate is the derivative of the metric along that change (finite differences)."""
    model, sw = double_sweep
    hf = model.hf_model
    layer, head, name = 1, 2, "y[1]"
    info = model.info
    d_head, group = info["d_head"], info["n_heads"] // info["n_kv_heads"]
    unit = head if which == "q" else head // group  # the projection's head whose slice is patched
    g = atp.grid(model, store, [PAIRS[0]], ["resid_pre"], [name], answers="truth")
    (clean_row, corrupt_row), (a, b) = g.rows[0], g.answers[0]
    pos = torch.as_tensor(g.tokens[name])
    prompt = store.tokens(corrupt_row)
    sl = slice(unit * d_head, (unit + 1) * d_head)
    got = {}
    _run = lambda tokens, hooks: metric(hf, tokens, a, b, hooks)  # noqa: E731
    _run(store.tokens(clean_row), [lambda: _qkv_hook(hf, layer, which, lambda r: got.__setitem__("clean", r.clone()))])
    clean_proj = got["clean"][0, pos, sl]

    def patch(r):
        r[:, pos, sl] = clean_proj

    z = {}
    cap = lambda key: lambda: site_hook(hf, "head", layer, head, lambda x: z.__setitem__(key, x.clone()))  # noqa: E731
    _run(prompt, [cap("corrupt")])
    _run(prompt, [lambda: _qkv_hook(hf, layer, which, patch), cap("patched")])
    dz_hooked = z["patched"] - z["corrupt"]  # [2 rows (answers A, B), s, dh]
    assert dz_hooked.abs().max() > 1e-6

    # HeadAttention on the prompt alone (the rows' prompt part is the same in both).
    tr = atp.tree(prompt, a[:1], b[:1], model.device)
    tr_clean = atp.tree(store.tokens(clean_row), a[:1], b[:1], model.device)
    corrupt, clean = (atp.forward(model, t, grad=False, qkv=True) for t in (tr, tr_clean))
    q, k, v = corrupt.qkv[layer]
    att = atp.HeadAttention(q, k, v, tr.mask, float(hf.model.layers[layer].self_attn.scaling))
    t = len(prompt)
    if which == "q":
        exact, linear = att.query_patch(clean.qkv[layer][0][:, pos], pos)
        torch.testing.assert_close(exact[head], dz_hooked[0, pos], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.delete(dz_hooked[0, :t].numpy(), pos.numpy(), 0), 0, atol=1e-14)
        # The linearised change is the derivative of the exact one.
        dq = clean.qkv[layer][0][:, pos] - q[:, pos]
        small, _ = att.query_patch(q[:, pos] + 1e-6 * dq, pos)
        torch.testing.assert_close(small[head] / 1e-6, linear[head], rtol=1e-4, atol=1e-10)
    else:
        kc = clean.qkv[layer][1].repeat_interleave(group, 0)
        exact, linear = att.key_patch(kc[:, pos], pos)
        torch.testing.assert_close(exact[head], dz_hooked[0, :t], rtol=1e-9, atol=1e-12)
        dk = kc[:, pos] - att.k[:, pos]
        small, _ = att.key_patch(att.k[:, pos] + 1e-6 * dk, pos)
        torch.testing.assert_close(small[head] / 1e-6, linear[head], rtol=1e-4, atol=1e-10)

    # The sweep's estimate: the derivative of the metric along the hooked change of z (both rows:
    # a key patch also moves the answer tokens' outputs).
    def shifted(eps: float) -> float:
        def edit(x):
            x += eps * dz_hooked
        return _run(prompt, [lambda: site_hook(hf, "head", layer, head, edit)])

    fd = (shifted(1e-4) - shifted(-1e-4)) / 2e-4
    i = cell(sw, f"head_{which} L{layer}H{head} @ {name}")
    assert sw.per_pair()[i, 0] == pytest.approx(fd, rel=1e-4, abs=1e-10)
    assert sw.cells["status"][i] == "estimated"


# --- 2. the embedded model: the top cells are confirmed by exact patching ---------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from core.models import load_model

    model = load_model("smollm2-135m")
    cache = tmp_path_factory.mktemp("atp-smol")
    return model, RunStore.open(build(SMOL, cache, progress=False, model=model))


def test_top_cells_on_the_embedded_model_are_confirmed_by_the_executor(smol):
    model, store = smol
    calls = []
    # Two positions keep the executor's chunks few (this machine runs the embedded model slowly).
    sw = atp.sweep(model, store, [(0, 1), (2, 3)], kinds=["resid_pre"], positions=["final", "slot[2]"],
                   progress=lambda f, s: calls.append(f))
    assert calls[-1] == 1.0 and len(sw.cells["label"]) == 31 * 2
    checked = atp.verify(model, store, sw, top_k=5, n_random=3, seed=1)
    v = checked.verification["kinds"]["resid_pre"]
    df = checked.frame()
    verified = df[df["status"] == "verified"]
    assert len(verified) == 8 and v["n_verified"] == 8
    assert checked.verification["baseline_max_abs_diff"] < 1e-3
    assert v["recall_at_k"] >= 0.6 and v["spearman"] > 0, v
    ranked = verified.reindex(verified["estimate"].abs().sort_values(ascending=False).index)
    top, rest = ranked[:5], ranked[5:]
    big = top[top["exact"].abs() > 0.05]
    assert len(big) >= 3 and (np.sign(big["estimate"]) == np.sign(big["exact"])).all(), top
    # What the estimate ranks first has larger exact effects than the random sample, and the
    # largest effect it missed is smaller than what it found.
    assert top["exact"].abs().mean() > 2 * rest["exact"].abs().mean(), ranked
    assert abs(v["max_missed"]) < v["max_exact"]


# --- files, the command line, bad input -------------------------------------------------------------------------------

def test_sweep_json_round_trip_is_strict_json(double_sweep, tmp_path):
    _, sw = double_sweep
    path = atp.save(sw, tmp_path)
    assert path == tmp_path / "sweeps" / sw.run / f"{sw.hash}.json"

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data["cells"]["exact"][0] is None  # NaN is null
    again = atp.load(path)
    assert again.hash == sw.hash and again.cells["label"] == sw.cells["label"]
    np.testing.assert_array_equal(again.per_pair(), sw.per_pair())
    assert atp.list_sweeps(tmp_path, sw.run)[0]["hash"] == sw.hash


@pytest.mark.parametrize("change,message", [
    ({"kinds": ["resid_post"]}, "unknown site kind 'resid_post'"),
    ({"layers": [3]}, "resid_pre layer 3 is out of range"),
    ({"kinds": ["mlp_out"], "layers": [2]}, "mlp_out layer 2 is out of range"),
    ({"pairs": [(0, 7)]}, "seed 7 is not in run"),
    ({"pairs": [(3, 3)]}, "patches a seed into itself"),
    ({"positions": ["y[9]"]}, "output values are y[0]-y[3]"),
])
def test_bad_input_is_one_line(store, tiny, change, message):
    args = {"pairs": PAIRS, "kinds": ["resid_pre"], "positions": ["final"], **change}
    with pytest.raises(InterventionError) as err:
        atp.sweep(tiny, store, **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_writes_a_verified_sweep_and_refuses_bad_input(cache, store, capsys):
    run = store.name.removesuffix(".zarr")
    code = cli(["sweep", run, "--cache", str(cache), "--pairs", "11:0,1:11", "--kinds", "resid_pre,head_k",
                "--positions", "final,slot[1]", "--answers", "truth", "--verify-top", "2", "--verify-random", "1",
                "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    [saved] = atp.list_sweeps(cache, run)
    sw = atp.load(saved["path"])
    assert saved["verified"] == 3 and sw.kinds == ["resid_pre", "head_k"] and saved["path"] in out
    assert "recall@2" in out
    assert cli(["sweep", run, "--cache", str(cache), "--pairs", "11-0"]) == 2
    assert cli(["sweep", "no-such-run", "--cache", str(cache), "--pairs", "0:1"]) == 2
    err = capsys.readouterr().err
    assert "error: --pairs '11-0'" in err and "no run store 'no-such-run'" in err


def test_sweep_page_shows_estimates_and_verified_cells(cache, store, tiny):
    from tests.support import app_page

    # The command line's sweep (the same file when that test ran first): no model in the app.
    atp.sweep_and_verify(tiny, store, cache, PAIRS, ["resid_pre", "head_k"], ["final", "slot[1]"], "truth",
                         top_k=2, n_random=1)
    at = app_page("sweep", {"WORKBENCH_CACHE": str(cache)}, run=store.name.removesuffix(".zarr"))
    text = " ".join(str(m.value) for m in at.markdown) + " ".join(str(c.value) for c in at.caption)
    assert "verified" in text and "recall@2" in text, text
    import pyarrow as pa

    frames = [pa.ipc.open_stream(c.proto.datasets[0].data.data).read_all().to_pandas()
              for c in at.get("vega_lite_chart") if c.proto.datasets]
    heat = next(f for f in frames if {"status", "estimate", "position"} <= set(f.columns))
    assert sorted(heat["status"].value_counts().items()) == [("estimated", 3), ("verified", 3)]  # resid_pre's 6 cells
