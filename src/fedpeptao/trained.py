"""Use what a run produced: its global model or one client's personal model, to label or score text.

A finished run directory holds ``config.yaml``, ``model.json`` (base model, tuning, labels, label
words and template), ``global.safetensors`` and ``clients/<k>.safetensors`` (each client's complete
model: its own tensors with the global shared ones, exactly what it evaluates with).
:func:`load_run` rebuilds the frozen backbone and the tuning from them; nothing is pickled.

FedPepTAO's result is personal by design: its unselected layers never left the devices, so the
server's copy of them is only the warm-up's. For such a run ``client=None`` is refused; pick the
client whose model you want.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedpeptao.config import ConfigError, ExperimentConfig, load_config
from fedpeptao.core.metrics import score
from fedpeptao.data.dataset import TextDataset
from fedpeptao.data.encoding import encode
from fedpeptao.data.readers import load_task_dir, read_table
from fedpeptao.data.tasks import load_splits
from fedpeptao.experiment import MODEL_CARD, MODEL_FORMAT, build_tuned_model, load_configured_backbone
from fedpeptao.models.loading import Backbone
from fedpeptao.models.tuned import TunedModel

Inputs = Sequence[str] | Sequence[tuple[str, str]]


class RunError(ValueError):
    """A run directory, client or tensor file that cannot be used; one line saying why."""


@dataclass
class TrainedModel:
    """A trained classifier: the frozen backbone with one set of tuning tensors loaded."""

    cfg: ExperimentConfig
    model: TunedModel
    backbone: Backbone
    head: str
    labels: list[str]
    pair: bool
    metric: str
    client: int | None
    text_length: int  # text tokens per example (model.max_length less the tuning's prompt positions)

    def _dataset(self, inputs: Inputs) -> TextDataset:
        if isinstance(inputs, str):
            raise TypeError("predict takes a list of texts (or of (text_a, text_b) pairs), not one string")
        items = list(inputs)
        if not items:
            raise ValueError("no inputs to predict")
        pairs = all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items)
        if pairs != self.pair:
            need = "(text_a, text_b) pairs" if self.pair else "single texts"
            raise ValueError(f"this model classifies {need}")
        texts_a = [str(x[0]) for x in items] if pairs else [str(x) for x in items]
        texts_b = [str(x[1]) for x in items] if pairs else None
        return TextDataset(texts_a, texts_b, np.zeros(len(items), dtype=np.int64), list(self.labels))

    def count_truncated(self, inputs: Inputs) -> int:
        """How many inputs are longer than ``model.max_length`` tokens (their tails are cut)."""
        data = self._dataset(inputs)
        tokenizer = self.backbone.tokenizer
        lengths = [len(ids) for ids in tokenizer(data.texts_a, data.texts_b)["input_ids"]]
        return int(sum(n > self.cfg.model.max_length for n in lengths))

    @torch.no_grad()
    def predict_proba(self, inputs: Inputs, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``[N, C]`` class probabilities (softmax of the head's class scores), in ``labels`` order."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        data = self._dataset(inputs)
        encoded = encode(data, self.backbone.tokenizer, self.model.task.layout, self.text_length, self.cfg.model.template)
        self.model.eval()
        out = []
        batches = encoded.batches(np.arange(len(encoded)), batch_size)
        for batch in tqdm(batches, total=-(-len(encoded) // batch_size), disable=not progress, desc="predict"):
            batch.pop("labels", None)
            out.append(torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, inputs: Inputs, batch_size: int = 32) -> list[str]:
        """One label name per input."""
        return [self.labels[i] for i in self.predict_proba(inputs, batch_size).argmax(-1)]

    def evaluate(self, data: str | Path | TextDataset | None = None) -> dict[str, float | int | str]:
        """The run's metric (and accuracy) on ``data``: a task folder, a labelled table, a
        TextDataset, or by default the run's own test split."""
        if data is None:
            dataset = load_splits(self.cfg.data, self.cfg.data_seed())[2]
        elif isinstance(data, TextDataset):
            dataset = data
        else:
            path = Path(data)
            dataset = load_task_dir(path, self.labels)[2] if path.is_dir() else read_table(path, label_names=self.labels)
        if len(dataset) == 0:
            raise ValueError("no examples to evaluate")
        inputs = list(zip(dataset.texts_a, dataset.texts_b)) if dataset.is_pair else dataset.texts_a
        preds = self.predict_proba(inputs).argmax(-1)
        result: dict[str, float | int | str] = {"metric": self.metric, self.metric: score(self.metric, preds, dataset.labels),
                                                "accuracy": score("accuracy", preds, dataset.labels),
                                                "examples": len(dataset)}
        return result


def read_card(run_dir: Path) -> dict:
    """``model.json`` of a finished run (RunError when the run never finished)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    path = run_dir / MODEL_CARD
    if not path.is_file() or not (run_dir / "global.safetensors").is_file():
        raise RunError(f"{run_dir}: the run never finished (no {MODEL_CARD} / global.safetensors); resume it first")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    if card.get("format") != MODEL_FORMAT:
        raise RunError(f"{path}: not a fedpeptao model card")
    return card


def tensor_file(run_dir: Path, card: dict, client: int | None) -> Path:
    """The tensors of the model asked for, or RunError naming the clients there are."""
    run_dir = Path(run_dir)
    clients = card.get("clients", [])
    if client is None:
        if card.get("personal_tensors"):
            raise RunError(f"{run_dir}: this run's model is personal ({len(card['personal_tensors'])} tensor(s) never left "
                           f"the devices); pick a client with --client K / client=K (clients: {_listing(clients)})")
        return run_dir / "global.safetensors"
    if client not in clients:
        raise RunError(f"client {client}: not a client that trained in this run (clients: {_listing(clients)})")
    return run_dir / "clients" / f"{client}.safetensors"


def _listing(clients: list[int]) -> str:
    return ", ".join(map(str, clients[:20])) + (" ..." if len(clients) > 20 else "") if clients else "none"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable or truncated ({str(exc).splitlines()[0]})") from None


def load_run(run_dir: str | Path, client: int | None = None, backbone: Backbone | None = None) -> TrainedModel:
    """The global model (``client=None``) or client ``client``'s model of a finished run."""
    run_dir = Path(run_dir)
    card = read_card(run_dir)
    tensors = load_tensors(tensor_file(run_dir, card, client))
    try:
        cfg = load_config(run_dir / "config.yaml", ["device=auto"])  # wherever it trained, use what is here
    except ConfigError as exc:
        raise RunError(f"{run_dir / 'config.yaml'}: {exc}") from None
    backbone = backbone or load_configured_backbone(cfg)
    built = build_tuned_model(cfg, backbone, list(card["labels"]), bool(card["pair"]))
    expected = set(built.model.trainable_names())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3] or sorted(set(tensors) - expected)[:3]
        raise RunError(f"{run_dir}: its tensors do not match the model the config builds ({missing})")
    built.model.load_trainable(tensors)
    built.model.eval()
    return TrainedModel(cfg, built.model, backbone, built.head, list(card["labels"]), bool(card["pair"]),
                        str(card["metric"]), client, built.max_length)
