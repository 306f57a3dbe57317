"""Chat templates by name: what ``data.chat_template`` may say, and the Jinja text each choice stands for.

``data.chat_template`` is null (the tokenizer's own template; lmadapt's fallback when it has none), a name
from :data:`CHAT_TEMPLATES` (``chatml``, ``fallback``), a Jinja template written out (it contains ``{{`` or
``{%``), or the path of a file holding one (relative to the working directory, as every path in a config).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2

from lmadapt.config import did_you_mean
from lmadapt.errors import ConfigError

# Every turn is <|{role}|>\n{content}{eos}\n; the generation prompt is <|assistant|>\n.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# ChatML (Qwen, SmolLM2, ...): <|im_start|>{role}\n{content}<|im_end|>\n per turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "fallback": FALLBACK_CHAT_TEMPLATE}
TOKENIZER_TEMPLATE = "tokenizer"  # the name recorded when the tokenizer's own template was used


@dataclass(frozen=True)
class ChatTemplate:
    """A chosen template: ``name`` (a :data:`CHAT_TEMPLATES` key, ``tokenizer``, ``jinja`` for one written
    out, or the file's path) and its Jinja ``template`` text."""

    name: str
    template: str


def is_jinja(text: str) -> bool:
    """``text`` is a template written out rather than a name or a path."""
    return "{{" in text or "{%" in text


@functools.lru_cache(maxsize=32)
def resolve_chat_template(choice: str) -> ChatTemplate:
    """The template ``data.chat_template: choice`` stands for; :class:`ConfigError` naming the key if none."""
    problem = chat_template_problem(choice)
    if problem:
        raise ConfigError([f"data.chat_template: {problem}"])
    if choice in CHAT_TEMPLATES:
        return ChatTemplate(choice, CHAT_TEMPLATES[choice])
    if is_jinja(choice):
        return ChatTemplate("jinja", choice)
    return ChatTemplate(choice, Path(choice).expanduser().read_text(encoding="utf-8"))


def chat_template_problem(choice: str) -> str | None:
    """What is wrong with ``data.chat_template: choice`` (None: nothing): an unknown name, a file that cannot
    be read, a template that is not valid Jinja."""
    if choice in CHAT_TEMPLATES:
        return None
    if is_jinja(choice):
        text, where = choice, "the template"
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            return (f"{choice!r} is not a template name ({', '.join(CHAT_TEMPLATES)}), a Jinja template "
                    f"(with {{{{ ... }}}} or {{% ... %}}) or an existing file (paths are relative to the "
                    f"working directory).{did_you_mean(choice, CHAT_TEMPLATES)}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot read the template file {choice}: {exc}"
        where = f"the template in {choice}"
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"{where} is not valid Jinja (line {exc.lineno}: {exc.message})"
    return None
