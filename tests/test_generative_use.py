"""Using a generative run: load_run(...).generate / evaluate, `fedpeptao generate` / `evaluate`, the PEFT
export (an adapter that, loaded by PEFT on a fresh backbone, generates what we generate), and the
Flower evaluation reply of a generative run (the same metrics rows as the simulator)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import (keep_process_settings, rows_without_timing, run_in_process,  # noqa: E402,F401
                            tiny_experiment)
from test_generative_runs import write_instruct  # noqa: E402

import fedpeptao  # noqa: E402
from fedpeptao.cli import main  # noqa: E402
from fedpeptao.config import ExperimentConfig, load_config  # noqa: E402
from fedpeptao.data.instruct import encode_instruct, load_instruct_splits  # noqa: E402
from fedpeptao.export import export, patch_peft_prefix_generation  # noqa: E402
from fedpeptao.generation import generate  # noqa: E402
from fedpeptao.models.loading import load_backbone  # noqa: E402
from fedpeptao.sim.simulator import Simulation, run_experiment  # noqa: E402
from fedpeptao.trained import RunError  # noqa: E402
from fedpeptao.utils.round_log import TIMING  # noqa: E402

TOMI = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "tomi"
PROMPTS = ["The cup is in the box. Where is the cup?",
           [{"role": "user", "content": "The apple is in the garden. Where is the apple?"}],
           [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Where is the key?"}]]


def generative_run(root: Path, name: str, *extra: str) -> Path:
    task = write_instruct(root / "instruct", repeat=1)
    cfg = load_config(None, [f"output_dir={root}", f"run_name={name}", "model.name=tiny-llama", "model.head=generate",
                             f"data.task={task}", "model.max_length=48", "federated.num_clients=2",
                             "federated.clients_per_round=2", "federated.rounds=2", "method.name=fedavg",
                             "progress=false", "generation.max_new_tokens=5", "client.lr=0.05", *extra])
    return run_experiment(cfg)[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generative-use")
    return {tuning: generative_run(root, tuning, f"tuning.name={tuning}") for tuning in ("deep_prompt", "lora")}


@pytest.fixture(scope="module")
def run(runs) -> Path:
    return runs["deep_prompt"]


def cli_generate(run_dir: Path, source: Path, out: Path, *extra: str) -> list[dict]:
    assert main(["generate", str(run_dir), "--input", str(source), "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the Python API ---------------------------------------------------------------------------------

def test_evaluate_reproduces_the_runs_own_test_metrics(run):
    """FedAvg: every client evaluates the global model, so the last row pools it over the whole test split."""
    model = fedpeptao.load_run(run)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = model.evaluate()
    assert metrics["metric"] == "exact_match" and metrics["examples"] == last["eval_examples"] == 24
    assert metrics["exact_match"] == last["exact_match"]
    assert metrics["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    assert metrics["tokens"] > 0 and "choice_accuracy" not in metrics
    folder = run.parent / "instruct"
    for data in (folder, folder / "test.jsonl"):  # a task folder (its test split) or one file
        assert model.evaluate(data) == metrics


def test_multiple_choice_questions_are_scored_by_the_chosen_option(run, tmp_path):
    rows = [{"prompt": f"Where is the {t}?\nA. box\nB. garden", "completion": letter}
            for t, letter in (("cup", "A"), ("pen", "B"), ("hat", "A"))]
    metrics = fedpeptao.load_run(run).evaluate(write_jsonl(tmp_path / "mc.jsonl", rows))
    assert metrics["examples"] == 3 and 0.0 <= metrics["choice_accuracy"] <= 1.0 and "exact_match" in metrics


def test_generate_answers_prompts_as_the_run_evaluation_does(run):
    model = fedpeptao.load_run(run)
    answers = model.generate(PROMPTS)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # a string is one user turn; batching and order do not change an answer
    assert model.generate([PROMPTS[1][0]["content"], PROMPTS[0]]) == [answers[1], answers[0]]
    assert model.generate(PROMPTS, batch_size=1) == answers
    # the same text the engine generates for the test split (same prompt layout, length cut and stop)
    cfg = model.cfg
    test = load_instruct_splits(cfg.data, cfg.data_seed())[2]
    encoded = encode_instruct(test, model.backbone.tokenizer, model.text_length, model=model.backbone.model)
    (expected,) = generate(model.model, model.backbone.tokenizer, encoded, [np.arange(len(test))],
                           max_new_tokens=cfg.generation.max_new_tokens, max_length=cfg.model.max_length)
    assert model.generate(test.prompts) == expected
    # max_new_tokens caps the answer: one token is the first of the run's default five
    short = model.generate(PROMPTS, max_new_tokens=1)
    assert all(a.startswith(s) and len(s) <= len(a) for s, a in zip(short, answers)) and short != answers
    # prompts longer than the run's length lose their beginning, as in evaluation
    long = ["word " * 100 + "where is the cup?"]
    assert model.count_truncated_prompts(long) == 1 and len(model.prompt_ids(long)[0]) == model.text_length - 5
    assert model.generate(long) == model.generate(["word " * 60 + "where is the cup?"])


def test_each_kind_of_model_refuses_the_other_kinds_use_in_one_line(run, tmp_path, task_dir, capsys):
    gen = fedpeptao.load_run(run)
    for call in (lambda: gen.predict(["a text"]), lambda: gen.predict_proba(["a text"]),
                 lambda: gen.count_truncated(["a text"])):
        with pytest.raises(RunError, match=r"^predict: this run's model generates text \(model.head=generate\)"):
            call()
    for bad, error, says in (("one prompt", TypeError, "list of prompts"), ([], ValueError, "no prompts"),
                             ([{"role": "user", "content": "x"}], TypeError, "one message"),
                             ([[{"role": "robot", "content": "x"}]], ValueError, "unknown role"),
                             ([[{"role": "user"}]], TypeError, "dict of strings")):
        with pytest.raises(error, match=says):
            gen.generate(bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate(["x"], batch_size=0)
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=c", "model.name=tiny-bert", f"data.task={task_dir}",
                             "federated.num_clients=2", "federated.clients_per_round=2", "federated.rounds=1",
                             "method.name=fedavg", "progress=false", "model.max_length=16"])
    classifier_run = run_experiment(cfg)[1]
    classifier = fedpeptao.load_run(classifier_run)
    assert set(classifier.predict(["a gripping film"])) <= {"0", "1"}  # classification works as before
    with pytest.raises(RunError, match=r"^generate: this run's model classifies text \(model.head=linear\)"):
        classifier.generate(["where is the cup?"])
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "where is the cup?"}])
    assert main(["generate", str(classifier_run), "--input", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: generate: this run's model classifies text") and "\n" not in err


# -- the command line --------------------------------------------------------------------------------

def test_cli_generate_reads_prompts_or_instruct_files_and_writes_json_lines(run, tmp_path, capsys, monkeypatch):
    model = fedpeptao.load_run(run)
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    rows = cli_generate(run, source, tmp_path / "out.jsonl")
    assert [r["prompt"] for r in rows] == PROMPTS and [r["generated"] for r in rows] == model.generate(PROMPTS)
    rows = cli_generate(run, source, tmp_path / "short.jsonl", "--max-new-tokens", "1")
    assert [r["generated"] for r in rows] == model.generate(PROMPTS, max_new_tokens=1)
    # an instruction file in any layout the run could train on: its prompts are answered
    test_file = run.parent / "instruct" / "test.jsonl"
    rows = cli_generate(run, test_file, tmp_path / "test.jsonl")
    prompts = [json.loads(line)["prompt"] for line in test_file.read_text().splitlines()]
    assert [r["generated"] for r in rows] == model.generate(prompts)
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,output\nWhere is the cup?,The cup is in the box.,box\n")
    rows = cli_generate(run, alpaca, tmp_path / "alpaca.jsonl")
    assert rows[0]["generated"] == model.generate(["Where is the cup?\n\nThe cup is in the box."])[0]
    # standard input, to standard output
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"prompt": "where is the pen?"}) + "\n"))
    capsys.readouterr()
    assert main(["generate", str(run), "--input", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == model.generate(["where is the pen?"])[0]

    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(model.evaluate()))
    assert main(["evaluate", str(run)]) == 0 and "| exact_match |" in capsys.readouterr().out

    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (tmp_path / "odd.jsonl").write_text('{"prompt": 3}\n')
    for argv, says in ((["generate", str(run), "--input", str(tmp_path / "bad.jsonl")], "line 2 is not JSON"),
                       (["generate", str(run), "--input", str(tmp_path / "odd.jsonl")], "line 1: 'prompt' should be"),
                       (["generate", str(run), "--input", str(source), "--max-new-tokens", "0"], "max_new_tokens"),
                       (["predict", str(run), "--input", str(tmp_path / "alpaca.csv")], "generates text")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, err


# -- the PEFT export ----------------------------------------------------------------------------------

def peft_generate(adapter: Path, base_name: str, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """What a plain PEFT user computes: the adapter on a fresh backbone, ``generate`` (greedy), decoded
    up to the first of the EOS ids ``generation.json`` lists."""
    from peft import PeftModel

    card = json.loads((adapter / "generation.json").read_text())
    base = load_backbone(base_name, head="generate")
    tokenizer, eos = base.tokenizer, card["eos_token_ids"]
    model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    answers = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                                          dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            ended = next((i for i, t in enumerate(out) if t in eos), len(out))
            answers.append(tokenizer.decode(out[:ended], skip_special_tokens=True))
    return answers


@pytest.mark.parametrize("tuning", ["deep_prompt", "lora"])
def test_peft_adapter_generates_what_fedpeptao_generate_does(runs, tuning, tmp_path):
    run_dir = runs[tuning]
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--format", "peft", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert (out / "generation.json").is_file() and not (out / "classifier.json").exists()
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    ours = [r["generated"] for r in cli_generate(run_dir, source, tmp_path / "ours.jsonl", "--max-new-tokens", "8")]
    patch_peft_prefix_generation()  # PEFT 0.21.2 + transformers 5.24 drop the prefix in generate (export.py)
    ids = fedpeptao.load_run(run_dir).prompt_ids(PROMPTS, 8)
    assert peft_generate(out, "tiny-llama", ids, 8) == ours
    assert any(ours)  # not an empty answer everywhere


@pytest.mark.skipif(not (TOMI / "test.jsonl").is_file(), reason="needs ../shared/data/instruct/tomi")
@pytest.mark.parametrize("tuning", ["deep_prompt", "lora"])
def test_peft_export_of_real_smollm2_generates_what_we_generate_on_tomi(tmp_path, tuning):
    """One round on 8 ToMi examples (about 20 s on a busy 2-core CPU); 3 test prompts, 4 new tokens."""
    tuned = [f"tuning.name={tuning}"] + (["tuning.num_prompt_tokens=8"] if tuning == "deep_prompt" else [])
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=tomi", "model.name=smollm2-135m",
                             "model.head=generate", f"data.task={TOMI}", "data.max_train_examples=8",
                             "data.max_eval_examples=2", "data.validation_fraction=0.0", "model.max_length=128",
                             "federated.num_clients=2", "federated.clients_per_round=2", "federated.rounds=1",
                             "method.name=fedavg", *tuned, "client.batch_size=8", "client.epochs=1",
                             "generation.max_new_tokens=4", "progress=false"])
    _, run_dir = run_experiment(cfg)
    prompts = [json.loads(line)["prompt"] for line in (TOMI / "test.jsonl").read_text().splitlines()[:3]]
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    ours = [r["generated"] for r in cli_generate(run_dir, source, tmp_path / "ours.jsonl")]
    model = fedpeptao.load_run(run_dir)
    export(model, tmp_path / "adapter", "peft")  # what `fedpeptao export --format peft` writes
    ids = model.prompt_ids(prompts)
    tokenizer = model.backbone.tokenizer  # generation.json's layout: the chat template with the generation prompt
    assert ids == [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for p in prompts]
    patch_peft_prefix_generation()
    assert peft_generate(tmp_path / "adapter", "smollm2-135m", ids, 4) == ours
    assert all(a.strip() for a in ours)


# -- Flower ---------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("keep_process_settings")
def test_flower_evaluation_of_a_generative_run_gives_the_simulators_rows(tmp_path):
    experiment = tiny_experiment(write_instruct(tmp_path / "instruct", repeat=1),
                                 model={"name": "tiny-llama", "head": "generate", "max_length": 48},
                                 generation={"max_new_tokens": 4})
    replies = []

    def record(grid):
        send = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            answers = send(messages, timeout=timeout)
            replies.extend(a for a in answers if a.metadata.message_type == "evaluate")
            return answers

        grid.send_and_receive = send_and_receive

    out, _ = run_in_process(tmp_path, experiment, grid_setup=record)
    for round_replies in (replies[:2], replies[2:]):  # the counts travel, one integer each, no confusion matrix
        metrics = [r.content["metrics"] for r in round_replies]
        assert sum(m["test-generation-examples"] for m in metrics) == 24 and all(m["test-generation-tokens"] > 0
                                                                                 for m in metrics)
        assert not any(key.endswith("-confusion") for m in metrics for key in m)
    sim = Simulation(ExperimentConfig.model_validate(experiment))
    sim.run()
    rows, expected = rows_without_timing(out), [{k: v for k, v in r.items() if k not in TIMING} for r in sim.history]
    assert len(rows) == 2 and rows[0]["eval_examples"] == 24 and "exact_match" in rows[0]
    for got, want in zip(rows, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
