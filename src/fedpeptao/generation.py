"""Greedy generation with a tuned causal LM, and the metrics of generated answers.

Generation (:func:`greedy_generate` for one batch of prompts, :func:`generate` for clients' examples
of an :class:`~fedpeptao.data.instruct.InstructEncoded`, several clients in one pass as
:func:`fedpeptao.core.client.predict` does) is batched with left padding, stops each row at an
EOS token or after ``max_new_tokens``, and runs with any tuning:

- with a key/value cache where the tuning runs the backbone as is (``deep_prompt``, ``lora``,
  ``adapter``, no tuning): deep prompts are prepended to every layer's keys and values at every
  step by their attention function, and position ids stay shifted by the prompt length (as in
  training), so the tokens equal a step-by-step forward without a cache;
- with a cache for ``input_prompt`` (PEFT prompt tuning): its prompt embeddings are prepended once
  and then live in the cache, with the positions PEFT gives them in training;
- without a cache for input prompts computed from the text itself (``idpg``, ``attempt``): they
  see the whole sequence in training (prompt and completion), so each step reruns the full
  sequence, right-padded as in training (quadratic in the new tokens; fine for short answers).

Metrics (pure functions): SQuAD-style normalised exact match, and for multiple-choice questions
(the reference is an option letter, or the prompt lists options) whether the first option letter
of the generated text is the right one. :class:`GenerationScore` holds counts, so clients' scores
pool by adding them.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedpeptao.core.client import client_rows, own_tensors, row_batches
from fedpeptao.data.instruct import InstructEncoded
from fedpeptao.models.tuned import TunedModel
from fedpeptao.prompts.prefix import position_ids

CachePlan = Literal["backbone", "input_prompt"]


# -- greedy generation ----------------------------------------------------------------------


def cache_plan(model: TunedModel) -> CachePlan | None:
    """How ``model`` generates with a key/value cache, or None: it reruns the whole sequence."""
    if type(model).encode is TunedModel.encode:  # the tuning lives inside the backbone's modules
        return "backbone"
    from fedpeptao.tunings.input_prompt import FedPromptModel  # noqa: PLC0415

    if isinstance(model, FedPromptModel):
        return "input_prompt"
    return None


@torch.no_grad()
def greedy_generate(model: TunedModel, prompts: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int,
                    max_new_tokens: int = 32, use_cache: bool | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, without the EOS that ended it).

    ``use_cache``: None uses a key/value cache where the tuning allows (:func:`cache_plan`);
    False reruns the whole sequence every step (the reference the cache must equal).
    """
    if max_new_tokens < 1 or not prompts:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    plan = cache_plan(model) if use_cache is not False else None
    if use_cache and plan is None:
        raise ValueError(f"{type(model).__name__} cannot generate with a key/value cache")
    was_training = model.training
    model.eval()
    try:
        if plan is None:
            return _uncached(model, prompts, eos_ids, pad_id, max_new_tokens)
        return _cached(model, plan, prompts, eos_ids, pad_id, max_new_tokens)
    finally:
        model.train(was_training)


def _lm_head(model: TunedModel) -> nn.Module:
    return model.model.get_output_embeddings()


def _cache_kwarg(body: nn.Module) -> str:
    """The name of the cache argument (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class _Decoder:
    """Greedy choice, EOS bookkeeping and the tokens kept, shared by both paths."""

    def __init__(self, rows: int, eos_ids: Sequence[int], pad_id: int, device) -> None:
        self.eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps: list[torch.Tensor] = []

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        token = logits.float().argmax(-1)
        token = torch.where(self.done, torch.full_like(token, self.pad_id), token)
        ended = torch.isin(token, self.eos) & ~self.done
        self.steps.append(torch.where(ended | self.done, torch.full_like(token, -1), token))
        self.done |= ended
        return token

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def tokens(self) -> list[list[int]]:
        table = torch.stack(self.steps, 1).cpu().tolist()
        return [[t for t in row if t >= 0] for row in table]


def _cached(model: TunedModel, plan: CachePlan, prompts, eos_ids, pad_id: int, max_new_tokens: int) -> list[list[int]]:
    from transformers import DynamicCache  # noqa: PLC0415

    body, head, backbone = model.body(), _lm_head(model), model.model
    ids, mask = _left_padded(prompts, pad_id, model.device)
    cache = DynamicCache(config=backbone.config)
    common = {_cache_kwarg(body): cache, "use_cache": True, "return_dict": True}
    if plan == "backbone":
        shift = model.num_prefix_positions
        out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(backbone, mask, shift), **common)
    else:  # PEFT prompt tuning: the prompt embeddings first, at positions 0..P-1 as PEFT gives them
        embeds = backbone.get_input_embeddings()(ids)
        prompt = model.peft.get_prompt(batch_size=len(prompts)).to(embeds.dtype)
        mask = torch.cat([torch.ones(len(prompts), prompt.shape[1], dtype=mask.dtype, device=mask.device), mask], 1)
        shift = 0
        out = body(inputs_embeds=torch.cat([prompt, embeds], 1), attention_mask=mask,
                   position_ids=position_ids(backbone, mask, shift), **common)
    decoder = _Decoder(len(prompts), eos_ids, pad_id, model.device)
    token = decoder.choose(head(out.last_hidden_state[:, -1]))
    for _ in range(max_new_tokens - 1):
        if decoder.finished:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = body(input_ids=token.unsqueeze(1), attention_mask=mask,
                   position_ids=position_ids(backbone, mask, shift)[:, -1:], **common)
        token = decoder.choose(head(out.last_hidden_state[:, -1]))
    return decoder.tokens()


def _uncached(model: TunedModel, prompts, eos_ids, pad_id: int, max_new_tokens: int) -> list[list[int]]:
    """Every step reruns each whole sequence through the tuned model, right-padded as in training."""
    head = _lm_head(model)
    sequences = [list(p) for p in prompts]
    decoder = _Decoder(len(prompts), eos_ids, pad_id, model.device)
    for _ in range(max_new_tokens):
        if decoder.finished:
            break
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.as_tensor(seq)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        hidden = model.encode(ids, mask).last_hidden_state
        last = torch.as_tensor([len(s) - 1 for s in sequences], device=model.device)
        token = decoder.choose(head(hidden[torch.arange(len(sequences), device=model.device), last]))
        for seq, t in zip(sequences, token.tolist()):
            seq.append(t)
    return decoder.tokens()


def generate(model: TunedModel, tokenizer, data: InstructEncoded, parts: Sequence[np.ndarray],
             tensors: Sequence[dict[str, torch.Tensor]] | None = None, max_new_tokens: int = 32,
             batch_size: int = 16, max_length: int | None = None, use_cache: bool | None = None
             ) -> list[list[str]]:
    """The greedy answer (text) to each of client ``k``'s prompts ``parts[k]`` (in that order) under
    its tensors ``tensors[k]`` (None: the model's own).

    As :func:`fedpeptao.core.client.predict`: examples run shortest prompt first, several clients'
    examples share a batch (slot mode, each client's rows contiguous), one client's tensors are
    simply loaded. ``max_length``: prompts lose tokens on the left so that prompt and answer fit.
    """
    rows = client_rows(model, parts, tensors)
    owner, position, examples = rows.owner, rows.position, rows.examples
    budget = None if max_length is None else max(1, max_length - max_new_tokens)
    prompt_lengths = data.prompt_lengths[examples] if len(examples) else np.zeros(0, dtype=np.int64)
    answers: list[list[str]] = [[""] * len(part) for part in parts]
    for chunk in row_batches(rows, prompt_lengths, batch_size):
        prompts = [data.prompt_ids(int(examples[j])) for j in chunk]
        if budget is not None:
            prompts = [p[-budget:] for p in prompts]
        with own_tensors(model, rows, chunk):
            new = greedy_generate(model, prompts, data.eos_ids, data.pad_id, max_new_tokens, use_cache)
        for j, ids in zip(chunk, new):
            answers[owner[j]][position[j]] = tokenizer.decode(ids, skip_special_tokens=True)
    return answers


@torch.no_grad()
def completion_loss(model: TunedModel, data: InstructEncoded, parts: Sequence[np.ndarray],
                    tensors: Sequence[dict[str, torch.Tensor]] | None = None, batch_size: int = 32
                    ) -> list[tuple[float, int]]:
    """Client ``k``'s summed completion-token loss over ``parts[k]`` and its number of tokens: pooled
    over clients (sum / sum) it is the token-weighted loss of the union."""
    model.eval()
    rows = client_rows(model, parts, tensors)
    owner, examples = rows.owner, rows.examples
    sums, counts, whose = [], [], []
    for chunk in row_batches(rows, data.lengths(examples), batch_size):
        batch = data.collate(examples[chunk])
        with own_tensors(model, rows, chunk):
            out = model(**batch)
        sums.append(out.row_loss_sums())
        counts.append(out.row_token_counts())
        whose.append(owner[chunk])
    if not sums:
        return [(0.0, 0) for _ in parts]
    who = np.concatenate(whose)
    loss = np.bincount(who, weights=torch.cat(sums).double().cpu().numpy(), minlength=len(parts))
    tokens = np.bincount(who, weights=torch.cat(counts).double().cpu().numpy(), minlength=len(parts))
    return [(float(s), int(round(n))) for s, n in zip(loss, tokens)]


# -- metrics --------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised equality. A reference that is all article or punctuation (the option letter
    ``A``) keeps its articles on both sides: SQuAD's rule would turn it into the empty string,
    which every answer made of articles (``The.``) would then match."""
    wanted = normalize_answer(reference)
    if wanted:
        return normalize_answer(prediction) == wanted

    def bare(text: str) -> str:
        return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())

    return bare(prediction) == bare(reference)


#: option lines as multiple-choice prompts list them: ``A. text`` / ``(A) text`` on their own lines,
#: or ``A: text; B: text`` inline
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s+(.+?)\s*$", re.MULTILINE)
_OPTION_INLINE = re.compile(r"(?:^|[\s;,])([A-J]):\s*([^;]+?)(?=\s*;\s*[A-J]:|\s*\.?\s*$)", re.MULTILINE)
DEFAULT_LETTERS = "ABCD"


def parse_options(prompt: str) -> dict[str, str]:
    """The options a prompt lists, letter -> text (empty: none, or fewer than two in order A, B, ...)."""
    for pattern in (_OPTION_LINE, _OPTION_INLINE):
        options: dict[str, str] = {}
        for letter, text in pattern.findall(prompt):
            if letter == "ABCDEFGHIJ"[len(options)] and letter not in options:
                options[letter] = text.strip()
        if len(options) >= 2:
            return options
    return {}


def reference_choice(reference: str, options: dict[str, str]) -> str | None:
    """The option letter a reference names: the letter itself (``C``, ``C.``, ``(C)``), or the
    option whose text it is; None when the question is not multiple choice."""
    letters = "".join(options) or DEFAULT_LETTERS
    match = re.fullmatch(r"\s*\(?([A-J])[.):]?\s*", reference)
    if match and match.group(1) in letters:
        return match.group(1)
    wanted = normalize_answer(reference)
    found = [letter for letter, text in options.items() if normalize_answer(text) == wanted]
    return found[0] if len(found) == 1 else None


def chosen_option(generated: str, options: dict[str, str]) -> str | None:
    """The option a generated answer picks: its first standalone option letter (``B``, ``B.``,
    ``(B)``, ``Answer: B``), else the option whose text it is; None if neither."""
    letters = "".join(options) or DEFAULT_LETTERS
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", generated)
    if match:
        return match.group(1)
    wanted = normalize_answer(generated)
    found = [letter for letter, text in options.items() if wanted and normalize_answer(text) == wanted]
    return found[0] if len(found) == 1 else None


@dataclass
class GenerationScore:
    """Counts over generated answers; add clients' scores to pool them (``sum(scores, GenerationScore())``)."""

    examples: int = 0
    exact: int = 0  # normalised exact matches
    choice_examples: int = 0  # multiple-choice questions among them
    choice_correct: int = 0  # ... whose chosen option is the reference's

    def __add__(self, other: GenerationScore) -> GenerationScore:
        return GenerationScore(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def counts(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> GenerationScore:
        return cls(**{k: int(v) for k, v in counts.items()})

    def metrics(self) -> dict[str, float]:
        """``exact_match`` over every example; ``choice_accuracy`` over the multiple-choice ones (when any)."""
        out = {"exact_match": self.exact / self.examples if self.examples else 0.0}
        if self.choice_examples:
            out["choice_accuracy"] = self.choice_correct / self.choice_examples
        return out


def score_answer(generated: str, reference: str, prompt: str = "") -> GenerationScore:
    """One example's score: exact match, and the chosen option where the question is multiple choice."""
    options = parse_options(prompt)
    right = reference_choice(reference, options)
    score = GenerationScore(1, int(exact_match(generated, reference)))
    if right is not None:
        score.choice_examples = 1
        score.choice_correct = int(chosen_option(generated, options) == right)
    return score


def score_answers(generated: Sequence[str], references: Sequence[str], prompts: Sequence[str] | None = None
                  ) -> GenerationScore:
    prompts = prompts if prompts is not None else [""] * len(references)
    return sum((score_answer(g, r, p) for g, r, p in zip(generated, references, prompts, strict=True)),
               GenerationScore())


def evaluate_generation(model: TunedModel, tokenizer, data: InstructEncoded, parts: Sequence[np.ndarray],
                        tensors: Sequence[dict[str, torch.Tensor]] | None = None, max_new_tokens: int = 32,
                        batch_size: int = 16, max_length: int | None = None) -> list[GenerationScore]:
    """Client ``k``'s :class:`GenerationScore` on ``parts[k]``: generate, then score against the references."""
    answers = generate(model, tokenizer, data, parts, tensors, max_new_tokens, batch_size, max_length)
    return [score_answers(texts, [data.references[i] for i in part], [data.prompt_texts[i] for i in part])
            for texts, part in zip(answers, parts)]
