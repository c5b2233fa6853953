"""Build a device's model, data and algorithm from an ExperimentConfig exactly as the simulator does.

Equality between a Flower run and the simulator rests on both building the same frozen backbone,
the same initial tuning tensors, the same tokenised data, the same partition and the same
algorithm: both call :func:`fedpeptao.experiment.build_federation` and
:func:`fedpeptao.experiment.device_algorithm`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fedpeptao.algorithms import Algorithm
from fedpeptao.config import ExperimentConfig
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.experiment import Federation, build_federation, device_algorithm, public_selection_data


@lru_cache(maxsize=1)
def cached_federation(experiment_json: str, model_path: str | None, data_path: str | None
                      ) -> tuple[Federation, Algorithm]:
    """The last federation (and its algorithm's device side) built in this process, keyed by
    everything that determines it.

    Not client state: a Flower worker that serves many simulated clients reuses the frozen backbone
    and the tokenised data, as the embedded simulator does. Every client operation first loads all
    of that client's trainable tensors into the model, and the algorithm's device hooks are pure
    functions of the message and the client's own state, so nothing of one client can leak into
    another's work.
    """
    cfg = ExperimentConfig.model_validate_json(experiment_json)
    if model_path or data_path:
        cfg = cfg.model_copy(deep=True)
        if model_path:
            cfg.model.name = model_path
        if data_path:
            cfg.data = cfg.data.model_copy(update={"task": data_path, "train_file": None, "eval_file": None})
    fed = build_federation(cfg, own_data=data_path is not None)
    return fed, device_algorithm(cfg, fed)


@lru_cache(maxsize=1)
def cached_public_data(experiment_json: str, model_path: str | None, data_path: str | None
                       ) -> tuple[EncodedDataset, np.ndarray] | None:
    """``privacy.public_data`` encoded for the cached federation's model, read once per process."""
    fed, _ = cached_federation(experiment_json, model_path, data_path)
    return public_selection_data(fed.cfg, fed)


def resolve_data_path(path: Path) -> str:
    """A node's own data must be a task folder; say so plainly otherwise."""
    if not path.is_dir():
        raise FileNotFoundError(f"node config 'data-path': {path} is not a folder with train and dev/test tables")
    return str(path.resolve())
