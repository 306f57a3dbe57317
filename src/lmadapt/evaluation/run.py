"""Evaluation: perplexity, generation accuracy, multiple-choice and classification accuracy.

Each task is a function on in-memory examples; :func:`evaluate` reads the examples from files
(:class:`EvalConfig`: one entry of a run config's ``evals:`` list, or the flags of ``lmadapt eval``) and
dispatches. :func:`compare_table` shows base vs adapted.

Scoring rule (multiple choice and classification). The prompt becomes token ids as in
:func:`lmadapt.decoding.generation.encode_prompt` (as written, or a chat turn with the assistant's turn opened);
each candidate (choice or label) is tokenized *on its own, as written, without special tokens*, and
appended. Its score is the log-likelihood of those tokens given the prompt::

    log p(c | x) = sum_t log softmax(f(x ++ c_<t))[c_t]

So write candidates the way the model would continue the prompt: ``" sport"`` after ``"Topic:"`` for
byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen); ``"sport"`` with ``chat=True`` (the start of
the assistant's turn); without the space for SentencePiece tokenizers (Llama 2, Mistral), which add one.
A candidate that is a token-prefix of another always wins the summed score over it (the longer one
pays for its extra tokens): you are warned when labels look like that.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.generation import eval_mode
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import load_examples
from lmadapt.evaluation.tasks import (
    classification_accuracy,
    generation_accuracy,
    multiple_choice_accuracy,
    perplexity,
)


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, *,
             progress: bool | None = None) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes; the result is a JSON-ready dict with ``task`` and the metrics.

    The model is evaluated in eval mode under ``torch.inference_mode()``; its train/eval mode is
    restored afterwards.
    """
    examples = load_examples(cfg)
    common = {"chat": cfg.chat, "system_prompt": cfg.system_prompt, "progress": progress}
    with eval_mode(model):
        if cfg.task == "perplexity":
            result: dict[str, Any] = perplexity(model, tokenizer, [ex["text"] for ex in examples],
                                                max_length=cfg.max_length, batch_size=cfg.batch_size,
                                                progress=progress)
        elif cfg.task == "generation":
            result = generation_accuracy(model, tokenizer, examples, match=cfg.match,
                                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, **common)
        elif cfg.task == "multiple_choice":
            result = multiple_choice_accuracy(model, tokenizer, examples, **common)
        elif cfg.task == "classification":
            labels = list(cfg.labels) or sorted({ex["label"] for ex in examples})
            result = classification_accuracy(model, tokenizer, examples, labels, **common)
        else:
            raise LmadaptError(f"eval.task: unknown task {cfg.task!r}")
    return {"task": cfg.task, **result}
