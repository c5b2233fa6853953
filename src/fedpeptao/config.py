"""Typed experiment configuration: one TOML/YAML file plus ``key=value`` overrides.

Every value is validated before any work starts; a bad one raises :class:`ConfigError` with a
single line naming the key (``federated.rounds: must be >= 1``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpeptao.utils.round_log import tensorboard_available


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "minilm"  # builtin name, local folder or hub id
    head: Literal["auto", "linear", "mlm", "lm"] = "auto"  # auto: linear for encoders, lm for decoders
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(128, ge=8, le=8192)
    label_words: list[str] | None = None
    template: str | None = None


class DataConfig(_Section):
    task: str = "rotten_tomatoes"  # bundled task, or a folder with train/dev/test files
    train_file: str | None = None
    eval_file: str | None = None
    text_a: str | None = None
    text_b: str | None = None
    label: str | None = None
    partition: Literal["paper-dirichlet", "flwr-dirichlet", "iid"] = "paper-dirichlet"
    alpha: float = Field(1.0, gt=0.0)
    size_alpha: float = Field(5.0, gt=0.0)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)


class FederatedConfig(_Section):
    num_clients: int = Field(100, ge=1)
    clients_per_round: int = Field(10, ge=1)
    rounds: int = Field(100, ge=1)
    eval_every: int = Field(1, ge=1)
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _sampled_within_total(self) -> "FederatedConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})")
        return self


class ClientConfig(_Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(4e-2, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    reset_optimizer: bool = False


class ServerConfig(_Section):
    lr: float = Field(0.05, gt=0.0)
    lr_decay: float = Field(0.99, gt=0.0, le=1.0)
    lr_min: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    variant: Literal["plain", "reference"] = "plain"
    use_control_variates: bool = True
    use_momentum: bool = True
    validate_updates: bool = True
    max_update_norm: float | None = Field(None, gt=0.0)  # reject a client whose change is larger (L2)
    aggregation: Literal["weighted_mean", "median", "trimmed_mean"] = "weighted_mean"
    trim_ratio: float = Field(0.1, ge=0.0, lt=0.5)


class CheckpointConfig(_Section):
    every: int = Field(10, ge=0)  # rounds between checkpoints; 0 = only the final state
    keep: int = Field(3, ge=1)


class SelectionConfig(_Section):
    ratio: float | Literal["auto"] = "auto"  # share top ceil(ratio*L) layers; auto = Hessian eigen-density
    layers: list[int] | None = None  # explicit shared layers (overrides ratio)
    score_batch_size: int = Field(8, ge=2)
    warmup_rounds: int = Field(10, ge=0)
    hessian_clients: int = Field(3, ge=1)
    lanczos_iters: int = Field(50, ge=2)
    share_head: bool = True

    @model_validator(mode="after")
    def _ratio_range(self) -> "SelectionConfig":
        if isinstance(self.ratio, float) and not 0.0 < self.ratio <= 1.0:
            raise ValueError("ratio must be in (0, 1] or 'auto'")
        return self


class ExperimentConfig(_Section):
    algorithm: Literal["fedavg", "fedpeptao"] = "fedavg"
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    progress: bool = True
    tensorboard: bool = False  # also write round metrics to RUN_DIR/tensorboard (needs the tensorboard package)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federated: FederatedConfig = FederatedConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    selection: SelectionConfig = SelectionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, value: bool) -> bool:
        if value and not tensorboard_available():
            raise ValueError("the tensorboard package is not installed (pip install 'fedpeptao[tensorboard]')")
        return value

    @model_validator(mode="after")
    def _robust_only_with_fedavg(self) -> "ExperimentConfig":
        if self.algorithm == "fedpeptao" and self.server.aggregation != "weighted_mean":
            raise ValueError("server.aggregation: median/trimmed_mean apply to fedavg; FedPepTAO's step averages by data size")
        return self


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}': expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}" if key else message


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, merge and validate; raises ConfigError (one line, naming the key)."""
    data = _read_file(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
