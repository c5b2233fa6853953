"""One bad participant or one bad input never corrupts state or loses work."""

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from fedpeptao.config import ConfigError, load_config
from fedpeptao.algorithms import make_algorithm
from fedpeptao.algorithms.base import ServerContext
from fedpeptao.algorithms.fedavg import FedAvgSettings
from fedpeptao.algorithms.fedpeptao import FedPepTAOSettings
from fedpeptao.core.aggregation import ClientUpdate, averaging
from fedpeptao.core.server import ServerState
from fedpeptao.core.validation import ValidationPolicy, filter_updates
from fedpeptao.data.dataset import DataError
from fedpeptao.models.loading import ModelError
from fedpeptao.sim.simulator import resume_experiment, run_experiment
from fedpeptao.utils.checkpoint import CheckpointError, list_checkpoints

NAMES = {"prompt.layers.0": (3, 2, 8), "prompt.layers.1": (3, 2, 8), "head.weight": (2, 8)}


def params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) * scale for n, s in NAMES.items()}


def good_updates(start: int = 1) -> list[ClientUpdate]:
    return [ClientUpdate(k, params(100 + k, 0.1), 10 + 5 * k, 3 + k) for k in range(start, start + 3)]


def corrupt(kind: str) -> ClientUpdate:
    p = params(7, 0.1)
    if kind == "missing key":
        del p["head.weight"]
    elif kind == "extra key":
        p["prompt.layers.9"] = torch.zeros(3, 2, 8)
    elif kind == "wrong shape":
        p["prompt.layers.0"] = torch.zeros(3, 2, 9)
    elif kind == "wrong dtype":
        p["prompt.layers.1"] = p["prompt.layers.1"].double()
    elif kind == "nan":
        p["prompt.layers.0"][0, 0, 0] = float("nan")
    elif kind == "inf":
        p["head.weight"][1, 1] = float("inf")
    elif kind == "huge norm":
        p["prompt.layers.1"] *= 1e6
    elif kind == "no examples":
        return ClientUpdate(66, p, 0, 3)
    return ClientUpdate(66, p, 20, 3)


class Server:
    """The runtimes' server side: runtime-wide validation, then the algorithm's step."""

    def __init__(self, algorithm: str) -> None:
        ctx = ServerContext(num_clients=10, local_lr=0.04, seed=0, rounds=5,
                            layer_groups={0: ["prompt.layers.0"], 1: ["prompt.layers.1"]}, head_names=["head.weight"],
                            average=averaging("weighted_mean"))
        settings = FedPepTAOSettings(ratio=1.0) if algorithm == "fedpeptao" else FedAvgSettings()
        self.algo = make_algorithm(settings, ctx, params(0))
        if algorithm == "fedpeptao":  # past the switch: the selective step on every tensor
            self.algo.server_state = ServerState(server_lr=settings.server_lr)
        self.params, self.rejected = self.algo.params, []

    @property
    def server_state(self) -> ServerState:
        return self.algo.server_state

    def aggregate(self, updates: list[ClientUpdate], sampled: list[int] | None = None) -> None:
        accepted, self.rejected = filter_updates(updates, self.algo.global_shared(), ValidationPolicy(max_norm=100.0),
                                                 logging.getLogger("fedpeptao"), self.algo.extras_problem)
        if accepted:
            self.algo.aggregate(0, sampled or [u.client_id for u in updates], accepted)
        self.params = self.algo.params


def aggregator(algorithm: str) -> Server:
    return Server(algorithm)


KINDS = ["missing key", "extra key", "wrong shape", "wrong dtype", "nan", "inf", "huge norm", "no examples"]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedpeptao"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_update_is_left_out_and_named(algorithm, kind, caplog):
    with_bad, without = aggregator(algorithm), aggregator(algorithm)
    for round_index in range(2):  # two rounds, so momentum and control variates are in play
        updates = good_updates(1 + round_index)
        with caplog.at_level(logging.WARNING, logger="fedpeptao"):
            with_bad.aggregate(updates[:1] + [corrupt(kind)] + updates[1:])
        # |S_t| counts the sampled clients, the rejected one included (as the reference counts them)
        without.aggregate(updates, sampled=[u.client_id for u in updates] + [66])
        assert [cid for cid, _ in with_bad.rejected] == [66]
    assert "client 66" in caplog.text
    for name in NAMES:
        assert torch.equal(with_bad.params[name], without.params[name]), name
    if algorithm == "fedpeptao":
        (a, meta_a), (b, meta_b) = with_bad.server_state.state(), without.server_state.state()
        assert meta_a == meta_b
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_updates_bad_leaves_global_state_unchanged():
    agg = aggregator("fedpeptao")
    before = {k: v.clone() for k, v in agg.params.items()}
    agg.aggregate([corrupt("nan"), corrupt("wrong shape")])
    assert all(torch.equal(before[k], agg.params[k]) for k in NAMES)
    assert agg.server_state.round == 0


# -- malformed inputs: one clear error each, and the run directory untouched ------------------

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def base(tmp_path: Path, task: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'runs'}", "run_name=r", "model.name=tiny-bert", f"data.task={task}",
            "federated.num_clients=4", "federated.clients_per_round=2", "federated.rounds=1", "progress=false",
            "model.max_length=24", "tuning.num_prompt_tokens=2"]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def files_case(tmp_path: Path, train: str | bytes, evaluation: str = "sentence\tlabel\ngood\t1\nbad\t0\n", **cols):
    t = write(tmp_path / "files" / "train.tsv", train)
    e = write(tmp_path / "files" / "eval.tsv", evaluation)
    return [f"data.train_file={t}", f"data.eval_file={e}"] + [f"data.{k}={v}" for k, v in cols.items()]


ROWS = "sentence\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(20))

CASES = {
    "config: rounds zero": (ConfigError, lambda tp, task: ["federated.rounds=0"]),
    "config: unknown key": (ConfigError, lambda tp, task: ["federated.speed=3"]),
    "config: wrong type": (ConfigError, lambda tp, task: ["client.lr=fast"]),
    "config: sampled > clients": (ConfigError, lambda tp, task: ["federated.clients_per_round=9"]),
    "config: ratio out of range": (ConfigError, lambda tp, task: ["method.ratio=0"]),
    "config: robust with fedpeptao": (ConfigError, lambda tp, task: ["method.name=fedpeptao", "server.aggregation=median"]),
    "data: missing task folder": (DataError, lambda tp, task: [f"data.task={tp / 'nowhere'}"]),
    "data: missing column": (DataError, lambda tp, task: files_case(tp, ROWS, label="stars")),
    "data: unknown eval label": (DataError, lambda tp, task: files_case(tp, ROWS, "sentence\tlabel\nfine\t7\n")),
    "data: empty text": (DataError, lambda tp, task: files_case(tp, ROWS + "\t1\n")),
    "data: not utf-8": (DataError, lambda tp, task: files_case(tp, ROWS.encode() + "caf\xe9\t1\n".encode("latin-1"))),
    "data: empty file": (DataError, lambda tp, task: files_case(tp, "")),
    "data: too few examples for clients": (DataError, lambda tp, task: files_case(tp, ROWS) + ["federated.num_clients=15"]),
    "data: eval file missing": (DataError, lambda tp, task: files_case(tp, ROWS) + [f"data.eval_file={tp / 'none.tsv'}"]),
    "model: missing path": (ModelError, lambda tp, task: [f"model.name={tp / 'no-model'}"]),
    "model: folder without config": (ModelError, lambda tp, task: [f"model.name={write(tp / 'm' / 'x.txt', 'x').parent}"]),
    "model: lm head on an encoder": (ModelError, lambda tp, task: ["model.name=minilm", "model.head=lm"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_fails_before_any_work(case, tmp_path, task_dir):
    error, extra = CASES[case]
    existing = write(tmp_path / "runs" / "other" / "metrics.jsonl", '{"round": 0}\n').parent
    before = snapshot(tmp_path / "runs")
    with pytest.raises(error):
        run_experiment(load_config(None, base(tmp_path, task_dir) + extra(tmp_path, task_dir)))
    assert snapshot(tmp_path / "runs") == before, "the failed run wrote or changed files"
    assert not (tmp_path / "runs" / "r").exists() and existing.exists()


def test_existing_run_directory_is_never_overwritten(tmp_path, task_dir):
    run = write(tmp_path / "runs" / "r" / "metrics.jsonl", '{"round": 0}\n').parent
    before = snapshot(run)
    with pytest.raises(FileExistsError):
        run_experiment(load_config(None, base(tmp_path, task_dir)))
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate", "flip byte", "edit meta"])
def test_damaged_checkpoint_is_refused_or_falls_back(damage, tmp_path, task_dir):
    cfg = load_config(None, base(tmp_path, task_dir) + ["federated.rounds=3", "checkpoint.every=1"])
    _, run_dir = run_experiment(cfg)
    checkpoints = [path for _, path in list_checkpoints(run_dir)]
    assert len(checkpoints) == 3

    def hurt(folder: Path) -> None:
        state, meta = folder / "tensors.safetensors", folder / "state.json"
        if damage == "truncate":
            state.write_bytes(state.read_bytes()[:-50])
        elif damage == "flip byte":
            data = bytearray(state.read_bytes())
            data[len(data) // 2] ^= 0xFF
            state.write_bytes(bytes(data))
        else:
            meta.write_text(meta.read_text().replace('"round"', '"rounds"', 1) + " ")

    hurt(checkpoints[-1])  # newest damaged: resume falls back to the previous good one
    resume_experiment(run_dir)
    for _, folder in list_checkpoints(run_dir):
        hurt(folder)  # every checkpoint damaged: refused, nothing overwritten
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError):
        resume_experiment(run_dir)
    assert snapshot(run_dir) == before
