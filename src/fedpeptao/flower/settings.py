"""Typed views of Flower's two string-keyed configs: the run config and a SuperNode's node config.

The run config (``[tool.flwr.app.config]`` in ``flower_app/pyproject.toml``, overridable with
``flwr run -c``) names the same :class:`~fedpeptao.config.ExperimentConfig` file the embedded
simulator reads (``method.*`` and ``tuning.*`` choose the algorithm, as on the command line),
plus the few knobs only a real network needs (timeouts, quorum, where the server checkpoints).
The node config
(``flower-supernode --node-config``) says which data this node holds and where it keeps its state.
Everything is validated up front so a typo fails the run at once, naming the key, rather than in
round 37.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeptao.config import ConfigError, ExperimentConfig, load_config

# Run-config keys (they must also appear, with defaults, in flower_app/pyproject.toml: `flwr run -c`
# only overrides keys the app declares).
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",  # ExperimentConfig file (TOML/YAML) on the SuperLink host; "" = built-in defaults
    "overrides": "",  # "key=value; key=value" applied on top, as on the command line
    "output-dir": "",  # where the ServerApp writes results; "" = <output_dir>/<run_name or flower-RUNID>
    "checkpoint-dir": "",  # where the ServerApp checkpoints and, restarted, continues from; "" = <output-dir>
    "round-timeout": 600.0,  # seconds to wait for replies in one phase of a round
    "min-replies": 1,  # a round updates the global prompts only when at least this many clients reply
    "min-nodes": 0,  # nodes to wait for before starting; 0 = federated.num_clients
    "node-wait-timeout": 300.0,  # seconds to wait for min-nodes, then start with those present
}


def _split_overrides(text: str) -> list[str]:
    """``"a=1; b.c=x"`` or one override per line -> ``["a=1", "b.c=x"]``."""
    return [part.strip() for line in text.splitlines() for part in line.split(";") if part.strip()]


def _number(run_config: Mapping[str, Any], key: str, kind: type, minimum: float) -> Any:
    value = run_config.get(key, RUN_CONFIG_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"run config '{key}': expected a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise ConfigError(f"run config '{key}': expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"run config '{key}': must be >= {minimum}, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class ServerSettings:
    """What the ServerApp needs: the experiment plus deployment-only limits."""

    experiment: ExperimentConfig
    output_dir: Path
    checkpoint_dir: Path
    round_timeout: float
    min_replies: int
    min_nodes: int
    node_wait_timeout: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], run_id: int) -> ServerSettings:
        unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise ConfigError(f"run config '{unknown[0]}': unknown key (known: {', '.join(RUN_CONFIG_DEFAULTS)})")
        path = str(run_config.get("config", "")).strip()
        overrides = _split_overrides(str(run_config.get("overrides", "")))
        cfg = load_config(Path(path).expanduser() if path else None, overrides)
        output = str(run_config.get("output-dir", "")).strip()
        default_dir = Path(cfg.output_dir) / (cfg.run_name or f"flower-{run_id}")
        output_dir = Path(output).expanduser() if output else default_dir
        checkpoints = str(run_config.get("checkpoint-dir", "")).strip()
        checkpoint_dir = Path(checkpoints).expanduser() if checkpoints else output_dir
        min_nodes = _number(run_config, "min-nodes", int, 0) or cfg.federated.num_clients
        return cls(cfg, output_dir, checkpoint_dir, _number(run_config, "round-timeout", float, 1.0),
                   _number(run_config, "min-replies", int, 1), min_nodes,
                   _number(run_config, "node-wait-timeout", float, 0.0))


def default_state_root() -> Path:
    """Node-local state lives beside Flower's own files unless the node config says otherwise."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "fedpeptao-state"


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode's identity and local resources, from ``--node-config``.

    ``partition-id``/``num-partitions``: this node is client ``partition-id`` of the experiment's
    partition (the node holds the whole data set and keeps its part, as flwr-datasets does).
    ``data-path``: instead, a task folder (train + dev/test tables) holding only this node's data;
    then ``client-id`` (or ``partition-id``) names the client. ``model-path`` points the backbone at a
    local copy; ``state-dir`` (``""`` or ``none`` to disable) is where personal prompts and optimiser
    state are kept on disk so a restarted node continues; ``num-threads`` sets torch's CPU threads.
    """

    client_id: int
    partition: int | None  # None: the node's own data set, all of it
    data_path: Path | None
    model_path: str | None
    state_dir: Path | None
    num_threads: int

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: ExperimentConfig) -> NodeSettings:
        def integer(key: str) -> int | None:
            value = node_config.get(key)
            if value is None or value == "":
                return None
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"node config '{key}': expected an integer, got {value!r}") from None

        partition, num_partitions, client = integer("partition-id"), integer("num-partitions"), integer("client-id")
        data = str(node_config.get("data-path", "") or "").strip()
        if data:
            client = client if client is not None else partition
            if client is None:
                raise ConfigError("node config: 'data-path' needs 'client-id' (or 'partition-id') to name this client")
            partition = None
        else:
            if partition is None:
                raise ConfigError("node config: set 'partition-id' and 'num-partitions' "
                                  "(or 'data-path' and 'client-id')")
            total = cfg.federated.num_clients
            if num_partitions is not None and num_partitions != total:
                raise ConfigError(f"node config 'num-partitions' ({num_partitions}) differs from the experiment's "
                                  f"federated.num_clients ({total})")
            if not 0 <= partition < total:
                raise ConfigError(f"node config 'partition-id' ({partition}) outside 0..{total - 1}")
            client = partition
        if client < 0:
            raise ConfigError(f"node config 'client-id' must be >= 0, got {client}")
        state = node_config.get("state-dir")
        state_dir = default_state_root() if state is None else (
            None if str(state).strip().lower() in ("", "none") else Path(str(state)).expanduser())
        threads = integer("num-threads") or 1
        model = str(node_config.get("model-path", "") or "").strip() or None
        return cls(client, partition, Path(data).expanduser() if data else None, model, state_dir, threads)
