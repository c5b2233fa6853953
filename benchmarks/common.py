"""Run one experiment per process (so peak memory is that run's own) and collect its results."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks"


def child(overrides: list[str]) -> None:
    from fedpeptao.config import load_config
    from fedpeptao.sim.simulator import Simulation

    sim = Simulation(load_config(None, overrides + ["progress=false"]))
    history = sim.run()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    summary = sim.summary()
    print("RESULT " + json.dumps({"history": history, "summary": summary, "peak_mb": peak_mb, "peak_gpu_mb": gpu_mb,
                                  "selection": summary.get("selection")}))


def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A Python child (``args`` after the interpreter) whose ``RESULT`` line :func:`collect` reads;
    ``env`` is added to this process's environment (``ONE_THREAD`` for runs side by side)."""
    return subprocess.Popen([sys.executable, *args], env={**os.environ, **(env or {})}, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


#: one torch thread per child, so that two children side by side each have a core
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def collect(proc: subprocess.Popen, what: str = "benchmark run") -> dict:
    """The JSON of a finished child's ``RESULT`` line; its stderr's tail if it failed."""
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock timing covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_tokens(model) -> dict:
    """Real and padded tokens through the backbone of ``model`` (a TunedModel) from now on.

    Real tokens are summed on the model's device, so counting never makes the host wait for the
    GPU; read them with ``int(counts["real"])`` after timing, and reset with ``counts.update(real=0,
    padded=0)``."""
    counts = {"real": 0, "padded": 0}

    def count(_module, _args, kwargs):
        mask = kwargs["attention_mask"]
        counts["real"] = counts["real"] + mask.sum()
        counts["padded"] += mask.numel()

    model.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    return counts


def launch(overrides: list[str]) -> dict:
    """One experiment in its own process (:func:`child`), waited for."""
    return collect(start([__file__, *overrides]))


if __name__ == "__main__":
    child(sys.argv[1:])
