"""Prompt tuning: N trainable virtual-token embeddings in front of every sequence.

Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691
(METHODS.md §9, LLM-Adapters' prompt tuning). Saved and read as PEFT's PROMPT_TUNING adapter (PEFT 0.21,
``peft.tuners.prompt_tuning``).

The frozen decoder reads the trainable matrix P (N x d, ``prompt_embeddings``) before the embeddings of the L
real tokens, and the model's outputs are kept at the real positions only::

    h = Decoder([P; E(x_1); ...; E(x_L)])      positions: 0..N-1 for P, N + p_t for token t
    logits_t = W_out h_(N+t)                    t = 1..L: nothing is computed for the N virtual positions

So every caller (objectives, ``logits_to_keep``, evaluation, generation) sees L positions, as without the
adapter, and labels never meet a virtual position (PEFT pads them with -100 instead: the same loss). Two hooks
on the decoder (``model.model``) do it: before its forward, P goes in front of ``inputs_embeds``, the attention
mask gets N ones in front and the position ids move up by N; after it, the N virtual positions are cut out of
the hidden states, before the output head.

- KV cache: P enters at the first call (the prefill). The cache then holds its N keys and values and is
  marked, so that later calls with it (decoding) only widen the mask and shift the positions.
- Packed rows (no attention mask, positions restarting at each document: transformers' packed-sequence
  attention, as ``data.batching: packed`` makes them): P goes before every document, so that each document
  sees the soft prompt as it would alone.
- ``adapters_disabled``: nothing is prepended, which gives the base model. A cache filled with P keeps it.

Inits (PEFT's): ``text``, the embeddings of a text's tokens repeated or cut to N; ``sample_vocab``, the
embedding rows of N token ids drawn uniformly from the whole vocabulary; ``random``, N(0, 1) like PEFT's RANDOM
(an ``nn.Embedding``'s default init). Not mergeable: P is an input, not a change of any weight.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.registry import register
from lmadapt.models.tree import add_module, freeze_all, modules_of_type, remove_module

PROMPT_KEY = "prompt_embeddings"  # PEFT's tensor name in adapter_model.safetensors
MODULE_NAME = "soft_prompt"  # where the prompt lives: under the decoder, beside its embed_tokens
CACHE_MARK = "lmadapt_virtual_tokens"  # set on a KV cache that holds the soft prompt: its length
_PEFT_INIT = {"text": "TEXT", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = option(
        30, "N, the trainable virtual tokens put in front of every sequence (LLM-Adapters' default). 0: none, "
            "the base model (for checks).")
    init: Literal["sample_vocab", "text", "random"] = option(
        "sample_vocab", "sample_vocab: embedding rows of N token ids drawn uniformly from the vocabulary (PEFT's "
                        "SAMPLE_VOCAB); text: the embeddings of init_text's tokens, repeated or cut to N (PEFT's "
                        "TEXT); random: N(0, 1) values (PEFT's RANDOM; far larger than most models' embeddings).")
    init_text: str | None = option(
        None, "init: text only: the text, tokenized with the run's tokenizer (its special tokens included, as "
              "PEFT), e.g. a task description such as 'Classify the topic of this article:'.")

    def check(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 0:
            problems.append(f"num_virtual_tokens: must be >= 0, got {self.num_virtual_tokens}")
        if self.init == "text" and not self.init_text:
            problems.append("init_text: init 'text' needs the text whose tokens start the prompt, e.g. "
                            "init_text: 'Classify the topic of this article:'")
        if self.init != "text" and self.init_text:
            problems.append(f"init_text: only init 'text' reads it, but init is {self.init!r}; set init: text, or "
                            f"leave init_text out")
        return problems


@functools.cache
def _positional_names(decoder_type: type) -> list[str]:
    return list(inspect.signature(decoder_type.forward).parameters)[1:]  # without self


def _with_mask_ones(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The 2-D attention mask with N ones in front (the virtual tokens are always attended to)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise LmadaptError(f"prompt tuning needs a 2-D (batch x tokens) attention mask to widen by the "
                           f"{n} virtual tokens, got shape {tuple(mask.shape)}; a static cache makes 4-D masks: "
                           f"generate with the default (dynamic) cache")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _restarts(positions: torch.Tensor) -> bool:
    """Whether some row's positions restart (several packed documents: transformers' packed-sequence rule)."""
    return bool((positions[:, 1:] != positions[:, :-1] + 1).any())


def _per_document(embeds: torch.Tensor, positions: torch.Tensor,
                  prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``embeds`` (B, L, d) of packed rows with the N prompt rows before each document (a run of consecutive
    positions), and their positions (prompt: 0..N-1, tokens: p + N). Rows are filled up to the widest with zero
    vectors at positions 0, 1, ... (a sequence of their own). Also returns the column of each real token."""
    b, length, dim = embeds.shape
    n, dev = prompt.shape[0], embeds.device
    positions = positions.expand(b, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    cols = torch.arange(length, device=dev) + n * starts.cumsum(1)
    used = cols[:, -1] + 1
    rows, firsts = starts.nonzero(as_tuple=True)
    virtual = cols[rows, firsts][:, None] - n + torch.arange(n, device=dev)  # (documents, N) columns
    # each new column takes a row of the table [real tokens; prompt; zero filler]
    index = torch.full((b, int(used.max())), b * length + n, device=dev)
    index.scatter_(1, cols, torch.arange(b * length, device=dev).view(b, length))
    index[rows[:, None], virtual] = b * length + torch.arange(n, device=dev)
    table = torch.cat([embeds.reshape(-1, dim), prompt, prompt.new_zeros(1, dim)])
    new_positions = (torch.arange(index.shape[1], device=dev) - used[:, None]).scatter(1, cols, positions + n)
    new_positions[rows[:, None], virtual] = torch.arange(n, device=dev)
    return table[index], new_positions, cols


class SoftPrompt(nn.Module):
    """The N x d soft prompt, and the two decoder hooks that put it in front of every sequence (see the module
    docstring). ``prompt_embeddings`` stays fp32 and is cast to the embeddings' dtype per call, as in PEFT."""

    casts_own_parameters = True

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(values.detach().float().clone())
        self._enabled = True
        self._cols: torch.Tensor | None = None  # set by the pre-hook: the real tokens' columns to keep
        self._handles: list[Any] = []

    @property
    def adapter_enabled(self) -> bool:
        """False: nothing is prepended (the base model), except to a cache that already holds the prompt."""
        return self._enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self._enabled = value

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def attach(self, decoder: nn.Module) -> None:
        self._handles = [decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         decoder.register_forward_hook(self._after, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        self._cols = None
        n = self.num_virtual_tokens
        if args:  # a positional call, e.g. decoder(input_ids): name every argument
            kwargs = {**dict(zip(_positional_names(type(decoder)), args)), **kwargs}
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the keyword of transformers >= 5.24, or before
        if cache is not None and cache.get_seq_length() > 0:
            held = getattr(cache, CACHE_MARK, 0)
            if not held:  # a cache filled without the prompt: go on without it
                return ((), kwargs) if args else None
            positions = kwargs.get("position_ids")
            return (), {**kwargs, "attention_mask": _with_mask_ones(kwargs.get("attention_mask"), held),
                        "position_ids": None if positions is None else positions + held}
        if not self._enabled or n == 0:
            return ((), kwargs) if args else None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(kwargs["input_ids"])
        b, length = embeds.shape[:2]
        prompt = self.prompt_embeddings.to(embeds.dtype)
        positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        use_cache = kwargs.get("use_cache")
        use_cache = getattr(decoder.config, "use_cache", False) if use_cache is None else use_cache
        if mask is None and cache is None and not use_cache and positions is not None and _restarts(positions):
            embeds, positions, self._cols = _per_document(embeds, positions, prompt)
        else:  # one sequence per row (left or right padding is in the mask): P in front
            embeds = torch.cat([prompt.expand(b, -1, -1), embeds], dim=1)
            if positions is not None:
                front = torch.arange(n, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([front.expand(positions.shape[0], n), positions + n], dim=1)
            mask = _with_mask_ones(mask, n)
            self._cols = (torch.arange(length, device=embeds.device) + n).expand(b, length)
        return (), {**kwargs, "input_ids": None, "inputs_embeds": embeds, "attention_mask": mask,
                    "position_ids": positions}

    def _after(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cols, self._cols = self._cols, None
        if cols is None:
            return None

        def real(h: torch.Tensor) -> torch.Tensor:
            return h.gather(1, cols[..., None].expand(-1, -1, h.shape[-1]))

        if isinstance(output, tuple):  # return_dict=False: (hidden states, cache, ...)
            return (real(output[0]), *output[1:])
        for key in ("cache", "past_key_values"):
            if output.get(key) is not None:
                setattr(output[key], CACHE_MARK, self.num_virtual_tokens)
        output["last_hidden_state"] = real(output["last_hidden_state"])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(real(h) for h in output["hidden_states"])
        return output


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the decoder: the module that holds the input embeddings and takes
    ``inputs_embeds`` (``model`` of a transformers causal LM, ``backbone.model`` of a value model)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    parent = name.rpartition(".")[0] if name else ""
    decoder = model.get_submodule(parent) if parent else None
    if decoder is None or "inputs_embeds" not in inspect.signature(decoder.forward).parameters:
        raise LmadaptError(f"prompt tuning feeds its soft prompt to the decoder that holds the input embeddings, "
                           f"as inputs_embeds; a {type(model).__name__} has no such decoder (a transformers causal "
                           f"LM has one: model.model)")
    return parent, decoder


@register
class PromptTuning(Method):
    """Prompt tuning (Lester et al., arXiv:2104.08691): the frozen model reads [P; E(x)], P the N x d trainable
    soft prompt; the outputs at the N virtual positions are dropped."""

    name = "prompt_tuning"
    config_class = PromptTuningConfig
    peft_type = "PROMPT_TUNING"
    identity_at_init = False

    def __init__(self, config: PromptTuningConfig) -> None:
        super().__init__(config)
        self._text_ids: list[int] | None = None
        self._tokenizer_given: bool | None = None  # None: prepare() was not called
        self._tokenizer_name: str | None = None
        self._shape: dict[str, Any] = {}

    def prepare(self, model: nn.Module, tokenizer: Any) -> Any:
        """Tokenize ``init_text`` with the run's tokenizer (init: text); the tokenizer itself stays as it is."""
        self._tokenizer_given = tokenizer is not None
        self._tokenizer_name = getattr(tokenizer, "name_or_path", None) or getattr(model, "name_or_path", None)
        if tokenizer is not None and self.config.init == "text":
            ids = list(tokenizer(self.config.init_text)["input_ids"])
            if not ids:
                raise LmadaptError(f"init_text {self.config.init_text!r} has no tokens with this tokenizer; give "
                                   f"a longer text")
            n = self.config.num_virtual_tokens
            self._text_ids = (ids * math.ceil(n / len(ids)))[:n]  # repeated or cut to N, as PEFT's TEXT
        return tokenizer

    @torch.no_grad()
    def _initial_values(self, model: nn.Module) -> torch.Tensor:
        emb = model.get_input_embeddings()
        vocab, dim = emb.weight.shape
        n, dev = self.config.num_virtual_tokens, emb.weight.device
        if self.config.init == "random":
            return torch.randn(n, dim, device=dev)
        if self.config.init == "sample_vocab":
            ids = torch.randint(0, vocab, (n,), device=dev)
        elif self._text_ids is not None:
            ids = torch.tensor(self._text_ids, dtype=torch.long, device=dev)
        elif self._tokenizer_given is False:  # loading an adapter without a tokenizer: its file has the values
            return torch.zeros(n, dim, device=dev)
        else:
            raise LmadaptError("prompt_tuning with init 'text' tokenizes init_text with the run's tokenizer: call "
                               "method.prepare(model, tokenizer) before method.apply(model) (lmadapt train does)")
        return emb(ids).float()

    def apply(self, model: nn.Module) -> None:
        path, decoder = _decoder(model)
        freeze_all(model)
        soft = SoftPrompt(self._initial_values(model))
        add_module(model, f"{path}.{MODULE_NAME}", soft)
        soft.attach(decoder)
        config = decoder.config.get_text_config() if hasattr(decoder.config, "get_text_config") else decoder.config
        self._shape = {"token_dim": soft.prompt_embeddings.shape[1],
                       "num_attention_heads": getattr(config, "num_attention_heads", None),
                       "num_layers": getattr(config, "num_hidden_layers", None)}

    def _soft_prompt(self, model: nn.Module) -> SoftPrompt:
        found = [m for _, m in modules_of_type(model, SoftPrompt)]
        if len(found) != 1:
            raise LmadaptError(f"the model holds {len(found)} soft prompts, not 1; apply prompt_tuning once, to a "
                               f"fresh model")
        return found[0]

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("prompt_embeddings", [self._soft_prompt(model).prompt_embeddings])]

    def merge(self, model: nn.Module) -> None:
        raise LmadaptError("prompt_tuning cannot be merged into the base weights: its soft prompt is N extra input "
                           "vectors, not a change of any weight. Keep the adapter and load it with the base model "
                           "(lmadapt.load(..., adapter=...)), or train a mergeable method such as lora")

    def unmerge(self, model: nn.Module) -> None:
        self.merge(model)

    def unload(self, model: nn.Module) -> None:
        """Remove the soft prompt and its hooks: a plain transformers model again (the prompt is lost)."""
        for name, soft in list(modules_of_type(model, SoftPrompt)):
            soft.detach()
            remove_module(model, name)

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self._soft_prompt(model).prompt_embeddings.detach()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {PROMPT_KEY}:
            raise KeyError(f"a prompt-tuning adapter holds one tensor, {PROMPT_KEY!r}; this one holds "
                           f"{sorted(state) or 'none'}")
        target = self._soft_prompt(model).prompt_embeddings
        if state[PROMPT_KEY].shape != target.shape:
            raise ValueError(f"{PROMPT_KEY}: saved shape {tuple(state[PROMPT_KEY].shape)} != the model's "
                             f"{tuple(target.shape)} (num_virtual_tokens x hidden size: another base model?)")
        with torch.no_grad():
            target.copy_(state[PROMPT_KEY])

    def adapter_config(self) -> dict[str, Any]:
        cfg = self.config
        text = cfg.init == "text"
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "num_transformer_submodules": 1,
            **self._shape,  # token_dim, num_attention_heads, num_layers
            "prompt_tuning_init": _PEFT_INIT[cfg.init],
            "prompt_tuning_init_text": cfg.init_text if text else None,
            # PEFT refuses a TEXT config without one; it reads the tokenizer only to initialise a new prompt
            "tokenizer_name_or_path": (self._tokenizer_name or "unknown (an in-memory tokenizer)") if text else None,
            "tokenizer_kwargs": None,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> dict[str, Any]:
        task, parts = peft.get("task_type"), peft.get("num_transformer_submodules") or 1
        if task not in (None, "CAUSAL_LM") or parts != 1:
            raise ValueError(f"this PEFT prompt-tuning adapter is for task_type {task!r} with {parts} transformer "
                             f"submodules; lmadapt's prompt_tuning reads decoder-only (CAUSAL_LM, 1 submodule) ones")
        if peft.get("modules_to_save"):
            raise ValueError("this PEFT prompt-tuning adapter also trains modules_to_save, which lmadapt's "
                             "prompt_tuning does not support")
        init = {v: k for k, v in _PEFT_INIT.items()}.get(str(peft.get("prompt_tuning_init", "RANDOM")))
        if init is None:
            raise ValueError(f"prompt_tuning_init {peft.get('prompt_tuning_init')!r} is not one of PEFT's "
                             f"(TEXT, SAMPLE_VOCAB, RANDOM)")
        n = peft.get("num_virtual_tokens")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_virtual_tokens must be a whole number >= 0, got {n!r}")
        return {"num_virtual_tokens": n, "init": init,
                "init_text": peft.get("prompt_tuning_init_text") if init == "text" else None}
