"""Use what a run produced: its global model or one client's personal model, to label or score text.

A finished run directory holds ``config.yaml``, ``model.json`` (base model, tuning, labels, label
words and template), ``global.safetensors`` and ``clients/<k>.safetensors`` (each client's complete
model: its own tensors with the global shared ones, exactly what it evaluates with).
:func:`load_run` rebuilds the frozen backbone and the tuning from them; nothing is pickled.

FedPepTAO's result is personal by design: its unselected layers never left the devices, so the
server's copy of them is only the warm-up's. For such a run ``client=None`` is refused; pick the
client whose model you want.

A classification run's model labels text (:meth:`TrainedModel.predict`); a generative run's
(``model.head=generate``) answers prompts (:meth:`TrainedModel.generate`: greedy, with the run's
``generation`` settings, prompts read as the run's training prompts were). Both are scored by
:meth:`TrainedModel.evaluate`; asking one kind of model for the other's output is one error line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
from fedpeptao.data.instruct import (InstructDataset, Message, encode_instruct, eos_ids, load_instruct_dir,
                                     load_instruct_splits, prompt_token_ids, read_instruct)
from fedpeptao.data.readers import load_task_dir, read_table
from fedpeptao.data.tasks import load_splits
from fedpeptao.experiment import MODEL_CARD, MODEL_FORMAT, build_tuned_model, load_configured_backbone
from fedpeptao.generation import completion_loss, evaluate_generation, greedy_generate
from fedpeptao.models.loading import Backbone
from fedpeptao.models.tuned import TunedModel

Inputs = Sequence[str] | Sequence[tuple[str, str]]
#: a prompt to answer: plain text (one user turn) or chat messages (``{"role", "content"}`` dicts)
Prompt = str | Sequence[Mapping[str, str]]
_ROLES = ("system", "user", "assistant", "tool")


class RunError(ValueError):
    """A run directory, client or tensor file that cannot be used; one line saying why."""


@dataclass
class TrainedModel:
    """A trained model, the frozen backbone with one set of tuning tensors loaded: a classifier
    (:meth:`predict`) or, for a generative run, an answerer of prompts (:meth:`generate`)."""

    cfg: ExperimentConfig
    model: TunedModel
    backbone: Backbone
    head: str
    labels: list[str]  # class names; a generative run's distinct training answers (not used to answer)
    pair: bool
    metric: str
    client: int | None
    text_length: int  # text tokens per example (model.max_length less the tuning's prompt positions)

    @property
    def generative(self) -> bool:
        """Whether the run's task answers prompts by generating (``model.head=generate``)."""
        return bool(self.model.task.generative)

    def _require(self, generative: bool, asked: str) -> None:
        if self.generative == generative:
            return
        if self.generative:
            raise RunError(f"{asked}: this run's model generates text (model.head={self.head}); use "
                           f"generate(prompts) / `fedpeptao generate`, and evaluate()")
        raise RunError(f"{asked}: this run's model classifies text (model.head={self.head}); use "
                       f"predict(texts) / `fedpeptao predict`: only a run with model.head=generate generates")

    def _dataset(self, inputs: Inputs) -> TextDataset:
        self._require(False, "predict")
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

    def evaluate(self, data: str | Path | TextDataset | InstructDataset | None = None
                 ) -> dict[str, float | int | str]:
        """The run's metric (and accuracy) on ``data``: a task folder, a labelled table, a
        TextDataset, or by default the run's own test split.

        A generative run's: ``exact_match`` (and ``choice_accuracy`` when there are multiple-choice
        questions) of the greedy answers, and the completion tokens' mean loss (token-weighted), as
        the run's evaluation computes them; ``data`` an instruct folder or file
        (:func:`~fedpeptao.data.instruct.read_instruct`'s layouts) or an InstructDataset."""
        if self.generative:
            return self._evaluate_generation(data)
        if isinstance(data, InstructDataset):
            self._require(True, "evaluate on instruction data")
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

    # -- generative runs ------------------------------------------------------------------------

    def _max_new_tokens(self, value: int | None) -> int:
        if value is None:
            return self.cfg.generation.max_new_tokens
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"max_new_tokens: a whole number of at least 1, got {value!r}")
        return int(value)

    def _messages(self, prompts: Sequence[Prompt]) -> list[list[Message]]:
        """Each prompt as chat messages (a string is one user turn), checked."""
        if isinstance(prompts, (str, Mapping)):
            raise TypeError("generate takes a list of prompts (strings or lists of {role, content} messages), not "
                            "one prompt")
        items = list(prompts)
        if not items:
            raise ValueError("no prompts to generate from")
        out = []
        for i, prompt in enumerate(items):
            if isinstance(prompt, str):
                out.append([{"role": "user", "content": prompt}])
                continue
            if isinstance(prompt, Mapping):
                raise TypeError(f"prompt {i}: one message; a chat prompt is a list of {{role, content}} messages")
            if not isinstance(prompt, Sequence) or not prompt:
                raise TypeError(f"prompt {i}: expected a string or a non-empty list of {{role, content}} messages, "
                                f"got {type(prompt).__name__}")
            turns = []
            for message in prompt:
                if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                        or not isinstance(message.get("content"), str):
                    raise TypeError(f"prompt {i}: a message is a {{role, content}} dict of strings, got "
                                    f"{str(message)[:80]}")
                if message["role"] not in _ROLES:
                    raise ValueError(f"prompt {i}: unknown role '{message['role']}' (expected {', '.join(_ROLES)})")
                turns.append({"role": message["role"], "content": message["content"]})
            out.append(turns)
        return out

    def _prompt_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens kept so that prompt and answer fit the run's length (as its evaluation cuts)."""
        return max(1, self.text_length - max_new_tokens)

    def _full_prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        self._require(True, "generate")
        return [prompt_token_ids(self.backbone.tokenizer, m) for m in self._messages(prompts)]

    def prompt_ids(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[list[int]]:
        """The token ids each prompt is answered from: laid out as the run's training prompts were
        (the tokenizer's chat template with the generation prompt where it has one, else the
        messages' contents and a newline), cut on the left so that ``max_new_tokens`` answer
        tokens still fit ``model.max_length``, as the run's evaluation cuts them."""
        budget = self._prompt_budget(self._max_new_tokens(max_new_tokens))
        return [ids[-budget:] for ids in self._full_prompt_ids(prompts)]

    def count_truncated_prompts(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> int:
        """How many prompts lose tokens on the left (:meth:`prompt_ids`)."""
        budget = self._prompt_budget(self._max_new_tokens(max_new_tokens))
        return int(sum(len(ids) > budget for ids in self._full_prompt_ids(prompts)))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None, batch_size: int | None = None,
                 progress: bool = False) -> list[str]:
        """The greedy answer to each prompt (a string, or a list of ``{role, content}`` messages),
        as text without the EOS that ended it. ``max_new_tokens`` and ``batch_size`` default to the
        run's ``generation`` settings; prompts run shortest first, left padded, with a key/value
        cache where the tuning allows (:func:`fedpeptao.generation.greedy_generate`)."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        new = self._max_new_tokens(max_new_tokens)
        ids = self.prompt_ids(prompts, new)
        tokenizer = self.backbone.tokenizer
        stops = eos_ids(tokenizer, self.backbone.model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: at least 1, got {batch_size}")
        size = batch_size or self.cfg.generation.batch_size
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        answers = [""] * len(ids)
        starts = range(0, len(order), size)
        for start in tqdm(starts, total=len(starts), disable=not progress, desc="generate"):
            chunk = order[start:start + size]
            for i, tokens in zip(chunk, greedy_generate(self.model, [ids[i] for i in chunk], stops, pad, new)):
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        return answers

    def _instruct_data(self, data) -> InstructDataset:
        if data is None:
            return load_instruct_splits(self.cfg.data, self.cfg.data_seed())[2]
        if isinstance(data, InstructDataset):
            return data
        if isinstance(data, TextDataset):
            raise RunError("evaluate: this run's model generates text; give instruction data (an instruct folder or "
                           "file, or an InstructDataset), not a labelled TextDataset")
        path = Path(data)
        if path.is_dir() and not (path / "state.json").is_file():  # a task folder (a saved Dataset is read whole)
            return load_instruct_dir(path)[2]
        return read_instruct(path)

    def _evaluate_generation(self, data) -> dict[str, float | int | str]:
        """Greedy answers scored against the references, and the completion loss: the computation
        of the run's own evaluation (:meth:`fedpeptao.engine.worker.ClientWorker._generated`)."""
        dataset = self._instruct_data(data)
        if len(dataset) == 0:
            raise ValueError("no examples to evaluate")
        gen, tokenizer = self.cfg.generation, self.backbone.tokenizer
        encoded = encode_instruct(dataset, tokenizer, self.text_length, model=self.backbone.model)
        parts = [np.arange(len(dataset), dtype=np.int64)]
        (scored,) = evaluate_generation(self.model, tokenizer, encoded, parts, None, gen.max_new_tokens,
                                        gen.batch_size, self.cfg.model.max_length)
        ((loss_sum, tokens),) = completion_loss(self.model, encoded, parts, None, gen.batch_size)
        values = scored.metrics()
        return {"metric": self.metric, self.metric: values.get(self.metric, values["exact_match"]), **values,
                "loss": loss_sum / max(tokens, 1), "examples": len(dataset), "tokens": tokens}


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
