"""Instruction data for generative tuning: reading TRL's layouts and encoding them for a causal LM.

Reading (:func:`read_instruct`, :func:`load_instruct_dir`): JSON lines / JSON, CSV / TSV, or a
``datasets.save_to_disk`` folder, in the layouts TRL writes, detected from the columns:

- ``conversational``: ``prompt`` and ``completion`` as lists of ``{role, content}`` messages;
- ``messages``: one conversation; the last assistant turn is the target, every turn before it the
  prompt (turns after it are dropped);
- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``text``: ``prompt`` and ``completion`` as plain strings.

Every prompt is kept as a list of messages (a plain prompt becomes one user turn), the target as
a string. Other columns (``subject``, ``category``, ...) stay available in
:attr:`InstructDataset.columns`, e.g. for a natural partition by subject. Bad input is one
:class:`~fedpeptao.data.dataset.DataError` line naming the file (and the row, where one is at fault).

Encoding (:func:`encode_instruct`): the tokenizer's chat template where it has one (the prompt with
``add_generation_prompt=True``, then the completion's tokens and EOS), else ``"prompt\\n"`` and the
completion and EOS. The loss is on the completion tokens only. Too long examples lose prompt
tokens from the left (one warning per call, with the count). The result,
:class:`InstructEncoded`, has the interface the training loop reads
(:func:`fedpeptao.core.client.local_train`): ``len``, ``lengths``, ``batches``, ``collate``, ``pad_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedpeptao.data.dataset import DataError
from fedpeptao.data.encoding import EncodedDataset, special_wrap
from fedpeptao.data.tasks import cap_examples

log = logging.getLogger("fedpeptao.data")

InstructLayout = Literal["conversational", "messages", "alpaca", "text"]
Message = dict[str, str]
IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class InstructDataset:
    """Prompts (as chat messages) and their target completions, plus any other columns."""

    prompts: list[list[Message]]
    completions: list[str]
    layout: InstructLayout
    columns: dict[str, list] = field(default_factory=dict)  # every other column, row-aligned
    source: str | None = None
    #: the distinct answers (case and spacing folded) of the run's splits, and each example's index
    #: among them: what a Dirichlet partition over the answer and the majority rate read
    #: (:func:`answer_classes`); a run without them partitions as one class
    label_names: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    is_pair = False

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.completions):
            raise DataError(f"{self.source}: {len(self.prompts)} prompts but {len(self.completions)} completions")
        for name, values in self.columns.items():
            if len(values) != len(self.prompts):
                raise DataError(f"{self.source}: column '{name}' has {len(values)} rows, expected {len(self.prompts)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices) -> InstructDataset:
        """The examples at ``indices`` (ints in that order, or a boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        return InstructDataset([self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.layout,
                               {k: [v[i] for i in idx] for k, v in self.columns.items()}, self.source)

    def prompt_text(self, i: int) -> str:
        """Example ``i``'s prompt as plain text (its messages' contents, one per line)."""
        return "\n".join(m["content"] for m in self.prompts[i])

    def groups(self, column: str) -> tuple[np.ndarray, list[str]]:
        """Each example's group id under ``column`` (e.g. ``subject``) and the group names, sorted:
        what a natural (per-subject) partition needs."""
        if column not in self.columns:
            raise DataError(f"{self.source}: no column '{column}' (columns: {', '.join(self.columns) or 'none'})")
        values = [str(v) for v in self.columns[column]]
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[v] for v in values], dtype=np.int64), names


def answer_classes(*datasets: InstructDataset | None) -> None:
    """Give every dataset the same answer classes (``label_names``, ``labels``): the distinct
    completions of all of them, case and spacing folded."""
    present = [d for d in datasets if d is not None]
    names = sorted({" ".join(c.lower().split()) for d in present for c in d.completions})
    index = {name: i for i, name in enumerate(names)}
    for d in present:
        d.label_names = names
        d.labels = np.asarray([index[" ".join(c.lower().split())] for c in d.completions], dtype=np.int64)


def load_instruct_splits(cfg, seed: int) -> tuple[InstructDataset, InstructDataset | None, InstructDataset]:
    """(train, validation or None, test) of instruction data (``cfg`` is a DataConfig: a task folder,
    or ``train_file``/``eval_file``/``validation_file``), capped as classification data is, with
    shared answer classes."""
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataError("data.eval_file: required when data.train_file is given")
        train, evaluation = read_instruct(cfg.train_file), read_instruct(cfg.eval_file)
        validation = read_instruct(cfg.validation_file) if cfg.validation_file else None
    else:
        train, validation, evaluation = load_instruct_dir(cfg.task)
    train = cap_examples(train, cfg.max_train_examples, seed)
    validation = None if validation is None else cap_examples(validation, cfg.max_eval_examples, seed + 2)
    evaluation = cap_examples(evaluation, cfg.max_eval_examples, seed + 1)
    answer_classes(train, validation, evaluation)
    return train, validation, evaluation


# -- reading ------------------------------------------------------------------------------


def read_instruct(path, split: str = "train") -> InstructDataset:
    """One file (``.jsonl``/``.json``/``.csv``/``.tsv``) or ``save_to_disk`` folder (``split`` picks a
    split of a DatasetDict) of instruction data in any layout of the module docstring."""
    from fedpeptao.data.readers import _load  # noqa: PLC0415  (one parser for every table format)

    path = Path(path)
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl/.json, .csv/.tsv or a "
                        f"save_to_disk folder)")
    table = _load(path, split)
    columns = list(table.columns)
    cells = {name: [row[i] for row in table.rows] for i, name in enumerate(columns)}
    first = next((v for v in cells.get("prompt", []) if v is not None), None)
    if isinstance(first, str) and first.lstrip().startswith("["):  # a CSV cell holding JSON messages?
        try:
            first = json.loads(first)
        except json.JSONDecodeError:
            pass
    layout = detect_layout(columns, table.source, {"prompt": first})
    where = table.where
    if layout == "messages":
        used = ("messages",)
        prompts, completions = [], []
        for i, value in enumerate(cells["messages"]):
            turns = _messages(value, table.source, where[i], "messages")
            last = max((j for j, m in enumerate(turns) if m["role"] == "assistant"), default=None)
            if last is None:
                raise DataError(f"{table.source}: {where[i]}: column 'messages' has no assistant turn to learn")
            prompts.append(_non_empty(turns[:last], table.source, where[i], "messages"))
            completions.append(turns[last]["content"])
    elif layout == "alpaca":
        used = ("instruction", "input", "output")
        inputs = cells.get("input") or [None] * len(table.rows)
        prompts, completions = [], []
        for i, (instruction, extra, output) in enumerate(zip(cells["instruction"], inputs, cells["output"])):
            instruction = _text(instruction, table.source, where[i], "instruction")
            extra = "" if extra is None else _text(extra, table.source, where[i], "input", empty=True)
            prompts.append([{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}])
            completions.append(_text(output, table.source, where[i], "output"))
    else:
        used = ("prompt", "completion")
        prompts, completions = [], []
        for i, (prompt, completion) in enumerate(zip(cells["prompt"], cells["completion"])):
            if layout == "conversational":
                turns = _non_empty(_messages(prompt, table.source, where[i], "prompt"), table.source, where[i],
                                   "prompt")
                reply = _non_empty(_messages(completion, table.source, where[i], "completion"), table.source,
                                   where[i], "completion")
                prompts.append(turns)
                completions.append("\n".join(m["content"] for m in reply))
            else:
                prompts.append([{"role": "user", "content": _text(prompt, table.source, where[i], "prompt")}])
                completions.append(_text(completion, table.source, where[i], "completion"))
    others = {name: cells[name] for name in columns if name not in used}
    return InstructDataset(prompts, completions, layout, others, table.source)


def detect_layout(columns: Sequence[str], source: str | None = None, first: dict | None = None) -> InstructLayout:
    """The layout the columns name, or one DataError line naming the file and the columns found."""
    names = set(columns)
    if "messages" in names:
        return "messages"
    if {"prompt", "completion"} <= names:
        return "conversational" if first is None or isinstance(first.get("prompt"), list) else "text"
    if {"instruction", "output"} <= names:
        return "alpaca"
    raise DataError(f"{source}: no instruction layout fits the columns ({', '.join(columns) or 'none'}); expected "
                    f"prompt+completion, messages, or instruction+input+output (Alpaca)")


def load_instruct_dir(path) -> tuple[InstructDataset, InstructDataset | None, InstructDataset]:
    """(train, validation or None, test) from a folder with ``train``, optional ``dev``/``validation``
    and ``test`` files (any suffix of :data:`SUFFIXES`), or a ``save_to_disk`` DatasetDict folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")

    def find(*names: str) -> Path | None:
        return next((folder / f"{n}{s}" for n in names for s in SUFFIXES if (folder / f"{n}{s}").is_file()), None)

    train, test = find("train"), find("test")
    if train is None and test is None and (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        val = next((s for s in ("validation", "dev") if s in splits), None)
        if "train" not in splits or "test" not in splits:
            raise DataError(f"{folder}: needs 'train' and 'test' splits (found {', '.join(splits)})")
        return (read_instruct(folder, "train"), read_instruct(folder, val) if val else None,
                read_instruct(folder, "test"))
    if train is None or test is None:
        missing = " and ".join(n for n, p in (("train", train), ("test", test)) if p is None)
        raise DataError(f"{folder}: no {missing} file ({', '.join('*' + s for s in SUFFIXES)})")
    val = find("validation", "dev")
    return read_instruct(train), read_instruct(val) if val else None, read_instruct(test)


def _messages(value, source: str, where: str, column: str) -> list[Message]:
    """A cell holding a list of ``{role, content}`` (a JSON string in CSV files)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: {where}: column '{column}' is not a valid JSON list of messages: "
                            f"{err.msg}") from None
    if not isinstance(value, list):
        raise DataError(f"{source}: {where}: column '{column}' should be a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    turns = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{source}: {where}: column '{column}' has an entry that is not a {{role, content}} "
                            f"message of strings: {str(message)[:80]}")
        if message["role"] not in _ROLES:
            raise DataError(f"{source}: {where}: column '{column}' has an unknown role '{message['role']}' "
                            f"(expected {', '.join(_ROLES)})")
        turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _non_empty(turns: list[Message], source: str, where: str, column: str) -> list[Message]:
    if not turns:
        raise DataError(f"{source}: {where}: column '{column}' has no message before the target")
    return turns


def _text(value, source: str, where: str, column: str, empty: bool = False) -> str:
    if value is None or not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{source}: {where}: column '{column}' should be text, got "
                        f"{'nothing' if value is None else type(value).__name__}")
    text = str(value)
    if not empty and not text.strip():
        raise DataError(f"{source}: {where}: column '{column}' is empty")
    return text


# -- encoding -----------------------------------------------------------------------------


@dataclass
class InstructEncoded(EncodedDataset):
    """Token ids of prompt + completion per example, with what evaluation by generation reads.

    An :class:`~fedpeptao.data.encoding.EncodedDataset` (same ``len``, ``lengths``, ``batches``: the
    shuffle and length grouping the training loop uses), whose batches (:meth:`collate`) are
    right-padded like the classification data's, so the training loop and slot mode run unchanged.
    A batch's ``labels`` is ``[B, L]``: the completion's token ids (``-100`` after its end), ``L``
    the longest completion of the whole dataset (so batches of one dataset stack,
    :func:`fedpeptao.data.encoding.stack_batches`); ``target_pos`` is the position whose output
    predicts the first completion token (the prompt's last), so completion token ``j`` is
    predicted at ``target_pos + j``. The per-example ``labels`` array of the base class holds -1
    (there are no classes: a classification readout of these data fails loudly).
    """

    eos_ids: list[int] = field(default_factory=list)  # generation stops at any of them
    references: list[str] = field(default_factory=list)  # the completions as text (what generation is scored against)
    prompt_texts: list[str] = field(default_factory=list)  # the prompts as text (where choices are listed)
    label_width: int = 0
    truncated: int = 0  # examples whose prompt lost tokens on the left

    @classmethod
    def build(cls, input_ids: list[list[int]], prompt_lengths, pad_id: int, eos: list[int],
              references: list[str], prompt_texts: list[str], truncated: int = 0) -> InstructEncoded:
        starts = np.asarray(prompt_lengths, dtype=np.int64)
        width = max((len(s) - p for s, p in zip(input_ids, starts)), default=1)
        return cls(input_ids, starts - 1, np.full(len(input_ids), -1, dtype=np.int64), pad_id, list(eos),
                   list(references), list(prompt_texts), int(width), truncated)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self.target_pos + 1

    def prompt_ids(self, i: int) -> list[int]:
        return self.input_ids[i][:self.target_pos[i] + 1]

    def completion_ids(self, i: int) -> list[int]:
        return self.input_ids[i][self.target_pos[i] + 1:]

    def num_completion_tokens(self, indices: np.ndarray) -> int:
        """The tokens the loss of ``indices`` averages over (to pool losses token-weighted)."""
        return int(sum(len(self.input_ids[i]) - 1 - self.target_pos[i] for i in indices))

    def collate(self, chunk: np.ndarray) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), self.label_width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(chunk):
            seq, start = self.input_ids[i], int(self.target_pos[i]) + 1
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            labels[row, :len(seq) - start] = torch.tensor(seq[start:])
        return {"input_ids": ids, "attention_mask": mask,
                "target_pos": torch.as_tensor(self.target_pos[np.asarray(chunk)], dtype=torch.long),
                "labels": labels}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def eos_ids(tokenizer, model=None) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation config's."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for value in ([extra] if isinstance(extra, int) else list(extra or [])):
        if value not in ids:
            ids.append(int(value))
    if not ids:
        raise DataError("the tokenizer has no EOS token to end completions with")
    return ids


def prompt_token_ids(tokenizer, messages: list[Message], chat_template: bool | None = None) -> list[int]:
    """A prompt's ids as the model is asked it: the chat template with the generation prompt, else
    the messages' contents joined by newlines, a newline, and the tokenizer's leading special tokens."""
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template:
        if not has_chat_template(tokenizer):
            raise DataError("chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    before, _ = special_wrap(tokenizer)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return before + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_instruct(dataset: InstructDataset, tokenizer, max_length: int, chat_template: bool | None = None,
                    model=None) -> InstructEncoded:
    """Tokenise prompts and completions for a causal LM (module docstring); ``chat_template``:
    None uses the tokenizer's where it has one. ``model``: its generation config's EOS ids also
    end generation."""
    if max_length < 2:
        raise DataError(f"max_length {max_length} leaves no room for a prompt and a completion")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = eos_ids(tokenizer, model)
    completions = tokenizer(list(dataset.completions), add_special_tokens=False)["input_ids"]
    all_ids, starts, cut_prompts, cut_completions = [], [], 0, 0
    for i, messages in enumerate(dataset.prompts):
        prompt = prompt_token_ids(tokenizer, messages, chat_template)
        completion = list(completions[i]) + [stops[0]]
        if len(completion) > max_length - 1:  # keep one prompt token to predict the first completion token
            completion = completion[:max_length - 1]
            cut_completions += 1
        room = max_length - len(completion)
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room:]
            cut_prompts += 1
        all_ids.append(prompt + completion)
        starts.append(len(prompt))
    if cut_prompts or cut_completions:
        extra = f"; {cut_completions} completions were cut on the right" if cut_completions else ""
        log.warning("%s: %d of %d examples exceed max_length=%d: their prompts were cut from the left%s",
                    dataset.source or "instruction data", cut_prompts, len(dataset), max_length, extra)
    prompts = [dataset.prompt_text(i) for i in range(len(dataset))]
    return InstructEncoded.build(all_ids, starts, pad_id, stops, list(dataset.completions), prompts, cut_prompts)
