"""Prompts against the template text; alignment, canonicality and positions; the parser."""

import numpy as np
import pytest

from core.datasets import DATASETS, Sample
from core.prompts import NumberFormat, PromptError, build_prompts, choose_format, parse_number, prompt_text

HEADER = ('The task is to provide your best estimate for "Output". Please provide that and only that, '
          "without any additional text.\n\n\n\n\n")


def small_sample():
    return Sample(seed=0, x_train=np.array([[39.68, 1005.89], [-2.5, 7.0]]), y_train=np.array([423.53, -0.5]),
                  x_query=np.array([1.0, 12.34]), y_true=3.0)


def test_template_text_natural_and_aligned():
    s = small_sample()
    assert prompt_text(s, NumberFormat("natural")) == (
        HEADER
        + "Feature 0: 39.68\nFeature 1: 1005.89\nOutput: 423.53\n\n"
        + "Feature 0: -2.5\nFeature 1: 7.0\nOutput: -0.5\n\n"
        + "Feature 0: 1.0\nFeature 1: 12.34\nOutput: "
    )
    assert prompt_text(s, NumberFormat("aligned", (2, 4, 3))) == (
        HEADER
        + "Feature 0: 39.68\nFeature 1: 1005.89\nOutput: 423.53\n\n"
        + "Feature 0: -02.50\nFeature 1: 0007.00\nOutput: -000.50\n\n"
        + "Feature 0: 01.00\nFeature 1: 0012.34\nOutput: "
    )


def test_aligned_widths_are_the_widest_integer_part(tokenizer):
    s = small_sample()
    fmt = choose_format("aligned", [s], tokenizer)
    assert fmt.int_digits == (2, 4, 3)


@pytest.mark.parametrize("name", list(DATASETS))
def test_aligned_prompts_share_length_and_positions_and_are_canonical(name, tokenizer):
    samples = [DATASETS[name].sample(seed, 12) for seed in range(60)]
    fmt = choose_format("aligned", samples, tokenizer)
    prompts = build_prompts(samples, fmt, tokenizer)
    lengths = {len(p.tokens) for p in prompts}
    assert len(lengths) == 1
    for s, p in zip(samples, prompts):
        ids = list(p.tokens)
        text = tokenizer.decode(ids)
        assert text == p.text == prompt_text(s, fmt)
        assert list(tokenizer(text)["input_ids"]) == ids  # decode then encode: same ids
        np.testing.assert_array_equal(p.x_spans, prompts[0].x_spans)
        np.testing.assert_array_equal(p.y_spans, prompts[0].y_spans)
        # Every recorded span decodes to the value (with its leading space).
        for i, row in enumerate(np.vstack([s.x_train, s.x_query[None]])):
            for j, v in enumerate(row):
                a, b = p.x_spans[i, j]
                assert tokenizer.decode(ids[a:b]) == " " + fmt.write(v, j)
        for i, v in enumerate(s.y_train):
            a, b = p.y_spans[i]
            assert tokenizer.decode(ids[a:b]) == " " + fmt.write(v, s.x_train.shape[1])
            assert p.answer_slots[i] == a
            assert tokenizer.decode(ids[a - 2:a]) == "Output:"
        assert p.answer_slots[-1] == p.final == len(ids) - 1
        assert tokenizer.decode(ids[-3:]) == "Output: "


def test_natural_prompts_record_positions_per_seed(tokenizer):
    samples = [DATASETS["linear-ni12"].sample(seed, 6) for seed in range(10)]
    prompts = build_prompts(samples, choose_format("natural", samples, tokenizer), tokenizer)
    assert len({len(p.tokens) for p in prompts}) > 1
    for s, p in zip(samples, prompts):
        for i, v in enumerate(s.y_train):
            a, b = p.y_spans[i]
            assert tokenizer.decode(list(p.tokens[a:b])) == " " + str(float(v))


def test_unknown_format_is_refused(tokenizer):
    with pytest.raises(PromptError, match="unknown prompt format"):
        choose_format("fancy", [small_sample()], tokenizer)


@pytest.mark.parametrize("text,value", [
    ("423.53\n", 423.53),
    ("0423.53\n\nFeature 0:", 423.53),
    ("-12.5 is my guess", -12.5),
    ("  -0007.10", -7.1),
    ("The answer is 17", 17.0),
    ("12.", 12.0),
    (".5", 0.5),
    ("1,234.5", 1.0),
    ("12.3.4", 12.3),
])
def test_parser_reads_the_first_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "   ", "Output:", "I cannot answer", "\n\n", "-"])
def test_parser_gives_nan_without_digits(text):
    assert np.isnan(parse_number(text))
