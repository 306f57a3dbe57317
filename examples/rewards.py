"""Example reward functions for `lmadapt vas-train` (see docs/vas.md).

A reward is any callable ``reward(prompts, completions) -> list[float]``:

- ``prompts``: the prompts as written in the prompts file (before any chat template);
- ``completions``: the base model's sampled text for each prompt, without special tokens;
- returns one finite float per (prompt, completion) pair, in the same order. Higher is better.

lmadapt calls it on chunks of up to 64 pairs, so a reward model can batch its forward passes. Refer to one as
``examples/rewards.py:names_a_topic`` (a file path) or ``my_package.rewards:names_a_topic`` (an importable module).
These examples need nothing but the standard library; a learned reward model (e.g. a transformers
``AutoModelForSequenceClassification``) is called the same way: load it once at import time, score the pairs.
"""

from __future__ import annotations

import re

TOPICS = ("sport", "tech", "food")
POSITIVE = {"good", "great", "excellent", "happy", "love", "wonderful", "best", "nice", "glad", "enjoy"}
NEGATIVE = {"bad", "terrible", "awful", "sad", "hate", "worst", "poor", "angry", "boring", "wrong"}


def names_a_topic(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion's first word is one of sport/tech/food (the answer format of
    examples/data/topics_train.jsonl), 0.5 when such a word appears later, else 0.0."""
    scores = []
    for text in completions:
        words = re.findall(r"[a-z]+", text.lower())
        scores.append(1.0 if words[:1] and words[0] in TOPICS else 0.5 if set(words) & set(TOPICS) else 0.0)
    return scores


def brevity(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for an empty answer down to 0.0 at 40 words or more: steer towards short answers."""
    return [1.0 - min(len(text.split()), 40) / 40 for text in completions]


def positivity(prompts: list[str], completions: list[str]) -> list[float]:
    """(positive - negative words) / words, a toy sentiment score in [-1, 1]."""
    scores = []
    for text in completions:
        words = re.findall(r"[a-z']+", text.lower())
        hits = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(hits / max(1, len(words)))
    return scores
