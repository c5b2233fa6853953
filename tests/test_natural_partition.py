"""The natural partition (``data.partition=natural``, ``data.partition_by=<column>``): one client per
value of a column of instruction data, test and validation examples following by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeptao.config import ConfigError, load_config
from fedpeptao.data.dataset import DataError
from fedpeptao.data.instruct import load_instruct_splits
from fedpeptao.data.partition import flwr_natural, follow_groups, natural
from fedpeptao.experiment import client_parts
from fedpeptao.sim.simulator import Simulation

# Training examples per subject (sorted: client 0 is "algebra", 1 "biology", 2 "chemistry"), and test
# examples: chemistry has none, which leaves its client an empty test part.
TRAIN = {"biology": 4, "algebra": 6, "chemistry": 3}
TEST = {"algebra": 2, "biology": 3}


def _rows(counts: dict[str, int]) -> list[dict]:
    """Plain prompt-completion rows with a ``subject`` column, subjects interleaved (not grouped in the file)."""
    rows = [{"prompt": f"Question {i} on {subject}?", "completion": f"answer {i % 3}", "subject": subject}
            for subject, count in counts.items() for i in range(count)]
    return [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]


def write_subjects(folder: Path, train: dict[str, int] = TRAIN, test: dict[str, int] = TEST,
                   validation: dict[str, int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, counts in (("train", train), ("test", test), ("validation", validation)):
        if counts is not None:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(counts)))
    return folder


def _config(folder: Path, *extra: str):
    return load_config(None, ["model.name=tiny-llama", "model.head=generate", f"data.task={folder}",
                              "data.partition=natural", "data.partition_by=subject", "federated.num_clients=3",
                              "federated.clients_per_round=3", *extra])


def _parts(folder: Path, *extra: str):
    cfg = _config(folder, *extra)
    train, val, test = load_instruct_splits(cfg.data, cfg.data_seed())
    return (train, val, test), client_parts(cfg, train, test, val)


def _subjects(dataset, part: np.ndarray) -> set[str]:
    return {dataset.columns["subject"][i] for i in part}


# -- the split ----------------------------------------------------------------------------


def test_one_client_per_subject_in_sorted_order_and_the_test_split_follows_by_name(tmp_path):
    (train, val, test), (train_parts, test_parts, val_parts, groups) = _parts(write_subjects(tmp_path / "d"))
    assert val is None and val_parts is None  # no validation file: hold_out takes it from the training parts
    assert groups == ["algebra", "biology", "chemistry"]
    for k, name in enumerate(groups):
        assert _subjects(train, train_parts[k]) == {name} and len(train_parts[k]) == TRAIN[name]
        assert len(test_parts[k]) == TEST.get(name, 0) and _subjects(test, test_parts[k]) <= {name}
    assert len(test_parts[2]) == 0  # chemistry: no test examples, an empty part
    for parts, dataset in ((train_parts, train), (test_parts, test)):  # every example exactly once
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(dataset)))
        assert all(p.dtype == np.int64 and np.array_equal(p, np.sort(p)) for p in parts)
    again = client_parts(_config(tmp_path / "d", "seed=5"), train, test, val)  # no seed is involved
    assert all(np.array_equal(a, b) for a, b in zip(again[0], train_parts))


def test_a_validation_file_is_divided_by_the_same_column(tmp_path):
    folder = write_subjects(tmp_path / "d", validation={"chemistry": 2, "algebra": 1})
    (_, val, _), (_, _, val_parts, groups) = _parts(folder)
    assert [len(p) for p in val_parts] == [1, 0, 2]
    assert [_subjects(val, p) for p in val_parts] == [{"algebra"}, set(), {"chemistry"}]


def test_flower_natural_id_partitioner_gives_the_groups_and_their_indices():
    parts, names = flwr_natural(["b", "a", "b", "c", "a", "b"])
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    assert [p.tolist() for p in follow_groups(names, ["c", "c", "a"], "subject", "test")] == [[2], [], [0, 1]]


# -- refusals, one line each --------------------------------------------------------------


@pytest.mark.parametrize("extra, key, words", [
    (["data.partition=natural"], "data.partition_by", "needs the column"),
    (["data.partition_by=subject"], "data.partition_by", "only data.partition=natural"),
    (["data.partition=natural", "data.partition_by=subject", "model.head=linear", "model.name=tiny-bert"],
     "data.partition", "classification data keeps none"),
])
def test_the_config_refuses_a_partition_without_its_column_or_a_column_without_the_partition(extra, key, words):
    base = [] if "model.head=linear" in extra else ["model.name=tiny-llama", "model.head=generate"]
    with pytest.raises(ConfigError, match=rf"^{key}: .*{words}") as err:
        load_config(None, [*base, *extra])
    assert "\n" not in str(err.value)


def test_num_clients_must_equal_the_number_of_groups(tmp_path):
    folder = write_subjects(tmp_path / "d")
    with pytest.raises(DataError, match=r"^federated.num_clients: 4, but data.partition_by=subject has 3 groups .*"
                                        r"set federated.num_clients=3$"):
        _parts(folder, "federated.num_clients=4")


def test_a_missing_column_names_the_columns_there_are(tmp_path):
    folder = write_subjects(tmp_path / "d")
    with pytest.raises(DataError, match=r"no column 'topic' \(columns: subject\)"):
        _parts(folder, "data.partition_by=topic")


def test_a_test_group_no_client_trained_on_is_refused(tmp_path):
    folder = write_subjects(tmp_path / "d", test={"algebra": 1, "zoology": 2})
    with pytest.raises(DataError, match=r"^data.partition_by: the test split .* has subject 'zoology', which no "
                                        r"training example has.*training groups: 'algebra', 'biology', 'chemistry'"):
        _parts(folder)


def test_long_group_lists_are_cut_in_the_error_line():
    with pytest.raises(DataError, match=r"has 20 groups .*'g07', \.\.\. \(20 in all\)"):
        natural([f"g{i:02d}" for i in range(20)], 3, "source")


# -- a run --------------------------------------------------------------------------------


def test_a_run_gives_each_subject_its_own_client(tmp_path):
    folder = write_subjects(tmp_path / "d", train={"algebra": 8, "biology": 6, "chemistry": 5})
    sim = Simulation(_config(folder, "model.max_length=32", "federated.rounds=1", "generation.max_new_tokens=2",
                             "client.epochs=1", "progress=false", f"output_dir={tmp_path / 'runs'}"))
    sim.run()
    fed = sim.fed
    for k, (name, count) in enumerate({"algebra": 8, "biology": 6, "chemistry": 5}.items()):
        held = len(fed.val_parts[k])
        assert len(fed.train_parts[k]) + held == count and held == int(0.1 * count)  # hold_out within the client
        assert _subjects(fed.train_set, np.concatenate([fed.train_parts[k], fed.val_parts[k]])) == {name}
        assert len(fed.eval_parts[k]) == TEST.get(name, 0)
    assert fed.splits["clients"].endswith("'algebra', 'biology', 'chemistry'")
    assert sim.history[-1]["eval_examples"] == sum(TEST.values())
