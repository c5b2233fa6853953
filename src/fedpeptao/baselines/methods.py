"""The baseline registry and the simulation that runs a baseline exactly like FedPepTAO.

A *method* is (how the trainable part of the model is built, what travels, client-side hooks,
server rule). :class:`BaselineSimulation` is a :class:`~fedpeptao.sim.simulator.Simulation`:
backbone, data, tokenisation, partition, seed, client sampling (the same ``rng`` draws), local
training (:func:`~fedpeptao.core.federation.client_round` and
:func:`~fedpeptao.core.client.local_train`), update validation, evaluation, metrics, time and byte
accounting are the simulator's own code. It changes only

- the model, rebuilt on the same backbone after the simulator has built its default one (the
  default one *is* the P-tuning v2 model, kept as is for the prompt-based optimisers);
- :meth:`train_round`, which wraps each client's ``client_round`` in the rule's client hooks and
  counts the bytes of what the rule really sends (SCAFFOLD's control variates included);
- the aggregation step (:class:`RuleAggregator`: the simulator's validation, then the rule; plain
  FedAvg goes through :class:`~fedpeptao.core.federation.Aggregator` itself).

``fedavg`` (P-tuning v2, every layer shared) and ``fedpeptao`` run on the stock ``Simulation``
with ``algorithm=fedavg`` / ``algorithm=fedpeptao``: nothing is swapped for them.

The Flower app runs the same methods from the same pieces (run config ``method``): its clients
build the model with :func:`build_model` on their federation's backbone and run the rule's device
side, its strategy holds the rule's server side in a :class:`RuleAggregator`.

Limitation: the simulator's checkpoints hold the model tensors and client states, not a rule's own
state (FedAdam's ``m``/``v``, SCAFFOLD's ``c``/``c_k``), so a baseline run is not resumable mid-run;
``fedpeptao compare --resume`` works per finished method instead.

Every baseline shares all of its trainable tensors (there are no personal tensors), so payload
bytes are ``payload.num_bytes`` of safetensors of float32 tensors: ``4 * (parameters) + header``
per message, the header being a few dozen bytes per tensor. Trainable parameter counts (``L``
layers, hidden ``H``, ``kv = num_kv_heads * head_dim``, ``P`` prompt tokens, head ``H*C + C`` for
the linear head with ``C`` classes, nothing for mlm/lm heads) are listed in :data:`METHODS`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeptao.baselines.optimizers import FedAvgRule, RuleName, make_rule
from fedpeptao.config import ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.federation import Aggregator, ClientState, client_round, round_seed
from fedpeptao.core.server import ClientUpdate
from fedpeptao.core.validation import filter_updates
from fedpeptao.experiment import Federation
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.models.registry import Backbone
from fedpeptao.sim.simulator import Simulation

log = logging.getLogger("fedpeptao.server")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    model: str = "deep"  # deep | fedprompt | lpt | lora | adapter | idpg | attempt
    rule: RuleName = "fedavg"
    overrides: tuple[str, ...] = ()  # config overrides this method needs (applied after the user's)
    native: bool = False  # run the stock Simulation (fedavg, fedpeptao and its ablations)
    shared: str = ""  # what travels
    parameters: str = ""  # trainable (= shared) parameters per client, without the head


_DEEP = "L * P * 2 * kv"
WEIGHT_LR = 5e-3  # device lr of LoRA and adapters (overrides client.lr)
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fedpeptao", "FedPepTAO: scored layer selection, SCAFFOLD-II control variates and server momentum",
           overrides=("algorithm=fedpeptao",), native=True,
           shared="deep prompts of the selected ceil(r*L) layers + head; the rest stay on the device",
           parameters=f"{_DEEP} trained, ceil(r*L) * P * 2 * kv shared"),
    Method("fedavg", "P-tuning v2, every layer's deep prompt shared, FedAvg", overrides=("algorithm=fedavg",),
           native=True, shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("fedprompt", "prompt tuning on the input only (PEFT PromptTuning), FedAvg", model="fedprompt",
           shared="input prompt + head", parameters="P * H"),
    Method("lpt", "late prompt tuning: hidden-state prompt inserted at layer L//2, FedAvg", model="lpt",
           shared="late prompt + head", parameters="P * H"),
    # Weight-space methods train at a quarter of the prompts' lr: at 0.02 AdamW keeps LoRA at the
    # majority class on MR and adapters near it; 2e-3 and 5e-3 both learn (docs/results/compare).
    Method("lora", f"LoRA r=8 on the attention query/value (PEFT), FedAvg, device lr {WEIGHT_LR}", model="lora",
           overrides=(f"client.lr={WEIGHT_LR}",), shared="LoRA A and B matrices + head",
           parameters="L * 2 * r * 2H (BERT)"),
    Method("adapter", f"bottleneck adapter after each FFN (reduction 16), FedAvg, device lr {WEIGHT_LR}",
           model="adapter", overrides=(f"client.lr={WEIGHT_LR}",), shared="adapters + head",
           parameters="L * (2 * H * m + m + H), m = H // 16"),
    Method("idpg", "instance-dependent prompt generator (S-IDPG, bottleneck 32), FedAvg", model="idpg",
           shared="generator + head", parameters="H*m + m + m*P*H + P*H, m = 32"),
    Method("attempt", "ATTEMPT: attention over 4 frozen random source prompts + a target prompt, FedAvg",
           model="attempt", shared="target prompt + attention module + head",
           parameters="P*H + (H*r + r) + (r*H + H) + 2H, r = 32"),
    Method("fedprox", "P-tuning v2 prompts, FedProx (mu = 0.01)", rule="fedprox",
           shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("scaffold", "P-tuning v2 prompts, SCAFFOLD (option II, client control variates)", rule="scaffold",
           shared="prompts + head and their control variates (2x both ways)", parameters=_DEEP),
    Method("moon", "P-tuning v2 prompts, MOON (mu = 1, tau = 0.5)", rule="moon",
           shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("fedadam", "P-tuning v2 prompts, FedAdam server (Reddi et al. 2021)", rule="fedadam",
           shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("fedyogi", "P-tuning v2 prompts, FedYogi server", rule="fedyogi",
           shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("fedadagrad", "P-tuning v2 prompts, FedAdagrad server", rule="fedadagrad",
           shared="every layer's deep prompt + head", parameters=_DEEP),
    # FedPepTAO ablations (SPEC section 5): config overrides of the native algorithm
    Method("fedpeptao-all-layers", "FedPepTAO without layer selection (every layer shared)",
           overrides=("algorithm=fedpeptao", "selection.ratio=1.0"), native=True,
           shared="every layer's deep prompt + head", parameters=_DEEP),
    Method("fedpeptao-no-cv", "FedPepTAO without control variates",
           overrides=("algorithm=fedpeptao", "server.use_control_variates=false"), native=True,
           shared="selected layers + head", parameters=_DEEP),
    Method("fedpeptao-no-momentum", "FedPepTAO without server momentum",
           overrides=("algorithm=fedpeptao", "server.use_momentum=false"), native=True,
           shared="selected layers + head", parameters=_DEEP),
    Method("fedpeptao-sgd", "FedPepTAO with device SGD instead of AdamW",
           overrides=("algorithm=fedpeptao", "client.optimizer=sgd"), native=True,
           shared="selected layers + head", parameters=_DEEP),
]}

# The paper's comparison (SPEC section 5): FedPepTAO and the nine baselines, the server optimisers split out.
DEFAULT_METHODS = ["fedpeptao", "fedavg", "fedprompt", "lpt", "lora", "adapter", "idpg", "attempt",
                   "fedprox", "scaffold", "moon", "fedadam", "fedyogi", "fedadagrad"]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def check_method_config(cfg: ExperimentConfig, method: Method) -> None:
    """Baselines replace the server step of plain FedAvg: they need ``algorithm=fedavg``."""
    if not method.native and cfg.algorithm != "fedavg":
        raise ValueError(f"{method.name} runs with algorithm=fedavg (its own rule replaces the server step), "
                         f"not algorithm={cfg.algorithm}")


def method_rule(method: Method, cfg: ExperimentConfig, rule_options: dict | None = None) -> FedAvgRule:
    """A fresh rule of ``method`` for ``cfg``: server and devices build theirs alike (native methods: FedAvg's)."""
    return make_rule(method.rule, cfg.federated.num_clients, cfg.client.lr, **(rule_options or {}))


def build_model(kind: str, sim: Simulation | Federation) -> PromptedClassifier:
    """The trainable model of a method, on the (frozen) backbone of a simulation or a Flower client's federation."""
    from fedpeptao.baselines import peft_methods, prompts  # noqa: PLC0415

    if kind == "deep":
        return sim.model
    base = sim.model
    words = base.label_word_ids.tolist() or None
    args = (sim.backbone.model, sim.head, base.num_labels)
    tokens, seed = sim.cfg.model.num_prompt_tokens, sim.cfg.seed
    if kind == "fedprompt":
        return prompts.FedPromptClassifier(*args, tokens, words, seed)
    if kind == "lpt":
        return prompts.LatePromptClassifier(*args, tokens, words, seed)
    if kind == "idpg":
        return prompts.IDPGClassifier(*args, tokens, words, seed)
    if kind == "attempt":
        return prompts.ATTEMPTClassifier(*args, tokens, words, seed)
    if kind == "lora":
        return peft_methods.LoRAClassifier(*args, words, seed)
    if kind == "adapter":
        return peft_methods.AdapterClassifier(*args, words, seed)
    raise ValueError(f"unknown model kind {kind!r}")


class RuleAggregator(Aggregator):
    """The simulator's aggregator with the server step replaced by a baseline's rule.

    Validation is the simulator's (on the model tensors of each update); a plain FedAvg rule goes
    through :meth:`Aggregator.aggregate` unchanged (so robust averaging settings apply to it too).
    """

    rule: FedAvgRule

    @classmethod
    def wrap(cls, agg: Aggregator, rule: FedAvgRule) -> RuleAggregator:
        new = cls(params=agg.params, shared=agg.shared, validation=agg.validation, averaging=agg.averaging,
                  trim_ratio=agg.trim_ratio)
        new.rule = rule
        return new

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        if type(self.rule) is FedAvgRule:
            return super().aggregate(updates)
        current = self.broadcast()
        self.rejected = []
        if self.validation is not None:
            model_part = [ClientUpdate(u.client_id, {n: u.params[n] for n in current if n in u.params},
                                       u.num_examples, u.num_steps) for u in updates]
            accepted, self.rejected = filter_updates(model_part, current, self.validation, log)
            keep = {u.client_id for u in accepted}
            updates = [u for u in updates if u.client_id in keep]
        if not updates:
            log.warning("no valid update this round; global state unchanged")
            return None
        new = self.rule.aggregate(current, updates)
        self.params.update({name: new[name].to(current[name].dtype) for name in self.shared})
        return None


class BaselineSimulation(Simulation):
    """A Simulation whose model, client hooks and server rule are those of ``method``."""

    def __init__(self, cfg: ExperimentConfig, method: Method | str, run_dir: Path | None = None,
                 backbone: Backbone | None = None, rule_options: dict | None = None):
        method = get_method(method) if isinstance(method, str) else method
        if method.native:
            raise ValueError(f"{method.name} runs on the stock Simulation (overrides {list(method.overrides)})")
        check_method_config(cfg, method)
        super().__init__(cfg, run_dir, backbone)
        self.method = method
        if method.model != "deep":
            self.model = build_model(method.model, self)
            initial = self.model.trainable_state()
            self.clients = [ClientState(params=initial) for _ in range(cfg.federated.num_clients)]
            self.aggregator.params = dict(initial)
            self.aggregator.shared = self.model.trainable_names()
        self.rule = method_rule(method, cfg, rule_options)
        self.aggregator = RuleAggregator.wrap(self.aggregator, self.rule)

    def train_round(self, round_index: int) -> dict:
        """As :meth:`Simulation.train_round`, inside the rule's client hooks and with its payloads."""
        fed = self.cfg.federated
        sampled = np.sort(self.rng.choice(fed.num_clients, size=fed.clients_per_round, replace=False))
        global_shared = self.aggregator.broadcast()
        down = payload.num_bytes(self.rule.down(global_shared))
        updates, slowest, up, losses = [], 0.0, 0, []
        for k in sampled:
            k = int(k)
            with self.rule.client(self, k, global_shared) as extra_loss:
                update, result = client_round(self.model, self.clients[k], global_shared, self.train_data,
                                              self.train_parts[k], self.local_cfg,
                                              round_seed(self.cfg.seed, round_index, k), extra_loss)
            sent = self.rule.upload(k, global_shared, update, result.num_steps)
            up += payload.num_bytes(sent)
            slowest = max(slowest, result.seconds)
            losses.append(result.mean_loss)
            updates.append(ClientUpdate(k, sent, result.num_examples, result.num_steps))
        self.aggregator.aggregate(updates)
        return {"clients": sampled.tolist(), "bytes_up": up, "bytes_down": down * len(sampled),
                "slowest_client_s": slowest, "train_loss": float(np.nanmean(losses)),
                "rejected": [list(r) for r in self.aggregator.rejected]}

    def summary(self) -> dict:
        return {**super().summary(), "algorithm": self.method.name}


def make_simulation(cfg: ExperimentConfig, method: Method | str, backbone: Backbone | None = None,
                    rule_options: dict | None = None) -> Simulation:
    """The simulation that runs ``method`` for ``cfg`` (``cfg`` must already carry the method's overrides)."""
    method = get_method(method) if isinstance(method, str) else method
    if method.native:
        return Simulation(cfg, None, backbone)
    return BaselineSimulation(cfg, method, None, backbone, rule_options)


def shared_parameter_count(sim: Simulation) -> int:
    """Parameters in one uplink message of model tensors (what the aggregator shares)."""
    return sum(t.numel() for t in sim.aggregator.broadcast().values())


def method_overrides(method: Method | str, overrides: Sequence[str] = ()) -> list[str]:
    method = get_method(method) if isinstance(method, str) else method
    return [*overrides, *method.overrides]
