"""Stored activations against the raw Hugging Face model and the TransformerLens bridge."""

import numpy as np
import pytest
import torch

from cache_builder.build import BuildSpec, build
from core.store import RunStore


def eager_reference(hf):
    hf.config._attn_implementation = "eager"
    return hf.eval()


def check_against_hf(store: RunStore, hf, atol_resid: float, atol_attn: float):
    """Stored activations vs output_hidden_states / output_attentions of an independent HF model."""
    n_layers = store.attrs["model"]["n_layers"]
    for i in range(len(store.seeds)):
        ids = torch.as_tensor(store.tokens(i), dtype=torch.long)[None]
        with torch.inference_mode():
            out = hf(ids, output_hidden_states=True, output_attentions=True)
        pos = torch.as_tensor(store.act_positions(i), dtype=torch.long)
        assert pos[-1] == ids.shape[1] - 1
        for layer in range(n_layers):
            ref = out.hidden_states[layer][0, pos].numpy()
            scale = np.abs(ref).max()
            np.testing.assert_allclose(store.resid(i, layer), ref, atol=atol_resid * scale, rtol=atol_resid)
            att = out.attentions[layer][0][:, pos].numpy()  # [H, P, T]
            np.testing.assert_allclose(store.attn_rows(i, layer)[..., : ids.shape[1]], att, atol=atol_attn, rtol=0)
            # attn_out + mlp_out reconstruct the next residual.
            recon = store.resid(i, layer) + store.attn_out(i, layer) + store.mlp_out(i, layer)
            np.testing.assert_allclose(recon, store.resid(i, layer + 1), atol=atol_resid * scale, rtol=4 * atol_resid)
            # Per-head outputs at the final position sum to the attention output there.
            np.testing.assert_allclose(store.head_out(i, layer).sum(0), store.attn_out(i, layer)[-1],
                                       atol=atol_resid * scale, rtol=4 * atol_resid)
        # After the last layer: HF reports it after the final norm.
        last = torch.as_tensor(store.resid(i, n_layers))
        with torch.inference_mode():
            normed = hf.model.norm(last).numpy()
        ref = out.hidden_states[n_layers][0, pos].numpy()
        np.testing.assert_allclose(normed, ref, atol=atol_resid * np.abs(ref).max() * 4, rtol=0)


@pytest.fixture(scope="module")
def tiny_acts_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("acts")
    spec = BuildSpec("tiny-random-llama", "linear-ni12", 5, [0, 1, 2], prompt_format="natural",
                     regressors=["mean"], batch_size=3)
    return RunStore.open(build(spec, out, progress=False))


def test_tiny_activations_equal_the_raw_hf_model(tiny_acts_store):
    from core.models import tiny_random_llama_hf

    # float16 storage: 1e-3 of the largest magnitude; probabilities to 1e-3 absolute.
    check_against_hf(tiny_acts_store, eager_reference(tiny_random_llama_hf()), 1e-3, 1e-3)


def test_tiny_activations_equal_the_bridge_hooks(tiny_acts_store):
    from core.models import load_model

    bridge = load_model("tiny-random-llama").bridge
    assert bridge.compatibility_mode is False
    for i in range(3):
        ids = torch.as_tensor(tiny_acts_store.tokens(i), dtype=torch.long)[None]
        pos = torch.as_tensor(tiny_acts_store.act_positions(i), dtype=torch.long)
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(ids)
        for layer in range(2):
            for hook, got in [(f"blocks.{layer}.hook_resid_pre", tiny_acts_store.resid(i, layer)),
                              (f"blocks.{layer}.hook_attn_out", tiny_acts_store.attn_out(i, layer)),
                              (f"blocks.{layer}.hook_mlp_out", tiny_acts_store.mlp_out(i, layer))]:
                ref = cache[hook][0, pos].numpy()
                np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0, err_msg=hook)
            # Per head: z of that head through its slice of the raw o_proj weight.
            z = cache[f"blocks.{layer}.attn.hook_z"][0, pos[-1]].reshape(4, 16)
            w_o = bridge.original_model.model.layers[layer].self_attn.o_proj.weight.detach()
            heads = torch.stack([z[h] @ w_o[:, 16 * h:16 * (h + 1)].T for h in range(4)]).numpy()
            np.testing.assert_allclose(tiny_acts_store.head_out(i, layer), heads, atol=1e-3 * np.abs(heads).max())
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, pos].numpy()
            np.testing.assert_allclose(tiny_acts_store.attn_rows(i, layer)[..., : ids.shape[1]], pattern, atol=1e-3)


def test_store_records_mode_dtypes_and_unembed(tiny_acts_store):
    from core.models import tiny_random_llama_hf

    a = tiny_acts_store.attrs
    assert a["model"]["compatibility_mode"] is False
    assert {"torch", "transformers", "transformer-lens", "zarr"} <= set(a["model"]["versions"])
    root = tiny_acts_store.root
    assert root["acts/resid"].dtype == np.float16
    assert root["acts/resid"].chunks == (1, 1, 6, 64)
    hf = tiny_random_llama_hf()
    ids = root["unembed/token_ids"][:]
    np.testing.assert_allclose(root["unembed/W_U"][:], hf.lm_head.weight[torch.as_tensor(ids)].T.detach().numpy())
    assert {"0", "9", " ", " -"} <= set(root["unembed/token_text"][:])
    assert root["unembed"].attrs["eps"] == pytest.approx(hf.config.rms_norm_eps)


def test_embedded_activations_equal_the_raw_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from core.models import embedded_gguf_path

    spec = BuildSpec("smollm2-135m", "friedman2", 3, [0, 1], regressors=["mean"], batch_size=2)
    store = RunStore.open(build(spec, tmp_path, progress=False))
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    check_against_hf(store, eager_reference(hf), 2e-3, 2e-3)


def test_float16_overflow_promotes_the_array_and_keeps_written_seeds(tmp_path, monkeypatch):
    import cache_builder.build as builder

    spec = BuildSpec("tiny-random-llama", "original1", 3, [0, 1, 2, 3], regressors=["mean"], batch_size=2)
    ref = RunStore.open(build(spec, tmp_path / "ref", progress=False))
    real, calls = builder._peaks, {"n": 0}

    def peaks(c):
        out = real(c)
        calls["n"] += 1
        if calls["n"] == 3:  # creation probe, first batch, then the second batch overflows
            out["mlp_out"] = 1e6
        return out

    monkeypatch.setattr(builder, "_peaks", peaks)
    got = RunStore.open(build(spec, tmp_path / "got", progress=False))
    arr = got.root["acts/mlp_out"]
    assert arr.dtype == np.float32 and "overflows float16" in arr.attrs["float32_because"]
    assert got.root["acts/resid"].dtype == np.float16
    want = ref.root["acts/mlp_out"][:].astype(np.float32)
    np.testing.assert_array_equal(arr[:2], want[:2])  # written before: kept exactly
    np.testing.assert_allclose(arr[2:], want[2:], rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_acts_choice_keeps_what_it_names_and_the_same_summaries(tmp_path, capsys):
    """A run built with `--acts resid,attn_rows:final` holds the full run's resid, the last of its
    attention rows and every summary bit for bit; the arrays it left out are refused by name."""
    from cache_builder.cli import main
    from core.store import StoreError, describe
    from tests.support import app_page

    common = dict(model="tiny-random-llama", dataset="friedman2", n_examples=4, seeds=[0, 1, 2],
                  regressors=["mean"], batch_size=2)
    full = RunStore.open(build(BuildSpec(**common), tmp_path / "full", progress=False))
    part_path = build(BuildSpec(**common, acts="resid,attn_rows:final"), tmp_path / "part", progress=False)
    part = RunStore.open(part_path)
    assert sorted(part.root["acts"].array_keys()) == ["attn_rows", "positions", "resid"]
    np.testing.assert_array_equal(part.root["acts/resid"][:], full.root["acts/resid"][:])
    np.testing.assert_array_equal(part.root["acts/attn_rows"][:], full.root["acts/attn_rows"][:][..., -1:, :])
    for name in ("final_resid", "mlp_norm", "head_scores"):
        np.testing.assert_array_equal(part.root[f"summary/{name}"][:], full.root[f"summary/{name}"][:])
    np.testing.assert_array_equal(part.predictions(), full.predictions())
    with pytest.raises(StoreError, match=r"holds no acts/mlp_out: it was built with --acts resid,attn_rows:final"):
        part.mlp_out(0, 1)
    assert "--acts resid,attn_rows:final" in describe(part) and "--acts all" in describe(full)

    # The attention page says what the run lacks instead of the one-seed view.
    none = build(BuildSpec(**common, acts="none"), tmp_path / "none", progress=False)
    at = app_page("attention", {"WORKBENCH_CACHE": str(tmp_path / "none")}, run=RunStore.open(none).name)
    assert any("holds no attention rows" in str(i.value) for i in at.info)
    capsys.readouterr()  # streamlit's own warnings

    # Bad input: an unknown array; another choice on an existing run.
    argv = ["build", "--model", "tiny-random-llama", "--dataset", "friedman2", "--n-examples", "4", "--seeds",
            "0-2", "--batch-size", "2", "--regressors", "mean", "--out", str(tmp_path / "part"), "--quiet"]
    for acts, message in (("resid,attn_rows:all", "unknown array 'attn_rows:all'"), ("mlp", "unknown array 'mlp'"),
                          ("all", "built with other parameters (acts: stored resid,attn_rows:final, asked all)")):
        assert main([*argv, "--acts", acts]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
