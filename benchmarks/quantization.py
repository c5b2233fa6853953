"""Quantized frozen backbones on SmolLM2-135M: memory, speed, fidelity, gradients (docs/generative.md).

Each configuration runs in its own process (so peak memory is its own): load, then a deep-prompt or
LoRA training step (forward + backward + AdamW) on a batch of 8 x 128 tokens, then the logits of
two fixed sentences against the float32 model's in train and eval mode.

    OMP_NUM_THREADS=1 python benchmarks/quantization.py            # every configuration, a table
    python benchmarks/quantization.py --one nf4 deep_prompt       # one, as JSON

Configurations: ``none``/``int8``/``nf4`` through :func:`fedpeptao.models.loading.load_backbone`
(bitsandbytes); ``torchao-int8``/``torchao-int4`` through transformers' ``TorchAoConfig`` when
torchao is installed (weight-only int8; int4 as ``IntxWeightOnlyConfig``, group 64: torchao's
``Int4WeightOnlyConfig`` needs CUDA).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

TEXTS = ["The capital of France is Paris, and the capital of Germany is Berlin. The largest planet is",
         "Water boils at a temperature of one hundred degrees"]
CONFIGS = ("none", "int8", "nf4", "torchao-int8", "torchao-int4")


def _rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Start a new high-water mark of resident memory (Linux: VmHWM), so a phase's own peak is read."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _load(which: str):
    import torch

    from fedpeptao.models.loading import load_backbone

    if not which.startswith("torchao"):
        return load_backbone("smollm2-135m", head="generate", quantization=which).model
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from fedpeptao.models.builtin import resolve_builtin

    quant = (Int8WeightOnlyConfig() if which == "torchao-int8"
             else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    return AutoModelForCausalLM.from_pretrained(str(resolve_builtin("smollm2-135m")), dtype=torch.float32,
                                                attn_implementation="sdpa", quantization_config=TorchAoConfig(quant))


def _weight_mb(model) -> float:
    import torch

    from fedpeptao.models.quantization import weight_bytes

    def inner(t):  # torchao tensor subclasses: their inner tensors
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            return sum(inner(getattr(t, n)) for n in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    if any(hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return sum(inner(t) for t in tensors) / 2**20
    return weight_bytes(model) / 2**20


def run_one(which: str, tuning: str) -> dict:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoTokenizer

    import fedpeptao.tasks  # noqa: F401
    from fedpeptao.models.builtin import resolve_builtin
    from fedpeptao.tasks.generative import Generate
    from fedpeptao.tunings.deep_prompt import DeepPromptModel
    from fedpeptao.tunings.lora import LoRAModel

    if which.startswith("torchao"):
        import torchao  # noqa: F401  (its import is part of its cost, not of the load)
    _trim()
    _reset_peak()
    base, base_anon = _rss_mb(), _rss_mb("RssAnon")
    start = time.perf_counter()
    model = _load(which)
    load_s = time.perf_counter() - start
    load_peak = _rss_mb("VmHWM") - base
    _trim()
    after_load, after_load_anon = _rss_mb() - base, _rss_mb("RssAnon") - base_anon
    weights = _weight_mb(model)

    # fidelity against the float32 model, in train and in eval mode
    path = str(resolve_builtin("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True).input_ids
    reference = torch.load(os.environ["FEDPEPTAO_REF"]) if "FEDPEPTAO_REF" in os.environ else None
    fidelity = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            logits = model(ids).logits
        top1 = logits.argmax(-1)
        if reference is not None:
            fidelity[f"top1_agree_{mode}"] = round(float((top1 == reference.argmax(-1)).float().mean()), 3)
            fidelity[f"max_logit_diff_{mode}"] = round(float((logits - reference).abs().max()), 2)
        elif "FEDPEPTAO_REF_OUT" in os.environ:
            torch.save(logits, os.environ["FEDPEPTAO_REF_OUT"])
    gen = torch.Generator().manual_seed(0)
    task = Generate(model)
    tuned = DeepPromptModel(model, task, 8, 0.0, gen) if tuning == "deep_prompt" else LoRAModel(model, task, 0)
    tuned.attach_task(gen)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch_ids = torch.randint(100, 20000, (8, 128), generator=gen)
    labels = torch.full((8, 16), -100)
    labels[:, :8] = batch_ids[:, 100:108]
    batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids),
             "target_pos": torch.full((8,), 99), "labels": labels}
    tuned.train()
    _trim()
    before_train = _rss_mb()
    fresh_peak = _reset_peak()
    times, reached = [], 0
    for _ in range(4):
        start = time.perf_counter()
        out = tuned(**batch)
        out.loss.backward()
        reached = sum(bool(p.grad is not None and p.grad.abs().sum() > 0) for p in params)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    train_peak = (_rss_mb("VmHWM") - before_train) if fresh_peak else float("nan")
    _trim()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    state_dtypes = sorted({str(v.dtype) for s in optimizer.state.values() for v in s.values()
                           if torch.is_tensor(v) and v.dim()})
    return {"config": which, "tuning": tuning, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
            "weights_mb": round(weights, 1), "rss_after_load_mb": round(after_load, 1),
            "anon_after_load_mb": round(after_load_anon, 1), "load_peak_mb": round(load_peak, 1),
            "train_peak_over_start_mb": round(train_peak, 1), "process_peak_mb": round(peak, 1),
            "step_s": round(sorted(times[1:])[1], 3), "grads_reached": f"{reached}/{len(params)}",
            "trainable_dtype": sorted({str(p.dtype) for p in params}), "optimizer_state_dtype": state_dtypes,
            **fidelity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "TUNING"))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--tunings", nargs="*", default=["deep_prompt", "lora"])
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one)))
        return
    folder = tempfile.mkdtemp(prefix="fedpeptao-quant-")
    reference = os.path.join(folder, "reference_logits.pt")
    subprocess.run([sys.executable, __file__, "--one", "none", "deep_prompt"], capture_output=True, text=True,
                   env={**os.environ, "FEDPEPTAO_REF_OUT": reference}, check=True)
    env = {**os.environ, "FEDPEPTAO_REF": reference}
    for which in args.configs:
        if which.startswith("torchao"):
            try:
                import torchao  # noqa: F401
            except ImportError:
                print(json.dumps({"config": which, "skipped": "torchao is not installed"}))
                continue
        for tuning in args.tunings:
            done = subprocess.run([sys.executable, __file__, "--one", which, tuning], capture_output=True, text=True,
                                  env=env)
            found = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            print(found[0][7:] if found else json.dumps({"config": which, "tuning": tuning,
                                                          "error": (done.stderr.strip().splitlines() or ["?"])[-1]}),
                  flush=True)


if __name__ == "__main__":
    main()
