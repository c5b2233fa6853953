"""Generative instruction tuning: reading TRL layouts, encoding, the token loss, greedy generation, metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeptao.core.client import LocalJob, LocalTrainConfig, local_train
from fedpeptao.data.dataset import DataError
from fedpeptao.data.encoding import stack_batches
from fedpeptao.data.instruct import InstructDataset, encode_instruct, load_instruct_dir, read_instruct
from fedpeptao.generation import (
    GenerationScore,
    cache_plan,
    chosen_option,
    completion_loss,
    evaluate_generation,
    exact_match,
    generate,
    greedy_generate,
    normalize_answer,
    parse_options,
    reference_choice,
    score_answer,
)
from fedpeptao.models.loading import ModelError, check_head, load_backbone
from fedpeptao.models.tiny import tiny_backbone
from fedpeptao.tasks import TASKS
from fedpeptao.tasks.generative import Generate, TokenOutput
from fedpeptao.tunings import build_model
from fedpeptao.tunings.adapter import AdapterSettings
from fedpeptao.tunings.deep_prompt import DeepPromptSettings
from fedpeptao.tunings.idpg import IDPGSettings
from fedpeptao.tunings.input_prompt import InputPromptSettings
from fedpeptao.tunings.lora import LoraSettings

INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"
needs_instruct = pytest.mark.skipif(not INSTRUCT.is_dir(), reason="shared instruction data not present")

CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "Where is the ball?"}],
     "completion": [{"role": "assistant", "content": "kitchen"}], "subject": "tom"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
     "completion": [{"role": "assistant", "content": "4"}], "subject": "maths"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- reading ------------------------------------------------------------------------------


def test_conversational_layout_keeps_other_columns(tmp_path):
    data = read_instruct(_write_jsonl(tmp_path / "train.jsonl", CONVERSATIONAL))
    assert data.layout == "conversational" and len(data) == 2
    assert data.prompts[1] == CONVERSATIONAL[1]["prompt"] and data.completions == ["kitchen", "4"]
    assert data.columns == {"subject": ["tom", "maths"]}
    groups, names = data.groups("subject")
    assert names == ["maths", "tom"] and groups.tolist() == [1, 0]
    assert data.subset([1]).columns == {"subject": ["maths"]}


def test_messages_layout_takes_the_last_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "name?"}, {"role": "assistant", "content": "Smol"},
                          {"role": "user", "content": "(ignored)"}]}]
    data = read_instruct(_write_jsonl(tmp_path / "chat.jsonl", rows))
    assert data.layout == "messages"
    assert [m["content"] for m in data.prompts[0]] == ["hi", "hello", "name?"] and data.completions == ["Smol"]


def test_alpaca_and_plain_text_layouts(tmp_path):
    alpaca = read_instruct(_write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"}]))
    assert alpaca.layout == "alpaca"
    assert alpaca.prompts == [[{"role": "user", "content": "Translate\n\nchat"}], [{"role": "user", "content": "Say hi"}]]
    text = read_instruct(_write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1=", "completion": "2"}]))
    assert text.layout == "text" and text.prompts == [[{"role": "user", "content": "1+1="}]]


def test_csv_and_save_to_disk(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('instruction,input,output,category\n"Add 1 and 2",,3,maths\n')
    data = read_instruct(csv_path)
    assert data.layout == "alpaca" and data.completions == ["3"] and data.columns == {"category": ["maths"]}
    conv_csv = tmp_path / "conv.csv"
    conv_csv.write_text('prompt,completion\n"[{""role"": ""user"", ""content"": ""q""}]",'
                        '"[{""role"": ""assistant"", ""content"": ""a""}]"\n')
    assert read_instruct(conv_csv).layout == "conversational"
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CONVERSATIONAL),
                          "test": datasets.Dataset.from_list(CONVERSATIONAL[:1])}).save_to_disk(str(folder))
    train, val, test = load_instruct_dir(folder)
    assert (len(train), val, len(test)) == (2, None, 1) and train.completions == ["kitchen", "4"]


def test_unknown_layout_is_one_line_naming_file_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        read_instruct(path)
    message = str(err.value)
    assert "\n" not in message and "odd.jsonl" in message and "question, answer" in message


def test_bad_rows_name_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONAL[0], {"prompt": "not messages", "completion": []}])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: column 'prompt'"):
        read_instruct(path)
    no_reply = _write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="line 1: column 'messages' has no assistant turn"):
        read_instruct(no_reply)


@needs_instruct
def test_reads_the_shared_instruction_sets():
    for name in ("tomi", "socialiqa", "mmlu"):
        train, val, test = load_instruct_dir(INSTRUCT / name)
        assert train.layout == "conversational" and len(train) > len(test) > 0 and val is None


# -- encoding and the loss ------------------------------------------------------------------


def _tiny(arch: str = "llama", seed: int = 0):
    return tiny_backbone(arch, head="generate", seed=seed)


def _dataset(n: int = 6) -> InstructDataset:
    prompts = [[{"role": "user", "content": f"question number {i} " + "word " * (i % 3)}] for i in range(n)]
    return InstructDataset(prompts, [f"answer {i}" + " more" * (i % 2) for i in range(n)], "conversational")


def test_encoding_without_chat_template_masks_the_prompt():
    backbone = _tiny()
    data = _dataset()
    enc = encode_instruct(data, backbone.tokenizer, 64)
    tok = backbone.tokenizer
    prompt = tok("question number 0 \n", add_special_tokens=False)["input_ids"]
    completion = tok("answer 0", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0] == [tok.cls_token_id] + prompt + completion + [tok.sep_token_id]
    assert enc.completion_ids(0) == completion + [tok.sep_token_id] and enc.eos_ids[0] == tok.sep_token_id
    batch = enc.collate(np.array([0, 1]))
    labels, target = batch["labels"], batch["target_pos"]
    assert labels.shape == (2, enc.label_width)
    for row, i in enumerate([0, 1]):
        n = len(enc.completion_ids(i))
        assert labels[row, :n].tolist() == enc.completion_ids(i) and (labels[row, n:] == -100).all()
        # the token at target_pos + j is the one before completion token j
        assert batch["input_ids"][row, target[row] + 1: target[row] + 1 + n].tolist() == enc.completion_ids(i)
    # batches of different widths still stack (the training loop's shared passes)
    wide = enc.collate(np.array([2, 5]))
    combined, rows = stack_batches([batch, wide], enc.pad_id)
    assert combined["labels"].shape == (4, enc.label_width) and rows == [slice(0, 2), slice(2, 4)]


def test_left_truncation_warns_once_with_the_count(caplog):
    backbone = _tiny()
    long = InstructDataset([[{"role": "user", "content": "one two three four five six seven eight nine ten " * 3}]] * 3
                           + [[{"role": "user", "content": "short"}]], ["the answer"] * 4, "conversational", source="x")
    with caplog.at_level(logging.WARNING, logger="fedpeptao.data"):
        enc = encode_instruct(long, backbone.tokenizer, 16)
    warnings = [r for r in caplog.records if r.name == "fedpeptao.data"]
    assert len(warnings) == 1 and "3 of 4 examples exceed max_length=16" in warnings[0].getMessage()
    full = backbone.tokenizer("one two three four five six seven eight nine ten " * 3 + "\n",
                              add_special_tokens=False)["input_ids"]
    completion = enc.completion_ids(0)
    assert len(enc.input_ids[0]) == 16 and completion == backbone.tokenizer(
        "the answer", add_special_tokens=False)["input_ids"] + [backbone.tokenizer.sep_token_id]
    assert enc.prompt_ids(0) == full[-(16 - len(completion)):]  # the prompt's end is kept
    assert enc.truncated == 3 and len(enc.input_ids[3]) < 16


def test_chat_template_is_used_where_the_tokenizer_has_one():
    backbone = _tiny()
    tok = backbone.tokenizer
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    enc = encode_instruct(_dataset(1), tok, 64)
    text = tok.apply_chat_template(_dataset(1).prompts[0], tokenize=False, add_generation_prompt=True)
    assert enc.prompt_ids(0) == tok(text, add_special_tokens=False)["input_ids"]
    assert encode_instruct(_dataset(1), tok, 64, chat_template=False).prompt_ids(0)[0] == tok.cls_token_id


def _tuned(settings=None, arch: str = "llama", seed: int = 0, scale: float = 0.0):
    backbone = _tiny(arch)
    model = build_model(settings or DeepPromptSettings(num_prompt_tokens=4, prompt_dropout=0.0), backbone.model,
                        Generate(backbone.model), seed)
    if scale:  # move the tuning away from its initialisation, so it visibly changes the output
        gen = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen) * scale)
    return backbone, model


def test_generate_task_is_registered_for_decoders_only():
    assert TASKS["generate"] is Generate and Generate.backbone_class == "causal_lm"
    with pytest.raises(ModelError, match="head='generate' needs a decoder"):
        check_head("encoder", "generate", "tiny-bert")
    _, model = _tuned()
    assert model.head is None and model.head_names() == []


def test_loss_is_the_token_mean_over_completion_tokens_only():
    backbone, model = _tuned()
    enc = encode_instruct(_dataset(), backbone.tokenizer, 64)
    batch = enc.collate(np.arange(6))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        full = model.model.get_output_embeddings()(model.encode(batch["input_ids"], batch["attention_mask"])
                                                   .last_hidden_state)
    losses, rows = [], []
    for row in range(6):
        start = int(batch["target_pos"][row]) + 1
        n = len(enc.completion_ids(row))
        logits = full[row, start - 1: start - 1 + n]
        targets = batch["input_ids"][row, start: start + n]
        losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
        rows.append(torch.full((n,), row))
    token_losses = torch.cat(losses)
    assert isinstance(out, TokenOutput)
    torch.testing.assert_close(out.loss, token_losses.mean())  # token-weighted, not a mean of row means
    torch.testing.assert_close(out.row_losses(), torch.stack([l.mean() for l in losses]))
    torch.testing.assert_close(out.row_token_counts(), torch.tensor([float(len(l)) for l in losses]))
    # one client's rows of a batched pass: the token mean over its rows, as if they were their own batch
    torch.testing.assert_close(out.loss_of(slice(2, 5)), torch.cat(losses[2:5]).mean())
    torch.testing.assert_close(out.rows(slice(2, 5)).loss, torch.cat(losses[2:5]).mean())
    own = model(**enc.collate(np.arange(2, 5)))
    torch.testing.assert_close(own.loss, out.loss_of(slice(2, 5)), rtol=1e-5, atol=1e-6)
    # only completion tokens carry loss
    assert out.token_losses.numel() == sum(len(enc.completion_ids(i)) for i in range(6))


def test_local_training_runs_unchanged_and_lowers_the_loss():
    backbone, model = _tuned(seed=1)
    enc = encode_instruct(_dataset(8), backbone.tokenizer, 64)
    before = completion_loss(model, enc, [np.arange(8)])[0]
    cfg = LocalTrainConfig(epochs=4, batch_size=4, lr=5e-2)
    result = local_train(model, enc, [LocalJob(model, np.arange(8), np.random.default_rng(0))], cfg)[0]
    after = completion_loss(model, enc, [np.arange(8)])[0]
    assert result.num_steps == 8 and np.isfinite(result.mean_loss)
    assert after[1] == before[1] == enc.num_completion_tokens(np.arange(8))
    assert after[0] < before[0]


# -- greedy generation ------------------------------------------------------------------------


def _step_by_step(model, prompt: list[int], eos: list[int], steps: int) -> list[int]:
    """The reference: each step the whole sequence without a cache, argmax of the last position."""
    sequence, new = list(prompt), []
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([sequence])
            hidden = model.encode(ids, torch.ones_like(ids)).last_hidden_state[0, -1]
            token = int(model.model.get_output_embeddings()(hidden).argmax())
            if token in eos:
                break
            new.append(token)
            sequence.append(token)
    return new


PROMPTS = [[101, 2000, 2001, 2002, 2003], [101, 3000, 3001], [101, 4000, 4001, 4002, 4003, 4004, 4005, 4006]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deep_prompt_generation_equals_step_by_step_and_differs_from_the_backbone(arch):
    _, model = _tuned(arch=arch, scale=0.5)
    assert cache_plan(model) == "backbone"
    got = greedy_generate(model, PROMPTS, [102], 0, max_new_tokens=6)
    assert got == [_step_by_step(model, p, [102], 6) for p in PROMPTS]
    bare = _tiny(arch).model
    bare_model = build_model(LoraSettings(), bare, Generate(bare), 0)  # LoRA's B = 0: exactly the backbone
    assert greedy_generate(bare_model, PROMPTS, [102], 0, max_new_tokens=6) != got
    assert greedy_generate(model, PROMPTS, [102], 0, max_new_tokens=6, use_cache=False) == got


@pytest.mark.parametrize("settings", [LoraSettings(), AdapterSettings(), InputPromptSettings(num_prompt_tokens=3),
                                      IDPGSettings(num_prompt_tokens=3)], ids=lambda s: s.name)
def test_other_tunings_generate_as_step_by_step(settings):
    _, model = _tuned(settings, scale=0.5)
    got = greedy_generate(model, PROMPTS, [102], 0, max_new_tokens=5)
    assert got == [_step_by_step(model, p, [102], 5) for p in PROMPTS]
    assert cache_plan(model) == {"lora": "backbone", "adapter": "backbone", "input_prompt": "input_prompt",
                                 "idpg": None}[settings.name]


def test_generation_stops_at_eos_per_row():
    _, model = _tuned(scale=0.5)
    free = greedy_generate(model, PROMPTS, [102], 0, max_new_tokens=4)
    stop = free[0][1]  # make the second token of row 0 an end of sequence
    stopped = greedy_generate(model, PROMPTS, [102, stop], 0, max_new_tokens=4)
    assert stopped[0] == free[0][:1]
    assert len(stopped[2]) <= 4 and all(stop not in row for row in stopped)


def test_several_clients_generate_in_one_pass_as_alone():
    backbone, model = _tuned(seed=2)
    enc = encode_instruct(_dataset(6), backbone.tokenizer, 64)
    tensors = []
    for k in range(2):
        gen = torch.Generator().manual_seed(40 + k)
        tensors.append({n: p.detach() + torch.randn(p.shape, generator=gen) * 0.5
                        for n, p in model.named_parameters() if p.requires_grad})
    parts = [np.array([0, 3, 4]), np.array([5, 1])]
    together = generate(model, backbone.tokenizer, enc, parts, tensors, max_new_tokens=4, batch_size=8)
    alone = [generate(model, backbone.tokenizer, enc, [part], [t], max_new_tokens=4)[0]
             for part, t in zip(parts, tensors)]
    assert together == alone


# -- metrics ----------------------------------------------------------------------------------


def test_normalised_exact_match():
    assert normalize_answer("  The Pantry! ") == "pantry"
    assert exact_match("the  pantry.", "Pantry") and exact_match("An apple", "apple")
    assert not exact_match("pantry box", "pantry")
    # an option letter that is an article is still an answer: "A" matches "a." and not "The" or "B"
    assert exact_match("A.", "A") and exact_match("a", "A")
    assert not exact_match("The", "A") and not exact_match("", "A") and not exact_match("B", "A")


MMLU = "Question?\nA. Easy\nB. Difficult\nC. Slow to warm up\nD. Secure\nAnswer:"
SIQA = "What next? A: pay the bill; B: useless; C: supported."


def test_multiple_choice_options_and_letters():
    assert parse_options(MMLU) == {"A": "Easy", "B": "Difficult", "C": "Slow to warm up", "D": "Secure"}
    assert parse_options(SIQA) == {"A": "pay the bill", "B": "useless", "C": "supported"}
    assert parse_options("Where is the ball?") == {}
    assert reference_choice("C", {}) == "C" and reference_choice("(B)", {}) == "B"
    assert reference_choice("E", {}) is None  # without listed options only A-D name a choice
    assert reference_choice("Slow to warm up", parse_options(MMLU)) == "C"
    assert reference_choice("kitchen", {}) is None
    assert chosen_option("C. Slow to warm up", parse_options(MMLU)) == "C"
    assert chosen_option("Answer: B", parse_options(MMLU)) == "B"
    assert chosen_option("The answer is (D)", parse_options(MMLU)) == "D"
    assert chosen_option("Secure", parse_options(MMLU)) == "D"  # no letter: the option's text
    assert chosen_option("E", parse_options(MMLU)) is None  # not an option
    assert chosen_option("useless", parse_options(SIQA)) == "B"


def test_scores_pool_by_adding_counts():
    a = score_answer("C", "C", MMLU)
    b = score_answer("B. Difficult", "C", MMLU)
    c = score_answer("the pantry", "pantry", "Where is it?")
    assert (a.exact, a.choice_correct, b.exact, b.choice_correct, c.exact, c.choice_examples) == (1, 1, 0, 0, 1, 0)
    pooled = sum([a, b, c], GenerationScore())
    assert pooled == GenerationScore(examples=3, exact=2, choice_examples=2, choice_correct=1)
    assert pooled.metrics() == {"exact_match": 2 / 3, "choice_accuracy": 0.5}
    assert GenerationScore.from_counts(pooled.counts()) == pooled


@pytest.mark.slow
@needs_instruct
def test_smollm2_answers_tomi_prompts_with_a_deep_prompt():
    backbone = load_backbone("smollm2-135m", head="generate")
    data = read_instruct(INSTRUCT / "tomi" / "test.jsonl").subset([0, 1, 2])
    enc = encode_instruct(data, backbone.tokenizer, 256, model=backbone.model)
    assert backbone.tokenizer.decode(enc.prompt_ids(0)).endswith("<|im_start|>assistant\n")
    assert backbone.tokenizer.decode(enc.completion_ids(0)) == data.completions[0] + "<|im_end|>"
    model = build_model(DeepPromptSettings(num_prompt_tokens=8, prompt_dropout=0.0), backbone.model,
                        Generate(backbone.model), 0)
    answers = generate(model, backbone.tokenizer, enc, [np.arange(3)], max_new_tokens=6)[0]
    reference = [backbone.tokenizer.decode(_step_by_step(model, enc.prompt_ids(i), enc.eos_ids, 6),
                                           skip_special_tokens=True) for i in range(3)]
    assert answers == reference and all(answers)
    scores = evaluate_generation(model, backbone.tokenizer, enc, [np.arange(3)], max_new_tokens=6)
    assert scores[0].examples == 3 and scores[0].choice_examples == 0
    # prompts that lose tokens on the left still end with the generation prompt
    short = generate(model, backbone.tokenizer, enc, [np.arange(1)], max_new_tokens=4, max_length=24)
    assert isinstance(short[0][0], str)
