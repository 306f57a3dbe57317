"""Rows to examples: each format's fields are checked, and every problem names file, line and field.

An :class:`Example` is either plain ``segments`` of text, each trained on or not (prompt/completion,
instruction, raw text), or ``messages`` of a conversation that the tokenizer's chat template renders. A
preference row is one example (prompt + chosen response) whose ``rejected`` is a second one (the same prompt +
the rejected response); rows take TRL's preference forms, strings or conversations, the prompt given or implicit
(the shared start of chosen and rejected).
A classification row is one example of its text whose ``target`` is its label (a class index, class indices,
or a number). A tagging row is one example of its ``words``, whose ``tags`` are their tag indices
(:mod:`lmadapt.data.tagging`).

Plain prompts for instruction rows (without ``use_chat_template``) use Alpaca-style headers::

    ### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{output}

Prompt/completion rows are concatenated as they are (the data carries its own separators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lmadapt.data.config import DataConfig
from lmadapt.data.readers import Record, type_name, unpaired_surrogate

ROLES = ("system", "user", "assistant", "tool")
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _surrogate_problem(name: str, text: str) -> str | None:
    """The problem to report when ``text`` (field ``name``) holds a lone surrogate, else None."""
    code = unpaired_surrogate(text)
    return None if code is None else (f"field '{name}': contains an unpaired surrogate ({code}); in JSON, "
                                      f"\\ud800-\\udfff escapes must come in high-low pairs")


@dataclass(frozen=True)
class Example:
    """One training example before tokenization.

    ``segments``: (text, trainable) pieces joined in order; ``messages``: a conversation for the chat
    template (then ``segments`` is empty). ``document`` marks raw text, which is chunked, not truncated.
    ``rejected``: for a preference pair (this example holds the chosen response), the same prompt with the
    rejected response.
    """

    source: str
    segments: tuple[tuple[str, bool], ...] = ()
    messages: tuple[dict[str, Any], ...] = ()
    document: bool = False
    rejected: Example | None = None
    target: int | float | tuple[int, ...] | None = None  # classification: class index, value, or class indices
    words: tuple[str, ...] = ()  # tagging: the words, tokenized one by one (lmadapt.data.tagging)
    tags: tuple[int, ...] = ()  # tagging: each word's tag, as its index in data.labels
    first_trained: int = 0  # messages: assistant turns before this index are context (a preference pair's prompt)


def detect_format(records: list[Record], cfg: DataConfig) -> str | None:
    """The format named by the first row whose keys fit one; None when no row fits any."""
    for record in records:
        keys = record.data
        if cfg.messages_field in keys:
            return "chat"
        if cfg.chosen_field in keys and cfg.rejected_field in keys:  # the prompt given, or implicit (TRL)
            return "preference"
        if cfg.prompt_field in keys and cfg.completion_field in keys:
            return "prompt_completion"
        if cfg.instruction_field in keys and cfg.output_field in keys:
            return "instruction"
        if cfg.tokens_field in keys and cfg.tags_field in keys:
            return "tagging"
        if cfg.text_field in keys:
            return "text"
    return None


def build_examples(records: list[Record], fmt: str, cfg: DataConfig) -> tuple[list[Example], list[str]]:
    """One example per good record; for bad records, their problems (a record may have several)."""
    convert = {"text": _text, "prompt_completion": _prompt_completion, "instruction": _instruction,
               "chat": _chat, "preference": _preference,
               "classification": _classification, "tagging": _tagging}[fmt]
    examples, problems = [], []
    for record in records:
        found: list[str] = []
        example = convert(record, cfg, found)
        if found:
            problems.append(f"{record.source}: " + "; ".join(found))
        else:
            examples.append(example)
    return examples, problems


def _string(record: Record, key: str, found: list[str], *, optional: bool = False,
            allow_empty: bool = False) -> str:
    """The string under ``key``; appends a problem naming the field when it is missing or wrong."""
    data = record.data
    if key not in data or (optional and data[key] is None):
        if not optional:
            found.append(_missing(key, data))
        return ""
    value = data[key]
    if not isinstance(value, str):
        found.append(f"field '{key}': expected a string, got {type_name(value)}")
        return ""
    if not allow_empty and not value.strip():
        found.append(f"field '{key}' is empty")
    if problem := _surrogate_problem(key, value):
        found.append(problem)
    return value


def _missing(key: str, data: dict[str, Any]) -> str:
    return f"field '{key}' is missing (the row has: {', '.join(map(str, data)) or 'no fields'})"


def _text(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    text = _string(record, cfg.text_field, found)
    return Example(record.source, segments=((text, True),), document=True)


def _classification(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    """The text, trained as one sequence (truncated, never chunked), with its label as ``target``."""
    text = _string(record, cfg.text_field, found)
    key = cfg.label_field
    if key not in record.data or record.data[key] is None:
        found.append(_missing(key, record.data))
        return Example(record.source)
    value = record.data[key]
    if isinstance(value, list):
        if not value:
            found.append(f"field '{key}': an empty list (a multi-label row needs at least one label)")
        target: Any = tuple(_class_index(v, f"{key}[{i}]", cfg, found) for i, v in enumerate(value))
    elif isinstance(value, float):  # a regression target
        target = value
        if not math.isfinite(value):
            found.append(f"field '{key}': {value} is not a finite number")
    else:
        target = _class_index(value, key, cfg, found)
    return Example(record.source, segments=((text, True),), target=target)


def _tagging(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    """The words, with their tags as indices into ``data.labels`` (settled: given, or collected from the training
    rows). One tag per word, each a BIO tag of the tag set."""
    from lmadapt.data.tagging import (
        tag_problem,  # lazily: lmadapt.data.tagging imports lmadapt.data.tokens, which imports this module
    )

    words, tags = (_string_list(record, key, found) for key in (cfg.tokens_field, cfg.tags_field))
    if words is None or tags is None:
        return Example(record.source)
    key = cfg.tags_field
    if len(words) != len(tags):
        found.append(f"field '{key}': {len(tags)} tags for {len(words)} words in '{cfg.tokens_field}'; give one tag "
                     f"per word")
    for i, word in enumerate(words):
        if not word.strip():
            found.append(f"field '{cfg.tokens_field}[{i}]': an empty word")
    known = {name: k for k, name in enumerate(cfg.labels)}
    for i, tag in enumerate(tags):
        if problem := tag_problem(tag):
            found.append(f"field '{key}[{i}]': {tag!r} is {problem}")
        elif tag not in known:
            found.append(f"field '{key}[{i}]': unknown tag {tag!r}; the tags are {list(cfg.labels)} (data.labels, or "
                         f"those of the training rows when it is empty)")
    return Example(record.source, words=tuple(words), tags=tuple(known.get(t, -1) for t in tags))


def _string_list(record: Record, key: str, found: list[str]) -> list[str] | None:
    """The non-empty list of strings under ``key``; None (with a problem naming the field) otherwise."""
    value = record.data.get(key)
    if key not in record.data or value is None:
        found.append(_missing(key, record.data))
        return None
    if not isinstance(value, list) or not value:
        found.append(f"field '{key}': expected a non-empty list of strings, got "
                     f"{'an empty list' if isinstance(value, list) else type_name(value)}")
        return None
    bad = [f"field '{key}[{i}]': expected a string, got {type_name(v)}" for i, v in enumerate(value)
           if not isinstance(v, str)]
    bad += [p for i, v in enumerate(value) if isinstance(v, str) and (p := _surrogate_problem(f"{key}[{i}]", v))]
    found += bad
    return None if bad else value


def _class_index(value: Any, key: str, cfg: DataConfig, found: list[str]) -> int:
    """A class label as its index: a name from ``data.labels``, or an index into them (any index >= 0 when
    ``data.labels`` is empty)."""
    known = cfg.labels
    if isinstance(value, str):
        if value in known:
            return known.index(value)
        stripped = [name for name in known if name.strip() == value.strip()]
        if len(stripped) == 1:
            return known.index(stripped[0])
        found.append(f"field '{key}': unknown label {value!r}; the labels are {known}" if known else
                     f"field '{key}': the label {value!r} is a name, but data.labels is empty; list the class "
                     f"names in data.labels (in index order)")
        return -1
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0 or (known and value >= len(known)):
            top = f"0 to {len(known) - 1} (data.labels has {len(known)} names)" if known else ">= 0"
            found.append(f"field '{key}': class index {value} is out of range; expected {top}")
        return value
    found.append(f"field '{key}': expected a label name, a class index, a list of them (multi-label) or a number "
                 f"(regression), got {type_name(value)}")
    return -1


def _with_chat(record: Record, cfg: DataConfig, prompt: str, completion: str) -> Example:
    """A user/assistant exchange, as chat turns or as plain prompt + completion segments."""
    if cfg.use_chat_template:
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        turns = system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Example(record.source, messages=tuple(turns))
    return Example(record.source, segments=((prompt, False), (completion, True)))


def _prompt_completion(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    prompt = _string(record, cfg.prompt_field, found, allow_empty=True)
    completion = _string(record, cfg.completion_field, found)
    return _with_chat(record, cfg, prompt, completion)


def _preference(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    """The chosen exchange, with the rejected one as its ``rejected``: two sequences that share the prompt.

    TRL's preference rows: strings (``prompt`` + ``chosen`` / ``rejected`` responses), or conversations (``prompt``
    a list of turns, ``chosen`` and ``rejected`` the assistant's replies as lists of turns). Without ``prompt`` (TRL's
    implicit prompt), the prompt is the start that chosen and rejected share (:func:`shared_start`)."""
    data = record.data
    if any(isinstance(data.get(k), list) for k in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)):
        return _conversation_pair(record, cfg, found)
    chosen, rejected = data.get(cfg.chosen_field), data.get(cfg.rejected_field)
    if data.get(cfg.prompt_field) is None and isinstance(chosen, str) and isinstance(rejected, str) \
            and chosen != rejected:  # implicit prompt: cut the shared start off
        cut = shared_start(chosen, rejected)
        record = Record(record.source, {**data, cfg.prompt_field: chosen[:cut], cfg.chosen_field: chosen[cut:],
                                        cfg.rejected_field: rejected[cut:]})
    prompt = _string(record, cfg.prompt_field, found, allow_empty=True)
    chosen = _string(record, cfg.chosen_field, found)
    rejected = _string(record, cfg.rejected_field, found)
    if not found and chosen == rejected:
        found.append(f"field '{cfg.rejected_field}': the same text as '{cfg.chosen_field}', so the pair prefers "
                     f"nothing")
    return replace(_with_chat(record, cfg, prompt, chosen), rejected=_with_chat(record, cfg, prompt, rejected))


def shared_start(chosen: str | list[Any], rejected: str | list[Any]) -> int:
    """The length of TRL's implicit prompt of a preference row: of the longest start (characters, or turns) that
    ``chosen`` and ``rejected`` share; for strings that differ right after a space, one less, so the space opens
    the responses (as TRL's ``extract_prompt``)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    differ = n < min(len(chosen), len(rejected))
    return n - 1 if isinstance(chosen, str) and differ and n > 0 and chosen[n - 1] == " " else n


def _conversation_pair(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    """TRL's conversational preference row: prompt turns (given, or the turns chosen and rejected share) followed by
    either reply; only the replies' assistant turns are trained (``first_trained``)."""
    p_key, c_key, r_key = cfg.prompt_field, cfg.chosen_field, cfg.rejected_field
    implicit = record.data.get(p_key) is None
    lists = {key: _turns(record, key, found) for key in ((c_key, r_key) if implicit else (p_key, c_key, r_key))}
    if found:
        return Example(record.source)
    if lists[c_key] == lists[r_key]:
        found.append(f"field '{r_key}': the same turns as '{c_key}', so the pair prefers nothing")
        return Example(record.source)
    cut = shared_start(lists[c_key], lists[r_key]) if implicit else 0
    prompt = lists[c_key][:cut] if implicit else lists[p_key]
    if not prompt:
        found.append(f"field '{c_key}': '{c_key}' and '{r_key}' share no turn before the reply, so there is no "
                     f"prompt; begin both with the prompt's turns (TRL's implicit prompt), or give '{p_key}'")
    elif prompt[-1]["role"] == "assistant":
        where = f"{c_key}[{cut - 1}]" if implicit else f"{p_key}[{len(prompt) - 1}]"
        found.append(f"field '{where}.role': the prompt ends with an assistant turn; end it with the turn that "
                     f"'{c_key}' and '{r_key}' reply to (user or tool)")
    for key in (c_key, r_key):
        reply = lists[key][cut:]
        bad = next((i for i, turn in enumerate(reply, cut) if turn["role"] != "assistant"), None)
        if not reply:
            found.append(f"field '{key}': nothing of it is left after the turns it shares with the other reply (it "
                         f"is the start of the other); give '{p_key}', or replies that differ")
        elif bad is not None and implicit:
            found.append(f"field '{key}[{bad}].role': {lists[key][bad]['role']!r}; without '{p_key}', '{c_key}' and "
                         f"'{r_key}' must be the same conversation up to the assistant's reply (the implicit "
                         f"prompt) and hold only assistant turns after it, but they differ from turn {cut} on")
        elif bad is not None:
            found.append(f"field '{key}[{bad}].role': {lists[key][bad]['role']!r}, but '{key}' holds the assistant's "
                         f"reply only; put the turns before it in '{p_key}'")
    pair = [Example(record.source, messages=tuple(prompt + lists[key][cut:]), first_trained=len(prompt))
            for key in (c_key, r_key)]
    return replace(pair[0], rejected=pair[1])


def _turns(record: Record, key: str, found: list[str]) -> list[dict[str, Any]]:
    """The non-empty list of well-formed turns under ``key``; [] (with the problems named) otherwise."""
    value = record.data.get(key)
    if value is None:
        found.append(_missing(key, record.data))
        return []
    if not isinstance(value, list):
        found.append(f"field '{key}': expected a list of messages, as in the row's other fields (TRL's "
                     f"conversational form), got {type_name(value)}")
        return []
    if not value:
        found.append(f"field '{key}' is empty")
        return []
    seen = len(found)
    for i, turn in enumerate(value):
        _check_turn(turn, f"{key}[{i}]", found)
    return value if len(found) == seen else []


def _instruction(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    instruction = _string(record, cfg.instruction_field, found)
    extra = _string(record, cfg.input_field, found, optional=True, allow_empty=True)
    output = _string(record, cfg.output_field, found)
    if cfg.use_chat_template:
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    elif extra.strip():
        prompt = INSTRUCTION_INPUT_PROMPT.format(instruction=instruction, input=extra)
    else:
        prompt = INSTRUCTION_PROMPT.format(instruction=instruction)
    return _with_chat(record, cfg, prompt, output)


def _chat(record: Record, cfg: DataConfig, found: list[str]) -> Example:
    key = cfg.messages_field
    turns = record.data.get(key)
    if key not in record.data:
        found.append(_missing(key, record.data))
    elif not isinstance(turns, list):
        found.append(f"field '{key}': expected a list of turns, got {type_name(turns)}")
    elif not turns:
        found.append(f"field '{key}' is empty")
    else:
        for i, turn in enumerate(turns):
            _check_turn(turn, f"{key}[{i}]", found)
        if not found and not any(t["role"] == "assistant" for t in turns):
            found.append(f"field '{key}': no assistant turn, so nothing to train on")
    return Example(record.source, messages=tuple(turns) if isinstance(turns, list) else ())


def _check_turn(turn: Any, name: str, found: list[str]) -> None:
    if not isinstance(turn, dict):
        found.append(f"field '{name}': expected an object with 'role' and 'content', got {type_name(turn)}")
        return
    role = turn.get("role")
    if "role" not in turn:
        found.append(f"field '{name}.role' is missing")
    elif role not in ROLES:
        found.append(f"field '{name}.role': unknown role {role!r} (allowed: {', '.join(ROLES)})")
    content = turn.get("content")
    if "content" not in turn and not turn.get("tool_calls"):
        found.append(f"field '{name}.content' is missing")
    elif content is None and turn.get("tool_calls"):
        pass  # an assistant turn that only calls tools
    elif not isinstance(content, str):
        found.append(f"field '{name}.content': expected a string, got {type_name(content)}")
    elif role == "assistant" and not content.strip() and not turn.get("tool_calls"):
        found.append(f"field '{name}.content' is empty")
    elif problem := _surrogate_problem(f"{name}.content", content):
        found.append(problem)
