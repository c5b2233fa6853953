"""Loading frozen backbones: builtin offline models, local checkpoints and hub ids (SPEC section 6).

``load_backbone(name_or_path, head)`` accepts

- a builtin name (:data:`~fedpeptao.models.builtin.BUILTIN_MODELS`: ``"minilm"``, ``"smollm2-135m"``);
- ``"tiny-<arch>"`` (``tiny-bert``, ``tiny-roberta``, ``tiny-gpt2``, ``tiny-llama``): random-weight
  models for smoke tests (:mod:`fedpeptao.models.tiny`), never for claims about accuracy;
- a local directory holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer), or a
  directory/file holding a single ``.gguf`` (loaded dequantised, not cached);
- a Hugging Face hub id (``roberta-large``, ``gpt2-large``, ``openlm-research/open_llama_3b``), served
  from the usual Hugging Face cache, downloaded only where the hub is reachable.

Every failure to find or load a model is a :class:`ModelError` with a one-line message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
)

from fedpeptao.models.builtin import (
    BUILTIN_MODELS,
    ModelError,
    ModelKind,
    _first_line,
    _gguf_model,
    _NotFound,
    _quiet_transformers,
    resolve_builtin,
)
from fedpeptao.models.quantization import bitsandbytes_config, check_quantized, quantization_refusal
from fedpeptao.tasks import TASKS



@dataclass
class Backbone:
    model: transformers.PreTrainedModel  # frozen later by the caller; float32 by default
    tokenizer: transformers.PreTrainedTokenizerBase  # always has a pad token
    kind: ModelKind
    name: str


# model_type families (config.model_type). Anything else is decided from the config / architectures.
DECODER_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "ctrl", "opt", "bloom", "falcon",
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma",
    "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "starcoder2", "granite", "cohere", "smollm3",
    "mpt", "persimmon", "xglm", "biogpt",
})


ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "albert", "electra",
    "deberta", "deberta-v2", "mpnet", "ernie", "modernbert", "megatron-bert", "data2vec-text", "nezha",
    "roformer", "luke", "funnel", "squeezebert", "mobilebert", "layoutlm",
})


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?$")


def infer_kind(config: PretrainedConfig) -> ModelKind:
    """Encoder (BERT/RoBERTa family) or decoder (GPT-2/LLaMA family), from a model config."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"encoder-decoder models ({config.model_type}) are not supported; use an encoder or a decoder")
    model_type = getattr(config, "model_type", "") or ""
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ENCODER_TYPES:
        return "encoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "encoder"
    from transformers.models.auto.modeling_auto import (  # noqa: PLC0415
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    causal, masked = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal and not masked:
        return "decoder"
    if masked and not causal:
        return "encoder"
    raise ModelError(f"cannot tell whether model type '{model_type}' is an encoder or a decoder")


def default_head(kind: ModelKind) -> str:
    """The classification rule a model kind gets unless the user picks one."""
    return "lm" if kind == "decoder" else "linear"


def check_head(kind: ModelKind, head: str, name: str) -> None:
    """A registered task that can read a model of this kind, or a ModelError naming the fix."""
    if head not in TASKS:
        raise ModelError(f"unknown head '{head}' (expected one of {', '.join(TASKS)})")
    if kind not in TASKS[head].kinds:
        fits = " or ".join(f"'{other}'" for other, task in TASKS.items() if kind in task.kinds)
        needs = " or ".join(TASKS[head].kinds)
        raise ModelError(f"'{name}' is {_article(kind)} {kind}: head='{head}' needs {_article(needs)} {needs} "
                         f"(use head={fits})")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


#: the transformers class a task's backbone loads as
MODEL_CLASSES = {"base": AutoModel, "masked_lm": AutoModelForMaskedLM, "causal_lm": AutoModelForCausalLM}


def model_class(head: str):
    return MODEL_CLASSES[TASKS[head].backbone_class]


def _finish_tokenizer(tokenizer, model, kind: ModelKind):
    """Pad token (decoders: eos), a finite model_max_length, and the model's pad id to match."""
    if tokenizer.pad_token is None:
        if kind == "decoder" and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelError(f"tokenizer of '{model.name_or_path}' has no pad, eos or unk token")
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**7):
        tokenizer.model_max_length = int(limit)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _sdpa_or_eager(build):
    """``build(attn_implementation)`` with PyTorch's fused attention, or eager attention for an
    architecture that has no sdpa implementation."""
    try:
        return build("sdpa")
    except ValueError as error:
        if "sdpa" not in str(error).lower():
            raise
        return build("eager")


def _from_pretrained(cls, source: str, name: str, head: str, dtype: torch.dtype, quantization: str = "none",
                     device: str | torch.device | None = None, **kwargs):
    """``cls.from_pretrained`` with sdpa, float32, and a ModelError for random (missing) weights.

    ``quantization`` (``int8``, ``nf4``): bitsandbytes quantizes the linear layers while they load,
    on ``device`` (a quantized model is placed where it loads, not moved afterwards).
    """
    if quantization != "none":
        kwargs["quantization_config"] = bitsandbytes_config(quantization, dtype)
        kwargs["device_map"] = {"": str(device or "cpu")}
    with _quiet_transformers():
        model, info = _sdpa_or_eager(lambda attention: cls.from_pretrained(
            source, dtype=dtype, attn_implementation=attention, output_loading_info=True, **kwargs))
    missing = sorted(k for k in (info.get("missing_keys") or ()) if not k.startswith("pooler."))
    check_quantized(model, quantization, name)
    if missing:
        what = {"masked_lm": "masked-LM head", "causal_lm": "language-model head"}.get(TASKS[head].backbone_class,
                                                                                     "weights")
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(f"'{name}' has no {what} for head='{head}': checkpoint lacks {len(missing)} "
                         f"weights ({shown})")
    return model


def _load_checkpoint(source: str, name: str, head: str, dtype: torch.dtype, quantization: str = "none",
                     device: str | torch.device | None = None, **hub_kwargs) -> Backbone:
    """Load a checkpoint folder or hub id (``hub_kwargs`` go to every from_pretrained call)."""
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as error:
        raise _NotFound(f"'{name}' is not a loadable model: {_first_line(error)}") from None
    except (ValueError, KeyError) as error:
        raise ModelError(f"'{name}' is not a loadable model: {_first_line(error)}") from None
    kind = infer_kind(config)
    head = default_head(kind) if head == "auto" else head
    check_head(kind, head, name)
    try:
        model = _from_pretrained(model_class(head), source, name, head, dtype, quantization, device, **hub_kwargs)
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"'{name}' could not be loaded: {_first_line(error)}") from None
    model.eval()
    return Backbone(model, _finish_tokenizer(tokenizer, model, kind), kind, name)


def _load_gguf(path: Path, name: str, head: str, dtype: torch.dtype) -> Backbone:
    """A single GGUF file, dequantised at load time (not cached; builtins are)."""
    head = "lm" if head == "auto" else head
    if head != "lm":
        raise ModelError(f"'{name}': GGUF checkpoints load as decoders only (head='lm')")
    try:
        model = _gguf_model(path.parent, path.name, dtype)
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
        raise ModelError(f"'{name}' could not be loaded from GGUF: {_first_line(error)}") from None
    kind = infer_kind(model.config)
    check_head(kind, head, name)
    model.eval()
    return Backbone(model, _finish_tokenizer(tokenizer, model, kind), kind, name)


def _looks_like_path(text: str) -> bool:
    """Not a hub id (``name`` or ``owner/name``): absolute, relative-dotted, home, nested or a file name."""
    if text.startswith(("/", ".", "~")) or "\\" in text or text.endswith(".gguf"):
        return True
    return not _HUB_ID.match(text)


def load_backbone(name_or_path: str | os.PathLike, head: str = "linear",
                  dtype: torch.dtype = torch.float32, quantization: str = "none",
                  device: str | torch.device | None = None) -> Backbone:
    """Load a frozen-to-be backbone and its tokenizer as the task ``head`` reads it.

    The task's ``backbone_class`` picks the transformers class: ``linear`` loads the base model
    (``AutoModel``) for a small trainable head on top, ``mlm`` ``AutoModelForMaskedLM`` (encoders
    whose checkpoint has the MLM head weights), ``lm`` ``AutoModelForCausalLM`` (decoders);
    ``head="auto"``: linear for encoders, lm for decoders. The kind is inferred from the config.

    ``quantization`` (``model.quantization``: ``none``, ``int8``, ``nf4``): the linear layers are
    quantized by bitsandbytes while they load (:mod:`fedpeptao.models.quantization`), on ``device``
    (default: the CPU), computing in ``dtype``; a combination that cannot work is one ModelError line.
    """
    if head not in TASKS and head != "auto":
        raise ModelError(f"unknown head '{head}' (expected one of {', '.join(TASKS)})")
    text = os.fspath(name_or_path)
    refusal = quantization_refusal(quantization)
    if refusal:
        raise ModelError(refusal)
    if text in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[text]
        head = default_head(builtin.kind) if head == "auto" else head
        check_head(builtin.kind, head, text)
        return _load_checkpoint(str(resolve_builtin(text)), text, head, dtype, quantization, device)
    if text.startswith("tiny-"):
        from fedpeptao.models.tiny import TINY_ARCHS, tiny_backbone  # noqa: PLC0415 - avoids an import cycle

        arch = text[len("tiny-"):]
        if arch in TINY_ARCHS:
            if quantization != "none":
                raise ModelError(quantization_refusal(quantization, from_config=text))
            backbone = tiny_backbone(arch, head=None if head == "auto" else head)
            backbone.model.to(dtype)
            return backbone
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                _refuse_gguf(quantization, text)
                return _load_gguf(path, text, head, dtype)
            raise ModelError(f"'{text}' is a file, not a model directory (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                _refuse_gguf(quantization, text)
                return _load_gguf(ggufs[0], text, head, dtype)
            raise ModelError(f"'{text}' is not a model directory (no config.json)")
        return _load_checkpoint(str(path), text, head, dtype, quantization, device)
    if _looks_like_path(text):
        raise ModelError(f"model path '{text}' does not exist")
    return _load_hub(text, head, dtype, quantization, device)


def _refuse_gguf(quantization: str, name: str) -> None:
    if quantization != "none":
        raise ModelError(quantization_refusal(quantization, gguf=name))


def _load_hub(model_id: str, head: str, dtype: torch.dtype, quantization: str = "none",
              device: str | torch.device | None = None) -> Backbone:
    """From the Hugging Face cache first; the network only where the hub is enabled."""
    try:
        return _load_checkpoint(model_id, model_id, head, dtype, quantization, device, local_files_only=True)
    except ModelError as error:
        cached_error = error
    from huggingface_hub import constants  # noqa: PLC0415

    names = ", ".join(BUILTIN_MODELS)
    if constants.HF_HUB_OFFLINE or not _is_missing(cached_error):
        if not _is_missing(cached_error):
            raise cached_error
        raise ModelError(f"model '{model_id}' is not available locally (not a builtin [{names}], not a local "
                         f"directory, not in the Hugging Face cache; hub access is off)")
    try:
        return _load_checkpoint(model_id, model_id, head, dtype, quantization, device)
    except ModelError as error:
        if _is_missing(error):
            raise ModelError(f"model '{model_id}' is not available locally (not a builtin [{names}], not a "
                             f"local directory, not in the Hugging Face cache) and could not be downloaded: "
                             f"{str(error).split(': ', 1)[-1]}") from None
        raise


# Architectures at paper scale, for benchmarks with random weights (no hub needed): shapes of
# roberta-large, gpt2-large, a 1.1B LLaMA (TinyLlama's) and LLaMA-7B.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "roberta-large-config": ("roberta", dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                             num_attention_heads=16, intermediate_size=4096,
                                             max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "gpt2-large-config": ("gpt2", dict(vocab_size=50257, n_embd=1280, n_layer=36, n_head=20, n_positions=1024)),
    "llama-1b-config": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)),
    "llama-7b-config": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096)),
}


def architecture_config(name: str) -> PretrainedConfig:
    """A builtin architecture's config, or a local folder's ``config.json``."""
    if name in ARCHITECTURES:
        model_type, values = ARCHITECTURES[name]
        return AutoConfig.for_model(model_type, **values)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model.random_init: '{name}' is neither a builtin architecture "
                         f"({', '.join(ARCHITECTURES)}) nor a folder with config.json")
    return AutoConfig.from_pretrained(str(path))


def load_random_backbone(name: str, head: str = "auto", dtype: torch.dtype = torch.float32, seed: int = 0
                         ) -> Backbone:
    """Any transformers architecture built from its config with random weights, for benchmarks only.

    The tokenizer is the folder's when it has one, else MiniLM's (its 30,522 ids fit every
    builtin architecture's vocabulary): the text is real, the model's knowledge is not.
    """
    config = architecture_config(name)
    kind = infer_kind(config)
    head = default_head(kind) if head == "auto" else head
    check_head(kind, head, name)
    path = Path(name).expanduser()
    source = str(path) if path.is_dir() and any(path.glob("tokenizer*")) else str(resolve_builtin("minilm"))
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"model.random_init: the tokenizer's {len(tokenizer)} ids exceed '{name}''s vocabulary "
                         f"of {config.vocab_size}")
    torch.manual_seed(seed)
    model = _sdpa_or_eager(lambda attention: model_class(head).from_config(config, dtype=dtype,
                                                                              attn_implementation=attention))
    model.eval()
    return Backbone(model, _finish_tokenizer(tokenizer, model, kind), kind, f"{name} (random weights)")


def _is_missing(error: ModelError) -> bool:
    """Did loading fail because the files are absent (rather than broken or unsuitable)?"""
    return isinstance(error, _NotFound)
