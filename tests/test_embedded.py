"""End to end on the embedded SmolLM2-135M: CLI build, answers vs the raw HF model, leaderboard."""

import io
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
import torch

from cache_builder.cli import main
from core.models import embedded_gguf_path
from core.store import RunStore


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    code = main(["build", "--model", "smollm2-135m", "--dataset", "linear-ni11", "--n-examples", "6",
                 "--seeds", "0-3", "--batch-size", "2", "--out", str(out), "--quiet",
                 "--regressors", "linear,knn,mean,last,gd-k1"])
    assert code == 0
    return RunStore.open(next(out.glob("*.zarr")))


def test_answers_equal_greedy_generation_of_the_raw_hf_model(embedded_store, tokenizer):
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    texts = embedded_store.llm_text()
    preds = embedded_store.predictions()[:, 0]
    for i in range(4):
        ids = torch.as_tensor(embedded_store.tokens(i), dtype=torch.long)[None]
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        reference = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert reference.startswith(texts[i]), (reference, texts[i])
        # The embedded model answers these with a number in the prompt's own zero-padded format.
        first = reference.split("\n")[0]
        assert float(first) == preds[i]


def test_converted_copy_is_the_gguf(tokenizer):
    """The tokenizer and weights the workbench loads (`core.models.converted`) are the GGUF's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.models import converted, load_model

    assert converted("model") is not None and converted("tokenizer") is not None
    path = embedded_gguf_path()
    raw_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert raw_tok.get_vocab() == tokenizer.get_vocab() and type(raw_tok) is type(tokenizer)
    text = "Feature 0: 57.21\nOutput: 0123.40\n\nFeature 0: -3.5e2 \u00e9\nOutput:"
    assert raw_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert raw_tok.decode(raw_tok(text)["input_ids"]) == tokenizer.decode(tokenizer(text)["input_ids"])
    raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = load_model("smollm2-135m").hf_model.state_dict()
    assert raw.keys() == ours.keys()
    for name in raw:
        assert torch.equal(raw[name], ours[name]), name


def test_leaderboard_cli_against_numpy(embedded_store):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["leaderboard", str(embedded_store.path), "--csv"]) == 0
    table = pd.read_csv(io.StringIO(buf.getvalue())).set_index("regressor")
    y = embedded_store.array("y_true")[:]
    x_tr, y_tr = embedded_store.array("x_train")[:], embedded_store.array("y_train")[:]
    model = embedded_store.predictions()[:, 0]
    last = y_tr[:, -1]
    assert table.loc["last", "mse_mean"] == pytest.approx(np.mean((last - y) ** 2))
    assert table.loc["last", "mae_median"] == pytest.approx(np.median(np.abs(last - y)))
    assert table.loc["model", "mse_mean"] == pytest.approx(np.nanmean((model - y) ** 2))
    ols = np.array([np.polyval(np.polyfit(x_tr[i, :, 0], y_tr[i], 1), x) for i, x in
                    enumerate(embedded_store.array("x_query")[:, 0])])
    assert table.loc["linear", "mse_mean"] == pytest.approx(np.mean((ols - y) ** 2), rel=1e-6, abs=1e-9)
    wins = np.mean(np.abs(last - y) < np.where(np.isnan(model), np.inf, np.abs(model - y)))
    assert table.loc["last", "beats_model"] == pytest.approx(wins)


def test_info_describes_the_store(embedded_store, capsys):
    assert main(["info", str(embedded_store.path)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "30 layers" in out and "4/4 done" in out
    assert "linear-ni11: 1 features, 6 examples" in out


def test_the_models_own_answer_wins_every_logit_difference(embedded_store):
    """The model's answer is its greedy choice, so at the first token where the truth
    differs from it, logit(truth) - logit(model) is negative; seeds where they agree are
    marked, not dropped."""
    from core.logit_diff import load_candidates, pair_logit_diff

    diff = pair_logit_diff(load_candidates(embedded_store), "truth", "model")
    model = embedded_store.predictions()[:, 0]
    same = np.abs(model - embedded_store.y_true()) < 0.005
    assert diff.status == ["same answer" if s else "ok" for s in same]
    assert (diff.lens[~same, -1] < 0).all() and (~same).any()


def test_export_cli_writes_the_apps_tables(embedded_store, tmp_path):
    out = tmp_path / "lens.csv"
    assert main(["export", str(embedded_store.path), "logit-lens-summary", "--pair", "truth,model",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["layer", "mean", "std", "q25", "q75", "n_seeds"]
    assert len(table) == 31  # before each of the 30 layers, and after the last
    assert main(["export", str(embedded_store.path), "no-such-table"]) == 2
    assert main(["export", str(embedded_store.path), "logit-lens", "--pair", "truth,nobody"]) == 2
