"""Typed experiment configuration: one TOML/YAML file plus ``key=value`` overrides.

Every value is validated before any work starts; a bad one raises :class:`ConfigError` with a
single line naming the key (``federated.rounds: must be >= 1``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import get_args, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpeptao.algorithms import REGISTERED, REGISTRY, MethodConfig, method_config
from fedpeptao.algorithms.fedpeptao import FedPepTAOSettings
from fedpeptao.core.metrics import GENERATION_METRICS, MetricName
from fedpeptao.models.quantization import TINY_MODELS, quantization_refusal
from fedpeptao.privacy.engine import resolve_noise_multiplier, update_noise_multiplier
from fedpeptao.privacy.settings import PrivacySettings
from fedpeptao.tasks import TASKS
from fedpeptao.tunings import TUNINGS, TuningConfig
from fedpeptao.tunings.deep_prompt import DeepPromptSettings
from fedpeptao.utils.device import Precision, check_device_name
from fedpeptao.utils.round_log import tensorboard_available


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "minilm"  # builtin name, local folder or hub id
    head: str = "auto"  # the task (fedpeptao.tasks): auto is linear for encoders, lm for decoders
    max_length: int = Field(128, ge=8, le=8192)
    label_words: list[str] | None = None
    template: str | None = None
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward (long sequences)
    random_init: bool = False  # benchmarks only: model.name is an architecture (roberta-large-config, ...) built untrained
    #: the frozen backbone's linear layers quantized by bitsandbytes while it loads (fedpeptao.models.quantization):
    #: int8 (LLM.int8) or nf4 (4-bit NormalFloat); trainables and optimiser state stay fp32
    quantization: Literal["none", "int8", "nf4"] = "none"

    @field_validator("head")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        """Any task registered in :mod:`fedpeptao.tasks` (also one registered after import)."""
        if value != "auto" and value not in TASKS:
            raise ValueError(f"unknown head '{value}' (expected auto, {', '.join(TASKS)})")
        return value

    @model_validator(mode="after")
    def _quantization_fits(self) -> "ModelConfig":
        """A quantization that cannot load this backbone, refused in one line naming the key."""
        tiny = self.name if self.name in TINY_MODELS else None
        refusal = quantization_refusal(self.quantization, random_init=self.random_init, from_config=tiny)
        if refusal:
            raise ValueError(refusal)
        return self


class DataConfig(_Section):
    task: str = "rotten_tomatoes"  # bundled task, or a folder with train/dev/test files
    train_file: str | None = None
    eval_file: str | None = None  # the test split
    validation_file: str | None = None  # else a held-out share of each client's training data
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    header: bool = True  # false: the tables' first line is data; name columns by index (text_a=3, label=1)
    text_a: str | None = None
    text_b: str | None = None
    label: str | None = None
    metric: MetricName | None = None  # default: the task's (CoLA: mcc, MRPC: acc_f1), else accuracy
    #: natural: one client per value of the column ``partition_by`` (instruction data's ``subject``, ...)
    partition: Literal["paper-dirichlet", "flwr-dirichlet", "iid", "natural"] = "paper-dirichlet"
    partition_by: str | None = None
    alpha: float = Field(1.0, gt=0.0)
    size_alpha: float = Field(5.0, gt=0.0)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    #: seeds what each client holds (subsamples, partition, validation hold-out); None: the run's ``seed``.
    #: Fix it to repeat a study over seeds on one partition (``compare --seeds ... --fixed-partition``).
    partition_seed: int | None = None

    @field_validator("text_a", "text_b", "label", mode="before")
    @classmethod
    def _column_index(cls, value: Any) -> Any:
        """``data.label=1`` names column 1 of a headerless table."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _natural_has_its_column(self) -> "DataConfig":
        """``partition_by`` is read by the natural partition only: one without the other is a
        mistake (a forgotten key, or a column silently ignored), refused in one line."""
        if self.partition == "natural" and not self.partition_by:
            raise ValueError("data.partition_by: data.partition=natural needs the column whose values are the "
                             "clients (e.g. data.partition_by=subject)")
        if self.partition_by is not None and self.partition != "natural":
            raise ValueError(f"data.partition_by: only data.partition=natural reads a column (data.partition is "
                             f"{self.partition})")
        return self


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
    group_by_length: bool = True  # batches of similar lengths, in a seeded order the round's clients share


class ServerConfig(_Section):
    """Runtime-wide server settings, whatever the algorithm: update validation and averaging."""

    validate_updates: bool = True
    max_update_norm: float | None = Field(None, gt=0.0)  # reject a client whose change is larger (L2)
    aggregation: Literal["weighted_mean", "median", "trimmed_mean"] = "weighted_mean"
    trim_ratio: float = Field(0.1, ge=0.0, lt=0.5)


class GenerationConfig(_Section):
    """Evaluation by generating (``model.head=generate``): greedy decoding."""

    max_new_tokens: int = Field(16, ge=1, le=2048)
    batch_size: int = Field(16, ge=1)


class CheckpointConfig(_Section):
    every: int = Field(10, ge=0)  # rounds between checkpoints; 0 = only the final state
    keep: int = Field(3, ge=1)


class ExperimentConfig(_Section):
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    progress: bool = True
    tensorboard: bool = False  # also write round metrics to RUN_DIR/tensorboard (needs the tensorboard package)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps
    precision: Precision = "fp32"  # the frozen backbone's dtype; trainables, optimiser and server stay fp32
    #: simulator: ``batched`` trains up to ``clients_per_pass`` clients in the same forward/backward
    #: passes over the one backbone; ``sequential`` one client after another; ``auto``: batched on
    #: an accelerator, sequential on a CPU (whose matmul rate does not grow with the rows of a pass)
    execution: Literal["auto", "batched", "sequential"] = "auto"
    clients_per_pass: int = Field(10, ge=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federated: FederatedConfig = FederatedConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    method: MethodConfig = FedPepTAOSettings()  # the federated algorithm and its settings (method.name)
    tuning: TuningConfig = DeepPromptSettings()  # what trains on the frozen backbone (tuning.name)
    checkpoint: CheckpointConfig = CheckpointConfig()
    generation: GenerationConfig = GenerationConfig()
    privacy: PrivacySettings = PrivacySettings()  # client-level differential privacy (privacy.mode)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        """Only the name's form: whether this machine has the device is checked where the model is
        placed (``resolve_device``), so a machine that only reads the config accepts ``device=cuda``."""
        return check_device_name(value)

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_a_folder(cls, value: str) -> str:
        """An existing file (or a path through one) cannot hold run directories: refused here, in one
        line, not as a NotADirectoryError when the run starts. A folder that does not exist yet is fine."""
        path = Path(value).expanduser()
        for candidate in (path, *path.parents):
            try:
                exists, folder = candidate.exists(), candidate.is_dir()
            except OSError:  # unreadable here (permissions): left to the run that writes it
                break
            if exists:
                if not folder:
                    where = "" if candidate == path else f" ({candidate} is a file)"
                    raise ValueError(f"output_dir: {value} is not a folder{where}; name a folder for the run "
                                     f"directories")
                break
        return value

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, value: bool) -> bool:
        if value and not tensorboard_available():
            raise ValueError("the tensorboard package is not installed (pip install 'fedpeptao[tensorboard]')")
        return value

    @model_validator(mode="after")
    def _method_fits(self) -> "ExperimentConfig":
        method, tuning = self.method, self.tuning
        if self.server.aggregation != "weighted_mean" and not method.robust_averaging:
            raise ValueError(f"server.aggregation: {self.server.aggregation} does not apply to {method.name}, whose "
                             f"server step weights clients by data size")
        generative = self.model.head in TASKS and TASKS[self.model.head].generative
        if self.data.metric is not None and generative != (self.data.metric in GENERATION_METRICS):
            fits = ", ".join(GENERATION_METRICS) if generative else "a classification metric"
            raise ValueError(f"data.metric: {self.data.metric} does not score model.head={self.model.head} (use {fits})")
        if generative and tuning.name in ("idpg", "attempt"):
            raise ValueError(f"tuning.name: {tuning.name} builds its prompt from the whole sequence, which in "
                             f"instruction tuning holds the answer it is trained to predict")
        if method.needs_layer_groups and not tuning.per_layer:
            per_layer = ", ".join(n for n in TUNINGS if _tuning_class(n).per_layer)
            raise ValueError(f"tuning.name: {method.name} selects among per-layer groups, which {tuning.name} does not "
                             f"have (use {per_layer})")
        return self

    @model_validator(mode="after")
    def _natural_partition_fits(self) -> "ExperimentConfig":
        """Only instruction data keeps the other columns a natural partition reads; classification
        tables keep text and label alone, so it is refused before any data is read."""
        if self.data.partition == "natural" and not (self.model.head in TASKS and TASKS[self.model.head].generative):
            generative = ", ".join(n for n, t in TASKS.items() if t.generative)
            raise ValueError(f"data.partition: natural reads a column of instruction data (model.head={generative}); "
                             f"classification data keeps none (use iid, paper-dirichlet or flwr-dirichlet)")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> "ExperimentConfig":
        """Secure aggregation with what needs one client's update, refused before any work (one line)."""
        privacy, method = self.privacy, self.method
        if not privacy.secure_aggregation:
            return self
        if method.secure_aggregation_refusal:
            raise ValueError(f"privacy.secure_aggregation: {method.secure_aggregation_refusal}")
        if self.server.aggregation != "weighted_mean":
            raise ValueError(f"server.aggregation: {self.server.aggregation} needs every client's update, but under "
                             f"privacy.secure_aggregation the server learns only their sum (use weighted_mean)")
        if self.server.max_update_norm is not None:
            raise ValueError("server.max_update_norm: under privacy.secure_aggregation the server sees no single "
                             "update to bound; unset it (privacy.mode=central or distributed clips on the devices)")
        refusal = privacy.secagg.refusal(self.federated.clients_per_round)
        if refusal:
            raise ValueError(refusal)
        devices_noise = privacy.mode in ("local", "distributed")
        if privacy.enabled and not privacy.adaptive and not (devices_noise and self.private_releases()):
            clip_norm = float(privacy.clip_norm)  # (a refused selection is _privacy_fits' line)
            per_round = self.federated.clients_per_round
            share = {"central": 0.0, "local": 1.0, "distributed": per_round ** -0.5}[privacy.mode]
            needed = clip_norm * (1.0 + 6.0 * share * self.noise_multiplier())
            if privacy.secagg.clipping_range < needed:
                raise ValueError(f"privacy.secagg.clipping_range: {privacy.secagg.clipping_range:g} is below the "
                                 f"clipped update plus 6 std of a device's noise ({needed:.3g}); a device whose "
                                 f"value falls outside it leaves the round")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> "ExperimentConfig":
        """DP settings that cannot work with the rest, refused before any work (one line each)."""
        privacy, method, fed = self.privacy, self.method, self.federated
        if not privacy.enabled:
            return self
        if method.dp_refusal:
            raise ValueError(f"privacy.mode: {method.dp_refusal}")
        if self.server.aggregation != "weighted_mean":
            raise ValueError(f"server.aggregation: {self.server.aggregation} cannot run under privacy.mode="
                             f"{privacy.mode}; the noise is calibrated to the sum of clipped updates (use weighted_mean)")
        releases = self.private_releases()
        if privacy.mode in ("local", "distributed") and releases:
            raise ValueError(f"privacy.selection: {method.name} under privacy.mode={privacy.mode} needs "
                             f"privacy.selection=public (its layer scores and Hessian ratio are not noised on the "
                             f"devices)")
        z = resolve_noise_multiplier(privacy, fed.num_clients, fed.clients_per_round, fed.rounds, releases)
        if privacy.adaptive:
            update_noise_multiplier(z, privacy.resolved_count_stddev(fed.clients_per_round))
        return self

    def data_seed(self) -> int:
        """The seed of what each client holds: ``data.partition_seed``, else the run's ``seed``."""
        return self.seed if self.data.partition_seed is None else self.data.partition_seed

    def private_releases(self) -> int:
        """Selection releases the accountant counts (none unless central DP privatises them)."""
        if not self.privacy.enabled or self.privacy.public_selection:
            return 0
        return self.method.private_releases()

    def noise_multiplier(self) -> float:
        """The run's noise multiplier: ``privacy.noise_multiplier`` or the one solved for its target."""
        fed = self.federated
        return resolve_noise_multiplier(self.privacy, fed.num_clients, fed.clients_per_round, fed.rounds,
                                        self.private_releases())

    def describe(self) -> str:
        """``method`` / ``tuning`` in one word each, for run names and logs."""
        return self.method.name if self.tuning.name == "deep_prompt" else f"{self.method.name}-{self.tuning.name}"


def _tuning_class(name: str) -> type:
    from fedpeptao.tunings.base import REGISTRY  # noqa: PLC0415

    return REGISTRY[name][0]


# Keys that moved: refused in one line naming the new key (fedpeptao < 0.2 configs).
MOVED_KEYS = {
    "algorithm": "method.name",
    "selection": "method.* (ratio, layers, warmup_rounds, hessian_clients, lanczos_iters, share_head, ...)",
    "model.num_prompt_tokens": "tuning.num_prompt_tokens",
    "model.prompt_dropout": "tuning.prompt_dropout",
    **{f"server.{key}": f"method.{new}" for key, new in [
        ("lr", "server_lr"), ("lr_decay", "lr_decay"), ("lr_min", "lr_min"), ("momentum", "momentum"),
        ("variant", "variant"), ("use_control_variates", "use_control_variates"),
        ("use_momentum", "use_momentum")]},
}


def _check_moved(data: dict[str, Any]) -> None:
    for old, new in MOVED_KEYS.items():
        section, _, key = old.partition(".")
        node = data.get(section)
        if (not key and section in data) or (key and isinstance(node, dict) and key in node):
            raise ConfigError(f"{old}: moved to {new}")
    if isinstance(data.get("selection"), dict):
        raise ConfigError("selection: moved to method.*")


def _fill_names(data: dict[str, Any]) -> None:
    """``method.mu=0.1`` alone means the default method's mu; give the union its tag."""
    for section, default, known in (("method", "fedpeptao", tuple(REGISTRY)), ("tuning", "deep_prompt", TUNINGS)):
        node = data.get(section)
        if isinstance(node, dict):
            node.setdefault("name", default)
            if node["name"] not in known:
                raise ConfigError(f"{section}.name: unknown {section} {node['name']!r}; choose from {', '.join(known)}")


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
    if len(parts) == 2 and parts[1] == "name" and parts[0] in SECTION_DEFAULTS:
        # `method.mu=0.1 method.name=fedprox` names the table being filled; only an explicit other name resets
        switch_table(data, parts[0], value, implicit_default=False)
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


SECTION_DEFAULTS = {"method": "fedpeptao", "tuning": "deep_prompt"}


def switch_table(data: dict[str, Any], section: str, name: Any, implicit_default: bool = True) -> None:
    """Point ``method`` or ``tuning`` at ``name``. Another algorithm starts from its own defaults;
    another tuning keeps the settings it shares (the prompt length). ``implicit_default``: a table
    without ``name`` is the default's (else it is taken to be ``name``'s already)."""
    table = data.get(section) if isinstance(data.get(section), dict) else {}
    current = table.get("name", SECTION_DEFAULTS[section] if implicit_default else name)
    if current == name:
        return
    kept = {}
    if section == "tuning":
        from fedpeptao.tunings.base import REGISTRY  # noqa: PLC0415

        fields = REGISTRY[name][0].model_fields if name in REGISTRY else {}
        kept = {k: v for k, v in table.items() if k != "name" and k in fields}
    data[section] = {"name": name, **kept}


def _first_error(exc: ValidationError, data: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
    if loc and loc[0] in ("method", "tuning") and len(loc) > 1 and loc[1] in (*REGISTRY, *TUNINGS):
        tag = loc.pop(1)  # the union's tag: method.fedprox.mu -> method.mu
        if err["type"] == "extra_forbidden":
            return f"{'.'.join(loc)}: not a setting of {tag}"
    key = ".".join(loc)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if re.match(r"^[a-z_]+\.[a-z_]+: ", message) or (key and message.startswith(f"{key}: ")):
        return message  # a validator that names its key
    return f"{key}: {message}" if key else message


def read_config_data(path: str | Path | None = None, overrides: Sequence[str] = (),
                     data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain data of a config file (or ``data``) with ``key=value`` overrides applied, unvalidated."""
    data = data if data is not None else (_read_file(Path(path)) if path is not None else {})
    for override in overrides:
        _apply_override(data, override)
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, merge and validate; raises ConfigError (one line, naming the key)."""
    return validate_config(read_config_data(path, overrides))


def validate_config(data: dict[str, Any]) -> ExperimentConfig:
    """A config from plain data (a file's or a checkpoint's); ConfigError names the key."""
    _check_moved(data)
    _fill_names(data)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, data)) from None


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def _accept_registered_methods() -> None:
    """Rebuild the config's ``method`` section when an algorithm registers after import."""
    field = ExperimentConfig.model_fields["method"]
    field.annotation, field.discriminator = get_args(method_config())[0], "name"
    ExperimentConfig.model_rebuild(force=True)


REGISTERED.append(_accept_registered_methods)
