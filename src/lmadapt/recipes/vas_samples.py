"""VAS training data: completions sampled from a frozen base model, scored by rewards, saved and read back."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lmadapt.data.readers import read_records
from lmadapt.decoding.generation import (
    decode_new,
    encode_prompt,
    eval_mode,
    left_pad,
    stop_token_ids,
)
from lmadapt.errors import DataError
from lmadapt.fsutil import atomic_write_text
from lmadapt.rewards import Reward


@dataclass
class Sample:
    """One sampled completion: the ids the base model saw and produced, and its reward per reward spec."""

    prompt: str
    completion: str
    prompt_ids: list[int]
    response_ids: list[int]  # ends with the stop token when ``finished``
    finished: bool
    rewards: dict[str, float] = field(default_factory=dict)


def collect_samples(base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                    n_per_prompt: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    chat: bool = False, seed: int = 0, batch_size: int = 8,
                    rewards: Sequence[Reward] = ()) -> list[Sample]:
    """``n_per_prompt`` samples y ~ pi_base(. | x) per prompt (softmax(z / temperature), top-p), scored by ``rewards``.

    Prompts are encoded as :func:`lmadapt.decoding.generation.generate` does; the generated ids are kept as they are
    (never re-tokenised from text). Deterministic for a given seed and batch size.
    """
    encoded = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(n_per_prompt)), key=lambda j: len(encoded[j[0]]))
    stops = stop_token_ids(base_model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=top_p, num_beams=1,
                              max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=sorted(stops),
                              pad_token_id=pad_id)
    device = next(base_model.parameters()).device
    found: dict[tuple[int, int], Sample] = {}
    with eval_mode(base_model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            ids, mask = left_pad([encoded[i] for i, _ in batch], pad_id, device)
            out = base_model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, (i, k) in enumerate(batch):
                new = out[row, ids.shape[1]:].tolist()
                end = next((j for j, t in enumerate(new) if t in stops), None)
                response = new if end is None else new[:end + 1]
                found[(i, k)] = Sample(prompts[i], decode_new(tokenizer, response, stops), encoded[i],
                                       response, end is not None)
    samples = [found[(i, k)] for i in range(len(prompts)) for k in range(n_per_prompt)]
    return score_samples(samples, rewards)


def score_samples(samples: list[Sample], rewards: Sequence[Reward], batch_size: int = 64) -> list[Sample]:
    """Fill ``sample.rewards[reward.spec]`` for each reward not scored yet, calling it on chunks of samples."""
    for reward in rewards:
        todo = [s for s in samples if reward.spec not in s.rewards]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for s, v in zip(chunk, reward([s.prompt for s in chunk], [s.completion for s in chunk])):
                s.rewards[reward.spec] = v
    return samples


def save_samples(samples: Sequence[Sample], path: str | Path) -> None:
    """One JSON object per line: prompt, completion, prompt_ids, response_ids, finished, rewards {spec: value}."""
    atomic_write_text(path, "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in samples))


def read_samples(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, chat: bool) -> list[Sample]:
    """Samples written by :func:`save_samples`, checked against ``tokenizer`` (the ids must decode to the text)."""
    samples, problems = [], []
    names = {f.name for f in dataclasses.fields(Sample)}
    stops = stop_token_ids(None, tokenizer)
    for record in read_records(str(path))[0]:
        try:
            s = Sample(**{k: v for k, v in record.data.items() if k in names})
        except TypeError as exc:
            problems.append(f"{record.source}: {exc}")
            continue
        if s.prompt_ids != encode_prompt(tokenizer, s.prompt, chat=chat) or \
                decode_new(tokenizer, s.response_ids, stops) != s.completion:
            problems.append(f"{record.source}: the stored ids do not match this tokenizer (chat={chat}); the "
                            f"samples were made with another tokenizer or chat setting")
        samples.append(s)
    if problems or not samples:
        raise DataError(problems or [f"{path}: no samples"], hint="Collect the samples again (samples: null).")
    return samples


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` field of every row of a JSONL (or JSON/CSV/Parquet) file; every problem names file:line."""
    records, problems = read_records(str(path))
    prompts = []
    for r in records:
        value = r.data.get("prompt")
        if not isinstance(value, str):
            got = "missing" if "prompt" not in r.data else f"a {type(value).__name__}, not a string"
            problems.append(f"{r.source}: field 'prompt' is {got}")
        else:
            prompts.append(value)
    if problems or not prompts:
        raise DataError(problems or [f"{path}: no rows"], hint="Each row needs a string field 'prompt'.")
    return prompts


def split_by_prompt(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): whole prompts are held out, so held-out prompts were never trained on."""
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    random.Random(f"lmadapt-vas-split:{seed}").shuffle(prompts)
    n_val = min(len(prompts) - 1, round(fraction * len(prompts))) if fraction > 0 else 0
    held = set(prompts[:max(n_val, 1 if fraction > 0 and len(prompts) > 1 else 0)])
    return [s for s in samples if s.prompt not in held], [s for s in samples if s.prompt in held]


def reward_targets(samples: Sequence[Sample], spec: str, *, normalize: bool, clip: float | None,
                   stats: dict[str, float] | None = None) -> tuple[list[float], dict[str, Any]]:
    """Targets (r - mean) / std (when ``normalize``), then clipped to [-clip, clip]; and the stats used.

    Mean and std come from ``samples`` unless ``stats`` (from the training samples) is given, which then also
    decides normalisation and clipping.
    """
    raw = torch.tensor([s.rewards[spec] for s in samples], dtype=torch.float64)
    if stats is None:
        std = float(raw.std()) if len(raw) > 1 else 0.0
        stats = {"normalize": normalize, "mean": float(raw.mean()), "std": std if std > 1e-8 else 1.0, "clip": clip}
    out = (raw - stats["mean"]) / stats["std"] if stats["normalize"] else raw
    if stats["clip"] is not None:
        out = out.clamp(-stats["clip"], stats["clip"])
    return out.tolist(), stats
