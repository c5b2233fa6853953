"""Crash-safe checkpoints of a federated run: safetensors for tensors, JSON for everything else.

Layout: ``RUN_DIR/checkpoints/round-00042/{state.safetensors, meta.json}``.

Why this shape:

* **No pickle.** A checkpoint may be copied between machines and users; ``torch.load`` of a pickle
  runs arbitrary code. Tensors go to safetensors, the rest (scalars, lists, optimiser
  hyper-parameters, RNG states) to JSON through :func:`flatten_state`, which has a closed set of
  types and refuses anything else.
* **Atomic.** A checkpoint is written into a hidden temporary directory, flushed to disk, then
  moved into place with one ``os.replace``. A crash at any point leaves either the old set of
  checkpoints or the old set plus the complete new one, never a half-written ``round-*``.
* **Verified.** ``meta.json`` records the SHA-256 of the safetensors file and of its own body, so
  a truncated, bit-flipped or hand-edited checkpoint is detected on load; :func:`load_latest_checkpoint`
  then falls back to the previous good one with a warning, and raises :class:`CheckpointError`
  (naming every directory tried and why it was refused) only when none is usable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = "fedpeptao-checkpoint"
VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "meta.json"
_ROUND_DIR = re.compile(r"^round-(\d+)$")
_REQUIRED = ("round", "tensors_sha256", "tensors_bytes", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint (or a state that cannot be stored); the message says where and why."""


# -- nested state <-> (tensors, JSON) ----------------------------------------------------------

def flatten_state(nested: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into named tensors and a JSON-able skeleton referring to them.

    Carries: dicts (any JSON-scalar keys, so an optimiser's ``{int: {...}}`` state survives),
    lists, tuples (``random.getstate()``), ``None``/bool/int/str, floats including NaN/Inf,
    bytes, NumPy arrays and scalars (any fixed-size dtype, e.g. an MT19937 ``uint32`` key) and
    torch tensors (any dtype, 0-d included; moved to CPU, ``requires_grad`` is not kept).

    The same tensor object reachable twice (simulated clients that have not trained yet share
    their initial tensors) is stored once and comes back as one shared object.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}

    def name_for(path: list[str]) -> str:
        base = "/".join(path) or "root"
        name, n = base, 1
        while name in tensors:
            name, n = f"{base}~{n}", n + 1
        return name

    def enc(obj: Any, path: list[str]) -> Any:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                name = name_for(path)
                tensors[name] = obj.detach().cpu()
                seen[id(obj)] = name
            return {"__tensor__": seen[id(obj)]}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError(f"{'/'.join(path)}: NumPy object arrays cannot be stored without pickle")
            name = name_for(path)
            tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy())
            return {"__ndarray__": name, "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return {"__npscalar__": obj.dtype.str, "value": enc(obj.item(), path)}
        if isinstance(obj, bytes):
            return {"__bytes__": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, [*path, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: enc(v, [*path, k]) for k, v in obj.items()}
            for k in obj:
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise TypeError(f"{'/'.join(path)}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            return {"__dict__": [[k, enc(v, [*path, str(k)])] for k, v in obj.items()]}
        raise TypeError(f"{'/'.join(path) or 'state'}: values of type {type(obj).__name__} cannot be stored "
                        "(convert to dicts, lists, numbers, arrays or tensors)")

    return tensors, enc(nested, [])


def unflatten_state(tensors: Mapping[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of :func:`flatten_state`; raises :class:`CheckpointError` if a referenced tensor is missing."""
    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"checkpoint metadata refers to tensor '{name}', which the tensor file lacks")
        return tensors[name]

    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__tensor__" in obj:
            return tensor(obj["__tensor__"])
        if "__ndarray__" in obj:
            raw = tensor(obj["__ndarray__"]).numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if "__npscalar__" in obj:
            return np.dtype(obj["__npscalar__"]).type(dec(obj["value"]))
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__bytes__" in obj:
            return base64.b64decode(obj["__bytes__"])
        if "__tuple__" in obj:
            return tuple(dec(v) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: dec(v) for k, v in obj["__dict__"]}
        return {k: dec(v) for k, v in obj.items()}

    return dec(meta)


# -- RNG states -------------------------------------------------------------------------------

def capture_rng_state(generator: np.random.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy (global and ``generator``), torch CPU and CUDA RNG states; storable by :func:`flatten_state`."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_global": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["numpy_generator"] = generator.bit_generator.state
    return state


def restore_rng_state(state: Mapping[str, Any], generator: np.random.Generator | None = None) -> None:
    """Put back what :func:`capture_rng_state` took. CUDA states are restored only when the device
    count matches (a run resumed on a CPU machine simply continues with fresh CUDA RNGs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy_global"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None:
        if "numpy_generator" not in state:
            raise CheckpointError("checkpoint has no NumPy generator state to restore")
        generator.bit_generator.state = state["numpy_generator"]


# -- save / load --------------------------------------------------------------------------------

def save_checkpoint(
    run_dir: Path, round_index: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], keep: int | None = 3
) -> Path:
    """Write ``run_dir/checkpoints/round-{round_index:05d}`` atomically and return its path.

    ``meta`` must be JSON-able (use :func:`flatten_state` for anything richer). ``round_index``
    orders checkpoints; the simulator's convention should be "the last completed round", resuming
    at ``round_index + 1``. After the write, checkpoints of *later* rounds are deleted (they belong
    to a timeline abandoned by a resume) and only the newest ``keep`` are kept (``None``: all).
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"round-{round_index:05d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensor_path = tmp / TENSORS_FILE
        save_file(_storable(tensors), str(tensor_path))
        _fsync_file(tensor_path)
        body = {
            "format": FORMAT, "version": VERSION, "round": round_index,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tensors_file": TENSORS_FILE, "tensors_sha256": _sha256_file(tensor_path),
            "tensors_bytes": tensor_path.stat().st_size, "num_tensors": len(tensors),
            "meta": json.loads(json.dumps(meta)),  # normalise (tuples -> lists, keys -> str) before hashing
        }
        body["meta_sha256"] = _meta_digest(body)
        meta_path = tmp / META_FILE
        meta_path.write_text(json.dumps(body, indent=1), encoding="utf-8")
        _fsync_file(meta_path)
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _prune(root, round_index, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every ``round-*`` directory, oldest first (validity not checked)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ROUND_DIR.match(p.name))]
    return sorted(found)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify one checkpoint directory; raise :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    meta_path, tensor_path = path / META_FILE, path / TENSORS_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: {META_FILE} is missing")
    try:
        body = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {META_FILE} is not a {FORMAT} file")
    if body.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {body.get('version')} is not supported (expected {VERSION})")
    recorded = body.pop("meta_sha256", None)
    if recorded != _meta_digest(body):
        raise CheckpointError(f"{path}: {META_FILE} checksum mismatch (file was edited or damaged)")
    missing = [key for key in _REQUIRED if key not in body]
    if missing:
        raise CheckpointError(f"{path}: {META_FILE} lacks {', '.join(missing)}")
    match = _ROUND_DIR.match(path.name)
    if match and int(match.group(1)) != body["round"]:
        raise CheckpointError(f"{path}: directory name says round {int(match.group(1))}, {META_FILE} says {body['round']}")
    if not tensor_path.is_file():
        raise CheckpointError(f"{path}: {TENSORS_FILE} is missing")
    size = tensor_path.stat().st_size
    if size != body["tensors_bytes"]:
        raise CheckpointError(f"{path}: {TENSORS_FILE} has {size} bytes, expected {body['tensors_bytes']} (truncated?)")
    if _sha256_file(tensor_path) != body["tensors_sha256"]:
        raise CheckpointError(f"{path}: {TENSORS_FILE} checksum mismatch (file is damaged)")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {TENSORS_FILE} cannot be read ({exc})") from None
    return int(body["round"]), tensors, body["meta"]


def load_latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint that verifies, falling back past bad ones with a logged warning.

    Bad checkpoints are left on disk (evidence); the next :func:`save_checkpoint` of an equal or
    earlier round removes or replaces them.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoints in {Path(run_dir) / 'checkpoints'}")
    problems = []
    for _, path in reversed(found):
        try:
            result = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("refusing checkpoint %s; trying an earlier one", exc)
            continue
        if problems:
            log.warning("resuming from %s (round %d) instead of a newer, damaged checkpoint", path, result[0])
        return result
    raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}:\n  " + "\n  ".join(problems))


# -- helpers ------------------------------------------------------------------------------------

def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses aliased storage)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"tensor '{name}' is a {type(t).__name__}; use flatten_state for non-tensor values")
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().nbytes():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            storages.add(ptr)
        out[name] = t
    return out


def _meta_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """``os.replace`` cannot replace a non-empty directory, so an existing one is set aside first
    and put back if the move fails."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Clean up after an earlier save that crashed (one writer per run directory is assumed).

    A half-written ``.tmp-*`` is deleted. A ``.old-round-*`` set aside for replacement whose
    replacement never arrived is put back; otherwise it is deleted.
    """
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-"):
            original = root / p.name[len(".old-"):].rsplit("-", 1)[0]
            if _ROUND_DIR.match(original.name) and not original.exists():
                os.replace(p, original)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, current: int, keep: int | None) -> None:
    found = list_checkpoints(root.parent)
    stale = [p for r, p in found if r > current]
    kept = [p for r, p in found if r <= current]
    if keep is not None:
        stale += kept[:-keep]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
