"""The ``data:`` section of a run config: which files, which format, how examples become token rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmadapt.config import option
from lmadapt.data.readers import unpaired_surrogate
from lmadapt.data.templates import chat_template_problem

Format = Literal["auto", "text", "prompt_completion", "instruction", "chat", "preference", "classification",
                 "tagging"]
LABELLED_FORMATS = ("preference", "classification", "tagging")  # rows that are not next-token text


@dataclass
class ReplayConfig:
    """``data.replay``: a share of every training batch drawn from a second ("old") corpus, as continual
    pretraining replays old data against forgetting ("Simple and Scalable Strategies to Continually Pre-train
    Large Language Models", arXiv:2403.08763: 5% for a weak shift, 25% for English to German). Its files are
    read with the data section's settings (max_length, add_eos, chat template, ...) except the fields here."""

    train: list[str] = option(
        [], "Files or globs of the replay corpus (same file types as data.train). Empty: no replay.")
    share: float = option(
        0.0, "Share of the rows of every training batch taken from the replay corpus, in [0, 1): the first n "
             "rows of an epoch hold floor(n s + 1/2) replay rows, spread evenly, the rest from data.train "
             "(lmadapt.data.replay). Rows, not tokens: with batching packed each row is max_length tokens, so it is "
             "also the share of the token slots. The replay corpus repeats (reshuffled) when it runs out.")
    format: Format = option("auto", "Row format of the replay files (as data.format).")
    text_field: str = option("text", "Key of the raw text in the replay files (format text). The other key "
                                     "names (messages_field, ...) are the data section's.")

    def check(self) -> list[str]:
        """Contradictions, each starting with the field name."""
        problems = []
        if not 0.0 <= self.share < 1.0:
            problems.append(f"share: must be in [0, 1) (the rest of each batch is data.train), got {self.share}")
        elif self.train and self.share == 0:
            problems.append("share: 0 takes nothing from the replay files; give the share of each batch to replay, "
                            "e.g. 0.05 for a weak shift, 0.25 for a new language")
        elif self.share > 0 and not self.train:
            problems.append("train: share > 0 but no replay files; give them, e.g. data.replay.train=[old.jsonl]")
        if self.format in LABELLED_FORMATS:
            problems.append(f"format: {self.format} rows are not next-token text; replay takes text, "
                            f"prompt_completion, instruction or chat rows")
        return problems


@dataclass
class DataConfig:
    train: list[str] = option(
        [], "Training files or globs: .jsonl, .json, .csv, .parquet, or .txt/.md (one document per file). "
            "Required to train.")
    train_tasks: list[int] = option(
        [], "A task id (an integer >= 0) per data.train entry, in order: rows read through entry i belong to task "
            "train_tasks[i], and training batches carry it per token as task_ids (MeteoRA's gate loss trains "
            "on it). Empty: no task ids.")
    validation: list[str] = option([], "Validation files or globs (same formats as train).")
    validation_fraction: float = option(
        0.0, "Without validation files: hold out this fraction of the training rows (seeded by data.seed).")
    format: Format = option(
        "auto", "Row format. auto: from the first row's keys (messages -> chat, prompt+chosen+rejected -> "
                "preference, prompt+completion -> prompt_completion, instruction+output -> instruction, "
                "text -> text, tokens+tags -> tagging). preference: pairs for objective dpo. classification: "
                "text_field + label_field rows for objective classify (never auto-detected). tagging: a list of "
                "words and a list of BIO tags per row, for objective tag.")
    text_field: str = option("text", "Key of the raw text (formats text and classification).")
    label_field: str = option(
        "label", "Key of the label (format classification): a name from data.labels or a class index; a list of "
                 "them for multi-label rows; a number for regression.")
    labels: list[str] = option(
        [], "Class names, in index order (format classification): a row's string label must be one of them and "
            "becomes its index. Give objective.labels the same list (a YAML anchor writes it once). Format "
            "tagging: the tag set (O, B-<type>, I-<type>); empty: collected from the training rows (O, then B- and "
            "I- of each type in sorted order; the report and the adapter record it).")
    tokens_field: str = option("tokens", "Key of the list of words (format tagging).")
    tags_field: str = option("tags", "Key of the list of BIO tags, one per word (format tagging).")
    word_separator: str = option(
        " ", "Format tagging: what goes between two words when they are tokenized (each word is tokenized on "
             "its own, with the separator before every word but the first); \"\" for Chinese or Japanese.")
    prompt_field: str = option("prompt", "Key of the prompt (formats prompt_completion and preference).")
    completion_field: str = option("completion", "Key of the completion (format prompt_completion).")
    instruction_field: str = option("instruction", "Key of the instruction (format instruction).")
    input_field: str = option("input", "Key of the optional input (format instruction).")
    output_field: str = option("output", "Key of the response (format instruction).")
    messages_field: str = option("messages", "Key of the list of {role, content} turns (format chat).")
    chosen_field: str = option("chosen", "Key of the preferred response (format preference).")
    rejected_field: str = option("rejected", "Key of the dispreferred response (format preference).")
    system_prompt: str | None = option(
        None, "System turn put before prompt_completion/instruction/preference rows when use_chat_template "
              "is true.")
    use_chat_template: bool = option(
        False, "Render prompt_completion, instruction and preference rows through the tokenizer's chat template "
               "as a user turn and an assistant turn (chat rows always use it).")
    chat_template: str | None = option(
        None, "The chat template conversations are rendered with. null: the tokenizer's own (lmadapt's "
              "fallback, with a notice, when it has none); chatml or fallback: that template by name; or a Jinja "
              "template written out, or the path of a file holding one. The adapter records it, and merge "
              "writes it into the merged tokenizer.")
    max_length: int = option(1024, "Tokens per example (and per packed row).")
    truncation: Literal["right", "left", "drop"] = option(
        "right", "An over-long prompt/completion, instruction or chat example: keep its first max_length "
                 "tokens (right), its last (left), or drop it. Text documents are split into chunks instead.")
    batching: Literal["length_grouped", "packed", "padded"] = option(
        "length_grouped", "length_grouped: batch examples of similar length (little padding); packed: several "
        "examples per row of exactly max_length tokens, attention and positions restarting at each example "
        "(best with a varlen attention kernel, e.g. flash-attention on GPU; on CPU the full-row attention "
        "made it 2x slower than length_grouped in benchmarks/train_throughput.py); padded: random order, "
        "padded to the longest in the batch.")
    loss_on_prompt: bool = option(False, "Also train on prompt / user / system tokens (not only on completions "
                                         "and assistant turns).")
    add_eos: bool = option(True, "End each completion and each text document with the EOS token.")
    skip_bad_rows: bool = option(False, "Skip malformed rows (and count them) instead of stopping with the list.")
    seed: int = option(0, "Seed of the validation hold-out.")
    replay: ReplayConfig = option(
        default_factory=ReplayConfig,
        help="Replay of an old corpus in every training batch (continual pretraining against forgetting).")

    def check(self) -> list[str]:
        """Cross-field contradictions, each starting with the field name."""
        problems = []
        if self.train_tasks and len(self.train_tasks) != len(self.train):
            problems.append(f"train_tasks: gives {len(self.train_tasks)} task id(s) for {len(self.train)} data.train "
                            f"entries; give one per entry, in the same order")
        if any(task < 0 for task in self.train_tasks):
            problems.append(f"train_tasks: task ids are integers >= 0, got {self.train_tasks}")
        if self.max_length < 2:
            problems.append(f"max_length: must be >= 2 (one token predicts the next), got {self.max_length}")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction > 0 and self.validation:
            problems.append("validation_fraction: validation files are given too; use either files or a "
                            "hold-out fraction. Choose one.")
        if self.system_prompt is not None and self.format == "chat":
            problems.append("system_prompt: chat rows carry their own system turns; system_prompt applies to "
                            "prompt_completion and instruction rows.")
        elif self.system_prompt is not None and not self.use_chat_template:
            problems.append("system_prompt: only used with use_chat_template=true.")
        if isinstance(self.system_prompt, str) and (code := unpaired_surrogate(self.system_prompt)):
            problems.append(f"system_prompt: contains an unpaired surrogate ({code}), which no tokenizer can "
                            f"encode (a command-line argument that was not UTF-8?)")
        if self.chat_template is not None and (problem := chat_template_problem(self.chat_template)):
            problems.append(f"chat_template: {problem}")
        if self.use_chat_template and self.format == "text":
            problems.append("use_chat_template: has no effect with format=text (raw documents).")
        if self.replay.train and (self.train_tasks or self.format in LABELLED_FORMATS):
            what = "train_tasks" if self.train_tasks else f"format {self.format}"
            problems.append(f"replay: replay mixes next-token rows into the batches, which {what} cannot take; drop "
                            f"data.replay or {what}")
        if self.format == "preference":
            problems += self.preference_problems()
        if self.format == "classification" and self.batching == "packed":
            problems.append("batching: packed puts several examples in one row, but classification gives every "
                            "row one label; use length_grouped or padded")
        if self.format == "tagging":
            problems += self.tagging_problems()
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: names must be distinct, got {self.labels}")
        return problems

    def tagging_problems(self) -> list[str]:
        """What contradicts tagging rows (checked for ``format: tagging``, and when auto-detected)."""
        from lmadapt.data.tagging import tag_problem

        problems = []
        if self.batching == "packed":
            problems.append("batching: packed puts several examples in one row, which tagging does not support "
                            "(the unmasked layers of objective tag would see across them); use length_grouped or "
                            "padded")
        bad = [f"{tag!r} ({problem})" for tag in self.labels if (problem := tag_problem(tag))]
        if bad:
            problems.append(f"labels: format tagging takes BIO tags: {'; '.join(bad)}")
        return problems

    def preference_problems(self) -> list[str]:
        """What contradicts preference pairs (checked for ``format: preference``, and when auto-detected)."""
        problems = []
        if self.batching == "packed":
            problems.append("batching: packed cannot hold preference pairs (the chosen and rejected sequences of a "
                            "pair must be separate rows of one batch); use length_grouped or padded")
        if self.loss_on_prompt:
            problems.append("loss_on_prompt: preference pairs compare the log-probabilities of the responses only; "
                            "set loss_on_prompt=false")
        return problems
