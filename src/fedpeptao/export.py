"""Hand a trained model to other tools: a PEFT adapter, or plain safetensors plus ``model.json``.

``peft``: ``peft.PeftModel.from_pretrained(base_model, OUT_DIR)`` loads it.

- deep prompts -> PEFT prefix tuning without projection: layer ``i``'s ``[P, 2, H_kv*d]`` prefix
  is PEFT's ``[P, L*2*H_kv*d]`` prompt embedding's slice ``i`` (PEFT views it as
  ``[P, 2L, H_kv, d]`` and takes rows ``2i``, ``2i+1`` as layer ``i``'s keys and values);
- LoRA -> PEFT LoRA with the same rank, alpha and target modules;
- input prompts -> PEFT prompt tuning (the tuning already is PEFT's module).

The adapter is built on a fresh copy of the base model and saved with PEFT's own
``save_pretrained``, so the files are exactly what PEFT writes. Its ``task_type`` is ``CAUSAL_LM``
whenever the run's task reads a causal-LM backbone (the task registry's ``backbone_class``:
``lm`` classification and ``generate``), so ``PeftModel.from_pretrained`` gives a model whose
``generate`` applies the adapter; ``FEATURE_EXTRACTION`` otherwise.

What PEFT has no place for goes beside it. A classification run: ``classifier.json`` (head kind,
pooling, labels, label words, template) and, for the linear head, ``head.safetensors``
(``weight``, ``bias``: logits = ``mean-pooled last hidden state @ weight.T + bias``, masked mean
over the text tokens). A generative run: ``generation.json`` (how a prompt is laid out, the EOS
ids that end an answer, ``max_new_tokens``, greedy).
Late prompts, adapters, IDPG and ATTEMPT have no PEFT form; they are refused in one line.

PEFT 0.21.2 with transformers 5.24 drops a prefix-tuning adapter's prefix in
``PeftModel.generate``: PEFT hands it to the model as ``past_key_values``, and transformers 5.24,
which names its cache ``cache``, ignores the old name when its own (empty) ``cache`` is also
given; the forward pass is right, generation runs the bare backbone. :func:`patch_peft_prefix_generation`
mends that in the running process (LoRA adapters need nothing).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedpeptao.data.instruct import eos_ids, has_chat_template
from fedpeptao.models.loading import load_backbone
from fedpeptao.tasks import task_class
from fedpeptao.trained import TrainedModel
from fedpeptao.tunings.common import wrap_with_peft

PEFT_TUNINGS = ("deep_prompt", "lora", "input_prompt")
CLASSIFIER_FILE, HEAD_FILE, GENERATION_FILE = "classifier.json", "head.safetensors", "generation.json"


class ExportError(ValueError):
    """What cannot be exported, in one line."""


def export(trained: TrainedModel, out_dir: str | Path, fmt: str) -> Path:
    """Write ``trained`` to ``out_dir`` (which must not hold files) as ``peft`` or ``safetensors``."""
    out = Path(out_dir)
    tuning = trained.cfg.tuning.name
    if fmt not in ("peft", "safetensors"):
        raise ExportError(f"--format: {fmt!r} is not one of peft, safetensors")
    if fmt == "peft" and tuning not in PEFT_TUNINGS:
        raise ExportError(f"tuning {tuning}: PEFT has no equivalent (exportable: {', '.join(PEFT_TUNINGS)}); "
                          f"use --format safetensors")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        state = trained.model.trainable_state()
        save_file({n: t.contiguous() for n, t in state.items()}, str(out / "tensors.safetensors"))
    else:
        _peft_adapter(trained).save_pretrained(str(out))
    if trained.generative:
        _generation_file(trained, out)
    else:
        _classifier_files(trained, out)
    return out


def peft_task_type(trained: TrainedModel) -> str:
    """PEFT's task type for the run's task: ``CAUSAL_LM`` for a task on a causal-LM backbone."""
    return "CAUSAL_LM" if task_class(trained.head).backbone_class == "causal_lm" else "FEATURE_EXTRACTION"


def _generation_file(trained: TrainedModel, out: Path) -> None:
    tokenizer = trained.backbone.tokenizer
    chat = has_chat_template(tokenizer)
    card = {"format": "fedpeptao-generator", "version": 1, "base_model": trained.cfg.model.name, "head": trained.head,
            "prompt": ("the tokenizer's chat template, add_generation_prompt=True, tokenized without special tokens"
                       if chat else "the tokenizer's leading special tokens, then the messages' contents joined by "
                       "newlines and a newline"),
            "chat_template": chat, "eos_token_ids": eos_ids(tokenizer, trained.backbone.model),
            "decoding": "greedy", "max_new_tokens": trained.cfg.generation.max_new_tokens,
            "max_length": trained.cfg.model.max_length, "tuning": trained.cfg.tuning.model_dump(mode="json"),
            "client": trained.client}
    (out / GENERATION_FILE).write_text(json.dumps(card, indent=2))


def _classifier_files(trained: TrainedModel, out: Path) -> None:
    model = trained.model
    card = {"format": "fedpeptao-classifier", "version": 1, "base_model": trained.cfg.model.name, "head": trained.head,
            "pooling": "masked mean of the last hidden state" if trained.head == "linear" else "label-word logits",
            "labels": trained.labels, "pair": trained.pair, "template": trained.cfg.model.template,
            "label_word_ids": model.task.label_word_ids, "tuning": trained.cfg.tuning.model_dump(mode="json"),
            "client": trained.client, "max_length": trained.cfg.model.max_length}
    (out / CLASSIFIER_FILE).write_text(json.dumps(card, indent=2))
    if model.head_names():  # a trained head (linear); the label-word tasks train none
        save_file({"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
                  str(out / HEAD_FILE))


def _peft_adapter(trained: TrainedModel):
    tuning = trained.cfg.tuning
    if tuning.name == "input_prompt":
        peft_model = trained.model.peft
        peft_model.peft_config["default"].task_type = peft_task_type(trained)  # the class a loader wraps it in
        return peft_model
    base = load_backbone(trained.cfg.model.name, head=trained.head).model  # fresh: ours carries our own prefix hook
    if tuning.name == "deep_prompt":
        return _prefix_adapter(trained, base)
    return _lora_adapter(trained, base)


def _prefix_adapter(trained: TrainedModel, base):
    from peft import PrefixTuningConfig  # noqa: PLC0415

    prompt = trained.model.prompt
    layers = prompt.active_layers
    if layers != list(range(prompt.num_model_layers)):
        raise ExportError("deep prompts on a subset of layers have no PEFT prefix-tuning form")
    config = PrefixTuningConfig(task_type=peft_task_type(trained), num_virtual_tokens=prompt.num_tokens,
                                prefix_projection=False)
    peft_model = wrap_with_peft(base, config)
    weight = torch.cat([prompt.layers[str(i)].detach().reshape(prompt.num_tokens, -1) for i in layers], dim=1)
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    if embedding.shape != weight.shape:
        raise ExportError(f"PEFT's prefix for this model is {tuple(embedding.shape)}, ours {tuple(weight.shape)}")
    with torch.no_grad():
        embedding.copy_(weight)
    return peft_model


def _lora_adapter(trained: TrainedModel, base):
    from peft import LoraConfig  # noqa: PLC0415

    s = trained.cfg.tuning
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=s.target_modules, bias="none",
                        task_type=peft_task_type(trained))
    peft_model = wrap_with_peft(base, config)
    ours = {n.removeprefix("model."): t for n, t in trained.model.trainable_state().items() if "lora_" in n}
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    if ours.keys() != theirs.keys():
        missing = sorted(set(ours) ^ set(theirs))[:3]
        raise ExportError(f"PEFT's LoRA modules differ from the trained ones ({missing})")
    with torch.no_grad():
        for name, tensor in ours.items():
            theirs[name].copy_(tensor)
    return peft_model


def patch_peft_prefix_generation() -> None:
    """Make ``PeftModel.generate`` apply a prefix-tuning adapter under transformers' ``cache`` argument.

    PEFT (0.21.2) puts the prefix in ``past_key_values`` (``PeftModelForCausalLM.prepare_inputs_for_generation``);
    transformers 5.24 passes the generation's own cache as ``cache`` and, given both names, keeps
    ``cache`` and drops the prefix, so the bare backbone generates (with positions still shifted by
    the prefix). Patched, the prefix becomes the cache when the generation's is empty (the first
    step) or unused (``use_cache=False``: every step reruns the whole sequence), and PEFT's fresh
    copy is dropped once the cache holds it. A no-op where PEFT passes no ``past_key_values`` beside
    ``cache`` (a fixed PEFT, an older transformers), and for other adapters. Patches the class, once
    per process.
    """
    from peft import PeftModelForCausalLM  # noqa: PLC0415
    from peft.utils import PeftType  # noqa: PLC0415

    original = PeftModelForCausalLM.prepare_inputs_for_generation
    if getattr(original, "_fedpeptao_prefix_cache", False):
        return
    prefix_types = {getattr(PeftType, name) for name in ("PREFIX_TUNING", "CARTRIDGE") if hasattr(PeftType, name)}

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        if self.active_peft_config.peft_type in prefix_types and "cache" in inputs \
                and inputs.get("past_key_values") is not None:
            prefix, cache = inputs.pop("past_key_values"), inputs["cache"]
            if cache is None or cache.get_seq_length() == 0 or inputs.get("use_cache") is False:
                inputs["cache"] = prefix
        return inputs

    prepare_inputs_for_generation._fedpeptao_prefix_cache = True
    PeftModelForCausalLM.prepare_inputs_for_generation = prepare_inputs_for_generation
