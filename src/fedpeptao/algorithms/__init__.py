"""Federated algorithms, one module each, behind one protocol (:mod:`fedpeptao.algorithms.base`):
``fedpeptao``, ``fedavg``, ``fedprox``, ``scaffold``, ``moon`` and ``fedopt`` (``fedadam``,
``fedyogi``, ``fedadagrad``). The runtimes create one with :func:`make_algorithm` and never name
a method."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from fedpeptao.algorithms import fedavg, fedopt, fedpeptao, fedprox, moon, scaffold  # noqa: F401
from fedpeptao.algorithms.base import REGISTERED, REGISTRY, Algorithm, AlgorithmSettings, ServerContext

METHODS = tuple(REGISTRY)  # the built-in methods


def method_config():
    """The typed ``method`` section: one settings class per registered algorithm, by ``name``."""
    settings = tuple(dict.fromkeys(cls.settings_class for cls in REGISTRY.values()))
    return Annotated[Union[settings], Field(discriminator="name")]  # noqa: UP007


MethodConfig = method_config()


def make_algorithm(settings: AlgorithmSettings, ctx: ServerContext, initial) -> Algorithm:
    """A fresh algorithm (server state at its start) of ``settings.name``."""
    return REGISTRY[settings.name](settings, ctx, initial)


__all__ = ["METHODS", "REGISTRY", "method_config", "Algorithm", "AlgorithmSettings", "MethodConfig", "ServerContext", "make_algorithm"]
