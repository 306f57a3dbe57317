"""Tiny models and tokenizers built from a config, for tests and examples (nothing is downloaded)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
SENTENCEPIECE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# The role each special token of the two tiny BPE styles plays (tokens absent from a tokenizer get no role).
SPECIAL_ROLES = {"<|im_start|>": "bos_token", "<|im_end|>": "eos_token", "<|endoftext|>": "unk_token",
                 "<s>": "bos_token", "</s>": "eos_token", "<unk>": "unk_token", "<pad>": "pad_token"}


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


def tiny_bpe_tokenizer(texts: Sequence[str], *, style: Literal["byte", "metaspace"] = "byte", vocab_size: int,
                       special_tokens: Sequence[str] | None = None, split_words: bool = True,
                       roles: bool = True, extra_special_tokens: bool = False,
                       chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts`` with the ``tokenizers`` library, for the vocabulary tests.

    - ``style="byte"``: GPT-2/SmolLM2 style: byte-level pre-tokenizer and decoder, the 256 byte symbols as the
      initial alphabet. ``special_tokens`` default :data:`SPECIAL_TOKENS` (ChatML), ids 0, 1, ...
    - ``style="metaspace"``: SentencePiece (Llama-2/Gemma) style: '▁' for spaces, trained within words, with
      ``<0xNN>`` byte-fallback tokens (ids right after the special tokens, before the trained pieces) and a
      Replace/ByteFallback/Fuse/Strip decoder. ``special_tokens`` default ``<unk> <s> </s>``; the first is the
      unknown token. ``split_words`` keeps the Metaspace pre-tokenizer (no token crosses a word); False gives
      Llama-2's ``tokenizer.json`` instead: a normalizer adds the '▁'s and nothing is pre-split.

    ``vocab_size`` is the most tokens it gets, special and byte tokens included (fewer when ``texts`` run out
    of merges). ``roles``: the special tokens play their usual parts (bos, eos, unk, pad: :data:`SPECIAL_ROLES`);
    ``extra_special_tokens``: all of them are also listed as extra special tokens; ``chat_template``: ChatML.
    """
    specials = list(special_tokens if special_tokens is not None
                    else SPECIAL_TOKENS if style == "byte" else SENTENCEPIECE_SPECIAL_TOKENS)
    if style == "byte":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        core.decoder = decoders.ByteLevel()
        core.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif style == "metaspace":
        core = _metaspace_bpe(texts, vocab_size, specials, split_words)
    else:
        raise ValueError(f"style is 'byte' or 'metaspace', not {style!r}")
    named = {SPECIAL_ROLES[t]: t for t in specials if t in SPECIAL_ROLES} if roles else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **named,
                                  **({"additional_special_tokens": specials} if extra_special_tokens else {}))
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def _metaspace_bpe(texts: Sequence[str], vocab_size: int, specials: list[str], split_words: bool) -> Tokenizer:
    """The ``style="metaspace"`` core of :func:`tiny_bpe_tokenizer`: trained with the Metaspace pre-tokenizer,
    then renumbered to make room for the 256 ``<0xNN>`` tokens after the special ones."""
    core = Tokenizer(models.BPE(unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                                        show_progress=False))
    data = json.loads(core.to_str())
    n = len(specials)
    vocab = {t: i if i < n else i + 256 for t, i in data["model"]["vocab"].items()}
    vocab.update({f"<0x{b:02X}>": n + b for b in range(256)})
    data["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    data["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ]).__getstate__())
    if not split_words:
        data["pre_tokenizer"] = None
        data["normalizer"] = json.loads(normalizers.Sequence([
            normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]).__getstate__())
    return Tokenizer.from_str(json.dumps(data))


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
