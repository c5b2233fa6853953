"""Crash-safe checkpoints of a federated run: a :data:`~fedpeptao.utils.state.State` on disk.

Layout: ``RUN_DIR/checkpoints/round-00042/{tensors.safetensors, state.json}``: the state after
round 42 (rounds are numbered from 1, as everywhere a user reads them); a resumed run continues
with round 43.

Why this shape:

* **No pickle, no codec.** A checkpoint may be copied between machines and users; ``torch.load``
  of a pickle runs arbitrary code. A State is already a flat dict of tensors (to safetensors) and
  a JSON-able dict (to JSON); its owners say how their state maps onto the two
  (:mod:`fedpeptao.utils.state`).
* **Atomic.** A checkpoint is written into a hidden temporary directory, flushed to disk, then
  moved into place with one ``os.replace``. A crash at any point leaves either the old set of
  checkpoints or the old set plus the complete new one, never a half-written ``round-*``.
* **Verified.** ``state.json`` records the SHA-256 and size of the tensor file, the tensors' names
  (in order) and the SHA-256 of its own body, so a truncated, bit-flipped or hand-edited
  checkpoint is detected on load; :func:`load_latest_checkpoint` then falls back to the previous
  good one with a warning, and raises :class:`CheckpointError` (naming every directory tried and
  why it was refused) only when none is usable.
* **Shared tensors stored once.** The same tensor under two names (simulated clients that have
  not trained since they received the same tensors) is written once and comes back as one object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = "fedpeptao-checkpoint"
VERSION = 2
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_OLD_FILES = ("meta.json", "state.safetensors")  # format 1 (a type-tagged codec), no longer read
_ROUND_DIR = re.compile(r"^round-(\d+)$")
_REQUIRED = ("round", "tensors_sha256", "tensors_bytes", "tensors", "same_as", "state")


class CheckpointError(RuntimeError):
    """No usable checkpoint (or a state that cannot be stored); the message says where and why."""


# -- save / load --------------------------------------------------------------------------------

def save_checkpoint(
    run_dir: Path, round_number: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
    keep: int | None = 3
) -> Path:
    """Write the State ``(tensors, meta)`` as ``run_dir/checkpoints/round-{round_number:05d}``,
    atomically, and return its path.

    ``round_number`` orders checkpoints: the number of the last completed round (from 1), so a
    resume continues with round ``round_number + 1``. ``meta`` must be JSON-able. After the
    write, checkpoints of *later* rounds are deleted (they belong to a timeline abandoned by a
    resume) and only the newest ``keep`` are kept (``None``: all).
    """
    if round_number < 0:
        raise ValueError(f"round_number must be >= 0, got {round_number}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"round-{round_number:05d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            state = json.loads(json.dumps(meta))  # normalise (tuples -> lists, keys -> str) before hashing
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the state's JSON part cannot be stored ({exc}); tensors belong in its "
                                  "tensor dict") from None
        stored, same_as = _storable(tensors)
        tensor_path = tmp / TENSORS_FILE
        save_file(stored, str(tensor_path))
        _fsync_file(tensor_path)
        body = {
            "format": FORMAT, "version": VERSION, "round": round_number,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tensors_file": TENSORS_FILE, "tensors_sha256": _sha256_file(tensor_path),
            "tensors_bytes": tensor_path.stat().st_size, "tensors": list(tensors), "same_as": same_as,
            "state": state,
        }
        body["body_sha256"] = _meta_digest(body)
        state_path = tmp / STATE_FILE
        state_path.write_text(json.dumps(body, indent=1), encoding="utf-8")
        _fsync_file(state_path)
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _prune(root, round_number, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every ``round-*`` directory, oldest first (validity not checked)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ROUND_DIR.match(p.name))]
    return sorted(found)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify one checkpoint directory: ``(round, tensors, meta)``, the tensors in the
    order they were saved; raise :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    state_path, tensor_path = path / STATE_FILE, path / TENSORS_FILE
    if not state_path.is_file():
        if any((path / name).is_file() for name in _OLD_FILES):
            raise CheckpointError(f"{path}: written by an older fedpeptao in checkpoint format 1, which this version "
                                  f"no longer reads (format {VERSION}); start the run again, or finish it with the "
                                  "version that wrote it")
        raise CheckpointError(f"{path}: {STATE_FILE} is missing")
    try:
        body = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {STATE_FILE} is not valid JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {STATE_FILE} is not a {FORMAT} file")
    if body.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {body.get('version')} is not supported (expected {VERSION})")
    recorded = body.pop("body_sha256", None)
    if recorded != _meta_digest(body):
        raise CheckpointError(f"{path}: {STATE_FILE} checksum mismatch (file was edited or damaged)")
    missing = [key for key in _REQUIRED if key not in body]
    if missing:
        raise CheckpointError(f"{path}: {STATE_FILE} lacks {', '.join(missing)}")
    match = _ROUND_DIR.match(path.name)
    if match and int(match.group(1)) != body["round"]:
        raise CheckpointError(f"{path}: directory name says round {int(match.group(1))}, {STATE_FILE} says "
                              f"{body['round']}")
    if not tensor_path.is_file():
        raise CheckpointError(f"{path}: {TENSORS_FILE} is missing")
    size = tensor_path.stat().st_size
    if size != body["tensors_bytes"]:
        raise CheckpointError(f"{path}: {TENSORS_FILE} has {size} bytes, expected {body['tensors_bytes']} (truncated?)")
    if _sha256_file(tensor_path) != body["tensors_sha256"]:
        raise CheckpointError(f"{path}: {TENSORS_FILE} checksum mismatch (file is damaged)")
    try:
        stored = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {TENSORS_FILE} cannot be read ({exc})") from None
    same_as = body["same_as"]
    if set(stored) != set(body["tensors"]) - set(same_as) or not set(same_as.values()) <= set(stored):
        raise CheckpointError(f"{path}: {TENSORS_FILE} does not hold the tensors {STATE_FILE} names")
    tensors = {name: stored[same_as.get(name, name)] for name in body["tensors"]}
    return int(body["round"]), tensors, body["state"]


def load_latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint that verifies, falling back past bad ones with a logged warning.

    Bad checkpoints are left on disk (evidence); the next :func:`save_checkpoint` of an equal or
    earlier round removes or replaces them.
    """
    root = Path(run_dir) / "checkpoints"
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoints in {root}")
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
    if all("checkpoint format 1" in p for p in problems):
        raise CheckpointError(f"{root}: every checkpoint was written by an older fedpeptao in checkpoint format 1, "
                              f"which this version no longer reads; start the run again, or finish it with the "
                              "version that wrote it")
    raise CheckpointError(f"no usable checkpoint in {root}:\n  " + "\n  ".join(problems))


# -- helpers ------------------------------------------------------------------------------------

def _storable(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU and contiguous tensors, and ``{name: earlier name}`` for a tensor stored under an
    earlier name already (the same tensor twice); other tensors that share memory are copied
    (safetensors refuses aliased storage)."""
    out: dict[str, torch.Tensor] = {}
    same_as: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"tensor '{name}' is a {type(t).__name__}; non-tensor values belong in the JSON part")
        t = t.detach()
        if t.untyped_storage().nbytes():
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                    t.dtype)
            if view in views:
                same_as[name] = views[view]
                continue
            views[view] = name
        t = t.cpu().contiguous()
        if t.untyped_storage().nbytes():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            storages.add(ptr)
        out[name] = t
    return out, same_as


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
