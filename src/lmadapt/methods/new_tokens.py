"""New tokens: add target-language tokens to the vocabulary and train only their rows (alone, or with LoRA).

Yamaguchi et al., "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of Target Language Text?",
arXiv:2406.11477 (METHODS.md section 17a; the library is :mod:`lmadapt.vocab`). :meth:`NewTokens.prepare` learns
``n`` tokens by continued BPE on the target text (or reads them from a folder written by ``lmadapt vocab expand``),
appends them at ids ``n_old..n_old+n_new-1`` so that old text encodes as before, resizes the embeddings (rows
rounded up to a multiple of 8) and initialises the new rows (``init``). Training then updates only

    R_in  (n_new x d):  e(i) = R_in[i - n_old]              for n_old <= i < n_old + n_new
    R_out (n_new x d):  logits_i = h . R_out[i - n_old]      (R_out = R_in when the embeddings are tied)

with learning rate ``train.lr * lr_scale`` (:mod:`lmadapt.methods.new_tokens_layer`), plus LoRA on the rest when
``lora:`` is given (the :mod:`lmadapt.methods.lora` layers, unchanged). Old rows never change
(``train_old_rows: true`` trains them too, at ``train.lr``, as the paper's full-embedding settings do).
``train_blocks`` trains whole transformer blocks in place, at ``train.lr``: ``[0, 1, -2, -1]`` with
``train_old_rows: true`` is the paper's "2x2 LS" (embeddings, head, first two and last two blocks). LoRA leaves
those blocks alone, as PEFT does with ``modules_to_save``.

The adapter is PEFT's: ``LORA`` with ``trainable_token_indices`` (or ``TRAINABLE_TOKENS`` without LoRA), the rows
saved under ``<module>.token_adapter.trainable_tokens_delta`` (PEFT 0.21 ``peft/tuners/trainable_tokens``; PEFT
stores the rows themselves, not a difference), next to the extended tokenizer; trained blocks are PEFT's
``modules_to_save``, their tensors under ``<block>.<parameter>``. Merge writes the rows into the resized matrices
(trained blocks already are the model's weights), so ``lmadapt merge`` gives a plain transformers model with the
larger vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmadapt.config import from_dict, option
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods._weights import decay_groups
from lmadapt.methods.base import Method, ParamGroup
from lmadapt.methods.lora import PEFT_PREFIX, Lora, key_mismatch
from lmadapt.methods.lora_layer import LoraConfig
from lmadapt.methods.new_tokens_layer import Span, TokenRowsEmbedding, TokenRowsHead
from lmadapt.methods.registry import register
from lmadapt.models.tree import (
    TRAINED_IN_PLACE,
    find_modules,
    freeze_all,
    pick_blocks,
    replace_module,
)
from lmadapt.vocab.bpe import VocabError

ROWS_KEY = {"LORA": "token_adapter.trainable_tokens_delta", "TRAINABLE_TOKENS": "trainable_tokens_delta"}
# PEFT's LORA config with no LoRA layers, for trained blocks without lora: PEFT keeps modules_to_save in a LORA
# config but not in TRAINABLE_TOKENS', and of the target lists that match nothing PEFT 0.21 accepts only
# "dummy-target-modules" (peft.utils.constants.DUMMY_TARGET_MODULES, X-LoRA's); [] raises "No modules were targeted".
NO_LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
           "target_modules": "dummy-target-modules", "bias": "none", "init_lora_weights": True, "inference_mode": True}
FILLED_IN = "Filled in by lmadapt when it expands the vocabulary and saved with the adapter, so that loading knows " \
            "which rows are new; leave it unset."


@dataclass
class NewTokensConfig:
    vocab: str | None = option(
        None, "An expansion folder written by `lmadapt vocab expand` (the extended tokenizer, the initialised rows and "
              "vocab_expansion.json). Give this or corpus.")
    corpus: list[str] = option(
        [], "Target-language text files to learn the new tokens from at the start of training (.txt/.md: one text "
            "per non-blank line; .jsonl/.json/.csv/.parquet: the text_field of each row). Give this or vocab.")
    text_field: str = option("text", "corpus only: the field holding the text in .jsonl/.json/.csv/.parquet files.")
    n: int = option(100, "corpus only: how many tokens to add (the paper recommends 50 to 100).")
    init: Literal["random", "mean_all", "mean", "merge", "focus", "align"] = option(
        "merge", "corpus only: how the new rows start (lmadapt.vocab.init): random, mean_all, mean (of the token's old "
                 "pieces), merge (along its BPE merge path), focus (FOCUS over similar old tokens), align (the "
                 "paper's: the old pieces its occurrences in the corpus overlap, frequency-weighted).")
    seed: int = option(0, "corpus only: seed of init random.")
    min_frequency: int = option(2, "corpus only: fewest occurrences of a pair for it to become a token.")
    pad_to_multiple_of: int = option(8, "corpus only: round the embedding rows up to a multiple of this (the paper: "
                                        "8).")
    lr_scale: float = option(
        1.0, "Learning rate of the token rows relative to train.lr. 1.0: the paper's setting (one learning rate, "
             "1e-4, for embeddings, head and layers).")
    weight_decay: float | None = option(
        None, "Weight decay of the token rows; null: the run's train.weight_decay (the paper: 0.01 on everything).")
    train_old_rows: bool = option(
        False, "Also train the old tokens' rows (the whole embedding and head, at train.lr; the adapter then holds "
               "them all). false: old rows stay bit for bit.")
    train_blocks: list[int] = option(
        [], "Transformer blocks to train fully (all their parameters, at train.lr), by index; negative ones count "
            "from the end. [0, 1, -2, -1] with train_old_rows: true is the paper's \"2x2 LS\". LoRA leaves them "
            "alone. []: no block trains.")
    lora: dict[str, Any] | None = option(
        None, "LoRA on the rest of the model: a lora method section without its name (r, alpha, target_modules, ...). "
              "It skips the train_blocks. null: only the token rows (and train_blocks) train.")
    old_tokens: int | None = option(None, f"The base tokenizer's length. {FILLED_IN}")
    rows: int | None = option(None, f"The embedding rows after expansion. {FILLED_IN}")

    def check(self) -> list[str]:
        problems = []
        if self.vocab and self.corpus:
            problems.append("vocab: give vocab (an expansion folder) or corpus (text files to learn from), not both")
        elif not self.vocab and not self.corpus and self.old_tokens is None:
            problems.append("vocab: required: give vocab (a folder written by `lmadapt vocab expand`) or corpus "
                            "(target-language text files to learn n new tokens from)")
        if self.vocab:
            changed = [k for k, v in (("n", 100), ("init", "merge"), ("seed", 0), ("min_frequency", 2),
                                      ("pad_to_multiple_of", 8)) if getattr(self, k) != v]
            problems += [f"{k}: only read with corpus; the vocab folder already holds its tokens and rows (leave it "
                         f"out, or give corpus instead of vocab)" for k in changed]
        for key in ("n", "min_frequency", "pad_to_multiple_of"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        repeated = sorted({i for i in self.train_blocks if self.train_blocks.count(i) > 1})
        if repeated:
            problems.append(f"train_blocks: {', '.join(map(str, repeated))} given more than once; name each block once")
        if self.lora is not None:
            try:
                from_dict(LoraConfig, self.lora)
            except ConfigError as exc:
                problems += [f"lora.{p}" for p in exc.problems]
        return problems


@register
class NewTokens(Method):
    """Vocabulary expansion (arXiv:2406.11477): new token rows train with their own learning rate, LoRA optional."""

    name = "new_tokens"
    config_class = NewTokensConfig
    peft_type = "TRAINABLE_TOKENS"  # with lora: "LORA" (+ trainable_token_indices), set per instance
    mergeable = True
    changes_tokenizer = True

    def __init__(self, config: NewTokensConfig) -> None:
        super().__init__(config)
        self.lora = Lora(from_dict(LoraConfig, config.lora)) if config.lora is not None else None
        if self.lora is not None or config.train_blocks:
            self.peft_type = "LORA"  # PEFT keeps modules_to_save (the trained blocks) only in a LORA config
        if config.train_blocks:
            self.trains_base_weights = True  # the blocks' own weights train: keep them in fp32 under bf16
        self.blocks: list[str] = []  # dotted names of train_blocks, set by apply()
        self.span: tuple[int, int] | None = None  # (n_old, n_old + n_new): the new ids, set by prepare()
        self.digest = ""  # of the new tokens' strings, set by prepare()
        self.names: dict[str, str] = {}  # "input"/"output" -> module name, set by apply()
        self.tied = False
        self.expansion: Any = None  # the ExpansionRecord of this run's expansion (None when loading)

    # --- the vocabulary ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, tokenizer: Any) -> Any:
        """Training: expand ``tokenizer`` and ``model`` (from ``vocab`` or ``corpus``) and return the extended
        tokenizer. Loading an adapter (``old_tokens`` is set): ``tokenizer`` is already the extended one; only
        resize the model to it (the rows come from the adapter's tensors)."""
        cfg = self.config
        if tokenizer is None:
            raise VocabError("new_tokens needs the tokenizer: pass it to prepare(model, tokenizer)")
        if cfg.old_tokens is not None:
            if len(tokenizer) <= cfg.old_tokens:
                raise VocabError(f"this new_tokens adapter adds tokens after id {cfg.old_tokens - 1}, but the "
                                 f"tokenizer given has {len(tokenizer)} tokens; load it with the tokenizer its folder "
                                 "carries")
            from lmadapt.vocab.init import resize_rows

            resize_rows(model, max(cfg.rows or 0, len(tokenizer)))
            self._set_span(tokenizer, cfg.old_tokens)
            return tokenizer
        new = self._from_folder(model, tokenizer) if cfg.vocab else self._from_corpus(model, tokenizer)
        if new.pad_token is None and tokenizer.pad_token is not None:
            new.pad_token = tokenizer.pad_token
        cfg.old_tokens, cfg.rows = len(tokenizer), model.get_input_embeddings().weight.shape[0]
        self._set_span(new, len(tokenizer))
        return new

    def _set_span(self, tokenizer: Any, old_tokens: int) -> None:
        """The new ids, and a digest of the new tokens' strings that checkpoints keep (:meth:`state_dict`)."""
        self.span = (old_tokens, len(tokenizer))
        tokens = tokenizer.convert_ids_to_tokens(list(range(*self.span)))
        self.digest = hashlib.sha256(json.dumps(tokens).encode("utf-8")).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The new tokens' digest: a resumed run re-learns them from ``corpus`` (or re-reads ``vocab``), and its
        checkpoint's rows belong to these tokens only."""
        return {"new_tokens_digest": self.digest}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        saved = state.get("new_tokens_digest")
        if saved is not None and saved != self.digest:
            raise LmadaptError("new_tokens: the new tokens differ from the checkpoint's (the corpus or vocab folder "
                               "changed since the run started), so its rows would go to other tokens; resume with "
                               "the text the run started with, or start again without --resume")

    def _from_corpus(self, model: nn.Module, tokenizer: Any) -> Any:
        from lmadapt.vocab.corpus import read_corpus
        from lmadapt.vocab.expansion import expand_model

        cfg = self.config
        texts, files = read_corpus(cfg.corpus, cfg.text_field, flag="method.corpus", field_flag="method.text_field")
        new, self.expansion = expand_model(model, tokenizer, texts, cfg.n, init=cfg.init, seed=cfg.seed,
                                           min_frequency=cfg.min_frequency, pad_to_multiple_of=cfg.pad_to_multiple_of,
                                           files=files)
        return new

    def _from_folder(self, model: nn.Module, tokenizer: Any) -> Any:
        from lmadapt.models.shards import embedding_names, tensor_index
        from lmadapt.vocab.expansion import expansion_rows, read_expansion, same_base

        folder = self.config.vocab
        new, record = read_expansion(folder)
        new_vocab = new.get_vocab()
        if record.old_tokens != len(tokenizer) or any(new_vocab.get(t) != i for t, i in tokenizer.get_vocab().items()):
            raise VocabError(f"method.vocab {folder} extends a tokenizer of {record.old_tokens} tokens "
                             f"({record.base_model}), not this model's ({len(tokenizer)} tokens); expand this model "
                             "with `lmadapt vocab expand --model <it>`")
        ids = record.new_ids(new)
        rows = expansion_rows(folder, record, ids)
        if not same_base(model, rows["old_input"]):
            raise VocabError(f"method.vocab {folder} was expanded from other weights than this model's "
                             f"({record.base_model}); expand this model with `lmadapt vocab expand`")
        if len(_matrices(model)) == 2 and "output" not in rows:
            raise VocabError(f"method.vocab {folder} holds a tied model but this model's output layer is its own; "
                             "expand this model with `lmadapt vocab expand`")
        from lmadapt.vocab.init import resize_rows

        resize_rows(model, tensor_index(folder)[embedding_names(folder)[0]].shape[0])
        with torch.no_grad():
            for w, key in zip(_matrices(model), ("input", "output")):
                w[ids] = rows[key].to(w.dtype)
        self.expansion = record
        return new

    # --- the layers --------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        """LoRA first (when configured; it freezes the model, and skips the trained blocks), then the trained
        blocks made trainable, then the token-row layers in place of the input embedding and the output layer,
        their rows trainable."""
        if self.span is None:
            raise LmadaptError("new_tokens: call method.prepare(model, tokenizer) before method.apply(model) (lmadapt "
                               "train and lmadapt.load_adapter do), so that the model has the new tokens' rows")
        self.blocks = pick_blocks(model, self.config.train_blocks, "method.train_blocks")
        names = {id(m): n for n, m in model.named_modules()}
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.names = {"input": names[id(emb)], "output": names[id(head)]}
        if self.lora is not None:
            lora = self.lora.config
            targets = find_modules(model, lora.target_modules, types=(nn.Linear,), exclude=lora.exclude_modules)
            if any(n == self.names["output"] for n, _ in targets):
                raise LmadaptError(f"new_tokens: lora.target_modules selects the output layer "
                                   f"({self.names['output']}), whose rows this method trains itself; leave it out "
                                   "of lora.target_modules")
            if self.blocks:
                self._keep_lora_out_of_blocks([n for n, _ in targets])
            self.lora.apply(model)
        else:
            freeze_all(model)
        for block in self.blocks:
            model.get_submodule(block).requires_grad_(True)
            setattr(model.get_submodule(block), TRAINED_IN_PLACE, True)
        lo, hi = self.span
        spans: list[Span] = [("new_rows", lo, hi)] + ([("old_rows", 0, lo)] if self.config.train_old_rows else [])
        self.tied = head.weight is emb.weight
        new_emb = TokenRowsEmbedding(emb, spans)
        replace_module(model, self.names["input"], new_emb)
        replace_module(model, self.names["output"], TokenRowsHead(head, spans, new_emb if self.tied else None))

    def _keep_lora_out_of_blocks(self, targets: list[str]) -> None:
        """Exclude the trained blocks from LoRA, as PEFT does with modules_to_save (a block trains fully)."""
        if all(n.startswith(tuple(f"{b}." for b in self.blocks)) for n in targets):
            raise LmadaptError(f"new_tokens: lora.target_modules select only modules inside train_blocks "
                               f"({', '.join(self.blocks)}), which train fully and take no LoRA (as in PEFT's "
                               "modules_to_save); target modules of other blocks too, or leave lora out")
        cfg = self.lora.config
        skip = [f"re:{re.escape(b)}\\..*" for b in self.blocks]
        self.lora.config = dataclasses.replace(cfg, exclude_modules=[*cfg.exclude_modules, *skip])

    def _block_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's modules_to_save keys (the block's own keys, prefixed) -> the trained blocks' tensors."""
        return {f"{PEFT_PREFIX}{b}.{k}": v for b in self.blocks
                for k, v in model.get_submodule(b).state_dict(keep_vars=True).items()}

    def _layers(self, model: nn.Module) -> list[TokenRowsEmbedding | TokenRowsHead]:
        return [model.get_submodule(self.names["input"]), model.get_submodule(self.names["output"])]

    def _owners(self, model: nn.Module) -> list[tuple[str, TokenRowsEmbedding | TokenRowsHead]]:
        """(module name, layer) of the layers that hold rows of their own: both, or the embedding when tied."""
        pairs = list(zip((self.names["input"], self.names["output"]), self._layers(model)))
        return pairs[:1] if self.tied else pairs

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        owners = [layer for _, layer in self._owners(model)]
        groups = [ParamGroup("new_rows", [m.new_rows for m in owners], lr_scale=self.config.lr_scale,
                             weight_decay=self.config.weight_decay)]
        if self.config.train_old_rows:
            groups.append(ParamGroup("old_rows", [m.old_rows for m in owners]))
        named = [(f"{b}.{n}", p) for b in self.blocks for n, p in model.get_submodule(b).named_parameters()]
        groups += [dataclasses.replace(g, name="blocks" if g.name == "decay" else "blocks_no_decay")
                   for g in decay_groups(named)]  # norms and biases without weight decay, as in full fine-tuning
        return groups + (self.lora.parameter_groups(model) if self.lora is not None else [])

    def merge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            layer.merge()
        if self.lora is not None:
            self.lora.merge(model)

    def unmerge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            layer.unmerge()
        if self.lora is not None:
            self.lora.unmerge(model)

    def unload(self, model: nn.Module) -> None:
        """Give the model its own embedding and output layer back (resized; merged rows stay) and unload LoRA."""
        emb, head = self._layers(model)
        replace_module(model, self.names["input"], emb.unloaded())
        replace_module(model, self.names["output"], head.unloaded())
        if self.tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        if self.lora is not None:
            self.lora.unload(model)

    # --- saving --------------------------------------------------------------------------------------
    def _row_keys(self, model: nn.Module) -> dict[str, TokenRowsEmbedding | TokenRowsHead]:
        """PEFT's key of each row tensor -> the layer that holds its rows."""
        suffix = ROWS_KEY[self.peft_type]
        return {f"{PEFT_PREFIX}{name}.{suffix}": layer for name, layer in self._owners(model)}

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The rows of the trainable ids in id order (old rows first when they train), per matrix, under PEFT's
        keys; then the trained blocks' tensors and LoRA's."""
        state = {key: torch.cat([rows.detach() for _, _, rows in sorted(layer.row_parameters(),
                                                                         key=lambda s: s[0])])
                 for key, layer in self._row_keys(model).items()}
        if self.peft_type == "TRAINABLE_TOKENS" and self.tied:  # PEFT saves the tied head's copy too
            tied_key = f"{PEFT_PREFIX}{self.names['output']}.{ROWS_KEY['TRAINABLE_TOKENS']}"
            state[tied_key] = next(iter(state.values())).clone()
        blocks = {k: v.detach() for k, v in self._block_tensors(model).items()}
        return {**state, **blocks, **(self.lora.adapter_state(model) if self.lora is not None else {})}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The reverse of :meth:`adapter_state`; every key and shape is checked before anything is written."""
        suffix = ROWS_KEY["TRAINABLE_TOKENS"]  # both forms' keys end with it
        rows = {k: v for k, v in state.items() if k.endswith(suffix)}
        blocks = {k: v for k, v in state.items() if k.startswith(tuple(f"{PEFT_PREFIX}{b}." for b in self.blocks))}
        rest = {k: v for k, v in state.items() if k not in rows and k not in blocks}
        if self.peft_type == "TRAINABLE_TOKENS" and self.tied:
            rows.pop(f"{PEFT_PREFIX}{self.names['output']}.{suffix}", None)
        layers, block_tensors = self._row_keys(model), self._block_tensors(model)
        if rest and self.lora is None:
            raise KeyError(f"{len(rest)} unexpected tensor(s), e.g. {min(rest)} (this new_tokens adapter "
                           "has no lora section)")
        for want, got in ((layers, rows), (block_tensors, blocks)):
            if got.keys() != want.keys():
                raise KeyError(key_mismatch(want.keys() - got.keys(), got.keys() - want.keys()))
        plan = []
        for key, tensor in block_tensors.items():
            if blocks[key].shape != tensor.shape:
                raise ValueError(f"{key.removeprefix(PEFT_PREFIX)}: saved shape {tuple(blocks[key].shape)} != "
                                 f"model's {tuple(tensor.shape)} (another base model?)")
            plan.append((tensor, blocks[key]))
        for key, layer in layers.items():
            spans = sorted(layer.row_parameters(), key=lambda s: s[0])
            want = (sum(hi - lo for lo, hi, _ in spans), layer.weight.shape[1])
            if tuple(rows[key].shape) != want:
                raise ValueError(f"{key.removeprefix(PEFT_PREFIX)}: saved shape {tuple(rows[key].shape)} != {want} "
                                 "(a tokenizer with other new tokens, or another base model?)")
            plan += zip((p for _, _, p in spans), rows[key].split([hi - lo for lo, hi, _ in spans]))
        if self.lora is not None:
            self.lora.load_adapter_state(model, rest)
        with torch.no_grad():
            for param, values in plan:
                param.copy_(values)

    def adapter_config(self) -> dict[str, Any]:
        """PEFT's config: LORA with ``trainable_token_indices`` (and the trained blocks as ``modules_to_save``;
        :data:`NO_LORA` when they train without LoRA), or TRAINABLE_TOKENS; the rows' ids, per matrix when untied
        (a tied output layer follows the embedding in PEFT too)."""
        if self.span is None or (self.config.train_blocks and not self.blocks):
            raise ValueError("prepare() and apply() the method before asking for its PEFT config")
        lo, hi = self.span
        ids = list(range(0 if self.config.train_old_rows else lo, hi))
        modules = [self.names["input"]] + ([] if self.tied else [self.names["output"]])
        if self.peft_type == "TRAINABLE_TOKENS":
            return {"peft_type": "TRAINABLE_TOKENS", "task_type": "CAUSAL_LM", "token_indices": ids,
                    "target_modules": modules, "init_weights": True, "inference_mode": True}
        indices = ids if self.tied else {m: ids for m in modules}
        lora = self.lora.adapter_config() if self.lora is not None else NO_LORA
        return {**lora, "trainable_token_indices": indices, "modules_to_save": self.blocks or None}

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("this is a PEFT TRAINABLE_TOKENS adapter without lmadapt's record, so lmadapt cannot tell "
                         "which tokenizer it belongs to; load it with PEFT (PeftModel.from_pretrained on the base "
                         "resized to the tokenizer), or merge it with PEFT and load the merged model")


def _matrices(model: nn.Module) -> list[torch.nn.Parameter]:
    from lmadapt.vocab.init import embedding_matrices

    return embedding_matrices(model)
