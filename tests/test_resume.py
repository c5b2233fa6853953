"""Checkpoint and resume: a run killed with SIGKILL mid-run resumes to the same end state."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeptao.config import load_config
from fedpeptao.sim.simulator import resume_experiment, run_experiment
from fedpeptao.utils.checkpoint import list_checkpoints

MR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "mr"
from fedpeptao.utils.round_log import TIMING  # noqa: E402


def common(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path}", f"data.task={MR}", "data.max_train_examples=400", "data.max_eval_examples=100",
            "model.name=minilm", "tuning.num_prompt_tokens=4", "model.max_length=32", "method.ratio=0.5", "federated.num_clients=6", "federated.clients_per_round=3",
            "federated.rounds=10", "checkpoint.every=1", "progress=false", "client.epochs=1"]


def comparable(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.skipif(not MR.is_dir(), reason="needs ../shared/data/tasks")
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    full_sim, full_dir = run_experiment(load_config(None, common(tmp_path) + ["run_name=full"]))

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "fedpeptao.cli", "run", *common(tmp_path), "run_name=killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_dir = tmp_path / "killed"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list_checkpoints(killed_dir)) < 3 and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    rows_before = len((killed_dir / "metrics.jsonl").read_text().splitlines())
    assert rows_before < 10, "the kill came after the last round"
    assert not (killed_dir / "summary.json").exists()

    resumed_sim, _ = resume_experiment(killed_dir)
    assert comparable(killed_dir) == comparable(full_dir)
    final_full, final_resumed = load_file(full_dir / "global.safetensors"), load_file(killed_dir / "global.safetensors")
    assert final_full.keys() == final_resumed.keys()
    for name in final_full:
        assert torch.allclose(final_full[name], final_resumed[name], atol=1e-6), name
    assert full_sim.clients.keys() == resumed_sim.clients.keys()
    for k, a in full_sim.clients.items():
        for name in a.params:
            assert torch.allclose(a.params[name], resumed_sim.clients[k].params[name], atol=1e-6), name
    server_a, server_b = full_sim.algorithm.server_state, resumed_sim.algorithm.server_state
    assert server_a.round == server_b.round and server_a.server_lr == pytest.approx(server_b.server_lr)
