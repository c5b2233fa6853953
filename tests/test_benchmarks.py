"""The GPU benchmark's CPU check: ``benchmarks/gpu.py --tiny`` runs its whole table on tiny models
(``--generative-7b --tiny`` its generative bf16 / nf4 table), and without ``--tiny`` a machine with
no GPU gets one clear line instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def run_script(*args: str, task_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = [f"data.task={task_dir}"] if task_dir else []
    return subprocess.run([sys.executable, str(SCRIPT), *args, *extra], env=env, text=True, capture_output=True,
                          timeout=600)


def test_gpu_benchmark_runs_its_table_at_tiny_size(tmp_path):
    from conftest import write_task

    task = write_task(tmp_path / "task", repeat=12)  # 240 examples: 10 clients with a batch or more each
    result = run_script("--tiny", task_dir=task)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["model"])
    assert header == ["model", "execution", "batched", "s/round", "examples/s", "TFLOP/s", "peak", "GiB"]
    for model in ("tiny-roberta", "tiny-llama"):
        rows = [line.split() for line in lines if line.split()[:1] == [model]]
        assert [r[1] for r in rows] == ["sequential", "batched"] and [r[2] for r in rows] == ["False", "True"]
        # s/round, examples/s, TFLOP/s and peak GiB are numbers (float() raises otherwise); their values
        # depend on how busy the machine is, so none is compared with anything
        assert all(len(r) == 7 for r in rows) and [[float(v) for v in r[3:]] for r in rows]
        assert any(line.startswith(f"{model}: batched / sequential examples/s = ") for line in lines)


def test_gpu_benchmark_generative_7b_mode_runs_at_tiny_size_on_the_cpu():
    """``--generative-7b --tiny``: tiny-llama saved as a bf16 checkpoint, then loaded in bf16, in nf4
    (bitsandbytes quantizes it while it loads) and in nf4 with gradient checkpointing, each trained
    generatively with 10 clients in one batched pass, in a process of its own."""
    pytest.importorskip("bitsandbytes")
    result = run_script("--generative-7b", "--tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["model"])
    assert header == ["model", "backbone", "batched", "s/round", "examples/s", "TFLOP/s", "peak", "GiB", "reserved",
                      "GiB", "<16", "GB"]
    rows = [line.split() for line in lines if line.split()[:1] == ["tiny-llama"]]
    assert [r[1] for r in rows] == ["bf16", "nf4", "nf4+ckpt"] and all(r[2] == "True" for r in rows)
    # timings depend on how busy the machine is: only that they are positive numbers; no GPU memory on the CPU
    assert all(len(r) == 9 and float(r[4]) > 0 and float(r[5]) > 0 and r[6] == r[7] == "nan" and r[8] == "n/a"
               for r in rows)
    assert "16 GB target: not measured (CPU, tiny model)" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_benchmark_without_a_gpu_says_so_in_one_line():
    result = run_script()
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "benchmarks/gpu.py needs a CUDA GPU (none found); run with --tiny to test it on the CPU"]
