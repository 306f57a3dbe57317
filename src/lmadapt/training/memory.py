"""Gradient (activation) checkpointing for a run: ``train.gradient_checkpointing``.

Chen et al., "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174): keep only each decoder
block's input in the forward pass and recompute the block's activations during the backward pass. Peak
activation memory drops from O(layers x tokens x hidden x per-block factor) to about
O(layers x tokens x hidden) plus one block's worth, at the cost of a second forward through every block
(about a third more compute). The gradients are the same up to floating-point reassociation: torch's
non-reentrant checkpoint replays the block with the saved RNG state, so dropout masks are identical.

transformers implements it per decoder layer; this module only switches it on for the length of a run
and back off afterwards, so evaluation and generation after training run as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from lmadapt.errors import ConfigError

# Non-reentrant: works when no input requires grad (frozen embeddings under LoRA), and keeps the RNG state.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def _switch(model: nn.Module, enable: bool) -> None:
    """Turn transformers' per-layer checkpointing on or off (``activation_checkpointing_*`` from transformers
    5.23, ``gradient_checkpointing_*`` before; the latter is deprecated there and removed in v6)."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder block's activations in the backward pass while the block runs (when ``enabled``).

    Raises :class:`~lmadapt.errors.ConfigError` when ``model`` is not a transformers model that supports it
    (e.g. a VAS value model, whose backbone always runs in eval mode, where transformers never checkpoints).
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError([(f"train.gradient_checkpointing: a {type(model).__name__} does not support it (only "
                            f"transformers models whose layers do); set train.gradient_checkpointing=false")])
    _switch(model, True)
    try:
        yield
    finally:
        _switch(model, False)
