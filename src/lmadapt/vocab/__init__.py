"""Vocabulary expansion, trimming and Learned Embedding Propagation (METHODS.md section 17).

- :mod:`~lmadapt.vocab.bpe`: the editable BPE model of a fast tokenizer; which tokenizers are supported.
- :mod:`~lmadapt.vocab.expand`: new tokens learned from target-language text, appended so old ids keep their meaning.
- :mod:`~lmadapt.vocab.init`: the new embedding and output rows (random, mean_all, mean, merge, focus).
- :mod:`~lmadapt.vocab.trim`: MAFT-style trimming to the tokens some corpora use.
- :mod:`~lmadapt.vocab.lep`: Learned Embedding Propagation into an instruct variant.
"""

from lmadapt.vocab.bpe import SUPPORTED, BPEModel, VocabError
from lmadapt.vocab.expand import NewToken, extend_tokenizer, learn_new_tokens
from lmadapt.vocab.init import INIT_METHODS, InitReport, init_new_rows, resize_for
from lmadapt.vocab.lep import LEPReport, propagate
from lmadapt.vocab.trim import TrimPlan, plan_trim, trim, trim_model, trim_tokenizer

__all__ = ["INIT_METHODS", "SUPPORTED", "BPEModel", "InitReport", "LEPReport", "NewToken", "TrimPlan", "VocabError",
           "extend_tokenizer", "init_new_rows", "learn_new_tokens", "plan_trim", "propagate", "resize_for", "trim",
           "trim_model", "trim_tokenizer"]
