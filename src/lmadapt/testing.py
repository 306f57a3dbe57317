"""Tiny models and tokenizers built from a config, for tests and examples (nothing is downloaded)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, 256 + 4 special tokens) with a ChatML template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama(vocab_size: int = 260, seed: int = 0, **overrides: int) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 64 and grouped-query attention, random weights from ``seed``."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, use_cache=False, pad_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 2,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def tiny_lora_adapters(*specs: dict[str, Any], root: str | Path | None = None) -> list[str]:
    """Folders of LoRA adapters of :func:`tiny_llama` (seed 0), one per ``specs`` entry (a ``lora`` method section
    without its name), for methods that take adapters as their input (meteora). Each has ``init: random`` (B
    random too, so it changes the model) and is saved with the base's fingerprint. Without specs: two, r 4 and
    r 2 with rsLoRA. ``root`` None: a new temporary folder, removed when the process exits."""
    from lmadapt.adapters.format import save_adapter
    from lmadapt.methods import build_method
    from lmadapt.models.fingerprint import fingerprint

    specs = specs or ({"r": 4, "alpha": 8}, {"r": 2, "alpha": 4, "rslora": True})
    if root is None:
        root = tempfile.mkdtemp(prefix="lmadapt-tiny-loras-")
        atexit.register(shutil.rmtree, root, True)
    base_fingerprint = fingerprint(tiny_llama())
    paths = []
    for i, spec in enumerate(specs):
        model = tiny_llama()
        torch.manual_seed(1000 + i)  # tiny_llama() seeds 0: each adapter draws its own factors
        method = build_method({"name": "lora", "init": "random", **spec})
        method.apply(model)
        path = Path(root) / f"lora{i}"
        save_adapter(model, method, path, base_model="tiny-llama", base_fingerprint=base_fingerprint)
        paths.append(str(path))
    return paths
