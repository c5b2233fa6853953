"""What trains on the frozen backbone, one module per tuning (settings class + ``build``):
``deep_prompt`` (P-tuning v2, the default), ``input_prompt``, ``late_prompt``, ``lora``,
``adapter``, ``idpg``, ``attempt``. Any tuning runs with any algorithm of
:mod:`fedpeptao.algorithms` (FedPepTAO needs one with per-layer groups)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from fedpeptao.tunings import adapter, attempt, deep_prompt, idpg, input_prompt, late_prompt, lora  # noqa: F401
from fedpeptao.tunings.base import REGISTRY, TuningSettings

TUNINGS = tuple(REGISTRY)
TuningConfig = Annotated[Union[tuple(settings for settings, _ in REGISTRY.values())],  # noqa: UP007
                         Field(discriminator="name")]


def build_tuning(settings: TuningSettings, model, head: str, num_labels: int, label_word_ids: list[int] | None,
                 seed: int):
    """The prompted classifier of ``settings`` around ``model`` (the frozen backbone)."""
    _, build = REGISTRY[settings.name]
    return build(settings, model, head, num_labels, label_word_ids, seed)


__all__ = ["TUNINGS", "TuningConfig", "TuningSettings", "build_tuning"]
