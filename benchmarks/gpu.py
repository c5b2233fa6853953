"""GPU benchmark (<= 5 minutes on one GPU): a 10-client round (timed after one warm-up round) of a
RoBERTa-large-size and a LLaMA-architecture (1.1B) model with random weights, batched and
sequential, in bf16.

Prints examples/s of each mode, their ratio, peak GPU memory and useful TFLOP/s (real tokens
only: forward 2N and backward 2N per token through the frozen backbone's matmuls). The weights
are random (``model.random_init``: no hub here), which does not change the cost of a pass.
``--tiny`` runs the same script on the CPU with tiny models, to test it anywhere.

``--generative-7b`` measures instead a LLaMA-7B-architecture backbone (hidden 4096, 32 layers,
32 heads, intermediate 11008, vocabulary 32000; random weights) tuned generatively
(``model.head=generate``, instruction data the script writes, deep prompts), 10 clients in each
batched pass, with the backbone in bf16, in nf4, and in nf4 with gradient checkpointing. The
random weights are saved as a bf16 safetensors checkpoint (``--checkpoint-dir``, else a temporary
folder deleted at the end, about 13.5 GB) and each run loads it the normal way, so ``nf4`` is
quantized by bitsandbytes while it loads. Each run is its own process, so its peak GPU memory is
its own; the table says whether that peak (reserved by the allocator) stays under 16 GB.
With ``--tiny`` the same mode runs tiny-llama, saved and loaded the same way, on the CPU.

On a machine where the bundled MiniLM (the tokenizer of the builtin architectures) or the
bundled data is not installed, ``--tokenizer DIR`` builds each architecture from a folder holding
its ``config.json`` and that tokenizer (``model.name`` as a local config folder), and trailing
``key=value`` overrides (``data.task=FOLDER``) apply to every run.

    .venv/bin/python benchmarks/gpu.py [--tiny] [--tokenizer DIR] [key=value ...]
    .venv/bin/python benchmarks/gpu.py --generative-7b [--tiny] [--tokenizer DIR] [--checkpoint-dir DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import collect, count_tokens, start

MODELS = {"roberta-large (355M)": ["model.name=roberta-large-config", "model.random_init=true", "model.head=mlm"],
          "llama-1b (1.1B)": ["model.name=llama-1b-config", "model.random_init=true", "model.head=lm"]}
TINY = {"tiny-roberta": ["model.name=tiny-roberta", "model.head=mlm"],
        "tiny-llama": ["model.name=tiny-llama", "model.head=lm"]}

#: ``--generative-7b``: each backbone's settings (the checkpoint's folder is the model.name of all)
GENERATIVE_RUNS = {"bf16": ["precision=bf16", "model.quantization=none"],
                   "nf4": ["precision=bf16", "model.quantization=nf4"],
                   "nf4+ckpt": ["precision=bf16", "model.quantization=nf4", "model.gradient_checkpointing=true"]}
#: the generative task (after round_of's defaults, before the user's overrides): 10 clients in one
#: batched pass of batch 4 each, prompts of about 25-60 tokens and completions of about 8
GENERATIVE = ["model.head=generate", "execution=batched", "clients_per_pass=10", "model.max_length=128",
              "client.batch_size=4", "data.max_eval_examples=20", "generation.max_new_tokens=8"]
#: the issue's target: 10 clients of a 7B model trained in one pass within 16 GB (16 x 10**9 bytes) of GPU memory
TARGET_BYTES = 16e9


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
    # in x out, not weight.numel(): a bitsandbytes layer's weight is packed (nf4: two per byte)
    n = sum(m.in_features * m.out_features for mname, m in sim.model.model.named_modules()
            if isinstance(m, torch.nn.Linear) and "embed" not in mname and "lm_head" not in mname)
    examples = sum(len(sim.train_parts[k]) for k in range(10))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if not tiny else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if not tiny else float("nan")
    return {"model": name, "execution": execution, "batched": sim.batched, "seconds": seconds,
            "examples_s": examples / seconds, "tflops": 4 * n * int(tokens["real"]) / seconds / 1e12,
            "peak_gib": peak, "reserved_gib": reserved}


def rate(value: float, width: int, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or in scientific notation where those would round a
    nonzero rate to zero (a tiny model's TFLOP/s on a busy CPU prints 2.10e-05, not 0.000)."""
    if value != 0 and abs(value) < 0.5 * 10 ** -decimals:
        return f"{value:>{width}.2e}"
    return f"{value:>{width}.{decimals}f}"


WORDS = ("the river city market garden north south winter summer morning evening old new small large red blue "
         "green train road bridge school library kitchen window letter story farmer teacher doctor painter "
         "village harbour mountain forest island station").split()
THINGS = ("lamp", "boat", "coat", "book", "clock", "chair", "kite", "bell")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "grey")


def write_instruct(folder: Path, train: int, test: int = 40, seed: int = 0) -> Path:
    """A generative instruction task (``prompt``/``completion`` strings in train.jsonl, test.jsonl):
    notes of 15-45 filler words hide one thing's colour, which the completion states in a sentence."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        rows = []
        for _ in range(count):
            thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
            filler = [rng.choice(WORDS) for _ in range(rng.randint(15, 45))]
            cut = rng.randint(0, len(filler))
            notes = " ".join(filler[:cut] + [f"the {thing} is {colour}"] + filler[cut:])
            rows.append({"prompt": f"Read the notes and answer the question.\nNotes: {notes}.\n"
                                   f"Question: what colour is the {thing}?",
                         "completion": f"The {thing} is {colour}."})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def save_random_checkpoint(folder: Path, tiny: bool, tokenizer: Path | None, scratch: Path) -> str:
    """A random-weight LLaMA (tiny-llama, or the 7B architecture built on the GPU) saved as a bf16
    safetensors checkpoint with its tokenizer into ``folder``; returns its label. ``tokenizer``: the
    7B architecture's config folder (in ``scratch``) gets that tokenizer (:func:`config_folders`)."""
    from fedpeptao.models.loading import load_random_backbone
    from fedpeptao.models.tiny import tiny_backbone

    if tiny:
        backbone, label = tiny_backbone("llama", head="generate"), "tiny-llama"
    else:
        name = "llama-7b-config"
        if tokenizer:
            name = config_folders({name: [f"model.name={name}"]}, tokenizer, scratch)[name][0].split("=", 1)[1]
        with torch.device("cuda"):  # random init on the GPU: seconds, not minutes on the CPU
            backbone = load_random_backbone(name, head="generate", dtype=torch.bfloat16)
        billions = sum(p.numel() for p in backbone.model.parameters()) / 1e9
        label = f"llama-7b ({billions:.1f}B)"
    tok = backbone.tokenizer
    if tok.eos_token is None and tok.sep_token is not None:  # a BERT WordPiece tokenizer (MiniLM's): as tiny-llama
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        backbone.model.config.bos_token_id, backbone.model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        backbone.model.generation_config.bos_token_id = tok.bos_token_id
        backbone.model.generation_config.eos_token_id = tok.eos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    backbone.model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "fedpeptao-label.txt").write_text(label)
    del backbone, tok
    gc.collect()
    if not tiny:
        torch.cuda.empty_cache()
    return label


def generative(args) -> None:
    """``--generative-7b``: the random-weight checkpoint, then one process per backbone setting."""
    workdir = Path(tempfile.mkdtemp(prefix="fedpeptao-gen-"))
    folder = args.checkpoint_dir or workdir / "checkpoint"
    try:
        if (folder / "config.json").is_file() and (folder / "fedpeptao-label.txt").is_file():
            label = (folder / "fedpeptao-label.txt").read_text()
        else:
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            label = save_random_checkpoint(folder, args.tiny, args.tokenizer, workdir)
            print(f"saved {label}'s random weights (bf16 safetensors) in {time.perf_counter() - started:.0f} s")
        examples = 100 if args.tiny else 400  # 10 or 40 per client: 3 or 10 steps of batch 4
        task = write_instruct(workdir / "instruct", train=examples)
        base = [f"model.name={folder}", f"data.task={task}", f"data.max_train_examples={examples}", *GENERATIVE]
        print(f"{'model':>22} {'backbone':>9} {'batched':>7} {'s/round':>8} {'examples/s':>10} {'TFLOP/s':>8} "
              f"{'peak GiB':>8} {'reserved GiB':>12} {'<16 GB':>6}")
        met = []
        for setting, overrides in GENERATIVE_RUNS.items():
            child = start([__file__, "--child", f"{label}|{setting}", *(["--tiny"] if args.tiny else []),
                           *base, *overrides, *args.overrides])
            try:
                r = collect(child, f"{label} {setting}")
            except RuntimeError as error:  # e.g. out of memory: the row says so and the others still run
                last = str(error).strip().splitlines()[-1][:120]
                print(f"{label:>22} {setting:>9} failed: {last}")
                continue
            fits = "n/a" if args.tiny else "yes" if r["reserved_gib"] * 2 ** 30 < TARGET_BYTES else "no"
            if fits == "yes":
                met.append(setting)
            print(f"{label:>22} {setting:>9} {str(r['batched']):>7} {r['seconds']:>8.1f} "
                  f"{rate(r['examples_s'], 10, 1)} {rate(r['tflops'], 8, 3)} {r['peak_gib']:>8.2f} "
                  f"{r['reserved_gib']:>12.2f} {fits:>6}")
        if args.tiny:
            print("16 GB target: not measured (CPU, tiny model)")
        else:
            print(f"16 GB target (10 clients in one pass, peak reserved < 16e9 bytes): "
                  f"{'met by ' + ', '.join(met) if met else 'not met'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def child(args) -> None:
    """One generative run in this process (its own peak memory); its row as a RESULT line."""
    label, setting = args.child.split("|", 1)
    row = round_of(label, args.overrides, "batched", args.tiny)
    print("RESULT " + json.dumps({**row, "setting": setting}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (tests the script)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, where the bundled MiniLM is absent")
    parser.add_argument("--generative-7b", action="store_true",
                        help="LLaMA-7B architecture, generative, bf16 / nf4 / nf4 + gradient checkpointing")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="--generative-7b: keep the random checkpoint here (reused when present)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (none found); run with --tiny to test it on the CPU")
    if args.child:
        return child(args)
    if args.generative_7b:
        device = "CPU (tiny-llama)" if args.tiny else torch.cuda.get_device_name(0)
        print(f"device: {device}; generative (model.head=generate), deep prompts, 10 clients per batched pass; "
              f"random weights saved as a bf16 checkpoint and loaded from it")
        return generative(args)
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
