"""Learned Embedding Propagation (LEP): carry embeddings learned on an adapted base into an instruct variant.

Tikhomirov and Chernyshev, "Facilitating large language model Russian adaptation with Learned Embedding
Propagation", arXiv:2412.21140; reference code ``RefalMachine/ruadapt`` (``ruadapt/ushanka``). Three models:
the original base ``B`` and its instruct variant ``I`` (both with the old tokenizer), and the donor ``D``: ``B``
adapted to a new tokenizer (embedding init, then continued pretraining of mainly embeddings and LM head).

1. Subtoken averaging: each new token's string is spelled with the old tokenizer and its old rows averaged,
   ``E~ = A E`` with ``A[t, s] = count(s in old(t)) / |old(t)|`` (``"mean"``) or ``count(s in old(t))``
   (``"sum"``), giving ``E_B~`` and ``E_I~`` (``|V_new| x d``).
2. ``P = argmin_P ||E_B~ P - E_I~||_F`` (``torch.linalg.lstsq`` in fp64; ``P`` is ``d x d``).
3. ``E_I_new = E_D P``, for the input embeddings and, separately, for the LM head (input only when tied);
   special and added tokens take their old instruct rows.

Modes: ``"conversion"`` (the default above), ``"straight"`` (``P = I``: swap in the donor's rows) and
``"union"`` (``P`` fitted only on the tokens that both vocabularies share).

``keep_shared`` (not in the paper): the tokens both vocabularies hold (same string) keep the instruct model's own
rows and only the others are projected. For a vocabulary *expansion* whose donor trained only the new rows, the
shared rows of ``E_D`` are ``E_B``'s, and ``E_B P`` only approximates ``E_I``; keeping ``E_I`` is exact there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmadapt.vocab.bpe import VocabError, added_token_ids
from lmadapt.vocab.init import subtoken_ids

MODES = ("conversion", "straight", "union")
AVERAGING = ("mean", "sum")


@dataclass
class LEPReport:
    """What :func:`propagate` did.

    ``residuals``: per matrix (``"input"``, ``"output"``), the relative fit residual
    ``||E_B~ P - E_I~||_F / ||E_I~||_F`` over the rows the projection was fitted on (all rows for
    ``conversion`` and ``straight``, the shared tokens for ``union``).
    """

    mode: str
    averaging: str
    rows: int  # embedding rows of the result (= the donor's)
    tokens: int  # ids of the new tokenizer; rows past it are padding, set to zero
    tied: bool
    fit_rows: int  # rows P was fitted on: the spellable new tokens, or the shared ones for "union"
    residuals: dict[str, float] = field(default_factory=dict)
    empty_encodings: int = 0  # new tokens that the old tokenizer spells with no token at all (zero rows)
    special_rows_copied: int = 0  # special/added tokens given their old instruct rows
    special_tokens_copied: list[str] = field(default_factory=list)
    special_tokens_missing: list[str] = field(default_factory=list)  # added tokens absent from the old tokenizer
    shared_rows_kept: int = 0  # keep_shared: rows of tokens both vocabularies hold, kept from the instruct model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise VocabError(f"unknown LEP mode {mode!r}; choose one of: {', '.join(MODES)}")


def _check_averaging(mode: str) -> None:
    if mode not in AVERAGING:
        hint = " (the occurrence-weighted 'occ' variant of ushanka needs corpus counts and is not implemented)"
        raise VocabError(f"unknown subtoken averaging mode {mode!r}; choose one of: {', '.join(AVERAGING)}"
                         + (hint if mode == "occ" else ""))


def _id_rows(tokenizer: Any) -> int:
    """Rows needed to hold every id of ``tokenizer`` (its largest id + 1, added tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


def _same_alphabet(old: Any, new: Any) -> bool:
    """True when both are fast tokenizers with the same model type and decoder, so that a new token's piece
    (``Ġthe``, ``▁the``, a partial UTF-8 byte sequence) means the same thing to the old model."""
    try:
        a, b = (json.loads(t.backend_tokenizer.to_str()) for t in (old, new))
    except AttributeError:
        return False
    return a["model"]["type"] == b["model"]["type"] and a.get("decoder") == b.get("decoder")


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def subtokens_by_id(old_tokenizer: Any, new_tokenizer: Any) -> dict[int, list[int]]:
    """For each id of the new tokenizer, the old ids that spell the same token (LEP step 1).

    - a special/added token whose string is a token of the old tokenizer: that one old id; otherwise its
      string encoded by the old tokenizer;
    - a token whose piece is also in the old BPE vocabulary: that old id;
    - when both tokenizers share the model type and decoder (a new tokenizer grown from the old one, byte-level
      or SentencePiece-style): the old model applied to the piece itself (``Ġthe`` keeps its leading space,
      partial UTF-8 byte tokens keep their bytes); this is what ``old.encode(new.decode([id]))`` gives for
      whole-character tokens, without the pre-tokenizer;
    - otherwise: ``old.encode(new.decode([id]), add_special_tokens=False)``.
    An empty list means the old tokenizer cannot spell the token (characters outside its alphabet, no unk).
    """
    old_vocab = old_tokenizer.get_vocab()
    new_added = added_token_ids(new_tokenizer)
    pieces = _same_alphabet(old_tokenizer, new_tokenizer)
    if pieces:
        old_pieces = old_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    out: dict[int, list[int]] = {}
    for token, i in new_tokenizer.get_vocab().items():
        if i in new_added:
            content = new_added[i]
            out[i] = [old_vocab[content]] if content in old_vocab else _encode_text(old_tokenizer, content)
        elif pieces:
            out[i] = [old_pieces[token]] if token in old_pieces else subtoken_ids(old_tokenizer, token)
        else:
            text = new_tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out[i] = _encode_text(old_tokenizer, text)
    return out


def averaging_matrix(old_tokenizer: Any, new_tokenizer: Any, *, mode: str = "mean", rows: int | None = None,
                     columns: int | None = None) -> tuple[Tensor, list[int]]:
    """The sparse fp64 ``[rows, columns]`` matrix ``A`` of LEP step 1 (``E~ = A E``) and the new ids whose old
    encoding is empty (their rows of ``A`` are zero).

    ``A[t, s] = count(s in old(t)) / |old(t)|`` for ``"mean"``, ``count(s in old(t))`` for ``"sum"``.
    ``rows`` defaults to the new tokenizer's id count (more rows, e.g. the donor's padding rows, stay zero);
    ``columns`` to the old tokenizer's id count (pass the old embedding rows when they are more).
    """
    _check_averaging(mode)
    ids = subtokens_by_id(old_tokenizer, new_tokenizer)
    n_rows = _id_rows(new_tokenizer) if rows is None else rows
    n_cols = _id_rows(old_tokenizer) if columns is None else columns
    r: list[int] = []
    c: list[int] = []
    v: list[float] = []
    empty: list[int] = []
    for i in sorted(ids):
        spelled = ids[i]
        if not spelled:
            empty.append(i)
            continue
        w = 1.0 / len(spelled) if mode == "mean" else 1.0
        r += [i] * len(spelled)
        c += spelled
        v += [w] * len(spelled)
    if ids and max(ids) >= n_rows:
        raise VocabError(f"the new tokenizer has ids up to {max(ids)} but only {n_rows} rows were asked for; "
                         "the target matrix must have a row for every new token")
    if c and max(c) >= n_cols:
        raise VocabError(f"the old tokenizer spells new tokens with ids up to {max(c)}, but the old embedding "
                         f"matrix has only {n_cols} rows; is the old tokenizer the base model's tokenizer?")
    index = torch.tensor([r, c], dtype=torch.long).reshape(2, -1)
    matrix = torch.sparse_coo_tensor(index, torch.tensor(v, dtype=torch.float64), (n_rows, n_cols),
                                     check_invariants=True)
    return matrix.coalesce(), empty


def subtoken_average(embeddings: Tensor, old_tokenizer: Any, new_tokenizer: Any, *, mode: str = "mean") -> Tensor:
    """LEP step 1: ``[V_new, d]`` rows, each the mean (or sum) of the old rows that spell the new token.

    Tokens the old tokenizer cannot spell get zero rows (see :func:`averaging_matrix` for the count).
    """
    matrix, _ = averaging_matrix(old_tokenizer, new_tokenizer, mode=mode, columns=embeddings.shape[0])
    return torch.sparse.mm(matrix.to(embeddings.device), embeddings.double()).to(embeddings.dtype)


def shared_token_rows(old_tokenizer: Any, new_tokenizer: Any) -> Tensor:
    """New ids of the tokens (strings) that both vocabularies hold: the rows ``"union"`` mode fits ``P`` on."""
    old_vocab = old_tokenizer.get_vocab()
    return torch.tensor(sorted(i for t, i in new_tokenizer.get_vocab().items() if t in old_vocab), dtype=torch.long)


@torch.no_grad()
def fit_projection(src: Tensor, dst: Tensor, rows: Tensor | None = None) -> Tensor:
    """``P = argmin_P ||src[rows] P - dst[rows]||_F`` (LEP step 2), solved by ``torch.linalg.lstsq`` in fp64.

    Returns the fp64 ``[d, d]`` map. Fewer fit rows than ``d`` would leave ``P`` underdetermined: refused.
    """
    if src.shape != dst.shape or src.dim() != 2:
        raise VocabError(f"fit_projection needs two matrices of the same shape, got {tuple(src.shape)} and "
                         f"{tuple(dst.shape)}")
    if rows is not None:
        src, dst = src[rows.to(src.device)], dst[rows.to(dst.device)]
    if src.shape[0] < src.shape[1]:
        raise VocabError(f"{src.shape[0]} row(s) to fit a {src.shape[1]} x {src.shape[1]} projection: at least "
                         f"{src.shape[1]} are needed (in 'union' mode, the vocabularies share too few tokens; "
                         "use 'conversion')")
    return torch.linalg.lstsq(src.double(), dst.double()).solution


def _relative_residual(src: Tensor, dst: Tensor, proj: Tensor) -> float:
    norm = torch.linalg.norm(dst)
    diff = torch.linalg.norm(src @ proj - dst)
    return float(diff / norm) if norm > 0 else float(diff)


@torch.no_grad()
def propagate_matrices(E_B: Tensor, E_I: Tensor, E_D: Tensor, averaging: Tensor, *, mode: str = "conversion",
                       shared_rows: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
    """LEP on matrices: ``E_I_new = E_D P`` with ``P = argmin ||(A E_B) P - (A E_I)||_F`` (``P = I`` for
    ``"straight"``; fitted on ``shared_rows`` only for ``"union"``).

    ``averaging`` is ``A`` (sparse ``[V_D, V_old]``, :func:`averaging_matrix`); ``E_B``/``E_I`` are ``[V_old, d]``,
    ``E_D`` is ``[V_D, d]``. Returns ``(E_I_new`` in ``E_I``'s dtype, ``P`` in fp64, the relative fit residual
    ``||E_B~ P - E_I~|| / ||E_I~||`` over the fit rows``)``. Special-token rows and padding are left to the caller.
    """
    _check_mode(mode)
    if E_B.shape != E_I.shape:
        raise VocabError(f"base embeddings are {tuple(E_B.shape)} but instruct embeddings are {tuple(E_I.shape)}; "
                         "LEP needs an instruct variant of the same base (same vocabulary and hidden size)")
    if E_D.shape[1] != E_B.shape[1]:
        raise VocabError(f"donor hidden size {E_D.shape[1]} differs from the base/instruct hidden size "
                         f"{E_B.shape[1]}; the donor must be the same base, adapted to the new tokenizer")
    if tuple(averaging.shape) != (E_D.shape[0], E_B.shape[0]):
        raise VocabError(f"averaging matrix is {tuple(averaging.shape)}, expected (donor rows, old rows) = "
                         f"{(E_D.shape[0], E_B.shape[0])}")
    if mode == "union" and shared_rows is None:
        raise VocabError("'union' mode needs shared_rows (the new ids of tokens both vocabularies hold)")
    A = averaging.to(E_B.device)
    B_t = torch.sparse.mm(A, E_B.double())
    I_t = torch.sparse.mm(A, E_I.double())
    rows = shared_rows.to(E_B.device) if mode == "union" else slice(None)
    if mode == "straight":
        proj = torch.eye(E_B.shape[1], dtype=torch.float64, device=E_B.device)
    else:
        proj = fit_projection(B_t[rows], I_t[rows])
    residual = _relative_residual(B_t[rows], I_t[rows], proj)
    E_new = (E_D.to(E_B.device).double() @ proj).to(E_I.dtype)
    return E_new, proj, residual


def _special_pairs(old_tokenizer: Any, new_tokenizer: Any) -> tuple[list[tuple[int, int, str]], list[str]]:
    """``(new id, old id, string)`` of the new tokenizer's special/added tokens that the old one also has, and
    the strings of those it does not have."""
    old_vocab = old_tokenizer.get_vocab()
    pairs, missing = [], []
    for i, content in sorted(added_token_ids(new_tokenizer).items()):
        if content in old_vocab:
            pairs.append((i, old_vocab[content], content))
        else:
            missing.append(content)
    return pairs, missing


def _shared_pairs(old_tokenizer: Any, new_tokenizer: Any, specials: list[tuple[int, int, str]]
                  ) -> list[tuple[int, int, str]]:
    """``(new id, old id, token)`` of the ordinary tokens both vocabularies hold (special ones are in ``specials``)."""
    old_vocab, done = old_tokenizer.get_vocab(), {p[0] for p in specials}
    return [(i, old_vocab[t], t) for t, i in sorted(new_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            if t in old_vocab and i not in done]


def _matrices(base: Any, instruct: Any, donor: Any, new_tokenizer: Any) -> tuple[dict[str, tuple], bool]:
    """The ``(E_B, E_I, E_D)`` triple of each matrix to write (``"input"``, and ``"output"`` unless the instruct
    model ties them), after checking that the three models fit together."""
    def weights(model: Any) -> tuple[Tensor, Tensor | None]:
        out = model.get_output_embeddings()
        return model.get_input_embeddings().weight, (None if out is None else out.weight)

    (b_in, b_out), (i_in, i_out), (d_in, d_out) = weights(base), weights(instruct), weights(donor)
    if b_in.shape != i_in.shape:
        raise VocabError(f"the base model's input embeddings are {tuple(b_in.shape)} (rows x hidden) but the "
                         f"instruct model's are {tuple(i_in.shape)}; LEP needs the instruct variant of this very "
                         "base (same vocabulary and hidden size)")
    if d_in.shape[1] != i_in.shape[1]:
        raise VocabError(f"the donor's hidden size is {d_in.shape[1]} but the instruct model's is {i_in.shape[1]}; "
                         "the donor must be the base adapted to the new tokenizer")
    n_new = _id_rows(new_tokenizer)
    if d_in.shape[0] < n_new:
        raise VocabError(f"the donor has {d_in.shape[0]} embedding rows but the new tokenizer has {n_new} ids; "
                         "pass the donor adapted to this tokenizer (rows >= len(new_tokenizer))")
    tied = i_out is None or i_out is i_in
    triples: dict[str, tuple] = {"input": (b_in, i_in, d_in)}
    if not tied:
        b_out = b_in if b_out is None else b_out
        d_out = d_in if d_out is None else d_out
        if b_out.shape != i_out.shape:
            raise VocabError(f"the base model's LM head is {tuple(b_out.shape)} but the instruct model's is "
                             f"{tuple(i_out.shape)}; LEP needs the instruct variant of this very base")
        if d_out.shape != d_in.shape:
            raise VocabError(f"the donor's LM head is {tuple(d_out.shape)} but its input embeddings are "
                             f"{tuple(d_in.shape)}; both must have one row per donor token")
        triples["output"] = (b_out, i_out, d_out)
    return triples, tied


@torch.no_grad()
def propagate(base_model: Any, instruct_model: Any, donor_model: Any, old_tokenizer: Any, new_tokenizer: Any, *,
              mode: str = "conversion", averaging: str = "mean", keep_shared: bool = False
              ) -> tuple[Any, LEPReport]:
    """Give ``instruct_model`` the donor's learned vocabulary by LEP (arXiv:2412.21140): ``E_I_new = E_D P``.

    ``base_model``/``instruct_model`` use ``old_tokenizer``; ``donor_model`` is the base adapted to
    ``new_tokenizer``. ``P`` is fitted per matrix (input embeddings; the LM head separately unless the instruct
    model ties them) on subtoken-averaged base and instruct rows (:func:`propagate_matrices`). The instruct model
    is changed in place and returned, resized to the donor's row count (``config.vocab_size`` follows); special
    and added tokens that the old tokenizer also has get their old instruct rows; rows past the new tokenizer's
    ids (the donor's padding to a multiple) are zero. ``keep_shared``: tokens both tokenizers hold (same string)
    keep their instruct rows too, so only the new tokens are projected (see the module docstring).
    """
    _check_mode(mode)
    _check_averaging(averaging)
    triples, tied = _matrices(base_model, instruct_model, donor_model, new_tokenizer)
    n_rows, n_old = triples["input"][2].shape[0], triples["input"][0].shape[0]
    n_tokens = _id_rows(new_tokenizer)
    A, empty = averaging_matrix(old_tokenizer, new_tokenizer, mode=averaging, rows=n_rows, columns=n_old)
    shared = shared_token_rows(old_tokenizer, new_tokenizer) if mode == "union" else None
    pairs, missing = _special_pairs(old_tokenizer, new_tokenizer)
    copied = pairs + (_shared_pairs(old_tokenizer, new_tokenizer, pairs) if keep_shared else [])
    new_ids = torch.tensor([p[0] for p in copied], dtype=torch.long)
    old_ids = torch.tensor([p[1] for p in copied], dtype=torch.long)
    new_weights: dict[str, Tensor] = {}
    residuals: dict[str, float] = {}
    for name, (E_B, E_I, E_D) in triples.items():
        E_new, _, residuals[name] = propagate_matrices(E_B, E_I, E_D, A, mode=mode, shared_rows=shared)
        E_new[n_tokens:] = 0
        if copied:
            E_new[new_ids.to(E_new.device)] = E_I[old_ids.to(E_I.device)].to(E_new.device)
        new_weights[name] = E_new
    instruct_model.resize_token_embeddings(n_rows, mean_resizing=False)
    instruct_model.get_input_embeddings().weight.copy_(new_weights["input"])
    if "output" in new_weights:
        instruct_model.get_output_embeddings().weight.copy_(new_weights["output"])
    report = LEPReport(
        mode=mode, averaging=averaging, rows=n_rows, tokens=n_tokens, tied=tied,
        fit_rows=int(shared.numel()) if shared is not None else n_tokens - len(empty), residuals=residuals,
        empty_encodings=len(empty), special_rows_copied=len(pairs),
        special_tokens_copied=[p[2] for p in pairs], special_tokens_missing=missing,
        shared_rows_kept=len(copied) - len(pairs),
    )
    return instruct_model, report
