"""Tiny random-weight backbones of each supported architecture, for fast unit tests only.

Never use them for claims about accuracy. Every model: hidden 32, 4 attention heads (LLaMA: grouped
query attention with 2 key/value heads), intermediate 64, 128 usable positions, float32, sdpa
attention. All share the MiniLM package's BERT WordPiece tokenizer (vocab 30522, uncased) with
consistent special ids: ``[PAD]`` = 0 is the pad token, ``[CLS]`` = 101 is bos, ``[SEP]`` = 102 is eos,
``[MASK]`` = 103 is the mask token. As with the real tokenizers of each family:

- bert: ``[CLS] a [SEP] b [SEP]`` with token type ids;
- roberta: the same templates, no token type ids (its type vocabulary has one entry);
- gpt2: no special tokens added;
- llama: bos (``[CLS]``) prepended only.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
)

from fedpeptao.models.builtin import ModelError, resolve_builtin
from fedpeptao.models.loading import Backbone, check_head, model_class

TINY_ARCHS = ("bert", "roberta", "gpt2", "llama")
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 32, 4, 2, 64, 128
VOCAB_SIZE = 30522
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103
_KINDS = {"bert": "encoder", "roberta": "encoder", "gpt2": "decoder", "llama": "decoder"}


@lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    return str(resolve_builtin("minilm"))


def tiny_tokenizer(arch: str):
    """A fresh copy of the MiniLM WordPiece tokenizer, with the special tokens ``arch`` expects."""
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    if len(tokenizer) != VOCAB_SIZE or [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                        tokenizer.mask_token_id] != [PAD_ID, CLS_ID, SEP_ID, MASK_ID]:
        raise ModelError("the minilm tokenizer does not have the expected vocabulary/special ids")
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    tokenizer.model_max_length = POSITIONS
    if arch != "bert":
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    if arch == "gpt2":
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B:1",
                                                                        special_tokens=[])
    elif arch == "llama":
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A $B:1", special_tokens=[("[CLS]", CLS_ID)])
    return tokenizer


def tiny_config(arch: str, num_layers: int = 3):
    common = {"pad_token_id": PAD_ID, "bos_token_id": CLS_ID, "eos_token_id": SEP_ID}
    if arch == "bert":
        return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=num_layers,
                          num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                          max_position_embeddings=POSITIONS, type_vocab_size=2, **common)
    if arch == "roberta":
        # RoBERTa counts positions from pad + 1 (real checkpoints: 514 = 512 + pad 1 + 1).
        return RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=num_layers,
                             num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                             max_position_embeddings=POSITIONS + PAD_ID + 1, type_vocab_size=1, **common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=num_layers, n_head=HEADS,
                          n_inner=INTERMEDIATE, n_positions=POSITIONS, **common)
    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=num_layers,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                           intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, **common)
    raise ModelError(f"unknown tiny architecture '{arch}' (expected one of {', '.join(TINY_ARCHS)})")


def tiny_backbone(arch: str, head: str | None = None, seed: int = 0,
                  num_layers: int = 3) -> Backbone:
    """A random-weight backbone of ``arch``; the same ``seed`` gives the same weights.

    ``head`` defaults to ``"linear"`` for encoders and ``"lm"`` for decoders. The global torch RNG
    is left untouched.
    """
    config = tiny_config(arch, num_layers)
    kind = _KINDS[arch]
    head = head or ("linear" if kind == "encoder" else "lm")
    check_head(kind, head, f"tiny-{arch}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(head).from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    return Backbone(model, tiny_tokenizer(arch), kind, f"tiny-{arch}")
