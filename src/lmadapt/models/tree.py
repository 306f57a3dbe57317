"""The one module that walks and edits the model tree.

Targets are matched by *anchored* names, never by substring:

- ``"q_proj"`` matches a module whose dotted name ends with the whole component ``q_proj``
  (``model.layers.0.self_attn.q_proj``), never ``q_proj_extra`` nor ``lora_q_proj``;
- ``"self_attn.q_proj"`` matches on the last two components, and so on;
- ``"re:<pattern>"`` matches when the regular expression matches the *whole* dotted name;
- ``"all-linear"`` matches every ``nn.Linear`` except the output head (``lm_head`` / the output embeddings).

Every method swaps or adds modules only through :func:`replace_module`, so a swap keeps the
dotted path (and with it the base model's state-dict keys) intact.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lmadapt.errors import ConfigError, LmadaptError


def name_matches(name: str, target: str) -> bool:
    """True when module ``name`` is selected by ``target`` (anchored component suffix or ``re:`` full match)."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    parts, want = name.split("."), target.split(".")
    return len(want) <= len(parts) and parts[-len(want):] == want


def _output_head_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {n for n, m in model.named_modules() if m is head} if head is not None else set()


def find_modules(
    model: nn.Module,
    targets: Sequence[str],
    *,
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` selected by ``targets`` and not by ``exclude``, in model order.

    Raises with the available names when a target selects nothing, so a typo cannot silently
    train nothing.
    """
    heads = _output_head_names(model)
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    chosen: list[tuple[str, nn.Module]] = []
    unmatched = []
    for target in targets:
        if target == "all-linear":
            hits = [(n, m) for n, m in candidates if n not in heads]
        else:
            hits = [(n, m) for n, m in candidates if name_matches(n, target)]
        if not hits:
            unmatched.append(target)
        chosen += hits
    if unmatched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})
        kinds = "/".join(t.__name__ for t in types)
        raise LmadaptError(
            f"target module(s) {', '.join(repr(t) for t in unmatched)} match no {kinds} module in the model. "
            f"Available names: {', '.join(leaf_names) or '(none)'}; use 're:<regex>' to match full dotted "
            f"names (e.g. 're:.*layers\\.(2[0-9])\\.mlp\\..*') or 'all-linear'."
        )
    picked = {name for name, _ in chosen}  # reported in model order, whatever the order of the targets
    out = [(n, m) for n, m in candidates if n in picked and not any(name_matches(n, e) for e in exclude)]
    if chosen and not out:
        raise LmadaptError(f"exclude {list(exclude)} removes every module that target(s) {list(targets)} "
                           f"select, so nothing would be adapted; narrow the exclude list")
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` and return the module it replaced.

    ``new`` takes the train/eval mode of the module it replaces, so an adapter added to a model in eval
    mode does not run its dropout.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new.train(old.training)
    setattr(parent, child, new)
    return old


def plain_linear(layer: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` sharing ``layer``'s ``weight`` and ``bias`` Parameters (no copy): what an adapter layer
    that wraps a linear becomes when it is unloaded (its ``as_linear``)."""
    bias = getattr(layer, "bias", None)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    plain.weight = layer.weight
    if bias is not None:
        plain.bias = bias
    return plain


def add_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name``, where there is nothing yet: an adapter that sits beside the base
    modules instead of replacing one (prompt tuning's soft prompt). The base model's state-dict keys stay as
    they are; ``new`` adds its own under ``name``. It takes its parent's train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if hasattr(parent, child):
        raise LmadaptError(f"cannot add a module at {name}: the model has something there already (was the "
                           f"method applied twice?); load the adapter into a fresh model")
    new.train(parent.training)
    parent.add_module(child, new)


def remove_module(model: nn.Module, name: str) -> nn.Module:
    """Take the module at dotted path ``name`` out of the model (one that :func:`add_module` put there) and
    return it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    delattr(parent, child)
    return old


def modules_of_type(model: nn.Module, cls: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every submodule that is an instance of ``cls``."""
    for name, module in model.named_modules():
        if isinstance(module, cls):
            yield name, module


_BLOCK = re.compile(r"(.*\.)?(layers|h|blocks|block)\.(\d+)$")


def transformer_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the transformer blocks, in index order: modules named ``<...>.layers.<i>`` (or ``h``,
    ``blocks``, ``block``). A model with several such lists (a vision tower beside the language model) gets the
    blocks of all of them, sorted by index."""
    names = [n for n, _ in model.named_modules() if _BLOCK.fullmatch(n)]
    return sorted(names, key=lambda n: int(n.rsplit(".", 1)[1]))


def pick_blocks(model: nn.Module, indices: list[int], key: str) -> list[str]:
    """The dotted names of the transformer blocks ``indices`` picks (negative ones from the end), in model order.
    Every bad index is reported at once in a :class:`ConfigError` naming the config ``key`` (e.g.
    ``method.train_blocks``), before the model changes; a model with several lists of blocks is refused."""
    if not indices:
        return []
    blocks = transformer_blocks(model)
    lists = sorted({n.rsplit(".", 1)[0] for n in blocks})
    if len(lists) != 1:
        found = f"{len(lists)} lists of them ({', '.join(lists)}), so an index is ambiguous" if lists else "none"
        raise ConfigError([(f"{key}: the model's transformer blocks (modules named <...>.layers.<i>, "
                            f"h.<i>, blocks.<i> or block.<i>): found {found}; name the modules to train instead")])
    n = len(blocks)
    where = f"the model has {n} transformer blocks ({lists[0]}.0 to {lists[0]}.{n - 1})"
    problems = [f"{key}: index {i} is out of range: {where}; give 0 to {n - 1}, or -{n} to -1 "
                "counting from the end" for i in indices if not -n <= i < n]
    picked = [i % n for i in indices if -n <= i < n]
    for block in sorted({b for b in picked if picked.count(b) > 1}):
        same = " and ".join(str(i) for i in indices if -n <= i < n and i % n == block)
        problems.append(f"{key}: {same} both name block {block} ({where}); name each block once")
    if problems:
        raise ConfigError(problems)
    return [blocks[b] for b in sorted(set(picked))]


def freeze_all(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter (and keep the output head fast once frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    _contiguous_head_input(model)


def _make_contiguous(module: nn.Module, args: tuple) -> tuple | None:
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _contiguous_head_input(model: nn.Module) -> None:
    """Give the output head contiguous inputs.

    transformers slices the hidden states it feeds the head (``hidden[:, -k:, :]``, e.g. in every
    generation prefill). torch's linear on such a strided 3-D view is ~100x slower when the weight
    does not require grad (it is expanded per batch row): 1.13 s instead of 9 ms for SmolLM2's
    49,152 x 576 head at batch 8 on CPU (torch 2.13). Copying the slice first costs microseconds.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Linear) and not getattr(head, "_lmadapt_contiguous_input", False):
        head.register_forward_pre_hook(_make_contiguous)
        head._lmadapt_contiguous_input = True


# Set to True on a module whose base weights a method trains in place (new_tokens' train_blocks): the base
# model's outputs are then gone from the model, and adapters_disabled refuses.
TRAINED_IN_PLACE = "lmadapt_trained_in_place"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[nn.Module]:
    """Run the frozen base model through the same weights: every adapter module is switched off inside.

    Used for losses that need the base model's logits (BA-LoRA, self-distillation) and for
    proxy-tuning's anti-expert, without a second copy of the model in memory. Raises when the model has
    no adapter modules at all (plain model, full or partial fine-tuning): the base outputs are gone then.

    ``names`` switches off only those named adapters (modules that hold named adapters expose
    ``adapter_names`` and a settable ``disabled_adapters``); the others stay as they are.
    """
    in_place = [n for n, m in model.named_modules() if getattr(m, TRAINED_IN_PLACE, False)]
    if in_place:
        raise LmadaptError(f"{len(in_place)} module(s) of the model train their base weights in place ({in_place[0]}"
                           f"{', ...' if len(in_place) > 1 else ''}: e.g. new_tokens' train_blocks), so switching the "
                           "adapters off would not give the base model's outputs; load the base model separately "
                           "for them")
    if not any(isinstance(getattr(m, "adapter_enabled", None), bool) for m in model.modules()):
        raise LmadaptError("the model has no adapter modules to switch off (a plain model, or a method such as "
                           "full/freeze that trains the base weights themselves), so it cannot give the base "
                           "model's outputs; load the base model separately for them")
    if names is not None:
        with _named_adapters_disabled(model, [names] if isinstance(names, str) else list(names)):
            yield model
        return
    switched = [m for m in model.modules() if getattr(m, "adapter_enabled", None) is True]
    for m in switched:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in switched:
            m.adapter_enabled = True


@contextlib.contextmanager
def _named_adapters_disabled(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Add ``names`` to every holder's ``disabled_adapters`` inside; each holder's own set comes back on exit."""
    holders = [m for m in model.modules() if isinstance(getattr(m, "disabled_adapters", None), frozenset)]
    known = {n for m in holders for n in m.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LmadaptError(f"adapters_disabled: the model holds no adapter named {', '.join(map(repr, unknown))}; "
                           f"it holds {sorted(known) or 'no named adapters'}")
    before = [(m, m.disabled_adapters) for m in holders]
    for m, off in before:
        m.disabled_adapters = off | set(names)
    try:
        yield
    finally:
        for m, off in before:
            m.disabled_adapters = off


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
