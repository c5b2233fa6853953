"""Using a trained run: load_run, predict / evaluate / export on the command line, PEFT export."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedpeptao
from fedpeptao.cli import main
from fedpeptao.config import load_config
from fedpeptao.data.readers import read_table
from fedpeptao.models.loading import load_backbone
from fedpeptao.sim.simulator import run_experiment
from fedpeptao.trained import RunError

MR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "mr"


def tiny_run(tmp_path: Path, task: Path, *extra: str) -> Path:
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=r", "model.name=tiny-bert", f"data.task={task}",
                             "data.partition=iid", "federated.num_clients=4", "federated.clients_per_round=2",
                             "federated.rounds=2", "progress=false", "model.max_length=16", "client.epochs=1", *extra])
    return run_experiment(cfg)[1]


@pytest.fixture
def run_dir(tmp_path, task_dir) -> Path:
    return tiny_run(tmp_path, task_dir, "tuning.num_prompt_tokens=3", "method.ratio=0.5")


def test_a_run_keeps_every_clients_model_and_a_model_card(run_dir):
    card = json.loads((run_dir / "model.json").read_text())
    assert card["base_model"] == "tiny-bert" and card["tuning"]["name"] == "deep_prompt"
    assert card["labels"] == ["0", "1"] and card["personal_tensors"], "FedPepTAO at ratio 0.5 keeps layers personal"
    glob = load_file(run_dir / "global.safetensors")
    for k in card["clients"]:
        tensors = load_file(run_dir / "clients" / f"{k}.safetensors")
        assert tensors.keys() == glob.keys()
        shared = [n for n in glob if n not in card["personal_tensors"]]
        assert all(torch.equal(tensors[n], glob[n]) for n in shared), "a client's shared layers are the global ones"
    a, b = (load_file(run_dir / "clients" / f"{k}.safetensors") for k in card["clients"][:2])
    assert any(not torch.equal(a[n], b[n]) for n in card["personal_tensors"]), "personal layers differ per client"


def test_cli_predict_evaluate_and_refusals(run_dir, tmp_path, capsys):
    lines = tmp_path / "three_lines.txt"
    lines.write_text("a great and moving film\ni hated the plot\n" + "word " * 40 + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run_dir), "--client", "0", "--input", str(lines), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] in ("0", "1") for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1.0) < 1e-5 for r in rows)
    assert "1 of 3 inputs are longer than model.max_length" in capsys.readouterr().err

    assert main(["evaluate", str(run_dir), "--client", "0", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["metric"] == "accuracy" and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["examples"] == 20

    for argv, says in [(["evaluate", str(run_dir), "--client", "99"], "client 99: not a client"),
                       (["evaluate", str(run_dir)], "personal"),
                       (["predict", str(run_dir), "--client", "0", "--input", str(tmp_path / "empty.txt"),
                         "--output", str(tmp_path / "none.jsonl")], "no text to predict"),
                       (["export", str(run_dir), "--client", "0", "--format", "peft", str(run_dir)], "not empty")]:
        (tmp_path / "empty.txt").write_text("\n")
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err
    assert not (tmp_path / "none.jsonl").exists()


def test_load_run_api(run_dir):
    model = fedpeptao.load_run(run_dir, client=1)
    labels = model.predict(["wonderful", "awful", "fine"])
    assert len(labels) == 3 and set(labels) <= {"0", "1"}
    assert model.predict_proba(["wonderful"]).shape == (1, 2)
    assert set(model.evaluate()) >= {"metric", "accuracy", "examples"}
    with pytest.raises(RunError, match="personal"):
        fedpeptao.load_run(run_dir)


def test_unfinished_run_and_damaged_tensors_are_refused(run_dir):
    (run_dir / "clients" / "0.safetensors").write_bytes((run_dir / "clients" / "0.safetensors").read_bytes()[:100])
    with pytest.raises(RunError, match="truncated"):
        fedpeptao.load_run(run_dir, client=0)
    (run_dir / "model.json").unlink()
    with pytest.raises(RunError, match="never finished"):
        fedpeptao.load_run(run_dir, client=1)


def peft_labels(out: Path, base, texts: list[str], max_length: int) -> np.ndarray:
    """What a plain PEFT user computes: the adapter on the base model, then the saved head."""
    from peft import PeftModel

    tokenizer = base.tokenizer
    model = PeftModel.from_pretrained(base.model, str(out)).eval()
    head = load_file(out / "head.safetensors")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
    logits = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
    return logits.argmax(-1).numpy()


@pytest.mark.skipif(not MR.is_dir(), reason="needs ../shared/data/tasks")
def test_peft_export_of_real_minilm_predicts_what_we_predict(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=mr", "model.name=minilm", f"data.task={MR}",
                             "data.max_train_examples=120", "data.max_eval_examples=60", "federated.num_clients=2",
                             "federated.clients_per_round=2", "federated.rounds=1", "method.name=fedavg",
                             "tuning.num_prompt_tokens=4", "model.max_length=48", "progress=false", "client.epochs=1"])
    _, run = run_experiment(cfg)
    texts = read_table(MR / "test.tsv").texts_a[:50]
    ours = fedpeptao.load_run(run)
    assert main(["export", str(run), "--format", "peft", str(tmp_path / "peft")]) == 0
    expected = np.array([ours.labels.index(label) for label in ours.predict(texts)])
    got = peft_labels(tmp_path / "peft", load_backbone("minilm", head="linear"), texts, 48)
    assert (got == expected).all()
    probs = ours.predict_proba(texts)
    assert probs.max(1).min() < 0.99, "a trained but not saturated model: the check compares real decisions"


def test_lora_exports_to_peft_and_unexportable_tunings_say_so(tmp_path, task_dir, capsys):
    run = tiny_run(tmp_path, task_dir, "method.name=fedavg", "tuning.name=lora", "tuning.r=2", "client.lr=0.05")
    assert main(["export", str(run), "--format", "peft", str(tmp_path / "lora")]) == 0
    texts = ["a great and moving film", "i hated the plot", "dull", "a joyful delight"]
    ours = fedpeptao.load_run(run)
    expected = np.array([ours.labels.index(label) for label in ours.predict(texts)])
    assert (peft_labels(tmp_path / "lora", load_backbone("tiny-bert", head="linear"), texts, 16) == expected).all()
    other = tiny_run(tmp_path / "b", task_dir, "method.name=fedavg", "tuning.name=adapter")
    assert main(["export", str(other), "--format", "peft", str(tmp_path / "adapter")]) == 2
    assert "tuning adapter: PEFT has no equivalent" in capsys.readouterr().err
    assert main(["export", str(other), "--format", "safetensors", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "tensors.safetensors").is_file() and (tmp_path / "plain" / "classifier.json").is_file()
