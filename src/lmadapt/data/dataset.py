"""From a :class:`DataConfig` to tokenized train/validation sets and a :class:`DataReport`.

Order: read every file, check every row, tokenize, fit to ``max_length``. Unreadable files always stop
the run; bad rows stop it with the full list (:class:`DataError`) unless ``skip_bad_rows`` is set, in
which case they are skipped and counted. Nothing is written, so this runs before the output folder exists.

Length policy: a raw-text document longer than ``max_length`` is cut into consecutive chunks of
``max_length`` tokens (nothing lost); any other example is truncated on the right or left, or dropped
(``truncation``). A truncated example with no trained token left is dropped too. A preference pair becomes two
sequences, chosen then rejected, at consecutive indices (``TokenizedDataset.paired``); it is kept whole or dropped
whole. A tagging row (:mod:`lmadapt.data.tagging`) is truncated on the right or left or dropped, never chunked,
and its labels are tag indices at word starts, not next tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lmadapt.data.config import DataConfig, ReplayConfig
from lmadapt.data.formats import Example, build_examples, detect_format
from lmadapt.data.readers import ReadResult, expand_patterns, read_files
from lmadapt.data.tagging import align_tags, collect_tags, tokenize_words
from lmadapt.data.tokens import (
    IGNORE,
    RowProblem,
    mask_first,
    special_prefix,
    tokenize_example,
)
from lmadapt.errors import ConfigError, DataError, LmadaptError

KEPT_PROBLEMS = 20


@dataclass
class TokenizedDataset:
    """Token rows ready for batching: ``input_ids[i]`` and ``labels[i]`` (-100: no loss) of example i, and its
    task id ``tasks[i]`` when ``data.train_tasks`` gives them (``tasks`` is empty otherwise). ``paired``:
    preference pairs, example 2k the chosen and 2k + 1 the rejected sequence of pair k. ``targets[i]``: the label
    of example i for classification (a class index, a tuple of them, or a number; empty for other formats).
    Tagging: ``tag_names`` is the tag set, ``labels[i]`` holds tag indices at each word's first sub-token (not
    token ids) and ``later_labels[i]`` those of the other sub-tokens (:func:`lmadapt.data.tagging.align_tags`)."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    paired: bool = False
    targets: list[Any] = field(default_factory=list)
    tag_names: list[str] = field(default_factory=list)
    later_labels: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def add(self, source: str, input_ids: list[int], labels: list[int]) -> None:
        """Append one example."""
        self.input_ids.append(input_ids)
        self.labels.append(labels)
        self.sources.append(source)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example."""
        return [len(ids) for ids in self.input_ids]


@dataclass
class DataReport:
    """What loading did to the data, counted over train and validation together (unless named)."""

    format: str = ""
    files: int = 0
    rows_read: int = 0
    rows_skipped: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    examples_truncated: int = 0
    tokens_truncated: int = 0
    examples_dropped: int = 0
    documents_chunked: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    max_length: int = 0
    tags: list[str] = field(default_factory=list)  # format tagging: the tag set, in index order
    tags_from_rows: bool = False  # format tagging: the tag set was collected from the training rows
    skipped: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for people."""
        val = f" and {self.validation_examples:,} validation" if self.validation_examples else ""
        unit = "preference pairs" if self.format == "preference" else "examples"
        text = (f"Data ({self.format}): read {self.rows_read:,} rows from {self.files} file(s); "
                f"{self.train_examples:,} training{val} {unit}, {self.tokens:,} tokens of which "
                f"{self.trainable_tokens:,} carry loss.")
        if self.tags:
            where = "collected from the training rows" if self.tags_from_rows else "data.labels"
            text += f" Tags ({where}): {', '.join(self.tags)}."
        if self.empty_files:
            more = ", ..." if len(self.empty_files) > 3 else ""
            text += f" {len(self.empty_files)} file(s) held no rows: {', '.join(self.empty_files[:3])}{more}."
        if self.rows_skipped:
            text += f" Skipped {self.rows_skipped:,} malformed rows (first: {self.skipped[0]})."
        if self.documents_chunked:
            text += f" Split {self.documents_chunked:,} long documents into chunks of {self.max_length} tokens."
        if self.examples_truncated:
            text += (f" Truncated {self.examples_truncated:,} examples to {self.max_length} tokens, losing "
                     f"{self.tokens_truncated:,} tokens.")
        if self.examples_dropped:
            text += (f" Dropped {self.examples_dropped:,} examples longer than {self.max_length} tokens "
                     f"(truncation=drop, or nothing left to train on after truncating).")
        return text


def fit_length(ids: list[int], labels: list[int], document: bool, cfg: DataConfig,
               report: DataReport) -> list[tuple[list[int], list[int]]]:
    """The example as pieces of at most ``max_length`` tokens (see the module docstring); counts in ``report``."""
    n, limit = len(ids), cfg.max_length
    if n <= limit:
        return [(ids, labels)]
    if document:
        report.documents_chunked += 1
        return [(ids[k:k + limit], mask_first(labels[k:k + limit])) for k in range(0, n, limit)]
    if cfg.truncation == "drop":
        report.examples_dropped += 1
        return []
    keep = slice(0, limit) if cfg.truncation == "right" else slice(n - limit, n)
    ids, labels = ids[keep], mask_first(labels[keep])
    if all(label == IGNORE for label in labels):
        report.examples_dropped += 1
        return []
    report.examples_truncated += 1
    report.tokens_truncated += n - limit
    return [(ids, labels)]


def _read(patterns: list[str], key: str, cfg: DataConfig) -> ReadResult:
    try:
        return read_files(patterns, cfg.text_field)
    except ConfigError as exc:
        raise ConfigError([f"{key}: {p}" for p in exc.problems]) from None


def _examples(read: ReadResult, key: str, cfg: DataConfig, problems: list[str]) -> tuple[list[Example], str]:
    """Checked examples of one split; row problems go to ``problems``, a format nobody can tell to the result."""
    fmt = cfg.format if cfg.format != "auto" else detect_format(read.records, cfg)
    if fmt is None and not read.records:  # nothing readable: the reading problems say why
        problems += read.row_problems
        return [], cfg.format
    if fmt is None:
        keys = sorted(read.records[0].data) if read.records else []
        read.file_problems.append(
            f"{key}: cannot tell the format from the keys {keys} of the first row; expected "
            f"'{cfg.messages_field}' (chat), '{cfg.chosen_field}'+'{cfg.rejected_field}' (preference), "
            f"'{cfg.prompt_field}'+'{cfg.completion_field}', "
            f"'{cfg.instruction_field}'+'{cfg.output_field}' or '{cfg.text_field}'. Set data.format and "
            f"the data.*_field names.")
        return [], "unknown"
    if fmt == "preference" and cfg.format == "auto":  # format: preference was checked with the config
        read.file_problems += [f"data.{p} (the rows of {key} are preference pairs)" for p in cfg.preference_problems()]
    if fmt == "tagging" and cfg.format == "auto":
        read.file_problems += [f"data.{p} (the rows of {key} are tagging rows)" for p in cfg.tagging_problems()]
    examples, found = build_examples(read.records, fmt, cfg)
    if fmt == "preference" and not cfg.use_chat_template and any(e.messages for e in examples):
        read.file_problems.append(f"data.use_chat_template: the rows of {key} hold conversations (lists of "
                                  f"messages), which the chat template renders; set data.use_chat_template: true")
    problems += read.row_problems + found
    return examples, fmt


def in_file_order(problems: list[str], files: list[str]) -> list[str]:
    """Problems sorted by file (in reading order), then by line, item or row number."""
    def key(problem: str) -> tuple[int, int]:
        for rank, path in enumerate(files):
            if problem.startswith(path + ":"):
                number = re.match(r"(?:item |row )?(\d+):", problem[len(path) + 1:])
                return rank, int(number.group(1)) if number else 0
        return len(files), 0
    return sorted(problems, key=key)


def _hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded choice of round(fraction * n) rows, at least one each when n >= 2."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_out = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    chosen = set(random.Random(seed).sample(range(len(examples)), n_out))
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def _tokenize(examples: list[Example], tokenizer: Any, cfg: DataConfig, report: DataReport,
              problems: list[str]) -> TokenizedDataset:
    prefix = special_prefix(tokenizer)
    out = TokenizedDataset(paired=any(e.rejected is not None for e in examples))
    for example in examples:
        if example.words:
            _add_tagged(out, example, tokenizer, cfg, prefix, report)
            continue
        try:
            ids, labels = tokenize_example(example, tokenizer, cfg, prefix)
            if example.rejected is not None:
                pair = [(ids, labels), tokenize_example(example.rejected, tokenizer, cfg, prefix)]
        except RowProblem as exc:
            problems.append(str(exc))
            continue
        if example.rejected is not None:  # both sequences or neither
            fitted = [fit_length(i, lab, False, cfg, report) for i, lab in pair]
            if all(fitted):
                for [(piece_ids, piece_labels)] in fitted:  # one piece each: pairs are never chunked
                    out.add(example.source, piece_ids, piece_labels)
            continue
        for piece_ids, piece_labels in fit_length(ids, labels, example.document, cfg, report):
            out.add(example.source, piece_ids, piece_labels)
            if example.target is not None:  # classification: one piece (never a document), one label
                out.targets.append(example.target)
    return out


def _add_tagged(out: TokenizedDataset, example: Example, tokenizer: Any, cfg: DataConfig, prefix: list[int],
                report: DataReport) -> None:
    """A tagging example, tokenized word by word and cut to ``max_length`` (right, left, or dropped)."""
    out.tag_names = list(cfg.labels)
    ids, word_of = tokenize_words(tokenizer, list(example.words), cfg.word_separator, prefix)
    labels, later = align_tags(word_of, list(example.tags), cfg.labels)
    n, limit = len(ids), cfg.max_length
    if n > limit:
        keep = slice(0, limit) if cfg.truncation == "right" else slice(n - limit, n)
        if cfg.truncation == "drop" or all(label == IGNORE for label in labels[keep]):
            report.examples_dropped += 1
            return
        ids, labels, later = ids[keep], labels[keep], later[keep]
        report.examples_truncated += 1
        report.tokens_truncated += n - limit
    out.add(example.source, ids, labels)
    out.later_labels.append(later)


def _settle_tags(cfg: DataConfig, reads: dict[str, ReadResult], train_key: str) -> tuple[DataConfig, bool]:
    """``cfg`` with ``data.labels`` collected from the training rows when they are tagging rows and it is empty
    (the training files are read for it when only validation is loaded), and whether it was collected."""
    read = reads.get(train_key)
    if cfg.labels or (cfg.format not in ("auto", "tagging")):
        return cfg, False
    if read is None:
        read = _read(cfg.train, train_key, cfg) if cfg.train else reads.get("data.validation")
    if read is None or (cfg.format == "auto" and detect_format(read.records, cfg) != "tagging"):
        return cfg, False
    tags = collect_tags(record.data.get(cfg.tags_field) for record in read.records)
    return dataclasses.replace(cfg, labels=tags), True


def _load(cfg: DataConfig, tokenizer: Any, *, train: bool, validation: bool,
          train_key: str = "data.train") -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """Read, check, split and tokenize; raise on unreadable files, and on bad rows unless skip_bad_rows.
    ``train_key``: the key messages name for ``cfg.train`` (``data.replay.train`` for the replay corpus)."""
    if cfg.check():  # a DataConfig built in Python has not been checked yet
        raise ConfigError([f"data.{p}" for p in cfg.check()])
    reads: dict[str, ReadResult] = {}
    if train:
        reads[train_key] = _read(cfg.train, train_key, cfg)
    if validation and cfg.validation:
        reads["data.validation"] = _read(cfg.validation, "data.validation", cfg)
    problems: list[str] = []
    cfg, collected = _settle_tags(cfg, reads, train_key)
    examples = {key: _examples(read, key, cfg, problems) for key, read in reads.items()}
    _raise_for_files(reads, problems)
    if train and not reads[train_key].rows_read:
        raise LmadaptError(f"{train_key}: no rows to train on:\n" + "".join(
            f"  - {path}: holds no rows (the file is empty or blank, a CSV header only, or an empty JSON array)\n"
            for path in reads[train_key].empty) + "Add rows to the file(s), or name other files.")
    train_ex = examples[train_key][0] if train else []
    if "data.validation" in examples:
        val_ex = examples["data.validation"][0]
    else:
        train_ex, val_ex = _hold_out(train_ex, cfg.validation_fraction, cfg.seed)
    report = DataReport(max_length=cfg.max_length)
    train_set = _tokenize(train_ex, tokenizer, cfg, report, problems)
    has_val = validation and (bool(cfg.validation) or cfg.validation_fraction > 0)
    val_set = _tokenize(val_ex, tokenizer, cfg, report, problems) if has_val else None
    if train and cfg.train_tasks:
        task_of = _file_tasks(cfg)
        train_set.tasks = [task_of[_source_file(s, task_of)] for s in train_set.sources]
        if val_set is not None and "data.validation" not in examples:  # held out from the training rows
            val_set.tasks = [task_of[_source_file(s, task_of)] for s in val_set.sources]
    problems = in_file_order(problems, [f for read in reads.values() for f in read.files])
    if problems and not cfg.skip_bad_rows:
        raise DataError(problems)
    report.format = ", ".join(sorted({fmt for _, fmt in examples.values()}))
    if report.format == "tagging":
        report.tags, report.tags_from_rows = list(cfg.labels), collected
    report.files = sum(len(read.files) for read in reads.values())
    report.empty_files = [path for read in reads.values() for path in read.empty]
    report.rows_read = sum(read.rows_read for read in reads.values())
    report.rows_skipped, report.skipped = len(problems), problems[:KEPT_PROBLEMS]
    _count_tokens(report, train_set, val_set)
    return train_set, val_set, report


def _file_tasks(cfg: DataConfig) -> dict[str, int]:
    """Each training file's task id (``data.train_tasks[i]`` for the files entry i names); a file two entries with
    different ids both name is refused."""
    task_of: dict[str, int] = {}
    clashes = []
    for entry, (pattern, task) in enumerate(zip(cfg.train, cfg.train_tasks)):
        for path in expand_patterns(pattern):
            if task_of.setdefault(str(path), task) != task:
                clashes.append(f"{path} (task {task_of[str(path)]}, and task {task} from data.train[{entry}])")
    if clashes:
        raise ConfigError([f"data.train_tasks: a file belongs to two tasks: {c}; make the entries name disjoint files"
                           for c in clashes])
    return task_of


def _source_file(source: str, files: dict[str, int]) -> str:
    """The file an example's ``source`` (``path``, ``path:LINE``, ``path:item N``, ``path:row N``) was read from."""
    return source if source in files else source.rsplit(":", 1)[0]


def _raise_for_files(reads: dict[str, ReadResult], problems: list[str]) -> None:
    fatal = [p for read in reads.values() for p in read.file_problems]
    if fatal:
        more = f"\n({len(problems)} malformed row(s) besides.)" if problems else ""
        raise LmadaptError(f"{len(fatal)} data file problem(s):\n" + "\n".join(f"  - {p}" for p in fatal) +
                           more + "\ndata.skip_bad_rows skips single rows, not whole files: fix or remove them.")


def _count_tokens(report: DataReport, train_set: TokenizedDataset, val_set: TokenizedDataset | None) -> None:
    per = 2 if train_set.paired else 1  # a preference pair is two sequences
    report.train_examples = len(train_set) // per
    report.validation_examples = len(val_set) // per if val_set is not None else 0
    for data in (train_set, val_set or TokenizedDataset()):
        report.tokens += sum(data.lengths)
        report.trainable_tokens += sum(label != IGNORE for labels in data.labels for label in labels)


def load_splits(cfg: DataConfig, tokenizer: Any) -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """(train, validation or None, report), reading and checking every file once.

    Validation comes from ``cfg.validation`` files, else a seeded ``validation_fraction`` of the training
    rows, else there is none. Raises :class:`DataError` listing every bad row unless ``skip_bad_rows``.
    """
    if not cfg.train:
        raise ConfigError(["data.train: no training files given; list .jsonl/.json/.csv/.parquet/.txt files "
                           "or globs, e.g. data.train=[data/train.jsonl]"])
    train_set, val_set, report = _load(cfg, tokenizer, train=True, validation=True)
    if not len(train_set):
        raise LmadaptError(f"no training examples are left: {report.summary()}")
    return train_set, val_set, report


def replay_config(cfg: DataConfig) -> DataConfig:
    """The data section that reads ``cfg.replay``'s files: ``cfg``'s settings with the replay's files, format and
    text key, no validation, task ids or replay of its own (and no chat template or system prompt for raw text)."""
    fmt = cfg.replay.format
    templated = cfg.use_chat_template and fmt != "text"
    return dataclasses.replace(cfg, train=list(cfg.replay.train), format=fmt, text_field=cfg.replay.text_field,
                               validation=[], validation_fraction=0.0, train_tasks=[], use_chat_template=templated,
                               system_prompt=cfg.system_prompt if templated and fmt != "chat" else None,
                               replay=ReplayConfig())


def load_replay(cfg: DataConfig, tokenizer: Any) -> tuple[TokenizedDataset, DataReport]:
    """The replay corpus of ``cfg.replay`` (raising as :func:`load_splits` does, naming ``data.replay.train``)
    with its report; :class:`lmadapt.data.replay.ReplayBatcher` mixes it into the training batches."""
    if problems := cfg.replay.check():
        raise ConfigError([f"data.replay.{p}" for p in problems])
    if not cfg.replay.train:
        raise ConfigError(["data.replay.train: no replay files given"])
    replay_set, _, report = _load(replay_config(cfg), tokenizer, train=True, validation=False,
                                  train_key="data.replay.train")
    if replay_set.paired or replay_set.targets or replay_set.tag_names:
        raise ConfigError([f"data.replay.format: the replay rows are {report.format} rows, not next-token text; "
                           f"replay takes text, prompt_completion, instruction or chat rows"])
    if not len(replay_set):
        raise LmadaptError(f"data.replay.train: no replay examples are left: {report.summary()}")
    return replay_set, report


def load_dataset(cfg: DataConfig, tokenizer: Any,
                 split: Literal["train", "validation"] = "train") -> tuple[TokenizedDataset, DataReport]:
    """One split with its report; "validation" without a hold-out fraction does not need training files."""
    if split == "train":
        train_set, _, report = load_splits(cfg, tokenizer)
        return train_set, report
    if split != "validation":
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if cfg.validation_fraction > 0:
        _, val_set, report = load_splits(cfg, tokenizer)
        return val_set or TokenizedDataset(), report
    if not cfg.validation:
        raise ConfigError(["data.validation: no validation files given, and validation_fraction is 0"])
    _, val_set, report = _load(cfg, tokenizer, train=False, validation=True)
    return val_set or TokenizedDataset(), report
