"""The model's own answer: batched greedy decoding with a KV cache.

The prefill is one forward pass over the whole prompt (the pass the activation
cache hooks into); decoding then feeds one token per step from the cache until
every sequence has written a complete number (or `max_new_tokens`).
"""

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from core.models import LoadedModel

# A number followed by something that cannot continue it: the answer is complete.
_COMPLETE = re.compile(r"\s*-?\d+(?:\.\d+)?(?=[^\d.])|\s*-?\d+\.(?=[^\d])|\s*\D*\n")


@dataclass
class Timing:
    """Seconds spent in prefill and in decoding (accumulated over calls)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_steps: int = 0
    batches: list[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[Int[Tensor, "b T"], Int[Tensor, "b T"]]:
    """Returns left-padded ids and the attention mask (all ones when lengths agree)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def prefill(model: LoadedModel, ids: Int[Tensor, "b T"], mask: Int[Tensor, "b T"],
            ) -> tuple[Float[Tensor, "b vocab"], DynamicCache]:
    """Runs the prompt forward once; returns the last position's logits and the KV cache.

    Only the last position is unembedded (`logits_to_keep=1`): the full [b, T, vocab]
    logits would cost a fifth of the prefill's compute and gigabytes of memory.
    """
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # Without padding the mask says nothing, so none is passed and HF lets SDPA take its
    # causal path (measured: no change in peak memory on the CPU, see core/memory.py).
    padded = bool((mask == 0).any())
    out = model.hf_model(input_ids=ids.to(model.device),
                         attention_mask=mask.to(model.device) if padded else None,
                         position_ids=position_ids.to(model.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values


def answer_complete(text: str) -> bool:
    """True when `text` already holds a whole number (or gave up with a newline)."""
    return _COMPLETE.match(text) is not None


class NumberGrammar:
    """The answers an aligned run's format can write: an optional minus sign, `int_digits`
    digits, a point and two decimals. `mask(text)` says which tokens keep `text` on that
    pattern (multi-digit tokens too), so a decoder restricted to it always writes a
    number: the readout that gives an untrained model an answer to compare."""

    def __init__(self, model: LoadedModel, int_digits: int) -> None:
        tokenizer = model.tokenizer
        self.width = int_digits + 3
        self.eos = tokenizer.eos_token_id
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.vocab_size = int(model.hf_model.get_output_embeddings().weight.shape[0])  # the logits' width
        self.device = model.device
        strings = {i: tokenizer.convert_tokens_to_string([t]) for i, t in enumerate(vocab) if t is not None}
        self.pieces = {i: s for i, s in strings.items() if s and set(s) <= set("-0123456789.")}
        self._masks: dict[str, Tensor] = {}

    def _shape(self, text: str) -> str | None:
        """Returns `text` as its pattern (sign, D per digit, points) or None off the pattern."""
        body = text.removeprefix("-")
        want = "D" * (self.width - 3) + ".DD"
        if len(body) > len(want) or body.count("-"):
            return None
        got = "".join("D" if c.isdigit() else c for c in body)
        return ("-" if text.startswith("-") else "") + got if want.startswith(got) else None

    def complete(self, text: str) -> bool:
        shape = self._shape(text)
        return shape is not None and len(shape.removeprefix("-")) == self.width

    def mask(self, text: str) -> Tensor:
        """Returns the [vocab] boolean mask of tokens allowed after `text` (EOS once complete)."""
        shape = self._shape(text)
        if shape not in self._masks:
            m = torch.zeros(self.vocab_size, dtype=torch.bool)
            if shape is not None and self.complete(text):
                m[self.eos] = True
            else:
                ok = [i for i, piece in self.pieces.items() if self._shape(text + piece) is not None]
                m[ok] = True
            self._masks[shape] = m.to(self.device)
        return self._masks[shape]


@dataclass
class Decoded:
    """A batch's greedy answers, the KV cache the decoding left and the prompts' mask."""

    texts: list[str]
    cache: DynamicCache
    prompt_mask: Int[Tensor, "b T"]


@torch.inference_mode()
def greedy_answers(model: LoadedModel, prompts: list[np.ndarray], max_new_tokens: int,
                   timing: Timing | None = None, capture: tuple | None = None) -> Decoded:
    """Returns each prompt's greedy continuation as text (stopped once a number is complete).

    `capture=(recorder, positions, box)` records the prefill's activations at `positions`
    (in left-padded coordinates) into `box["out"]` (see `core.capture.Recorder`).
    """
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    t0 = time.perf_counter()
    if capture is None:
        logits, cache = prefill(model, ids, mask)
    else:
        recorder, positions, box = capture
        with recorder.record(positions, mask.to(model.device)) as got:
            logits, cache = prefill(model, ids, mask)
        box.update(got)
    _sync(model.device)
    t1 = time.perf_counter()
    mask = prompt_mask = mask.to(model.device)
    positions = mask.sum(-1, keepdim=True) - 1
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                generated[i].append(t)
                done[i] = t == tok.eos_token_id or answer_complete(tok.decode(generated[i]))
        if all(done) or len(generated[0]) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions + 1
        out = model.hf_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1].float(), out.past_key_values
    _sync(model.device)
    if timing is not None:
        timing.prefill_s += t1 - t0
        timing.decode_s += time.perf_counter() - t1
        timing.prefill_tokens += int(ids.numel())
        timing.decode_steps += len(generated[0])
        timing.batches.append(len(prompts))
    return Decoded([tok.decode(g, skip_special_tokens=True) for g in generated], cache, prompt_mask)
