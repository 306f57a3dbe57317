"""Text generation: batched and left-padded, KV-cached, greedy or sampled, optionally streamed.

A thin layer over ``model.generate`` (transformers), which does the decoding, the cache and the
top-k / top-p sampling. This module decides what goes in (how a prompt becomes token ids, how a
batch is padded, when to stop) and what comes out (only the new text, special tokens removed).

Prompt rule, shared with :mod:`lmadapt.evaluation.tasks`: with ``chat=False`` a prompt is tokenized as
written, with the tokenizer's own special tokens (a BOS token for tokenizers that add one); with
``chat=True`` it becomes one user turn (after an optional system turn), rendered by the tokenizer's
chat template with the assistant's turn opened (``add_generation_prompt=True``). A prompt may also be a
conversation (a list of ``{"role", "content"}`` turns, e.g. a chat row up to its last assistant turn),
always rendered by the chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from lmadapt.errors import LmadaptError
from lmadapt.progress import Progress

Prompt = str | Sequence[Mapping[str, Any]]
"""A prompt: text, or a conversation of ``{"role", "content"}`` turns (rendered by the chat template)."""

# End-of-turn markers of common chat formats (ChatML, Llama 3, Gemma, Phi-3). Generation stops at
# whichever of them the tokenizer knows as a single token, besides its EOS token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) under ``torch.inference_mode()``; the train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def prompt_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """A prompt as chat turns: text becomes one user turn; ``system_prompt`` goes first unless there is a
    system turn already."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(t) for t in prompt]
    if system_prompt and not (turns and turns[0].get("role") == "system"):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, chat: bool = False,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt: text as written (with the tokenizer's special tokens), or, with ``chat`` or
    for a conversation, :func:`prompt_messages` rendered by the chat template with the assistant's turn opened.

    An empty prompt of a tokenizer that adds no BOS token becomes ``[bos or eos]`` (a document
    boundary), so that there is always a position to predict the first new token from.
    """
    if isinstance(prompt, str) and not chat:
        ids = list(tokenizer(prompt).input_ids)
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        return ids
    from lmadapt.data import (
        render_chat,  # the same template (or fallback) that training used
    )

    text = render_chat(tokenizer, prompt_messages(prompt, system_prompt), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)  # the template wrote the special tokens


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that end a generation: the tokenizer's and the model's EOS, and known end-of-turn tokens."""
    stops = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        stops.update(value if isinstance(value, (list, tuple)) else [value])
    vocab = tokenizer.get_vocab()
    stops.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    stops.discard(None)
    return stops


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             chat: bool = False, system_prompt: str | None = None, batch_size: int = 8,
             stream: Callable[[int, str], None] | None = None, seed: int | None = None,
             progress: bool | None = False, progress_desc: str = "generate") -> list[str]:
    """The new text generated for each prompt (greedy when ``temperature == 0``, else sampled).

    Sampling draws from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (0: no limit) and to the smallest set whose probability reaches ``top_p`` (1.0: no limit).
    Generation stops at EOS or an end-of-turn token, or after ``max_new_tokens``. ``stream(i, piece)`` is
    called with each new piece of text of prompt ``i`` as it arrives. ``seed`` makes sampling
    reproducible without touching the global random state. Other settings of ``model.generation_config``
    (e.g. ``repetition_penalty``) still apply. ``progress`` (False: none) counts prompts done under
    ``progress_desc``, as :mod:`lmadapt.progress` shows it.
    """
    check_generation_arguments(max_new_tokens, temperature, top_k, top_p, batch_size)
    encoded = [encode_prompt(tokenizer, p, chat=chat, system_prompt=system_prompt) for p in prompts]
    # Prompts of similar length share a batch (less padding); a streamed run keeps the caller's order.
    order = list(range(len(prompts))) if stream else sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    config = _generation_config(max_new_tokens, temperature, top_k, top_p, stops, pad_id)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model), seeded(seed, device), Progress(len(prompts), progress_desc, "prompts", progress) as done:
        for batch in batches:
            ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
            streamer = TokenStreamer(tokenizer, batch, stops, stream) if stream else None
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer)
            for row, i in enumerate(batch):
                outputs[i] = decode_new(tokenizer, out[row, ids.shape[1]:].tolist(), stops)
            done.update(len(batch))
    return outputs


def check_generation_arguments(max_new_tokens: int, temperature: float, top_k: int, top_p: float, batch_size: int) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        problems.append(f"top_k must be >= 0 (0: no limit), got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (1: no limit), got {top_p}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if problems:
        raise LmadaptError("generate: " + "; ".join(problems))


def _generation_config(max_new_tokens: int, temperature: float, top_k: int, top_p: float, stops: set[int],
                       pad_id: int) -> GenerationConfig:
    # use_cache=True: decode from the KV cache even when model.config.use_cache is False (as training sets it)
    common = dict(max_new_tokens=max_new_tokens, num_beams=1, use_cache=True, eos_token_id=sorted(stops),
                  pad_token_id=pad_id)
    if temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, **common)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows padded on the left, so every row ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def decode_new(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], stops: set[int]) -> str:
    """The text of generated ids up to (not including) the first stop token, without special tokens."""
    end = next((j for j, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the sampler for this block only; the global random state is restored afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class TokenStreamer(BaseStreamer):
    """Passes each row's new text to ``callback(prompt_index, piece)`` as its tokens arrive.

    Each row's tokens are decoded whole and the unseen tail is sent, so a character spread over
    several byte tokens is sent once it is complete. Nothing is sent after a row's stop token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, indices: list[int], stops: set[int],
                 callback: Callable[[int, str], None]) -> None:
        self.tokenizer, self.indices, self.stops, self.callback = tokenizer, indices, stops, callback
        self.tokens: list[list[int]] = [[] for _ in indices]
        self.sent = [0] * len(indices)
        self.done = [False] * len(indices)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for row, new in enumerate(value.reshape(len(self.indices), -1).tolist()):
            for token in new:
                if self.done[row]:
                    break
                if token in self.stops:
                    self.done[row] = True
                    break
                self.tokens[row].append(token)
            self._send(row, final=False)

    def end(self) -> None:
        for row in range(len(self.indices)):
            self._send(row, final=True)

    def _send(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest of its bytes
            return
        if len(text) > self.sent[row]:
            self.callback(self.indices[row], text[self.sent[row]:])
            self.sent[row] = len(text)
