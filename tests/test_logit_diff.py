"""Candidates, logit lens and head scores against an independent computation with the raw HF model."""

import itertools

import numpy as np
import pytest
import torch

from cache_builder.build import BuildSpec, build
from core.logit_diff import load_candidates, pair_logit_diff
from core.store import RunStore

REGS = ["mean", "last", "linear", "knn"]


@pytest.fixture(scope="module")
def natural_store(tmp_path_factory):
    # Natural format: prompts of different lengths, so the batch is left-padded.
    spec = BuildSpec("tiny-random-llama", "linear-ni12", 5, [0, 1, 2], prompt_format="natural",
                     regressors=REGS, batch_size=3)
    return RunStore.open(build(spec, tmp_path_factory.mktemp("lens"), progress=False))


@pytest.fixture(scope="module")
def reference():
    from core.models import tiny_random_llama_hf

    hf = tiny_random_llama_hf()
    hf.config._attn_implementation = "eager"
    return hf.eval()


def answers(store: RunStore, i: int) -> dict[str, float]:
    values = dict(zip(store.columns, store.predictions()[i]))
    return {"truth": store.y_true()[i], **{r: values[r] for r in REGS}}


def test_candidate_tokens_are_the_answers_written_naturally(natural_store, tokenizer):
    c = load_candidates(natural_store)
    for i in range(3):
        for name, value in answers(natural_store, i).items():
            want = tokenizer.encode(str(float(round(value, 2))), add_special_tokens=False)
            got = c.tokens[i, c.index(name)]
            assert got[got >= 0].tolist() == want


def test_logit_lens_and_answer_logprob_equal_the_raw_model(natural_store, reference, tokenizer):
    c = load_candidates(natural_store)
    n_layers = reference.config.num_hidden_layers
    w_u = reference.lm_head.weight
    checked = 0
    for a, b in itertools.combinations(["truth", *REGS], 2):
        diff = pair_logit_diff(c, a, b)
        for i in range(3):
            vals = answers(natural_store, i)
            ta = tokenizer.encode(str(float(round(vals[a], 2))), add_special_tokens=False)
            tb = tokenizer.encode(str(float(round(vals[b], 2))), add_special_tokens=False)
            if ta == tb:
                assert diff.status[i] == "same answer" and np.isnan(diff.lens[i]).all()
                continue
            k = next(j for j, (x, y) in enumerate(zip(ta, tb)) if x != y)
            prompt = natural_store.tokens(i).tolist()
            with torch.inference_mode():
                out = reference(torch.tensor([prompt + ta[:k]]), output_hidden_states=True)
                want = [float(((reference.model.norm(h[0, -1]) if layer < n_layers else h[0, -1])
                               @ (w_u[ta[k]] - w_u[tb[k]]))) for layer, h in enumerate(out.hidden_states)]
                logprob = {}
                for name, seq in ((a, ta), (b, tb)):
                    lp = torch.log_softmax(reference(torch.tensor([prompt + seq])).logits[0].float(), -1)
                    logprob[name] = float(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(seq)))
            assert diff.status[i] == "ok" and diff.step[i] == k
            np.testing.assert_allclose(diff.lens[i], want, rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(diff.lens[i, -1], float(out.logits[0, -1, ta[k]] - out.logits[0, -1, tb[k]]),
                                       rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(diff.answer_logprob[i], logprob[a] - logprob[b], rtol=1e-3, atol=1e-4)
            # The components add up to the final difference.
            total = diff.embed[i] + diff.attn[i].sum() + diff.mlp[i].sum()
            np.testing.assert_allclose(total, diff.lens[i, -1], rtol=1e-3, atol=1e-4)
            checked += 1
    assert checked >= 10


def test_head_scores_equal_the_raw_models_attention(natural_store, reference):
    from core.heads import HEAD_SCORES

    scores = natural_store.root["summary/head_scores"][:]
    for i in range(3):
        tokens = natural_store.tokens(i)
        with torch.inference_mode():
            att = reference(torch.tensor([tokens.tolist()]), output_attentions=True).attentions
        att = torch.stack(att)[:, 0].numpy()  # [L, H, T, T]
        slots = natural_store.root["positions/answer_slots"][i]
        ys = natural_store.root["positions/y"][i]
        xs = natural_store.root["positions/x"][i].reshape(-1, 2)
        final = att[:, :, slots[-1]]
        y_tok = [t for a, b in ys for t in range(a + 1, b)]
        x_tok = [t for a, b in xs for t in range(a + 1, b)]
        prev = np.mean([att[:, :, p, p - 1] for p in slots], 0)
        ind = [sum(att[:, :, p, q + 1] for q in range(p) if tokens[q] == tokens[p])
               for p in slots if (tokens[:p] == tokens[p]).any()]
        want = {"answer_values": final[..., y_tok].sum(-1), "feature_values": final[..., x_tok].sum(-1),
                "previous_token": prev, "induction": np.mean(ind, 0)}
        for j, name in enumerate(HEAD_SCORES):
            np.testing.assert_allclose(scores[i, j], want[name], atol=2e-3, err_msg=name)


def test_summaries_are_the_stored_activations_summarised_in_numpy(natural_store):
    """The builder summarises on the device before the copy, from left-padded batch rows
    (a batch of 3 prompts of different lengths); each summary must be that seed's stored
    activations summarised by plain numpy, pads and all."""
    store = natural_store
    lengths = [len(store.tokens(i)) for i in range(len(store.seeds))]
    assert len(set(lengths)) > 1  # some rows of a batch were padded
    for i in range(len(store.seeds)):
        tokens = store.tokens(i)
        rows = store.root["acts/attn_rows"][i].astype(np.float64)  # [L, H, P, T]
        slots = store.root["positions/answer_slots"][i]
        y_tok = [t for a, b in store.root["positions/y"][i] for t in range(a + 1, b)]
        x_tok = [t for a, b in store.root["positions/x"][i].reshape(-1, 2) for t in range(a + 1, b)]
        final = rows[:, :, -1]
        induction = [sum(rows[:, :, p, q + 1] for q in range(pos) if tokens[q] == tokens[pos])
                     for p, pos in enumerate(slots) if (tokens[:pos] == tokens[pos]).any()]
        want = [final[..., y_tok].sum(-1), final[..., x_tok].sum(-1),
                np.mean([rows[:, :, p, pos - 1] for p, pos in enumerate(slots)], 0),
                np.mean(induction, 0) if induction else np.zeros(rows.shape[:2])]
        np.testing.assert_allclose(store.root["summary/head_scores"][i], np.stack(want), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(store.root["summary/final_resid"][i],
                                      store.root["acts/resid"][i][:, -1].astype(np.float32))
        mlp = store.root["acts/mlp_out"][i].astype(np.float64)
        np.testing.assert_allclose(store.root["summary/mlp_norm"][i], np.sqrt((mlp ** 2).sum(-1)), rtol=1e-5)


def test_a_pair_with_a_failed_answer_is_marked_not_hidden(natural_store):
    c = load_candidates(natural_store)
    diff = pair_logit_diff(c, "truth", "model")
    failed = np.isnan(natural_store.predictions()[:, 0])
    for i in range(3):
        if failed[i]:
            assert diff.status[i] == "b has no answer" and np.isnan(diff.lens[i]).all()
