"""VAS, the training side: fit a value model on completions sampled from a frozen base model.

"Value Augmented Sampling for Language Model Alignment and Personalization", Han et al., arXiv:2405.06639.
Sample responses y ~ pi_base(. | x) and score them with a reward R(x, y). A value model (a causal-LM backbone
with a scalar head) then learns V(s) by TD(lambda). At decoding time (lmadapt.steering) each top-k candidate
token a is reweighted: z_a + beta * (V(s + a) - mean_K V).

States and positions. For prompt ids p (length P) and response ids y_0..y_{T-1} (the stop token included
when generation stopped), state s_t = p + y[:t] for t = 0..T-1. V(s_t) is the head's output at index
P + t - 1, the last token of s_t. The reward is r_{T-1} = R on the last response token (0 elsewhere), and
V(s_T) = 0 (terminal). These are exactly the indices j whose next label ``labels[j + 1]`` is a response token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from lmadapt.config import ConfigError, config_source, option, to_dict
from lmadapt.data.batching import Batcher
from lmadapt.data.readers import read_records
from lmadapt.errors import DataError, LmadaptError, ModelError
from lmadapt.fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_output_dir
from lmadapt.generation import decode_new, encode_prompt, eval_mode, left_pad, stop_token_ids
from lmadapt.loop import LoopResult, TrainConfig, Trainer
from lmadapt.methods import Method, ParamGroup, build_method, config_with_method, method_class
from lmadapt.models import (ModelConfig, fingerprint, load_model, load_tokenizer, model_display_name,
                            resolve_device, resolve_dtype, vocabulary_mismatch)
from lmadapt.objectives import model_inputs
from lmadapt.rewards import Reward, load_reward

VALUE_JSON = "lmadapt_value.json"
HEAD_FILE = "value_head.safetensors"
IGNORE = -100


# ----------------------------------------------------------------------------------------------- the model

@dataclass
class ValueOutput(ModelOutput):
    """``values``: (batch, seq) fp32, V of the state ending at each position; ``past_key_values``: the cache."""

    values: torch.Tensor | None = None
    past_key_values: Any = None


class ValueModel(nn.Module):
    """A causal-LM backbone and a zero-initialised head: V(s) = w . h_last(s) + b (so V = 0 at init).

    ``backbone`` is the whole transformers causal LM (saved as a plain model folder); only its decoder runs,
    so no vocabulary logits are computed. Dropout is off: config dropout fields are set to 0 and the
    backbone stays in eval mode even when this module is put in train mode.
    """

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = backbone.config
        for key, value in list(vars(config).items()):
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)
        self.backbone = backbone.eval()
        hidden = config.get_text_config().hidden_size
        device = next(backbone.parameters()).device
        self.value_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()
        self.tokenizer = tokenizer
        self.info: dict[str, Any] = dict(info or {})

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def train(self, mode: bool = True) -> ValueModel:
        super().train(mode)
        self.backbone.eval()  # no dropout, ever (as in the paper and TRL)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> ValueOutput:
        """V at every position; with ``use_cache`` the backbone's cache comes back for incremental decoding."""
        out = self.backbone.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, past_key_values=past_key_values,
                                          use_cache=use_cache)
        hidden = out.last_hidden_state
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # the head runs in fp32
            w, b = self.value_head.weight.float(), self.value_head.bias.float()
            values = F.linear(hidden.float(), w, b).squeeze(-1)
        return ValueOutput(values=values, past_key_values=out.past_key_values if use_cache else None)


def save_value_model(vm: ValueModel, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``path`` atomically: the backbone as a plain transformers folder (safetensors, config, tokenizer),
    ``value_head.safetensors`` and ``lmadapt_value.json`` (``vm.info`` plus the format fields)."""
    from lmadapt import __version__

    if vm.tokenizer is None:
        raise LmadaptError("save_value_model: the value model has no tokenizer; set vm.tokenizer first")
    head = {k: v.detach().float().cpu().contiguous() for k, v in vm.value_head.state_dict().items()}
    record = {"format": "lmadapt-value-model", "format_version": 1, "lmadapt_version": __version__,
              "value_head": HEAD_FILE, "hidden_size": int(head["weight"].shape[1]), **vm.info}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        vm.backbone.save_pretrained(tmp)
        vm.tokenizer.save_pretrained(tmp)
        save_file({f"value_head.{k}": v for k, v in head.items()}, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        (tmp / VALUE_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def load_value_model(path: str | Path, *, dtype: str | torch.dtype | None = None,
                     device: str | torch.device | None = None) -> tuple[ValueModel, PreTrainedTokenizerBase]:
    """(value model in eval mode, its tokenizer) from a folder written by :func:`save_value_model`.

    ``dtype`` (fp32/bf16/fp16/auto or a torch dtype; None: as saved) applies to the backbone; the head stays fp32.
    ``device``: None means auto (cuda, mps, else cpu).
    """
    path = Path(path)
    missing = [n for n in (VALUE_JSON, HEAD_FILE, "config.json") if not (path / n).is_file()]
    if not path.is_dir() or missing:
        inside = sorted(p.parent.name for p in path.glob(f"*/{VALUE_JSON}")) if path.is_dir() else []
        hint = f"; it holds value models {', '.join(inside)}: pass one of those folders" if inside else \
            "; give a folder written by `lmadapt vas-train` (save_value_model)"
        what = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}" if path.is_dir() \
            else "is a file"
        raise LmadaptError(f"{path} is not a value model: it {what}{hint}")
    info = json.loads((path / VALUE_JSON).read_text(encoding="utf-8"))
    dev = device if isinstance(device, torch.device) else resolve_device(str(device or "auto"))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    try:
        backbone = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the value model's backbone from {path}: {exc}") from exc
    head = load_file(str(path / HEAD_FILE))
    vm = ValueModel(backbone.to(dev), load_tokenizer(path), info)
    if head.get("value_head.weight") is None or head["value_head.weight"].shape != vm.value_head.weight.shape:
        raise LmadaptError(f"{path / HEAD_FILE}: expected value_head.weight of shape "
                           f"{tuple(vm.value_head.weight.shape)} (the backbone's hidden size)")
    vm.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in head.items()})
    return vm.eval(), vm.tokenizer


# ----------------------------------------------------------------------------------------------- samples

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

    Prompts are encoded as :func:`lmadapt.generation.generate` does; the generated ids are kept as they are
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


def check_same_tokenizer(base: PreTrainedTokenizerBase, value: PreTrainedTokenizerBase, *, base_name: str = "base",
                         value_name: str = "value backbone") -> None:
    """Refuse two tokenizers with different vocabularies: the value model reads the base model's token ids."""
    mismatch = vocabulary_mismatch(base, value)
    if mismatch:
        raise LmadaptError(f"the tokenizer of {value_name} differs from that of {base_name} ({len(base.get_vocab())} "
                           f"vs {len(value.get_vocab())} entries; it differs {mismatch}). The value model reads the base "
                           f"model's token ids, so both need one vocabulary: pick a value backbone of the same "
                           f"family (e.g. TinyLlama for Llama-2)")


# ----------------------------------------------------------------------------------------------- targets

def terminal_rewards(mask: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards: ``final[b]`` at the last True position of ``mask[b]``, 0 elsewhere."""
    mask = mask.bool()
    t = mask.shape[1]
    last = (t - 1 - mask.flip(1).float().argmax(dim=1)).clamp(min=0)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = final.float() * mask.any(dim=1)
    return rewards


def td_lambda_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                      lam: float) -> torch.Tensor:
    """TD(lambda) returns G_t over (B, T) tensors; ``mask`` marks each row's (contiguous) response states.

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)        V(s_{t+1}) = 0 past the last masked position
        GAE_t   = delta_t + gamma lambda GAE_{t+1}
        G_t     = GAE_t + V(s_t)                          (0 where the mask is False)

    lambda = gamma = 1 gives the Monte-Carlo return (the sum of later rewards); lambda = 0 the one-step target
    r_t + gamma V(s_{t+1}). Vectorised over the batch, a loop over time.
    """
    m = mask.float()
    v, r = values.float() * m, rewards.float() * m
    gae = torch.zeros_like(v[:, 0])
    out = torch.zeros_like(v)
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(gae)
        gae = (r[:, t] + gamma * next_v - v[:, t] + gamma * lam * gae) * m[:, t]
        out[:, t] = gae
    return (out + v) * m


def value_loss(gamma: float, lam: float) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int, Any]]:
    """The Trainer objective: sum over response states of 0.5 (V(s_t) - G_t)^2 (the loop divides by the count).

    G_t = td_lambda_returns of the same forward's values, detached (no gradient through the target).
    ``batch["rewards"]`` holds each row's final reward; the states are the positions j with labels[j+1] != -100.
    """
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, Any]:
        out = model(**model_inputs(batch))
        values = out.values[:, :-1]
        mask = batch["labels"][:, 1:].to(values.device) != IGNORE
        rewards = terminal_rewards(mask, batch["rewards"].to(values.device))
        returns = td_lambda_returns(values.detach(), rewards, mask, gamma, lam)
        loss = 0.5 * ((values - returns) ** 2)[mask].sum()
        return loss, int(mask.sum()), out
    return loss_fn


# ----------------------------------------------------------------------------------------------- training

class _RewardBatcher:
    """A Batcher of prompt + response rows (labels mark the response) that also collates each row's reward."""

    def __init__(self, samples: Sequence[Sample], targets: Sequence[float], *, batch_size: int, pad_id: int,
                 seed: int) -> None:
        rows = [s.prompt_ids + s.response_ids for s in samples]
        labels = [[IGNORE] * len(s.prompt_ids) + s.response_ids for s in samples]
        data = types.SimpleNamespace(input_ids=rows, labels=labels)
        self.batcher = Batcher(data, batch_size=batch_size, max_length=max(map(len, rows)), packing=False,
                               group_by_length=False, pad_id=pad_id, seed=seed)
        self.targets = [float(t) for t in targets]

    def __len__(self) -> int:
        return len(self.batcher)

    def batches(self, epoch: int) -> list:
        return self.batcher.batches(epoch)

    def collate(self, batch: list) -> dict[str, torch.Tensor]:
        out = self.batcher.collate(batch)
        out["rewards"] = torch.tensor([self.targets[row[0]] for row in batch], dtype=torch.float32)
        return out


class _WithValueHead:
    """``inner`` (full, lora, freeze) on the backbone, plus the value head, which always trains.

    The registered methods choose parameters among the backbone's modules only, so this wrapper adds the head as
    an optimizer group of its own (no weight decay) and freezes an untied LM head (unused by a value model). Every
    other hook (extra_loss, merge, unload, ...) is the inner method's, by delegation.
    """

    def __init__(self, inner: Method, head_lr_ratio: float = 1.0) -> None:
        self.inner, self.name, self.head_lr_ratio = inner, f"{inner.name}+value_head", head_lr_ratio

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def apply(self, model: ValueModel) -> None:
        self.inner.apply(model)
        out, inp = model.backbone.get_output_embeddings(), model.backbone.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            out.weight.requires_grad_(False)
        model.value_head.requires_grad_(True)

    def parameter_groups(self, model: ValueModel) -> list[ParamGroup]:
        head = list(model.value_head.parameters())
        groups = [dataclasses.replace(g, params=[p for p in g.params if all(p is not h for h in head)])
                  for g in self.inner.parameter_groups(model)]
        return [g for g in groups if g.params] + [ParamGroup("value_head", head, lr_scale=self.head_lr_ratio,
                                                             weight_decay=0.0)]

    def adapter_state(self, model: ValueModel) -> dict[str, torch.Tensor]:
        head = {f"value_head.{k}": v.detach() for k, v in model.value_head.state_dict().items()}
        return {**{k: v for k, v in self.inner.adapter_state(model).items() if k not in head}, **head}

    def load_adapter_state(self, model: ValueModel, state: dict[str, torch.Tensor]) -> None:
        model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()
                                          if k.startswith("value_head.")})
        self.inner.load_adapter_state(model, {k: v for k, v in state.items() if not k.startswith("value_head.")})


def value_method(spec: dict[str, Any] | str, vm: ValueModel, head_lr_ratio: float = 1.0) -> Any:
    """The method that trains ``vm``: ``spec`` (e.g. {"name": "lora", "r": 16}) on the backbone, plus the head
    (at ``head_lr_ratio`` times the run's learning rate).

    Methods with ``exclude_modules`` (lora) are told to leave the value head and the LM head alone.
    """
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    spec.setdefault("name", "full")
    cls = method_class(spec["name"])
    if any(f.name == "exclude_modules" for f in dataclasses.fields(cls.config_class)):
        heads = [n for n, m in vm.named_modules() if m is vm.backbone.get_output_embeddings()]
        spec["exclude_modules"] = [*spec.get("exclude_modules", []), "re:value_head",
                                   *(f"re:{re.escape(n)}" for n in heads)]
    inner = build_method(spec)
    if not inner.mergeable:
        raise LmadaptError(f"method {inner.name!r} cannot be merged into the backbone, and value models are saved "
                           f"as plain models; use full, lora or freeze")
    return _WithValueHead(inner, head_lr_ratio)


def _pad_id(vm: ValueModel) -> int:
    pad = getattr(vm.tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def fit_value_model(vm: ValueModel, samples: Sequence[Sample], targets: Sequence[float], *, train: TrainConfig,
                    run_dir: str | Path, method: dict[str, Any] | str = "full", gamma: float = 1.0,
                    lam: float = 0.95, val: tuple[Sequence[Sample], Sequence[float]] | None = None,
                    head_lr_ratio: float = 1.0, progress: bool = False) -> LoopResult:
    """Train ``vm`` in place through :class:`lmadapt.loop.Trainer` with :func:`value_loss`; ``targets`` are the
    final rewards (already normalised). The method is merged and unloaded afterwards: ``vm.backbone`` is a
    plain model again."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pad_id = _pad_id(vm)
    m = value_method(method, vm, head_lr_ratio)
    m.apply(vm)
    batcher = _RewardBatcher(samples, targets, batch_size=train.batch_size, pad_id=pad_id, seed=train.seed)
    val_batcher = _RewardBatcher(*val, batch_size=train.batch_size, pad_id=pad_id, seed=train.seed) \
        if val and len(val[0]) else None
    trainer = Trainer(vm, m, train, batcher, val_batcher, run_dir, base_model=vm.info.get("value_backbone"),
                      base_fingerprint=None, device=vm.device, loss_fn=value_loss(gamma, lam))
    result = trainer.run(progress=progress)
    m.merge(vm)
    m.unload(vm)
    vm.requires_grad_(False)
    vm.eval()
    return result


@torch.no_grad()
def value_reward_correlation(vm: ValueModel, samples: Sequence[Sample], targets: Sequence[float],
                             batch_size: int = 16) -> float:
    """Pearson correlation between V(s_{T-1}) (the state before the last response token) and the target reward."""
    pad_id = _pad_id(vm)
    batcher = _RewardBatcher(samples, targets, batch_size=batch_size, pad_id=pad_id, seed=0)
    preds, truth = [], []
    vm.eval()
    for plan in batcher.batches(0):
        batch = {k: v.to(vm.device) for k, v in batcher.collate(plan).items()}
        values = vm(**model_inputs(batch)).values[:, :-1]
        mask = batch["labels"][:, 1:] != IGNORE
        last = values.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)
        preds += values[torch.arange(len(last)), last].tolist()
        truth += batch["rewards"].tolist()
    if len(preds) < 2:
        return float("nan")
    return float(torch.corrcoef(torch.tensor([preds, truth]))[0, 1])


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class VasConfig:
    """A ``lmadapt vas-train`` run: sample from the base, score, fit one value model per reward."""

    model: ModelConfig = option(default_factory=ModelConfig, help="The frozen base model that is sampled.")
    value_backbone: str | None = option(None, "Model folder or built-in to start the value model from "
                                              "(same tokenizer as the base); null = the base model itself.")
    prompts: str | None = option(None, "JSONL (or JSON/CSV/Parquet) file whose rows have a string field 'prompt'.")
    rewards: list[str] = option([], "Reward callables, 'package.module:function' or 'path/file.py:function'; "
                                    "one value model is trained per reward.")
    samples: str | None = option(None, "Reuse the samples.jsonl of an earlier run instead of sampling.")
    n_per_prompt: int = option(4, "Completions sampled per prompt.")
    max_new_tokens: int = option(64, "Longest completion, in tokens.")
    temperature: float = option(1.0, "Sampling temperature (> 0); 1 samples pi_base itself.")
    top_p: float = option(1.0, "Nucleus sampling mass (1: none).")
    chat: bool = option(False, "Render prompts as a user turn with the chat template (use the same at generation).")
    generation_batch_size: int = option(8, "Sequences sampled together (each copy of a prompt counts).")
    seed: int = option(0, "Seed of the sampling and of the train/validation split.")
    gamma: float = option(1.0, "Discount gamma of the TD(lambda) targets.")
    lam: float = option(0.95, "lambda of the TD(lambda) targets (1: Monte-Carlo, 0: one-step TD).")
    normalize_rewards: bool = option(True, "Standardise rewards with the training samples' mean and std.")
    reward_clip: float | None = option(None, "Clip rewards (after normalisation) to [-c, c]; null: no clipping.")
    validation_fraction: float = option(0.1, "Fraction of the prompts held out (validation loss, correlation).")
    method: dict[str, Any] = option(default_factory=lambda: {"name": "full"},
                                    help="How the backbone trains: full, lora (+ its fields) or freeze; the "
                                         "value head always trains.")
    head_lr_ratio: float = option(1.0, "The value head's learning rate as a multiple of train.lr. The head starts "
                                       "at zero; with 1.0 and a few hundred steps it may learn only the mean "
                                       "(docs/vas.md).")
    train: TrainConfig = option(default_factory=TrainConfig, help="Optimisation and the loop.")
    output_dir: str = option("runs/vas", "Run folder: samples.jsonl, report.json, values/<reward>/.")
    overwrite: bool = option(False, "Replace an existing, non-empty output_dir.")

    def check(self) -> list[str]:
        rules = [("n_per_prompt", self.n_per_prompt >= 1, ">= 1"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                 ("generation_batch_size", self.generation_batch_size >= 1, ">= 1"),
                 ("temperature", self.temperature > 0, "> 0 (VAS samples the base model)"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
                 ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
                 ("validation_fraction", 0 <= self.validation_fraction < 1, "in [0, 1)"),
                 ("reward_clip", self.reward_clip is None or self.reward_clip > 0, "> 0 or null"),
                 ("head_lr_ratio", self.head_lr_ratio > 0, "> 0")]
        problems = [f"{k}: must be {want}, got {getattr(self, k)}" for k, ok, want in rules if not ok]
        if not self.rewards:
            problems.append("rewards: give at least one, e.g. [examples/rewards.py:brevity]")
        if not self.prompts and not self.samples:
            problems.append("prompts: required (or samples: an earlier run's samples.jsonl)")
        return problems


def load_vas_config(source: str | Path | dict[str, Any] | VasConfig,
                    overrides: Sequence[str] | dict[str, Any] = ()) -> VasConfig:
    """A validated :class:`VasConfig` from YAML, a dict or a VasConfig, with ``key=value`` overrides."""
    data, where = config_source(source, overrides)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    if isinstance(data.get("method"), dict):
        data["method"] = {"name": "full", **data["method"]}  # a value model's backbone trains fully by default
    cfg, problems = config_with_method(VasConfig, data, where, default_method={"name": "full"})
    if problems:
        raise ConfigError(problems, where)
    return cfg  # type: ignore[return-value]


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


def _gather_samples(cfg: VasConfig, rewards: list[Reward]) -> tuple[list[Sample], dict[str, Any]]:
    """Sample (or reuse) and score, after checking the value backbone's tokenizer; nothing is written here.

    Returns the samples and what the value models record about the base model.
    """
    base, tokenizer = load_model(cfg.model)
    if cfg.value_backbone:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.value_backbone), base_name=cfg.model.name_or_path,
                             value_name=cfg.value_backbone)
    info = {"base_model": model_display_name(cfg.model), "base_fingerprint": fingerprint(base),
            "value_backbone": model_display_name(cfg.value_backbone or cfg.model.name_or_path),
            "chat": cfg.chat, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p}
    if cfg.samples:
        return score_samples(read_samples(cfg.samples, tokenizer, chat=cfg.chat), rewards), info
    prompts = read_prompts(cfg.prompts)  # type: ignore[arg-type]
    print(f"vas: sampling {cfg.n_per_prompt} completion(s) for each of {len(prompts)} prompts", file=sys.stderr)
    samples = collect_samples(base, tokenizer, prompts, n_per_prompt=cfg.n_per_prompt,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              chat=cfg.chat, seed=cfg.seed, batch_size=cfg.generation_batch_size, rewards=rewards)
    return samples, info


def _train_one(cfg: VasConfig, reward: Reward, samples: list[Sample], out: Path, base_info: dict[str, Any],
               progress: bool) -> dict[str, Any]:
    """Fit and save the value model of one reward; returns its report entry."""
    train_set, val_set = split_by_prompt(samples, cfg.validation_fraction, cfg.seed)
    targets, stats = reward_targets(train_set, reward.spec, normalize=cfg.normalize_rewards, clip=cfg.reward_clip)
    val_targets = reward_targets(val_set, reward.spec, normalize=cfg.normalize_rewards, clip=cfg.reward_clip,
                                 stats=stats)[0] if val_set else []
    torch.manual_seed(cfg.train.seed)  # adapter init (lora), as lmadapt.train does
    backbone, tokenizer = load_model(dataclasses.replace(cfg.model, name_or_path=cfg.value_backbone or
                                                         cfg.model.name_or_path))
    info = {**base_info, "reward": reward.spec, "reward_name": reward.name, "rewards": [reward.spec],
            "gamma": cfg.gamma, "lam": cfg.lam, "reward_normalization": stats, "method": cfg.method,
            "samples": len(train_set)}
    vm = ValueModel(backbone, tokenizer, info)
    result = fit_value_model(vm, train_set, targets, train=cfg.train, run_dir=out / "logs" / reward.name,
                             method=cfg.method, gamma=cfg.gamma, lam=cfg.lam, val=(val_set, val_targets),
                             head_lr_ratio=cfg.head_lr_ratio, progress=progress)
    corr = value_reward_correlation(vm, val_set, val_targets) if len(val_set) > 1 else float("nan")
    corr = None if math.isnan(corr) else round(corr, 4)
    vm.info["heldout_correlation"] = corr
    path = save_value_model(vm, out / "values" / reward.name)
    print(f"vas: value model for {reward.spec} saved to {path} (held-out correlation {corr})", file=sys.stderr)
    return {"reward": reward.spec, "path": str(path), "steps": result.steps, "final_loss": result.final_loss,
            "val_loss": result.val_loss, "heldout_correlation": corr, "seconds": round(result.seconds, 2)}


def train_value_model(cfg: VasConfig | str | Path | dict[str, Any], *, progress: bool = True) -> Path:
    """Sample from the base, score with each reward, fit one value model per reward; returns ``output_dir``.

    Writes ``config.yaml``, ``samples.jsonl`` (reusable via ``samples:``), ``report.json``, ``logs/<reward>/``
    (metrics) and the value models ``values/<reward>/``. An existing, non-empty ``output_dir`` is refused unless
    ``overwrite``; nothing is written before the config, rewards, tokenizers and prompts have been checked.
    """
    cfg = cfg if isinstance(cfg, VasConfig) else load_vas_config(cfg)
    out = check_output_dir(Path(cfg.output_dir), cfg.overwrite)
    rewards = [load_reward(spec) for spec in cfg.rewards]
    names = [r.name for r in rewards]
    if len(set(names)) < len(names):
        raise ConfigError([f"rewards: two rewards share the folder name {n!r}; rename one function"
                           for n in sorted({n for n in names if names.count(n) > 1})])
    samples, base_info = _gather_samples(cfg, rewards)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_samples(samples, out / "samples.jsonl")
    report = {"samples": len(samples),
              "mean_reward": {r.spec: sum(s.rewards[r.spec] for s in samples) / len(samples) for r in rewards},
              "value_models": [_train_one(cfg, r, samples, out, base_info, progress) for r in rewards]}
    atomic_write_json(out / "report.json", report)
    return out
