"""Examples to token ids and labels (-100 where no loss), with exact prompt and assistant boundaries.

Plain segments (prompt/completion, instruction, text) are tokenized one by one and concatenated, so the
boundary between prompt and completion is exact; the tokenizer's own leading special tokens (BOS) come
first and EOS last (``add_eos``).

Conversations are rendered to one string by the chat template; each assistant reply (in a preference pair's
conversations, each one after the prompt: ``Example.first_trained``) is located by rendering the conversation up
to it (with the generation prompt) and through it, and the string is tokenized once with character offsets so
those spans become labels. The trained span is the reply plus the template's end-of-turn marker (trailing
whitespace excluded). The template is the one ``data.chat_template`` names (:mod:`lmadapt.data.templates`), else
the tokenizer's own; a tokenizer without one uses :data:`FALLBACK_CHAT_TEMPLATE` (with a one-time notice on
stderr)::

    <|user|>\\n{content}{eos}\\n<|assistant|>\\n{content}{eos}\\n

The label of the first token is always -100: nothing before it predicts it.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import jinja2

from lmadapt.data.config import DataConfig
from lmadapt.data.formats import Example
from lmadapt.data.readers import unpaired_surrogate
from lmadapt.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    TOKENIZER_TEMPLATE,
    ChatTemplate,
    resolve_chat_template,
)
from lmadapt.errors import LmadaptError

IGNORE = -100
CHAT_FORMATS = ("prompt_completion", "instruction", "preference")  # the formats use_chat_template makes conversations
_NOTIFIED: weakref.WeakSet[Any] = weakref.WeakSet()  # tokenizers whose fallback notice was given


class RowProblem(Exception):
    """A single row cannot be tokenized (its message names the row)."""


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                template: str | None = None) -> str:
    """The conversation as text, by ``template`` (Jinja text), else the tokenizer's chat template, else
    :data:`FALLBACK_CHAT_TEMPLATE` (saying so on stderr, once per tokenizer)."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        template = FALLBACK_CHAT_TEMPLATE
        _notice_fallback(tokenizer)
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _notice_fallback(tokenizer: Any) -> None:
    if tokenizer in _NOTIFIED:
        return
    _NOTIFIED.add(tokenizer)
    name = getattr(tokenizer, "name_or_path", "") or "this model"
    print(f"lmadapt: the tokenizer of {name} has no chat template, so conversations are rendered with lmadapt's "
          f"fallback template (<|role|>\\n{{content}}{{eos}}\\n per turn). To choose one, set data.chat_template "
          f"(e.g. chatml) when training; an adapter records the template it was trained with (docs/data.md).",
          file=sys.stderr, flush=True)


def chosen_template(tokenizer: Any, cfg: DataConfig) -> ChatTemplate:
    """The template conversations of ``cfg``'s data are rendered with for ``tokenizer``: the one
    ``cfg.chat_template`` names, else the tokenizer's own, else the fallback."""
    if cfg.chat_template is not None:
        return resolve_chat_template(cfg.chat_template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return ChatTemplate(TOKENIZER_TEMPLATE, own)
    return ChatTemplate("fallback", FALLBACK_CHAT_TEMPLATE)


def set_chat_template(tokenizer: Any, cfg: DataConfig) -> Any:
    """``tokenizer``, given the template ``cfg.chat_template`` names (unchanged when it names none), so that
    evaluation and generation during a run, and a tokenizer saved with the adapter, render conversations as
    the training data was rendered."""
    if cfg.chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(cfg.chat_template).template
    return tokenizer


def uses_chat(cfg: DataConfig, formats: str) -> bool:
    """Whether data of ``formats`` (as :class:`~lmadapt.data.DataReport` gives them: ``"chat"``,
    ``"chat, instruction"``, ...) went through the chat template under ``cfg``."""
    found = [f.strip() for f in formats.split(",")]
    return "chat" in found or (cfg.use_chat_template and any(f in CHAT_FORMATS for f in found))


def training_record(cfg: DataConfig, formats: str, tokenizer: Any) -> dict[str, Any]:
    """What an adapter records about how its data was rendered (``save_adapter(..., extra=...)``): the chat
    template used (``{"name", "template"}``; None: no conversations) and the system prompt put before
    prompt/completion and instruction rows (None: none)."""
    chat = uses_chat(cfg, formats)
    template = chosen_template(tokenizer, cfg) if chat else None
    plain = [f.strip() for f in formats.split(",") if f.strip() in CHAT_FORMATS]
    system = cfg.system_prompt if chat and plain else None
    return {"chat_template": None if template is None else {"name": template.name, "template": template.template},
            "system_prompt": system}


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
        template = resolve_chat_template(cfg.chat_template).template if cfg.chat_template is not None else None
        ids, trained = _tokenize_chat(example, tokenizer, template)
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


def _tokenize_chat(example: Example, tokenizer: Any, template: str | None) -> tuple[list[int], list[bool]]:
    messages = list(example.messages)
    try:
        text = render_chat(tokenizer, messages, template=template)
        spans = _assistant_spans(tokenizer, messages, text, template, example.first_trained)
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


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str, template: str | None,
                     first: int = 0) -> list[tuple[int, int]] | None:
    """Character spans of each assistant reply from turn ``first`` on (plus end-of-turn marker) in ``text``; None if
    one is not found."""
    spans, cursor = [], 0
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < first:
            continue
        before = _render_or_none(tokenizer, messages[:i], True, template)
        through = render_chat(tokenizer, messages[: i + 1], template=template).rstrip()
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


def _render_or_none(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    template: str | None) -> str | None:
    """The rendering, or None when the template refuses this prefix (e.g. an empty conversation)."""
    try:
        return render_chat(tokenizer, messages, add_generation_prompt, template)
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
