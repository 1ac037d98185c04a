"""`random:<spec>` models: the named shapes, seeded weights, and no weight file read."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.models import ModelUnavailable, check_spec, context_length, load_model, random_config


def test_llama_8b_shape_from_the_table_without_any_file():
    config, source = random_config("meta-llama/Llama-3.1-8B-Instruct")
    assert source.startswith("the shape table")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    d, ff, layers, vocab, kv = 4096, 14336, 32, config.vocab_size, 8 * 128
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q, o; k, v; gate, up, down; two norms
    expected = layers * per_layer + 2 * vocab * d + d  # embedding, unembedding (untied), final norm
    assert sum(p.numel() for p in model.parameters()) == expected
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape) == ((4096, 4096), (1024, 4096))
    assert model.config.rope_parameters["rope_type"] == "llama3"


def test_random_model_reads_no_weights_and_is_seeded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a random: model must not read weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    a = load_model("random:tiny-random-llama")
    b = load_model("random:tiny-random-llama")
    assert a.info["spec"] == "random:tiny-random-llama" and "random-init" in a.info["name"]
    assert a.info["n_layers"] == 2 and a.info["d_model"] == 64
    for (name, p), q in zip(a.hf_model.named_parameters(), b.hf_model.parameters()):
        assert torch.equal(p, q), name


def test_random_smollm2_has_the_embedded_models_shape():
    config, source = random_config("smollm2-135m")
    assert "GGUF" in source
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert context_length("random:smollm2-135m") == config.max_position_embeddings


def test_unknown_random_spec_is_one_line():
    with pytest.raises(ModelUnavailable) as err:
        check_spec("random:nobody/nothing")
    assert "no config of 'nobody/nothing'" in str(err.value) and "\n" not in str(err.value)
