"""The editable BPE model of a fast tokenizer: read its ``tokenizer.json``, change vocabulary and merges, rebuild.

Vocabulary expansion (Yamaguchi et al., "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of
Target Language Text?", arXiv:2406.11477) and MAFT-style trimming (Alabi et al., arXiv:2204.06487) both edit
the BPE model of a tokenizer: a vocabulary ``token -> id`` and an ordered merge list ``(left, right)`` whose
position is its priority. Everything else in ``tokenizer.json`` (normalizer, pre-tokenizer, post-processor,
decoder, added tokens) is carried over unchanged, apart from ids that a trim remaps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from lmadapt.errors import LmadaptError

SUPPORTED = (
    "BPE tokenizers (byte-level BPE as in GPT-2/Llama-3/SmolLM2/Qwen, and SentencePiece-style BPE "
    "with byte fallback as in Llama-2/Gemma), loaded as a transformers fast tokenizer"
)

BYTE_FALLBACK_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


class VocabError(LmadaptError):
    """A vocabulary could not be expanded, trimmed or propagated; the message says why and what to do."""


@dataclass
class BPEModel:
    """The BPE model of a fast tokenizer's ``tokenizer.json``, editable in place.

    ``vocab`` and ``merges`` are the live lists: edit them, then call :meth:`to_tokenizer`. ``data`` is the
    whole parsed ``tokenizer.json``; its ``model.vocab``/``model.merges`` are rewritten from the two fields.
    """

    data: dict[str, Any]
    vocab: dict[str, int]
    merges: list[tuple[str, str]]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> BPEModel:
        """Parse the BPE model of a transformers fast tokenizer (a copy: the tokenizer is not changed)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise VocabError(
                f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer, so its vocabulary "
                f"cannot be edited. Supported: {SUPPORTED}. Load it with AutoTokenizer.from_pretrained(...) "
                "from a folder that has tokenizer.json."
            )
        data = json.loads(backend.to_str())
        model = data.get("model") or {}
        kind = model.get("type")
        if kind != "BPE":
            raise VocabError(
                f"{type(tokenizer).__name__} uses a {kind} model, which lmadapt cannot edit. Supported: "
                f"{SUPPORTED}. WordPiece (BERT) and Unigram (T5, XLM-R, ALBERT) tokenizers are not."
            )
        return cls(data=data, vocab=dict(model["vocab"]), merges=_parse_merges(model.get("merges") or []))

    @property
    def byte_fallback(self) -> bool:
        """True for SentencePiece-style BPE that spells unknown characters as ``<0x..>`` byte tokens."""
        return bool(self.data["model"].get("byte_fallback"))

    def to_json(self) -> dict[str, Any]:
        """The ``tokenizer.json`` content with this vocabulary and these merges (a deep copy). Merges keep the json
        form they came in ("a b" strings for tokenizers < 0.20, which cannot read lists) unless a token has a space."""
        data = copy.deepcopy(self.data)
        data["model"]["vocab"] = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        raw = self.data["model"].get("merges") or []
        as_strings = bool(raw) and isinstance(raw[0], str) and not any(" " in a + b for a, b in self.merges)
        data["model"]["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in self.merges]
        return data

    def to_tokenizer(self, like: Any, id_map: dict[int, int] | None = None) -> PreTrainedTokenizerFast:
        """A fast tokenizer with this vocabulary and these merges and ``like``'s special tokens, chat template,
        padding and truncation side and ``model_max_length``.

        ``id_map`` (old id -> new id) remaps the ids of added tokens and of the post-processor's special tokens
        when ids changed (trimming); an added token whose id maps to nothing raises :class:`VocabError`.
        """
        data = self.to_json()
        if id_map is not None:
            _remap_added(data, id_map)
        _added_into_vocab(data)
        try:
            core = Tokenizer.from_str(json.dumps(data))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad json
            raise VocabError(f"the edited tokenizer.json does not load in tokenizers: {exc}") from exc
        kwargs: dict[str, Any] = dict(getattr(like, "special_tokens_map", {}) or {})
        extra = getattr(like, "extra_special_tokens", None)
        if extra:
            kwargs["extra_special_tokens"] = list(extra)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core,
            model_max_length=like.model_max_length,
            padding_side=like.padding_side,
            truncation_side=like.truncation_side,
            clean_up_tokenization_spaces=getattr(like, "clean_up_tokenization_spaces", False),
            **kwargs,
        )
        template = getattr(like, "chat_template", None)
        if template is not None:
            tok.chat_template = copy.deepcopy(template)
        tok.name_or_path = like.name_or_path
        return tok


def _parse_merges(raw: list[Any]) -> list[tuple[str, str]]:
    """Merges in either json form: ``"a b"`` strings (tokenizers < 0.20) or ``[a, b]`` lists."""
    out: list[tuple[str, str]] = []
    for m in raw:
        if isinstance(m, str):
            a, b = m.split(" ", 1)
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def _remap_added(data: dict[str, Any], id_map: dict[int, int]) -> None:
    """Rewrite the ids of added tokens and of post-processor special tokens through ``id_map``."""
    lost = [t["content"] for t in data.get("added_tokens", []) if t["id"] not in id_map]
    if lost:
        raise VocabError(
            f"{len(lost)} added/special token(s) would be dropped: {lost[:10]}. Keep them in the id map "
            "(every special and added token must survive a vocabulary change)."
        )
    for t in data.get("added_tokens", []):
        t["id"] = id_map[t["id"]]
    if data.get("post_processor"):
        _remap_processor(data["post_processor"], id_map)


def _added_into_vocab(data: dict[str, Any]) -> None:
    """Give every added token its id in the model vocabulary too (as SmolLM2's tokenizer.json does).

    tokenizers ignores the json id of an added token that the model vocabulary lacks and gives it the next id
    after the vocabulary's *size*, so once new tokens follow added ones (Llama-3: added 128000..128255, new from
    128256) the added tokens would move onto new tokens' ids. Added tokens are matched before the model runs and
    no merge produces them, so this does not change any encoding."""
    vocab = data["model"]["vocab"]
    owner = {i: t for t, i in vocab.items()}
    for t in data.get("added_tokens", []):
        have = vocab.get(t["content"])
        if have is None and t["id"] in owner:
            raise VocabError(f"added token {t['content']!r} has id {t['id']}, which the vocabulary gives to "
                             f"{owner[t['id']]!r}; every id must belong to one token.")
        if have is None:
            vocab[t["content"]] = t["id"]
        elif have != t["id"]:
            raise VocabError(f"added token {t['content']!r} has id {t['id']} but the vocabulary has it at {have}; "
                             "remap both the same way.")
    data["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))


def _remap_processor(proc: dict[str, Any], id_map: dict[int, int]) -> None:
    """Remap ids inside a post-processor (TemplateProcessing, Roberta/Bert processing, Sequence of them)."""
    for sub in proc.get("processors", []) or []:
        _remap_processor(sub, id_map)
    for spec in (proc.get("special_tokens") or {}).values():
        missing = [i for i in spec.get("ids", []) if i not in id_map]
        if missing:
            raise VocabError(f"the post-processor adds token {spec.get('id')!r} (ids {missing}), which the "
                             "id map drops; keep it in the vocabulary.")
        spec["ids"] = [id_map[i] for i in spec.get("ids", [])]
    for key in ("sep", "cls"):
        if isinstance(proc.get(key), list) and len(proc[key]) == 2:
            tok, old = proc[key]
            if old not in id_map:
                raise VocabError(f"the post-processor's {key} token {tok!r} (id {old}) is dropped by the id map; "
                                 "keep it in the vocabulary.")
            proc[key] = [tok, id_map[old]]


def byte_tokens(tokenizer: Any) -> set[str]:
    """The base alphabet that every text can be spelled in: the 256 byte-level symbols (``Ġ``, ``Ã``, ...) of a
    byte-level BPE, or ``<0x00>``..``<0xFF>`` of a SentencePiece-style BPE with byte fallback."""
    bpe = BPEModel.from_tokenizer(tokenizer)
    if bpe.byte_fallback:
        return {t for t in BYTE_FALLBACK_TOKENS if t in bpe.vocab}
    if _is_byte_level(bpe.data):
        from tokenizers import pre_tokenizers

        return set(pre_tokenizers.ByteLevel.alphabet())
    raise VocabError(
        f"{type(tokenizer).__name__} is a BPE tokenizer with neither a byte-level pre-tokenizer nor byte "
        f"fallback, so some text has no spelling in it. Supported: {SUPPORTED}."
    )


def _is_byte_level(data: dict[str, Any]) -> bool:
    """True when the pre-tokenizer (or one inside a Sequence) is ByteLevel."""
    def walk(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(walk(n) for n in node.get("pretokenizers", []) or [])

    return walk(data.get("pre_tokenizer"))


def added_token_ids(tokenizer: Any) -> dict[int, str]:
    """The special and added tokens by id (``added_tokens_decoder`` of the fast tokenizer)."""
    return {int(i): str(t.content if hasattr(t, "content") else t) for i, t in tokenizer.added_tokens_decoder.items()}
