"""What trains on the frozen backbone, one module per tuning (settings class + ``build``):
``deep_prompt`` (P-tuning v2, the default), ``input_prompt``, ``late_prompt``, ``lora``,
``adapter``, ``idpg``, ``attempt``. Any tuning runs with any task of :mod:`fedpeptao.tasks` and any
algorithm of :mod:`fedpeptao.algorithms` (FedPepTAO needs one with per-layer groups)."""

from __future__ import annotations

from typing import Annotated, Union

import torch
from pydantic import Field

from fedpeptao.models.tuned import TunedModel
from fedpeptao.tasks import Task
from fedpeptao.tunings import adapter, attempt, deep_prompt, idpg, input_prompt, late_prompt, lora  # noqa: F401
from fedpeptao.tunings.base import REGISTRY, TuningSettings

TUNINGS = tuple(REGISTRY)
TuningConfig = Annotated[Union[tuple(settings for settings, _ in REGISTRY.values())],  # noqa: UP007
                         Field(discriminator="name")]


def build_model(settings: TuningSettings, model, task: Task, seed: int) -> TunedModel:
    """The tuning of ``settings`` around ``model`` (the frozen backbone), read by ``task``.

    One generator seeded by ``seed`` initialises the tuning's tensors first and the task's head
    after them, so a run's initial tensors depend on the seed alone.
    """
    _, build = REGISTRY[settings.name]
    generator = torch.Generator().manual_seed(seed)
    tuned = build(settings, model, task, generator, seed)
    tuned.attach_task(generator)
    return tuned


__all__ = ["TUNINGS", "TuningConfig", "TuningSettings", "build_model"]
