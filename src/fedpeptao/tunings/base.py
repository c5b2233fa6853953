"""What a tuning is: which tensors of a frozen backbone train (PEFT's tuners are the model).

A tuning is a settings class (``tuning.*`` in a config, discriminated by ``tuning.name``) beside a
``build(settings, model, task, generator, seed)`` function that returns a
:class:`~fedpeptao.models.tuned.TunedModel` subclass holding the tuning's tensors. It knows nothing
of heads: the task (:mod:`fedpeptao.tasks`) is attached afterwards. Registered with
:func:`register_tuning`, so the config and the experiment builder find every tuning without naming one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

Builder = Callable[..., object]
REGISTRY: dict[str, tuple[type, Builder]] = {}


class TuningSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    #: whether the tuning's tensors come in per-layer groups (what FedPepTAO selects among)
    per_layer: ClassVar[bool] = False


def register_tuning(settings_class: type[TuningSettings]) -> Callable[[Builder], Builder]:
    """Decorator for a tuning's ``build(settings, model, task, generator, seed)``."""
    def wrap(build: Builder) -> Builder:
        REGISTRY[settings_class.model_fields["name"].default] = (settings_class, build)
        return build

    return wrap
