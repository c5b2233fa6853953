"""Turn text examples into token ids for each task's text layout (SPEC section 1).

Templates are lists of segments: the placeholders ``{a}``, ``{b}`` and ``{mask}`` and literal
text. Segments are tokenised separately and only the text placeholders are truncated, so the
template (and the label-word position) survives any input length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedpeptao.data.dataset import DataError, TextDataset

DEFAULT_TEMPLATES = {
    ("mask", False): "{a} . It was {mask} .",
    ("mask", True): "{a} ? {mask} , {b}",
    ("next_word", False): "{a} It was",
    ("next_word", True): "{a} {b} They are",
}

# Verbaliser words for label names people commonly use; anything else is its own word.
_KNOWN_WORDS = {
    "rotten": "bad", "fresh": "good", "negative": "bad", "positive": "good",
    "entailment": "yes", "not_entailment": "no", "subjective": "personal", "objective": "factual",
    "spam": "spam", "ham": "normal",
}


def default_label_words(label_names: list[str], is_pair: bool) -> list[str]:
    """Label words for a verbaliser when the user gave none."""
    if [n.lower() for n in label_names] == ["0", "1"]:
        return ["no", "yes"] if is_pair else ["bad", "good"]
    return [_KNOWN_WORDS.get(n.lower(), n) for n in label_names]


def label_word_ids(tokenizer, words: list[str], layout: str) -> list[int]:
    """One token id per label word; a word that follows the template (decoders) comes after a space."""
    ids = []
    for word in words:
        text = f" {word}" if layout == "next_word" else word
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise DataError(f"label word '{word}' produces no tokens")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {words} share a first token; choose words that start differently")
    return ids


@dataclass
class EncodedDataset:
    input_ids: list[list[int]]
    target_pos: np.ndarray  # where the class is read: the <mask> or the last token
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        return np.fromiter((len(self.input_ids[i]) for i in indices), dtype=np.int64, count=len(indices))

    def batches(self, indices: np.ndarray, batch_size: int, shuffle: bool = False,
                rng: np.random.Generator | None = None, group_seed: int | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Right-padded batches, padded only to the longest example in the batch.

        ``group_seed`` (training): after the seeded shuffle, examples are grouped by length (a
        stable sort, so equal lengths stay in shuffled order) and the ``j``-th batch is the one whose
        length rank is the rank of ``u_j`` among ``u_0..u_{n-1}``, uniforms drawn from
        ``group_seed``. Every client of a round draws the same ``u``, so at each step all clients
        of a batched pass take batches at about the same length quantile and padding stays small in
        both execution modes, while the order of lengths is still random.
        """
        order = np.asarray(indices)
        if shuffle:
            order = order[(rng or np.random.default_rng()).permutation(len(order))]
        if group_seed is not None:
            order = order[np.argsort(self.lengths(order), kind="stable")]
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if group_seed is not None and chunks:
            ranks = np.argsort(np.argsort(np.random.default_rng(group_seed).random(len(chunks)), kind="stable"))
            chunks = [chunks[r] for r in ranks]
        for chunk in chunks:
            yield self.collate(chunk)

    def collate(self, chunk: np.ndarray) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = self.input_ids[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "target_pos": torch.as_tensor(self.target_pos[chunk], dtype=torch.long),
            "labels": torch.as_tensor(self.labels[chunk], dtype=torch.long),
        }


def stack_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int
                  ) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """One batch of several (right-padded to the longest) and the rows each one fills, in order."""
    width = max(batch["input_ids"].shape[1] for batch in batches)
    rows, start = [], 0
    for batch in batches:
        rows.append(slice(start, start + len(batch["labels"])))
        start += len(batch["labels"])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    combined = {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
                "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
                "target_pos": torch.cat([b["target_pos"] for b in batches]),
                "labels": torch.cat([b["labels"] for b in batches])}
    return combined, rows


def _segments(template: str) -> list[str]:
    return [s for s in re.split(r"(\{a\}|\{b\}|\{mask\})", template) if s]


def _fit(lengths: dict[str, int], budget: int) -> dict[str, int]:
    """Shrink the longest text first until everything fits (like ``truncation='longest_first'``)."""
    lengths = dict(lengths)
    while sum(lengths.values()) > budget and any(lengths.values()):
        longest = max(lengths, key=lambda k: lengths[k])
        lengths[longest] -= 1
    return lengths


def encode(dataset: TextDataset, tokenizer, layout: str, max_length: int, template: str | None = None) -> EncodedDataset:
    """Tokenise a dataset in a task's ``layout`` (:data:`fedpeptao.tasks.base.Layout`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if layout == "plain":
        enc = tokenizer(dataset.texts_a, dataset.texts_b, truncation=True, max_length=max_length)
        ids = enc["input_ids"]
        return EncodedDataset(ids, np.zeros(len(ids), dtype=np.int64), dataset.labels.copy(), pad_id)

    template = template or DEFAULT_TEMPLATES[(layout, dataset.is_pair)]
    parts = _segments(template)
    if dataset.is_pair and "{b}" not in parts:
        raise DataError(f"template '{template}' has no {{b}} for a sentence-pair task")
    if layout == "mask" and "{mask}" not in parts:
        raise DataError(f"template '{template}' needs a {{mask}} for the mlm head")
    literal = {p: tokenizer(p, add_special_tokens=False)["input_ids"] for p in parts if p not in ("{a}", "{b}", "{mask}")}
    before, after = special_wrap(tokenizer)  # e.g. [CLS] ... [SEP], or <bos> ..., or nothing
    fixed = len(before) + len(after) + sum(len(v) for v in literal.values()) + parts.count("{mask}")
    tok_a = tokenizer(dataset.texts_a, add_special_tokens=False)["input_ids"]
    tok_b = tokenizer(dataset.texts_b, add_special_tokens=False)["input_ids"] if dataset.is_pair else None

    all_ids, targets = [], []
    for i in range(len(dataset)):
        texts = {"{a}": tok_a[i]} | ({"{b}": tok_b[i]} if tok_b is not None else {})
        keep = _fit({k: len(v) for k, v in texts.items()}, max_length - fixed)
        body: list[int] = []
        mask_at = -1
        for part in parts:
            if part in texts:
                body += texts[part][:keep[part]]
            elif part == "{mask}":
                mask_at = len(body)
                body.append(tokenizer.mask_token_id)
            else:
                body += literal[part]
        if layout == "mask":
            targets.append(len(before) + mask_at)
        else:  # the label word is predicted from the last template token
            targets.append(len(before) + len(body) - 1)
        all_ids.append(before + body + after)
    return EncodedDataset(all_ids, np.asarray(targets, dtype=np.int64), dataset.labels.copy(), pad_id)


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text.

    Read off by tokenising a probe word with and without special tokens, because fast
    tokenizers in transformers 5 no longer expose ``build_inputs_with_special_tokens``.
    """
    probe = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start:start + len(probe)] == probe:
            return full[:start], full[start + len(probe):]
    raise DataError("cannot find where this tokenizer places text among its special tokens")
