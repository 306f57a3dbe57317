"""Reading target-language text for the vocabulary tools (``lmadapt vocab``, the ``new_tokens`` method)."""

from __future__ import annotations

from pathlib import Path

from lmadapt.data.readers import read_files, unpaired_surrogate
from lmadapt.errors import ConfigError
from lmadapt.vocab.bpe import VocabError

_LINES = (".txt", ".md")


def read_corpus(patterns: list[str], text_field: str = "text", flag: str = "--corpus",
                field_flag: str = "--text-field") -> tuple[list[str], list[str]]:
    """``(texts, files)`` of the corpus files: a ``.txt``/``.md`` file gives one text per non-blank line, a data
    file (``.jsonl``/``.json``/``.csv``/``.parquet``) one per row, from ``text_field`` (empty values skipped).

    ``VocabError`` (one line, naming ``flag`` (``field_flag`` for the field), the file, line and field) for a missing file, an unreadable row,
    a row without ``text_field``, a non-text value, or a file that gives no text."""
    for pattern in patterns:
        if not any(c in pattern for c in "*?[") and not Path(pattern).expanduser().exists():
            raise VocabError(f"{flag} {pattern}: no such file; give target-language text files (.txt, .jsonl, .csv)")
    try:
        result = read_files(patterns, text_field)
    except ConfigError as exc:
        raise VocabError(f"{flag}: " + "; ".join(exc.problems)) from None
    problems = list(result.file_problems + result.row_problems)
    texts: list[str] = []
    per_file = dict.fromkeys(result.files, 0)
    for record in result.records:
        file = record.source if record.source in per_file else record.source.rpartition(":")[0]
        if Path(file).suffix.lower() in _LINES:
            lines = [line for line in record.data[text_field].splitlines() if line.strip()]
        elif text_field not in record.data:
            fields = ", ".join(sorted(map(str, record.data))) or "none"
            problems.append(f"{record.source}: no field {text_field!r} (it has: {fields}); name the text field "
                            f"with {field_flag}")
            continue
        elif not isinstance(record.data[text_field], str):
            problems.append(f"{record.source}: field {text_field!r} is {type(record.data[text_field]).__name__}, "
                            "not text")
            continue
        else:
            lines = [record.data[text_field]] if record.data[text_field].strip() else []
        bad = next((s for s in map(unpaired_surrogate, lines) if s), None)
        if bad:
            problems.append(f"{record.source}: the text holds an unpaired surrogate {bad}, which no tokenizer encodes")
            continue
        texts += lines
        per_file[file] = per_file.get(file, 0) + len(lines)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise VocabError(f"{flag}: {problems[0]}{more}")
    empty = [f for f, n in per_file.items() if n == 0]
    if empty:
        raise VocabError(f"{flag} {empty[0]}: the file has no text (no non-blank line, or no non-empty "
                             f"{text_field!r} value); give target-language text")
    return texts, list(result.files)
