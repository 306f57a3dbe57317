"""Training data: files -> checked rows -> examples -> token ids and labels -> deterministic batches.

Formats (``data.format``, or auto-detected from the first row's keys): ``text`` (raw documents, e.g.
continual pretraining; also every ``.txt``/``.md`` file), ``prompt_completion``, ``instruction``
(Alpaca-style headers unless ``use_chat_template``) and ``chat`` (``messages`` of role/content turns).
Loss falls only on completions and assistant turns (plus their end-of-turn token) unless
``loss_on_prompt``. Chat rows use the tokenizer's chat template, or, when it has none,
:data:`FALLBACK_CHAT_TEMPLATE`: every turn is ``<|{role}|>\\n{content}{eos_token}\\n``, and the
generation prompt is ``<|assistant|>\\n``.

Modules: ``config`` (the ``data:`` section), ``readers`` (files -> :class:`Record`), ``formats``
(rows -> examples, with problems naming file, line and field), ``tokens`` (examples -> ids/labels),
``dataset`` (the whole pipeline and :class:`DataReport`), ``batching`` (:class:`Batcher`, packing).
"""

from lmadapt.data.batching import Batch, Batcher, Row, length_grouped, pack_rows
from lmadapt.data.config import DataConfig
from lmadapt.data.dataset import (
                                  DataReport,
                                  TokenizedDataset,
                                  fit_length,
                                  load_dataset,
                                  load_splits,
)
from lmadapt.data.formats import (
                                  INSTRUCTION_INPUT_PROMPT,
                                  INSTRUCTION_PROMPT,
                                  ROLES,
                                  Example,
                                  build_examples,
                                  detect_format,
)
from lmadapt.data.readers import Record, expand_patterns, read_files, read_records
from lmadapt.data.tokens import (
                                  FALLBACK_CHAT_TEMPLATE,
                                  IGNORE,
                                  render_chat,
                                  special_prefix,
                                  tokenize_example,
)

__all__ = [
    "Batch", "Batcher", "DataConfig", "DataReport", "Example", "FALLBACK_CHAT_TEMPLATE", "IGNORE",
    "INSTRUCTION_INPUT_PROMPT", "INSTRUCTION_PROMPT", "ROLES", "Record", "Row", "TokenizedDataset",
    "build_examples", "detect_format", "expand_patterns", "fit_length", "length_grouped", "load_dataset",
    "load_splits", "pack_rows", "read_files", "read_records", "render_chat", "special_prefix",
    "tokenize_example",
]
