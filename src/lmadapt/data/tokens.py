"""Examples to token ids and labels (-100 where no loss), with exact prompt and assistant boundaries.

Plain segments (prompt/completion, instruction, text) are tokenized one by one and concatenated, so the
boundary between prompt and completion is exact; the tokenizer's own leading special tokens (BOS) come
first and EOS last (``add_eos``).

Conversations are rendered to one string by the chat template; each assistant reply is located by
rendering the conversation up to it (with the generation prompt) and through it, and the string is
tokenized once with character offsets so those spans become labels. The trained span is the reply plus
the template's end-of-turn marker (trailing whitespace excluded). A tokenizer without a chat template
uses :data:`FALLBACK_CHAT_TEMPLATE`::

    <|user|>\\n{content}{eos}\\n<|assistant|>\\n{content}{eos}\\n

The label of the first token is always -100: nothing before it predicts it.
"""

from __future__ import annotations

from typing import Any

import jinja2

from lmadapt.data.config import DataConfig
from lmadapt.data.formats import Example
from lmadapt.data.readers import unpaired_surrogate
from lmadapt.errors import LmadaptError

IGNORE = -100
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class RowProblem(Exception):
    """A single row cannot be tokenized (its message names the row)."""


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template or :data:`FALLBACK_CHAT_TEMPLATE`."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text by itself (e.g. BOS); empty for most chat models."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def tokenize_example(example: Example, tokenizer: Any, cfg: DataConfig,
                     prefix: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; raises :class:`RowProblem` when its template refuses it."""
    if example.messages:
        ids, trained = _tokenize_chat(example, tokenizer)
    else:
        ids, trained = list(prefix), [False] * len(prefix)
        for text, trainable in example.segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [trainable] * len(piece)
        if cfg.add_eos:
            if tokenizer.eos_token_id is None:
                raise LmadaptError("data.add_eos: the tokenizer has no EOS token; set data.add_eos=false")
            ids.append(tokenizer.eos_token_id)
            trained.append(True)
    if cfg.loss_on_prompt:
        trained = [True] * len(ids)
    labels = [token if keep else IGNORE for token, keep in zip(ids, trained)]
    return ids, mask_first(labels)


def mask_first(labels: list[int]) -> list[int]:
    """``labels`` with the first one set to -100 (no token predicts the first)."""
    return [IGNORE] + labels[1:] if labels else labels


def _tokenize_chat(example: Example, tokenizer: Any) -> tuple[list[int], list[bool]]:
    messages = list(example.messages)
    try:
        text = render_chat(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, text)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
        raise RowProblem(f"{example.source}: field 'messages': the chat template refused this conversation "
                         f"({exc})") from None
    if (code := unpaired_surrogate(text)) is not None:  # e.g. in a tool call or a turn's name
        raise RowProblem(f"{example.source}: field 'messages': the rendered conversation contains an unpaired "
                         f"surrogate ({code}), which no tokenizer can encode")
    if spans is None:
        raise RowProblem(f"{example.source}: field 'messages': an assistant reply does not appear verbatim in "
                         f"the rendered conversation, so its tokens cannot be found")
    return _tokens_in_spans(tokenizer, text, spans)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]] | None:
    """Character spans of each assistant reply (plus end-of-turn marker) in ``text``; None if one is not found."""
    spans, cursor = [], 0
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render_or_none(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1]).rstrip()
        if before is not None and text.startswith(through) and through.startswith(before) \
                and len(before) >= cursor:
            spans.append((len(before), len(through)))
        else:  # the template rewrites earlier turns (e.g. drops reasoning): find the reply itself
            content = turn.get("content") or ""
            start = text.find(content, cursor) if content else -1
            if start < 0:
                return None
            end = start + len(content)
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
        cursor = spans[-1][1]
    return spans


def _render_or_none(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str | None:
    """The rendering, or None when the template refuses this prefix (e.g. an empty conversation)."""
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError):
        return None


def _tokens_in_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenize ``text`` once; a token is trained when its characters overlap a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # tokenizers without offsets: tokenize the pieces between boundaries
        return _tokens_by_pieces(tokenizer, text, spans)
    trained = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def _tokens_by_pieces(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    for k in range(len(cuts) - 1):
        piece = tokenizer(text[cuts[k]:cuts[k + 1]], add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [k % 2 == 1] * len(piece)
    return ids, trained
