"""Build a device's model and data from an ExperimentConfig exactly as the embedded simulator does.

Equality between a Flower run and the simulator rests on both building the same frozen backbone,
the same initial prompts, the same tokenised data and the same partition: both call
:func:`fedpeptao.experiment.build_federation`, and for a baseline with its own model (LoRA,
adapters, the input-prompt methods) :func:`fedpeptao.baselines.methods.build_model` on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from fedpeptao.baselines.methods import build_model
from fedpeptao.config import ExperimentConfig, SelectionConfig
from fedpeptao.core.scoring import select_layers
from fedpeptao.models.classifier import PROMPT_PREFIX
from fedpeptao.experiment import Federation, build_federation

Tensors = dict[str, torch.Tensor]


@lru_cache(maxsize=1)
def cached_federation(experiment_json: str, model_path: str | None, data_path: str | None,
                      model_kind: str = "deep") -> Federation:
    """The last federation built in this process, keyed by everything that determines it.

    Not client state: a Flower worker that serves many simulated clients reuses the frozen backbone
    and the tokenised data, as the embedded simulator does. Every client operation first loads all
    of that client's trainable tensors into the model (or the fresh ``initial`` ones), so nothing of
    one client can leak into another's work. ``model_kind`` is a method's ``Method.model``: its
    model replaces the deep-prompt one, on the same backbone (a fresh one per kind, because LoRA
    and adapters change the backbone they are built on).
    """
    cfg = ExperimentConfig.model_validate_json(experiment_json)
    if model_path or data_path:
        cfg = cfg.model_copy(deep=True)
        if model_path:
            cfg.model.name = model_path
        if data_path:
            cfg.data = cfg.data.model_copy(update={"task": data_path, "train_file": None, "eval_file": None})
    fed = build_federation(cfg, own_data=data_path is not None)
    if model_kind == "deep":
        return fed
    model = build_model(model_kind, fed)
    return replace(fed, model=model, initial=model.trainable_state())


# -- which prompt layers travel (the server needs no model for this) ---------------------------

def layer_names(params: Tensors, layers: list[int]) -> list[str]:
    """Parameter names of the given prompt layers (``PromptedClassifier.layer_names`` from names alone)."""
    return [f"{PROMPT_PREFIX}{i}" for i in layers if f"{PROMPT_PREFIX}{i}" in params]


def head_names(params: Tensors) -> list[str]:
    return [name for name in params if not name.startswith(PROMPT_PREFIX)]


def choose_layers(sel: SelectionConfig, ranking: list[int], estimate_ratio: Callable[[], float]
                  ) -> tuple[float, list[int]]:
    """``(ratio, layers)`` under SPEC 2: explicit layers, a fixed ratio, or an estimated one.

    Same rule as ``Simulation.select``; ``estimate_ratio`` is only called for ``ratio = "auto"``.
    """
    num_layers = len(ranking)
    if sel.layers is not None:
        bad = [i for i in sel.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"selection.layers: {bad} outside 0..{num_layers - 1}")
        return len(set(sel.layers)) / num_layers, sorted(set(sel.layers))
    ratio = estimate_ratio() if sel.ratio == "auto" else float(sel.ratio)
    return ratio, select_layers(ranking, ratio)


def resolve_data_path(path: Path) -> str:
    """A node's own data must be a task folder; say so plainly otherwise."""
    if not path.is_dir():
        raise FileNotFoundError(f"node config 'data-path': {path} is not a folder with train and dev/test tables")
    return str(path.resolve())
