"""GPU benchmark (<= 5 minutes on one GPU): a 10-client round (timed after one warm-up round) of a
RoBERTa-large-size and a LLaMA-architecture (1.1B) model with random weights, batched and
sequential, in bf16.

Prints examples/s of each mode, their ratio, peak GPU memory and useful TFLOP/s (real tokens
only: forward 2N and backward 2N per token through the frozen backbone's matmuls). The weights
are random (``model.random_init``: no hub here), which does not change the cost of a pass.
``--tiny`` runs the same script on the CPU with tiny models, to test it anywhere.

On a machine where the bundled MiniLM (the tokenizer of the builtin architectures) or the
bundled data is not installed, ``--tokenizer DIR`` builds each architecture from a folder holding
its ``config.json`` and that tokenizer (``model.name`` as a local config folder), and trailing
``key=value`` overrides (``data.task=FOLDER``) apply to every run.

    .venv/bin/python benchmarks/gpu.py [--tiny] [--tokenizer DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import count_tokens

MODELS = {"roberta-large (355M)": ["model.name=roberta-large-config", "model.random_init=true", "model.head=mlm"],
          "llama-1b (1.1B)": ["model.name=llama-1b-config", "model.random_init=true", "model.head=lm"]}
TINY = {"tiny-roberta": ["model.name=tiny-roberta", "model.head=mlm"],
        "tiny-llama": ["model.name=tiny-llama", "model.head=lm"]}


def config_folders(models: dict[str, list[str]], tokenizer: Path, root: Path) -> dict[str, list[str]]:
    """Each builtin architecture as a local folder (its config.json and the given tokenizer)."""
    from fedpeptao.models.loading import architecture_config

    out = {}
    for label, overrides in models.items():
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.name="))
        folder = root / name
        architecture_config(name).save_pretrained(folder)
        for file in tokenizer.iterdir():
            if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens")) or file.suffix == ".txt"):
                shutil.copy(file, folder / file.name)
        out[label] = [f"model.name={folder}" if o.startswith("model.name=") else o for o in overrides]
    return out


def round_of(name: str, overrides: list[str], execution: str, tiny: bool) -> dict:
    from fedpeptao.config import load_config
    from fedpeptao.sim.simulator import Simulation

    device = "cpu" if tiny else "cuda"
    cfg = load_config(None, [
        f"device={device}", "precision=bf16", f"execution={execution}", "clients_per_pass=10", "progress=false",
        "data.task=rotten_tomatoes", "data.max_train_examples=" + ("200" if tiny else "2000"),
        "data.max_eval_examples=100", "model.max_length=64", "federated.num_clients=10",
        "federated.clients_per_round=10", "federated.rounds=2", "client.epochs=1", "client.batch_size=8",
        "method.name=fedavg", "tuning.name=deep_prompt", "tuning.num_prompt_tokens=16", "checkpoint.every=0", *overrides])
    sim = Simulation(cfg)
    tokens = count_tokens(sim.model)
    sim.train_round(0)  # warm-up: kernel selection and allocator growth are not part of the measure
    tokens.update(real=0, padded=0)
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    sim.train_round(1)
    if not tiny:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(m.weight.numel() for mname, m in sim.model.model.named_modules()
            if isinstance(m, torch.nn.Linear) and "embed" not in mname and "lm_head" not in mname)
    examples = sum(len(sim.train_parts[k]) for k in range(10))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if not tiny else float("nan")
    return {"model": name, "execution": execution, "batched": sim.batched, "seconds": seconds,
            "examples_s": examples / seconds, "tflops": 4 * n * int(tokens["real"]) / seconds / 1e12, "peak_gib": peak}


def rate(value: float, width: int, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or in scientific notation where those would round a
    nonzero rate to zero (a tiny model's TFLOP/s on a busy CPU prints 2.10e-05, not 0.000)."""
    if value != 0 and abs(value) < 0.5 * 10 ** -decimals:
        return f"{value:>{width}.2e}"
    return f"{value:>{width}.{decimals}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (tests the script)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, where the bundled MiniLM is absent")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (none found); run with --tiny to test it on the CPU")
    device = "CPU (tiny models)" if args.tiny else torch.cuda.get_device_name(0)
    print(f"device: {device}; bf16 backbone, fp32 trainables; random weights (model.random_init)")
    print(f"{'model':>22} {'execution':>10} {'batched':>7} {'s/round':>8} {'examples/s':>10} {'TFLOP/s':>8} "
          f"{'peak GiB':>8}")
    models = TINY if args.tiny else MODELS
    if args.tokenizer and not args.tiny:
        models = config_folders(models, args.tokenizer, Path(tempfile.mkdtemp(prefix="fedpeptao-gpu-")))
    for name, overrides in models.items():
        rows = [round_of(name, overrides + args.overrides, execution, args.tiny)
                for execution in ("sequential", "batched")]
        for r in rows:
            print(f"{r['model']:>22} {r['execution']:>10} {str(r['batched']):>7} {r['seconds']:>8.1f} "
                  f"{rate(r['examples_s'], 10, 1)} {rate(r['tflops'], 8, 3)} {r['peak_gib']:>8.2f}")
        print(f"{name}: batched / sequential examples/s = {rows[1]['examples_s'] / rows[0]['examples_s']:.2f}")


if __name__ == "__main__":
    main()
