"""The paper's methods as named presets of (algorithm, tuning): what ``fedpeptao compare`` runs.

A preset is a method and a tuning plus the few settings that method needs (``lora`` = LoRA +
FedAvg at device lr 5e-3). It is applied on top of one shared config file: when the preset's
algorithm (or tuning) differs from the file's, the file's ``method`` (``tuning``) table is
replaced by the preset's, keeping the tuning settings both tunings have (the prompt length), so
every method sees the same data, partition, seed, rounds and prompt budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeptao.config import ExperimentConfig, read_config_data, switch_table, validate_config

WEIGHT_LR = 5e-3  # device lr of LoRA and adapters (at the prompts' 0.02 they stall at the majority class)
_DEEP = "L * P * 2 * kv"


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    method: str = "fedavg"
    tuning: str = "deep_prompt"
    settings: tuple[str, ...] = ()  # further key=value settings of this preset
    shared: str = "every layer's deep prompt + head"  # what travels
    parameters: str = _DEEP  # trainable (= shared) parameters per client, without the head

    def overrides(self) -> list[str]:
        return [f"method.name={self.method}", f"tuning.name={self.tuning}", *self.settings]


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("fedpeptao", "FedPepTAO: scored layer selection, SCAFFOLD-II control variates and server momentum",
           "fedpeptao", shared="deep prompts of the selected ceil(r*L) layers + head; the rest stay on the device",
           parameters=f"{_DEEP} trained, ceil(r*L) * P * 2 * kv shared"),
    Preset("fedavg", "P-tuning v2, every layer's deep prompt shared, FedAvg"),
    Preset("fedprompt", "prompt tuning on the input only (PEFT PromptTuning), FedAvg", tuning="input_prompt",
           shared="input prompt + head", parameters="P * H"),
    Preset("lpt", "late prompt tuning: hidden-state prompt inserted at layer L//2, FedAvg", tuning="late_prompt",
           shared="late prompt + head", parameters="P * H"),
    Preset("lora", f"LoRA r=8 on the attention query/value (PEFT), FedAvg, device lr {WEIGHT_LR}", tuning="lora",
           settings=(f"client.lr={WEIGHT_LR}",), shared="LoRA A and B matrices + head",
           parameters="L * 2 * r * 2H (BERT)"),
    Preset("adapter", f"bottleneck adapter after each FFN (reduction 16), FedAvg, device lr {WEIGHT_LR}",
           tuning="adapter", settings=(f"client.lr={WEIGHT_LR}",), shared="adapters + head",
           parameters="L * (2 * H * m + m + H), m = H // 16"),
    Preset("idpg", "instance-dependent prompt generator (S-IDPG, bottleneck 32), FedAvg", tuning="idpg",
           shared="generator + head", parameters="H*m + m + m*P*H + P*H, m = 32"),
    Preset("attempt", "ATTEMPT: attention over 4 frozen random source prompts + a target prompt, FedAvg",
           tuning="attempt", shared="target prompt + attention module + head",
           parameters="P*H + (H*r + r) + (r*H + H) + 2H, r = 32"),
    Preset("fedprox", "P-tuning v2 prompts, FedProx (mu = 0.01)", "fedprox"),
    Preset("scaffold", "P-tuning v2 prompts, SCAFFOLD (option II, client control variates)", "scaffold",
           shared="prompts + head and their control variates (2x both ways)"),
    Preset("moon", "P-tuning v2 prompts, MOON (mu = 1, tau = 0.5)", "moon"),
    Preset("fedadam", "P-tuning v2 prompts, FedAdam server (Reddi et al. 2021)", "fedadam"),
    Preset("fedyogi", "P-tuning v2 prompts, FedYogi server", "fedyogi"),
    Preset("fedadagrad", "P-tuning v2 prompts, FedAdagrad server", "fedadagrad"),
    # FedPepTAO on another per-layer tuning, and its ablations (SPEC section 5)
    Preset("fedpeptao-lora", f"FedPepTAO selecting among LoRA's per-layer matrices, device lr {WEIGHT_LR}",
           "fedpeptao", "lora", (f"client.lr={WEIGHT_LR}",),
           shared="LoRA matrices of the selected layers + head", parameters="L * 2 * r * 2H (BERT)"),
    Preset("fedpeptao-all-layers", "FedPepTAO without layer selection (every layer shared)", "fedpeptao",
           settings=("method.ratio=1.0",)),
    *[Preset(f"fedpeptao-{suffix}", f"FedPepTAO {what}", "fedpeptao", settings=(setting,),
             shared="selected layers + head")
      for suffix, what, setting in [("no-cv", "without control variates", "method.use_control_variates=false"),
                                    ("no-momentum", "without server momentum", "method.use_momentum=false"),
                                    ("sgd", "with device SGD instead of AdamW", "client.optimizer=sgd"),
                                    # the stable variant where few local steps make the published form unstable
                                    ("previous", "correcting with the c_k of the previous round, as SCAFFOLD's "
                                     "clients do", "method.correction=previous")]],
]}

# The paper's comparison (SPEC section 5): FedPepTAO and the nine baselines, the server optimisers split out.
DEFAULT_PRESETS = ["fedpeptao", "fedavg", "fedprompt", "lpt", "lora", "adapter", "idpg", "attempt",
                   "fedprox", "scaffold", "moon", "fedadam", "fedyogi", "fedadagrad"]


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_config(config_path: str | Path | None, preset: Preset | str, overrides: Sequence[str] = ()
                  ) -> ExperimentConfig:
    """The config file plus ``overrides``, then the preset's algorithm, tuning and settings."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    data = read_config_data(config_path, overrides)
    for section, name in (("method", preset.method), ("tuning", preset.tuning)):
        switch_table(data, section, name)
    return validate_config(read_config_data(None, preset.settings, data))
