"""Data as users have it: each GLUE layout read without configuration, headerless tables by
column index, and the metric that follows from the task (never from a folder name)."""

from pathlib import Path

import pytest

from fedpeptao.config import load_config
from fedpeptao.data.readers import load_task_dir, read_table
from fedpeptao.sim.simulator import Simulation

SENTENCES = ["the book was read by everyone .", "him likes she .", "they left early .", "what did you buy it ?",
             "she sang a song .", "the more you eat .", "we saw the film .", "a ran dog ."]


def write(folder: Path, name: str, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def cola(folder: Path, repeat: int = 4) -> Path:
    """CoLA as GLUE distributes it: headerless train/dev (source, label, mark, sentence), unlabelled test."""
    rows = [f"gj04\t{1 - i % 2}\t{'' if i % 2 == 0 else '*'}\t{s}" for i, s in enumerate(SENTENCES)]
    write(folder, "train.tsv", rows * repeat)
    write(folder, "dev.tsv", rows)
    write(folder, "test.tsv", ["index\tsentence"] + [f"{i}\t{s}" for i, s in enumerate(SENTENCES)])
    return folder


def test_cola_headerless_layout(tmp_path):
    train, validation, dev = load_task_dir(cola(tmp_path / "CoLA"))
    assert train.layout == dev.layout == "cola" and len(dev) == 8 and not train.is_pair
    assert validation is None, "the test file has no labels: dev is the test split, validation is held out"
    assert train.texts_a[1] == "him likes she ." and list(train.labels[:2]) == [1, 0]


@pytest.mark.parametrize("layout, header, row, pair", [
    ("mrpc", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", "{y}\t1\t2\tone text .\tanother text .", True),
    ("qnli", "index\tquestion\tsentence\tlabel", "{i}\twhat is it ?\tit is a thing .\t{name}", True),
    ("rte", "index\tsentence1\tsentence2\tlabel", "{i}\ta man sleeps .\tsomeone sleeps .\t{name}", True),
    ("sst-2", "sentence\tlabel", "a fine film {i}\t{y}", False),
])
def test_glue_layouts_with_headers(tmp_path, layout, header, row, pair):
    names = ["entailment", "not_entailment"]
    lines = [header] + [row.format(i=i, y=i % 2, name=names[i % 2]) for i in range(6)]
    write(tmp_path, "train.tsv", lines)
    write(tmp_path, "dev.tsv", lines)
    train, _, dev = load_task_dir(tmp_path)
    assert train.layout == layout and train.is_pair == pair and len(dev) == 6


def test_headerless_table_by_column_index(tmp_path):
    write(tmp_path, "train.tsv", [f"x{i}\t{i % 2}\tignored\tsentence number {i}" for i in range(6)])
    with pytest.raises(Exception, match="no label column"):
        read_table(tmp_path / "train.tsv", header=True)  # 4 fields but not CoLA's: the first line is a header
    data = read_table(tmp_path / "train.tsv", text_a="3", label="1", header=False)
    assert len(data) == 6 and data.texts_a[0] == "sentence number 0" and data.label_names == ["0", "1"]
    cfg = load_config(None, ["data.header=false", "data.text_a=3", "data.label=1"])
    assert (cfg.data.text_a, cfg.data.label, cfg.data.header) == ("3", "1", False)


def test_a_cola_folder_runs_with_mcc_and_no_configuration(tmp_path, capsys):
    folder = cola(tmp_path / "my-task")  # not called cola: the layout, not the name, picks the metric
    cfg = load_config(None, ["model.name=tiny-bert", f"data.task={folder}", "federated.num_clients=2",
                             "federated.clients_per_round=2", "federated.rounds=1", "progress=false",
                             "tuning.num_prompt_tokens=2", "model.max_length=16", "method.name=fedavg"])
    sim = Simulation(cfg)
    assert sim.metric == "mcc"
    sim.run()
    summary = sim.summary()
    assert -1.0 <= summary["final_metric"] <= 1.0 and summary["metric"] == "mcc"
    assert "dev.tsv" in summary["splits"]["test"] and "held out" in summary["splits"]["validation"]
    assert summary["validation_metric"] is not None and summary["selected_round"] == 1
    chosen = load_config(None, ["data.metric=macro_f1"]).data.metric
    assert chosen == "macro_f1"
