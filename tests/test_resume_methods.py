"""Every compare preset (algorithm x tuning) resumes exactly from any checkpoint.

The run is abandoned after a checkpoint (all that carries over is on disk, as after SIGKILL; the
subprocess SIGKILL itself is in test_resume.py) and continued with ``resume_experiment``: every
global and per-client tensor, the optimiser moments and the per-round rows must equal those of
the uninterrupted run.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

from fedpeptao.compare.presets import DEFAULT_PRESETS, preset_config
from fedpeptao.config import ConfigError, save_config
from fedpeptao.sim.simulator import Simulation, resume_experiment, run_experiment
from fedpeptao.utils.checkpoint import list_checkpoints
from fedpeptao.utils.state import join

from fedpeptao.utils.round_log import TIMING  # noqa: E402


def tiny_config(tmp_path: Path, task: Path, name: str, run: str, rounds: int = 4):
    path = tmp_path / "base.toml"
    path.write_text(f'seed = 3\nprogress = false\noutput_dir = "{tmp_path}"\nrun_name = "{run}"\n'
                    f'[model]\nname = "tiny-bert"\nmax_length = 24\n'
                    f'[data]\ntask = "{task}"\npartition = "iid"\n'
                    f'[federated]\nnum_clients = 4\nclients_per_round = 2\nrounds = {rounds}\n'
                    f'[client]\nepochs = 1\nbatch_size = 8\n[checkpoint]\nevery = 1\nkeep = 10\n'
                    f'[tuning]\nnum_prompt_tokens = 3\nprompt_dropout = 0.0\n'
                    f'[method]\nname = "fedpeptao"\nratio = "auto"\nwarmup_rounds = 2\nlanczos_iters = 6\n')
    return preset_config(path, name)


def run_state(sim: Simulation) -> tuple[dict[str, torch.Tensor], dict]:
    """The algorithm's and every client's state: tensors, and the JSON part as JSON gives it back."""
    tensors, meta = join({"algorithm": sim.algorithm.state(),
                          "clients": join({str(k): c.state() for k, c in sorted(sim.clients.items())})})
    return tensors, json.loads(json.dumps(meta))


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", DEFAULT_PRESETS + ["fedpeptao-lora"])
def test_preset_resumes_exactly_after_a_checkpoint(tmp_path, task_dir, name, caplog):
    full, full_dir = run_experiment(tiny_config(tmp_path, task_dir, name, "full"))
    # the abandoned run: rounds 1 and 2 done and checkpointed (round 2 is FedPepTAO's last warm-up
    # round: its switch, Hessian clients and base download happen after the resume)
    cut = tiny_config(tmp_path, task_dir, name, "cut", rounds=2)
    cut_sim, cut_dir = run_experiment(cut)
    del cut_sim
    save_config(tiny_config(tmp_path, task_dir, name, "cut"), cut_dir / "config.yaml")  # the run it was part of
    (cut_dir / "summary.json").unlink()
    with caplog.at_level(logging.INFO, logger="fedpeptao"):
        resumed, _ = resume_experiment(cut_dir)
    assert rows(cut_dir) == rows(full_dir)
    # rounds numbered from 1 and globally in the rows, the checkpoints and the log, also after the resume
    assert [r["round"] for r in rows(cut_dir)] == [1, 2, 3, 4]
    assert [r for r, _ in list_checkpoints(cut_dir)] == [1, 2, 3, 4]
    assert "continuing after round 2" in caplog.text
    (expected, expected_meta), (actual, actual_meta) = run_state(full), run_state(resumed)
    assert expected_meta == actual_meta
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        diff = (tensor.double() - actual[key].double()).abs().max().item() if tensor.numel() else 0.0
        assert diff <= 1e-6, f"{name}: {key} differs by {diff:.3g}"


def test_a_checkpoint_of_another_method_is_refused(tmp_path, task_dir):
    _, run_dir = run_experiment(tiny_config(tmp_path, task_dir, "scaffold", "a", rounds=1))
    save_config(tiny_config(tmp_path, task_dir, "moon", "a", rounds=1), run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"another config \(method.name: 'scaffold' -> 'moon'\)"):
        resume_experiment(run_dir)
