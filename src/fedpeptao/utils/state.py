"""What resumes a run: a flat dict of tensors plus a JSON-able dict.

Everything that must continue exactly after a restart (an algorithm, a client, the round engine)
gives its state as a :data:`State`, ``(tensors, meta)``:

* ``tensors``: a flat ``{name: Tensor}``; the owner chooses the names, grouping them with
  ``/`` (``params/<name>``, ``momentum/<name>``, ``client_control/<cid>/<name>``);
* ``meta``: a dict of JSON values only (numbers, strings, booleans, None, lists, dicts with
  string keys). It comes back as JSON reads it: tuples as lists, keys as strings.

and takes it back with ``load_state(tensors, meta)`` (or a ``from_state`` constructor).
:func:`join` composes the states of several owners into one, each under its section name, and
:func:`split` takes them apart again; :mod:`fedpeptao.utils.checkpoint` writes a State to disk.
There is no type-tagged encoding: an owner that holds something else (an optimiser's nested
state, an RNG) says itself how it maps onto tensors and JSON.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: ``(tensors, meta)``: flat named tensors, and a JSON-able dict
State = tuple[dict[str, Tensor], dict[str, Any]]


def add_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` named ``<prefix>/<name>``."""
    return {f"{prefix}/{name}": t for name, t in tensors.items()}


def take_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors named ``<prefix>/<name>``, as ``{name: tensor}`` (in their order)."""
    start = f"{prefix}/"
    return {name[len(start):]: t for name, t in tensors.items() if name.startswith(start)}


def join(sections: Mapping[str, State]) -> State:
    """One State of several: section ``s``'s tensors named ``s/<name>``, its meta under ``meta[s]``."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for name, (section_tensors, section_meta) in sections.items():
        if "/" in name:
            raise ValueError(f"section name {name!r} must not contain '/'")
        tensors.update(add_prefix(name, section_tensors))
        meta[name] = section_meta
    return tensors, meta


def split(state: State) -> dict[str, State]:
    """Inverse of :func:`join`: the sections by name (every top-level key of the meta)."""
    tensors, meta = state
    sections: dict[str, State] = {name: ({}, section_meta) for name, section_meta in meta.items()}
    for full, tensor in tensors.items():  # one pass: a checkpoint may hold thousands of clients
        name, _, rest = full.partition("/")
        if name not in sections or not rest:
            raise ValueError(f"tensor '{full}' belongs to no section ({', '.join(sections) or 'none'})")
        sections[name][0][rest] = tensor
    return sections


# -- RNG states -------------------------------------------------------------------------------

def rng_state(generator: np.random.Generator | None = None) -> State:
    """Python's, NumPy's (global and ``generator``'s), torch's CPU and CUDA RNG states.

    NumPy's and Python's states are JSON (an MT19937 key as a list of ints, a PCG64 state as
    Python ints); torch's are its own ``uint8`` tensors (``torch``, ``torch_cuda/<device>``).
    """
    version, internal, gauss = random.getstate()
    numpy_global = np.random.get_state(legacy=False)
    numpy_global["state"] = {**numpy_global["state"], "key": numpy_global["state"]["key"].tolist()}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta: dict[str, Any] = {"python": [version, list(internal), gauss], "numpy_global": numpy_global}
    if generator is not None:
        meta["numpy_generator"] = generator.bit_generator.state
    return tensors, meta


def restore_rng_state(state: State, generator: np.random.Generator | None = None) -> None:
    """Put back what :func:`rng_state` took. CUDA states are restored only when the device count
    matches (a run resumed on a CPU machine simply continues with fresh CUDA RNGs)."""
    tensors, meta = state
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_global = dict(meta["numpy_global"])
    numpy_global["state"] = {**numpy_global["state"], "key": np.asarray(numpy_global["state"]["key"], np.uint32)}
    np.random.set_state(numpy_global)
    torch.set_rng_state(tensors["torch"])
    cuda = take_prefix(tensors, "torch_cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda[str(i)] for i in range(len(cuda))])
    if generator is not None:
        if "numpy_generator" not in meta:
            raise ValueError("the state has no NumPy generator state to restore")
        generator.bit_generator.state = meta["numpy_generator"]


__all__ = ["State", "add_prefix", "join", "restore_rng_state", "rng_state", "split", "take_prefix"]
