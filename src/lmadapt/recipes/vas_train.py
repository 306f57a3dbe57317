"""VAS, the training side: fit a value model on completions sampled from a frozen base model.

"Value Augmented Sampling for Language Model Alignment and Personalization", Han et al., arXiv:2405.06639.
Sample responses y ~ pi_base(. | x) and score them with a reward R(x, y). A value model (a causal-LM backbone
with a scalar head) then learns V(s) by TD(lambda). At decoding time (lmadapt.decoding.steering) each top-k candidate
token a is reweighted: z_a + beta * (V(s + a) - mean_K V).

States and positions. For prompt ids p (length P) and response ids y_0..y_{T-1} (the stop token included
when generation stopped), state s_t = p + y[:t] for t = 0..T-1. V(s_t) is the head's output at index
P + t - 1, the last token of s_t. The reward is r_{T-1} = R on the last response token (0 elsewhere), and
V(s_T) = 0 (terminal). These are exactly the indices j whose next label ``labels[j + 1]`` is a response token.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lmadapt.config import ConfigError, config_source, option, to_dict
from lmadapt.data.batching import Batcher
from lmadapt.data.tokens import IGNORE
from lmadapt.decoding.value_model import ValueModel, save_value_model
from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_write_json, atomic_write_text, check_output_dir
from lmadapt.methods import (
    Method,
    build_method,
    config_with_method,
    method_class,
)
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import (
    ModelConfig,
    load_model,
    load_tokenizer,
    model_display_name,
)
from lmadapt.models.vocab import check_same_tokenizer
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.causal_lm import model_inputs
from lmadapt.recipes.vas_samples import (
    Sample,
    collect_samples,
    read_prompts,
    read_samples,
    reward_targets,
    save_samples,
    score_samples,
    split_by_prompt,
)
from lmadapt.rewards import Reward, load_reward
from lmadapt.training.config import TrainConfig
from lmadapt.training.loop import LoopResult
from lmadapt.training.run import Run


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


def value_method(spec: dict[str, Any] | str, vm: ValueModel) -> Method:
    """The method that trains ``vm``'s backbone: ``spec`` (e.g. {"name": "lora", "r": 16}). The value head is the
    value objective's (:class:`lmadapt.objectives.value.Value`), which trains it whatever the method selects.

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
    return inner


def _pad_id(vm: ValueModel) -> int:
    pad = getattr(vm.tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def fit_value_model(vm: ValueModel, samples: Sequence[Sample], targets: Sequence[float], *, train: TrainConfig,
                    run_dir: str | Path, method: dict[str, Any] | str = "full", gamma: float = 1.0,
                    lam: float = 0.95, val: tuple[Sequence[Sample], Sequence[float]] | None = None,
                    head_lr_ratio: float = 1.0, progress: bool = False) -> LoopResult:
    """Train ``vm`` in place in the one run (:class:`lmadapt.training.run.Run`) with the value objective
    (TD(lambda), :mod:`lmadapt.objectives.value`); ``targets`` are the final rewards (already normalised). The
    method is merged and unloaded afterwards: ``vm.backbone`` is a plain model again."""
    run = Run(Path(run_dir), train, str(vm.device), overwrite=True)
    run.path.mkdir(parents=True, exist_ok=True)
    pad_id = _pad_id(vm)
    m = value_method(method, vm)
    batcher = _RewardBatcher(samples, targets, batch_size=train.batch_size, pad_id=pad_id, seed=train.seed)
    run.apply_method(vm, m, batcher)
    objective = build_objective({"name": "value", "gamma": gamma, "lam": lam, "head_lr_ratio": head_lr_ratio})
    objective.setup(vm, vm.tokenizer, run.device)
    val_batcher = _RewardBatcher(*val, batch_size=train.batch_size, pad_id=pad_id, seed=train.seed) \
        if val and len(val[0]) else None
    result = run.fit(vm, m, objective, batcher, val_batcher, base_model=vm.info.get("value_backbone"),
                     base_fingerprint=None, progress=progress)
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
