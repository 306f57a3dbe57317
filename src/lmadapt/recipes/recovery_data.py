"""Recovery data: continuations sampled from the original model, written as a dataset to replay.

A model trained on a new language or domain forgets what it knew. Replaying text that the original model
wrote itself brings it back without the original training data: TransLLM's recovery knowledge distillation
(Geng et al., "Why Not Transform Chat Large Language Models to Non-English?", arXiv:2405.13923) trains the
chat model, with LoRA, on its own answers beside the new-language data. Each prompt x gets
``samples_per_prompt`` continuations

    y ~ pi_0(. | x),   pi_0(v | context) = softmax(z / T)[v] restricted to the top-k tokens and the top-p nucleus

drawn by :func:`lmadapt.decoding.generation.generate` (the one generation code path; T = 1 and no top-k/top-p
is the model's own distribution). Replayed as plain text (``data.replay``, objective ``causal_lm``), the rows
train -log pi(y | x); with ``objective: {name: distill, teacher: base}`` every position of them is pulled towards
pi_0's whole distribution instead.

Prompts, from the first row's keys (one kind per run):

- ``prompt`` rows: the text as written (with ``chat``: one user turn of the chat template);
- ``text`` rows: the first ``prompt_tokens`` tokens of the text (a document's opening, for CPT replay; a shorter
  text is the whole prompt);
- ``messages`` rows: the conversation up to and including its last user turn (always the chat template);
- ``from_scratch: N`` instead of files: N prompts of the BOS token alone (unconditional samples).

Rows written (JSONL), by ``format``: ``text`` {"text": prompt + continuation} (``data.format: text``, or
``data.replay``); ``completion`` {"prompt", "completion"} (``prompt_completion``; ``use_chat_template: true``
when sampled with ``chat``); ``chat`` {"messages": the prompt's turns + the assistant's continuation}. A sample
that is empty (the model stopped at once), shorter than ``min_new_tokens`` or (``dedup``) a copy of an earlier
row is dropped and counted. ``<output>.meta.yaml`` says where the data came from (model, adapter, sampling,
counts, versions) and which ``data:`` keys read it.

Determinism: the samples are sorted by prompt length (stable: prompt, then sample order), cut into batches of
``batch_size`` and drawn from one random stream seeded once with ``seed``; the same prompts, settings, model,
dtype, device and library versions give the same bytes. A different ``batch_size`` gives other (equally valid)
samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.config import option, to_dict
from lmadapt.data import ROLES, Record, read_files
from lmadapt.data.readers import type_name, unpaired_surrogate
from lmadapt.decoding.generation import (
    Prompt,
    check_generation_arguments,
    encode_prompt,
    generate,
    prompt_messages,
    seeded,
)
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.fsutil import atomic_write_text
from lmadapt.models.tree import model_device
from lmadapt.progress import Progress

Kind = Literal["prompt", "text", "messages", "scratch"]
KIND_FIELDS: tuple[Kind, ...] = ("messages", "prompt", "text")  # a row's kind: the first of these keys it has
DATA_FORMAT = {"text": "text", "completion": "prompt_completion", "chat": "chat"}  # --format -> data.format
META_SUFFIX = ".meta.yaml"  # not a data suffix: a folder or glob of data files never reads it as rows
ROW_HINT = "Fix or remove these rows; nothing was generated."


@dataclass
class RecoveryConfig:
    """What ``lmadapt recovery-data`` does: where the prompts come from, which model samples, how, and where to."""

    output: str = option(help="The .jsonl file to write (lmadapt train reads it by its suffix); its provenance goes "
                              "beside it, in OUTPUT.meta.yaml.")
    inputs: list[str] = option([], "Prompt files or globs (.jsonl, .json, .csv, .parquet; .txt/.md: one text "
                                   "each) whose rows hold 'prompt', 'text' or 'messages'.")
    from_scratch: int = option(0, "Instead of inputs: this many prompts of the BOS token alone (unconditional).")
    max_prompts: int = option(0, "Use only the first this many prompt rows of the inputs (all checked); 0: all.")
    model: str | None = option(None, "Built-in name or model folder (default: the adapter's base, else "
                                     "smollm2-135m-instruct).")
    adapter: str | None = option(None, "Adapter folder: sample from the model with it (e.g. a tuned model).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] | None = option(None, "dtype of the loaded weights.")
    device: str | None = option(None, "auto, cpu, cuda, cuda:N or mps (default auto).")
    force: bool = option(False, "Apply an adapter trained on another base model.")
    threads: int = option(0, "CPU threads, as train.threads (0: the idle cores).")
    format: Literal["text", "completion", "chat"] | None = option(
        None, "Rows written: text {text}, completion {prompt, completion}, chat {messages}. Default: chat when "
              "sampling with the chat template, else text.")
    chat: bool | None = option(None, "Render prompts with the chat template. Default: on for messages rows and "
                                     "format chat, else off.")
    system_prompt: str | None = option(None, "System turn before each chat prompt (default: the adapter's "
                                             "training one).")
    prompt_tokens: int = option(32, "text rows: the prompt is the text's first this many tokens.")
    samples_per_prompt: int = option(1, "Continuations sampled per prompt.")
    max_new_tokens: int = option(128, "At most this many new tokens per continuation.")
    temperature: float = option(1.0, "Sampling temperature; 1.0 follows the model's distribution, 0 is greedy.")
    top_k: int = option(0, "Sample among the k likeliest tokens (0: no limit).")
    top_p: float = option(1.0, "Nucleus threshold in (0, 1] (1.0: no limit).")
    seed: int = option(0, "Seed of the one random stream the samples are drawn from.")
    batch_size: int = option(8, "Samples generated together (the samples depend on it).")
    dedup: bool = option(False, "Drop a row identical to an earlier one.")
    min_new_tokens: int = option(0, "Drop a continuation of fewer tokens (counted by re-encoding its text).")
    overwrite: bool = option(False, "Replace an existing output file (and its .meta.yaml).")

    def check(self) -> list[str]:
        problems = []
        if not self.output.endswith(".jsonl"):
            problems.append(f"output: {self.output!r} must end in .jsonl (lmadapt train reads files by their suffix)")
        if bool(self.inputs) == bool(self.from_scratch):
            problems.append("inputs, from_scratch: give prompt files or from_scratch N (unconditional samples). "
                            "Choose one.")
        if self.max_prompts and self.from_scratch:
            problems.append("max_prompts: counts rows of inputs; from_scratch already says how many prompts")
        for key in ("from_scratch", "max_prompts", "min_new_tokens", "threads"):
            if getattr(self, key) < 0:
                problems.append(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("prompt_tokens", "samples_per_prompt"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        try:
            check_generation_arguments(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.batch_size)
        except LmadaptError as exc:
            problems.append(str(exc).removeprefix("generate: "))
        if self.temperature == 0 and self.samples_per_prompt > 1:
            problems.append(f"samples_per_prompt: {self.samples_per_prompt} greedy (temperature 0) continuations of "
                            f"a prompt are all the same; sample (temperature > 0) or take 1")
        return problems


@dataclass
class PromptSet:
    """The prompts of a run: their kind, the files they came from, and each prompt's value (text, conversation,
    or for ``text`` rows the whole text, cut once the tokenizer is loaded)."""

    kind: Kind
    values: list[Any]
    files: list[str] = field(default_factory=list)


@dataclass
class RecoveryReport:
    """What :func:`sample_recovery_data` wrote."""

    path: Path
    meta_path: Path
    format: str
    data_keys: dict[str, Any]  # the data: keys that read the file, e.g. {"format": "text"}
    counts: dict[str, int]
    seconds: float
    rows: list[dict[str, Any]]


def meta_path(output: str | Path) -> Path:
    """The provenance file beside ``output``."""
    return Path(f"{output}{META_SUFFIX}")


def check_output(cfg: RecoveryConfig) -> None:
    """Refuse an existing output (or its provenance file) unless ``overwrite``; refuse a folder always."""
    for path in (Path(cfg.output), meta_path(cfg.output)):
        if path.is_dir():
            raise LmadaptError(f"output {path} is a folder; give the path of a .jsonl file")
        if path.exists() and not cfg.overwrite:
            raise LmadaptError(f"output {path} already exists; choose another path, or pass --overwrite "
                               f"(overwrite=true) to replace it")


# ------------------------------------------------------------------------------------------------ prompts

def read_prompts(cfg: RecoveryConfig) -> PromptSet:
    """The prompts ``cfg`` names, every row checked; raises :class:`DataError` listing each bad row by file, line
    and field, before any model loads."""
    if cfg.from_scratch:
        return PromptSet("scratch", [""] * cfg.from_scratch)
    result = read_files(cfg.inputs)
    problems = result.file_problems + result.row_problems
    kind = next((k for r in result.records for k in KIND_FIELDS if k in r.data), None)
    prompts = PromptSet(kind or "prompt", [], list(result.files))
    for record in result.records:
        found: list[str] = []
        if kind is None:
            found.append(f"none of the fields {', '.join(map(repr, KIND_FIELDS))} (the row has: "
                         f"{', '.join(map(str, record.data)) or 'no fields'})")
            value = None
        elif kind == "messages":
            value = _conversation(record, found)
        else:
            value = _text(record, kind, found)
        if found:
            problems.append(f"{record.source}: " + "; ".join(found))
        else:
            prompts.values.append(value)
    if problems:
        raise DataError(problems, hint=ROW_HINT)
    if cfg.max_prompts:
        del prompts.values[cfg.max_prompts:]
    if not prompts.values:
        raise LmadaptError(f"no prompt rows in {', '.join(result.files)}; give files with 'prompt', 'text' or "
                           f"'messages' rows")
    return prompts


def _text(record: Record, key: str, found: list[str]) -> str:
    value = record.data.get(key)
    if key not in record.data:
        found.append(f"field '{key}' is missing (the row has: {', '.join(map(str, record.data))})")
    elif not isinstance(value, str):
        found.append(f"field '{key}': expected a string, got {type_name(value)}")
    elif not value.strip():
        found.append(f"field '{key}' is empty")
    elif code := unpaired_surrogate(value):
        found.append(f"field '{key}': contains an unpaired surrogate ({code})")
    else:
        return value
    return ""


def _conversation(record: Record, found: list[str]) -> list[dict[str, str]]:
    """The turns up to and including the last user turn."""
    turns = record.data.get("messages")
    if "messages" not in record.data:
        found.append(f"field 'messages' is missing (the row has: {', '.join(map(str, record.data))})")
        return []
    if not isinstance(turns, list) or not turns:
        found.append(f"field 'messages': expected a non-empty list of turns, got "
                     f"{'an empty list' if isinstance(turns, list) else type_name(turns)}")
        return []
    for i, turn in enumerate(turns):
        name = f"messages[{i}]"
        if not isinstance(turn, dict):
            found.append(f"field '{name}': expected an object with 'role' and 'content', got {type_name(turn)}")
            continue
        if turn.get("role") not in ROLES:
            found.append(f"field '{name}.role': expected one of {', '.join(ROLES)}, got {turn.get('role')!r}")
        content = turn.get("content")
        if not isinstance(content, str):
            found.append(f"field '{name}.content': expected a string, got {type_name(content)}")
        elif code := unpaired_surrogate(content):
            found.append(f"field '{name}.content': contains an unpaired surrogate ({code})")
    users = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"]
    if not found and not users:
        found.append("field 'messages': no user turn, so nothing for the model to answer")
    return [] if found else [{"role": t["role"], "content": t["content"]} for t in turns[:users[-1] + 1]]


def plan(cfg: RecoveryConfig, kind: Kind) -> tuple[str, bool]:
    """(format, chat) for prompts of ``kind``: the defaults resolved, contradictions refused together."""
    chat = cfg.chat if cfg.chat is not None else (cfg.format == "chat" or kind == "messages")
    fmt = cfg.format or ("chat" if chat else "text")
    problems = []
    if kind == "messages" and not chat:
        problems.append("chat: messages rows are conversations, always rendered by the chat template; drop "
                        "--no-chat (chat=false)")
    if kind == "messages" and fmt != "chat":
        problems.append(f"format: messages rows give conversations; write them as format chat, not {fmt}")
    if kind == "scratch" and chat:
        problems.append("from_scratch: samples from the BOS token alone have no turn to answer; use format text or "
                        "completion without chat")
    elif chat and fmt == "text":
        problems.append("format: text rows would train the chat template's markup as plain text; with chat, write "
                        "format chat or completion")
    elif fmt == "chat" and not chat:
        problems.append("format: chat rows need the continuation to be an assistant's answer; drop --no-chat")
    if cfg.system_prompt and not chat:
        problems.append("system_prompt: only used with chat (--chat)")
    if problems:
        raise ConfigError(problems)
    return fmt, chat


def text_prefix(tokenizer: PreTrainedTokenizerBase, text: str, n: int) -> str:
    """The text of the first ``n`` tokens of ``text`` (all of it when shorter), cut from the text as written
    (a fast tokenizer's character offsets) or, for a slow tokenizer, decoded."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    if len(encoded.input_ids) <= n:
        return text
    if fast:
        return text[:encoded.offset_mapping[n - 1][1]]
    return tokenizer.decode(encoded.input_ids[:n])


# ------------------------------------------------------------------------------------------------ sampling

def sample_continuations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt],
                         cfg: RecoveryConfig, *, chat: bool, system_prompt: str | None,
                         progress: bool | None = None) -> list[list[str]]:
    """``out[i][k]``: continuation k of prompt i, as the module docstring says they are drawn."""
    per = cfg.samples_per_prompt
    lengths = [len(encode_prompt(tokenizer, p, chat=chat, system_prompt=system_prompt)) for p in prompts]
    jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(per)), key=lambda job: lengths[job[0]])
    out = [[""] * per for _ in prompts]
    with seeded(cfg.seed, model_device(model)), Progress(len(jobs), "recovery-data", "rows", progress) as bar:
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start:start + cfg.batch_size]
            texts = generate(model, tokenizer, [prompts[i] for i, _ in batch], max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, chat=chat,
                             system_prompt=system_prompt, batch_size=len(batch))
            for (i, k), text in zip(batch, texts):
                out[i][k] = text
            bar.update(len(batch))
    return out


def build_rows(prompts: list[Prompt], continuations: list[list[str]], fmt: str, cfg: RecoveryConfig,
               tokenizer: PreTrainedTokenizerBase, system_prompt: str | None
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows to write, in prompt then sample order, and what was dropped (empty, short, duplicate)."""
    rows: list[dict[str, Any]] = []
    counts = {"prompts": len(prompts), "samples": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 0}
    seen: set[str] = set()
    for prompt, samples in zip(prompts, continuations):
        for text in samples:
            counts["samples"] += 1
            if not text.strip():
                counts["dropped_empty"] += 1
                continue
            if cfg.min_new_tokens and len(tokenizer(text, add_special_tokens=False).input_ids) < cfg.min_new_tokens:
                counts["dropped_short"] += 1
                continue
            if fmt == "text":
                row: dict[str, Any] = {"text": prompt + text}
            elif fmt == "completion":
                row = {"prompt": prompt, "completion": text}
            else:
                row = {"messages": prompt_messages(prompt, system_prompt) + [{"role": "assistant", "content": text}]}
            key = json.dumps(row, ensure_ascii=False, sort_keys=True)
            if cfg.dedup and key in seen:
                counts["dropped_duplicate"] += 1
                continue
            seen.add(key)
            rows.append(row)
    counts["rows"] = len(rows)
    return rows, counts


# ------------------------------------------------------------------------------------------------ the run

def sample_recovery_data(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: PromptSet,
                         cfg: RecoveryConfig, *, system_prompt: str | None = None, origin: dict[str, Any] | None = None,
                         progress: bool | None = None) -> RecoveryReport:
    """Sample the continuations of ``prompts`` from ``model`` and write ``cfg.output`` and its provenance file,
    each atomically (a crash leaves neither half-written); ``origin`` (model, adapter, fingerprint) goes into the
    provenance. ``system_prompt`` is the one resolved for chat (``cfg.system_prompt`` or the adapter's)."""
    fmt, chat = plan(cfg, prompts.kind)
    check_output(cfg)
    values = prompts.values
    if prompts.kind == "text":
        values = [text_prefix(tokenizer, text, cfg.prompt_tokens) for text in values]
    start = time.perf_counter()
    continuations = sample_continuations(model, tokenizer, values, cfg, chat=chat, system_prompt=system_prompt,
                                         progress=progress)
    rows, counts = build_rows(values, continuations, fmt, cfg, tokenizer, system_prompt)
    seconds = time.perf_counter() - start
    if not rows:
        raise LmadaptError(f"every sample was dropped ({counts}); nothing written. Lower min_new_tokens, or raise "
                           f"max_new_tokens")
    keys: dict[str, Any] = {"format": DATA_FORMAT[fmt]}
    if fmt == "completion" and chat:
        keys["use_chat_template"] = True
        if system_prompt:
            keys["system_prompt"] = system_prompt
    meta = _provenance(cfg, prompts, fmt, chat, system_prompt, model, counts, keys, origin or {})
    path = Path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output(cfg)  # again: another process may have written it while this one sampled
    atomic_write_text(meta_path(path), yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=120))
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return RecoveryReport(path, meta_path(path), fmt, keys, counts, seconds, rows)


def _provenance(cfg: RecoveryConfig, prompts: PromptSet, fmt: str, chat: bool, system_prompt: str | None,
                model: nn.Module, counts: dict[str, int], keys: dict[str, Any],
                origin: dict[str, Any]) -> dict[str, Any]:
    """The ``.meta.yaml`` record: no clock time in it, so that the same run writes the same bytes."""
    import transformers

    from lmadapt import __version__

    settings = to_dict(cfg)
    sampling = ("samples_per_prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size")
    parameter = next(model.parameters())
    return {
        "what": "recovery data: continuations sampled from the model below (lmadapt recovery-data)",
        "lmadapt_version": __version__,
        **origin,
        "prompts": {"kind": prompts.kind, "files": prompts.files, "count": len(prompts.values),
                    **({"prompt_tokens": cfg.prompt_tokens} if prompts.kind == "text" else {})},
        "chat": chat,
        "system_prompt": system_prompt,
        "sampling": {key: settings[key] for key in sampling},
        "filters": {"dedup": cfg.dedup, "min_new_tokens": cfg.min_new_tokens},
        "format": fmt,
        "counts": counts,
        "train_with": {f"data.{k}": v for k, v in keys.items()},
        "runtime": {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch."),
                    "torch": str(torch.__version__), "transformers": str(transformers.__version__)},
    }

