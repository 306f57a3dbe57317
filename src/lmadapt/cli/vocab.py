"""``lmadapt vocab expand|trim|propagate|inspect``: the vocabulary library (:mod:`lmadapt.vocab`) on model folders
(METHODS.md section 17; docs/vocab.md).

- ``expand``: :func:`lmadapt.vocab.expansion.expand_model` + :func:`~lmadapt.vocab.expansion.save_expansion`
  (new target-language tokens, arXiv:2406.11477).
- ``trim``: :func:`lmadapt.vocab.trim.trim` (MAFT-style, arXiv:2204.06487), checked on a held-out slice.
- ``propagate``: :func:`lmadapt.vocab.lep.propagate` (Learned Embedding Propagation, arXiv:2412.21140).

Every output is a complete transformers model folder, written atomically (a temporary folder beside it, then one
rename) with a JSON report in it; an existing folder is refused without ``--overwrite``. Corpora: ``.txt``/``.md``
give one text per non-blank line; ``.jsonl``/``.json``/``.csv``/``.parquet`` one text per row (``--text-field``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from lmadapt.cli.common import positive_int
from lmadapt.errors import LmadaptError

TRIM_REPORT, LEP_REPORT = "vocab_trim.json", "vocab_propagate.json"
# lmadapt.vocab.init.INIT_METHODS, lmadapt.vocab.lep.MODES and AVERAGING, written out so that building the parser
# does not import tokenizers and transformers (1.7 s); tests/test_cli_vocab.py checks that they agree.
INIT_METHODS = ("random", "mean_all", "mean", "merge", "focus", "align")
LEP_MODES, LEP_AVERAGING = ("conversion", "straight", "union"), ("mean", "sum")


def _vocab_error(message: str) -> LmadaptError:
    """A :class:`lmadapt.vocab.bpe.VocabError`, imported when one is raised (lmadapt.vocab imports tokenizers)."""
    from lmadapt.vocab.bpe import VocabError as _VocabError

    return _VocabError(message)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``vocab`` (with its ``expand``, ``trim``, ``propagate`` and ``inspect`` actions) on ``sub``."""
    p = sub.add_parser("vocab", help="add target-language tokens, trim unused ones, or carry them into an instruct "
                                     "model (docs/vocab.md)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    ex = actions.add_parser("expand", help="learn N new tokens from a corpus and write the resized model")
    ex.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    _corpus_args(ex)
    ex.add_argument("--n", type=positive_int, required=True, help="how many new tokens")
    ex.add_argument("--init", choices=INIT_METHODS, default="merge", help="how the new rows start (default merge)")
    ex.add_argument("--seed", type=int, default=0, help="seed of --init random (default 0)")
    ex.add_argument("--min-frequency", type=positive_int, default=2,
                    help="fewest occurrences of a pair for it to become a token (default 2)")
    ex.add_argument("--pad-to-multiple-of", type=positive_int, default=8, help="round the rows up (default 8)")
    tr = actions.add_parser("trim", help="keep only the tokens a corpus uses and write the smaller model")
    tr.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    _corpus_args(tr)
    tr.add_argument("--min-count", type=positive_int, default=1, help="fewest uses for a token to stay (default 1)")
    tr.add_argument("--keep-token", action="append", default=[], metavar="TOKEN",
                    help="also keep this token (as the vocabulary spells it, e.g. 'Ġthe'); repeat it")
    tr.add_argument("--check-fraction", type=_fraction, default=0.1,
                    help="hold out this share of the texts (seed 0) and check they encode the same (default 0.1)")
    tr.add_argument("--pad-to-multiple-of", type=positive_int, default=None, help="round the rows up (default: no)")
    lep = actions.add_parser("propagate", help="give an instruct model the vocabulary a donor learned (LEP)")
    lep.add_argument("--base", required=True, help="the base model (old tokenizer)")
    lep.add_argument("--instruct", required=True, help="its instruct variant (old tokenizer)")
    lep.add_argument("--donor", required=True, help="the base adapted to the new tokenizer")
    lep.add_argument("--mode", choices=LEP_MODES, default="conversion", help="default conversion")
    lep.add_argument("--averaging", choices=LEP_AVERAGING, default="mean", help="subtoken averaging (default mean)")
    lep.add_argument("--keep-shared", action="store_true",
                     help="tokens both vocabularies hold keep the instruct model's own rows; only the new ones are "
                          "projected (not in the paper; exact for an expansion whose donor trained only new rows)")
    for q in (ex, tr, lep):
        q.add_argument("--output", required=True, help="folder for the new model")
        q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="dtype to load and save in (default: the one the model folder stores)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
        q.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    ins = actions.add_parser("inspect", help="summarise a folder written by lmadapt vocab")
    ins.add_argument("folder")
    for q in (ex, tr, lep, ins):
        q.set_defaults(func=run)


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help=".txt/.md (one text per non-blank line), .jsonl/.json/.csv/.parquet (one per row), or a glob")
    p.add_argument("--text-field", default="text", help="field/column of the text in .jsonl/.json/.csv (default text)")


def run(args: argparse.Namespace) -> int:
    """Run the action and print its report."""
    if args.action == "inspect":
        return _inspect(Path(args.folder))
    from lmadapt.fsutil import check_output_dir

    for flag in ("model", "base", "instruct", "donor"):
        given = getattr(args, flag, None)
        if given and Path(given).expanduser().resolve() == Path(args.output).expanduser().resolve():
            raise _vocab_error(f"--output {args.output} is the --{flag} folder; write the new model to another one")
    check_output_dir(args.output, args.overwrite)  # before minutes of loading and learning
    action = {"expand": _expand, "trim": _trim, "propagate": _propagate}[args.action]
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # transformers' loading and saving bars too
    try:
        return action(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ corpus


# ------------------------------------------------------------------------------------------------ actions


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(f"lmadapt vocab {args.action}: {message}", file=sys.stderr, flush=True)


def _load(name: str, dtype: str | None) -> tuple[Any, Any]:
    """(model on the CPU, its tokenizer as saved: no pad token added) of a built-in name or folder."""
    from transformers import AutoTokenizer

    from lmadapt.errors import ModelError
    from lmadapt.jsonfile import read_json_object
    from lmadapt.models.builtins import resolve_model_path
    from lmadapt.models.loading import ModelConfig, load_model

    folder = resolve_model_path(name)
    if dtype is None:
        stored = read_json_object(folder / "config.json")
        stored = stored.get("dtype") or stored.get("torch_dtype") or "float32"
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(str(stored), "fp32")
    model, _ = load_model(ModelConfig(name_or_path=str(folder), dtype=dtype, device="cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"could not load the tokenizer of {name}: {exc}") from exc
    return model, tokenizer


def _expand(args: argparse.Namespace) -> int:
    from lmadapt.models.loading import model_display_name
    from lmadapt.vocab.corpus import read_corpus
    from lmadapt.vocab.expansion import RECORD_FILE, expand_model, save_expansion

    texts, files = read_corpus(args.corpus, args.text_field)
    _say(args, f"{len(texts)} text(s) from {len(files)} file(s); loading {args.model}")
    model, tokenizer = _load(args.model, args.dtype)
    _say(args, f"learning {args.n} new token(s), init {args.init}")
    new_tok, record = expand_model(model, tokenizer, texts, args.n, init=args.init, seed=args.seed,
                                   min_frequency=args.min_frequency, pad_to_multiple_of=args.pad_to_multiple_of,
                                   progress=False if args.no_progress else None, files=files)
    record.base_model = model_display_name(args.model)
    _say(args, f"writing {args.output}")
    out = save_expansion(args.output, model, new_tok, record, overwrite=args.overwrite)
    tpw, rep = record.tokens_per_word, record.init_report
    sample = ", ".join(repr(new_tok.convert_tokens_to_string([t.token])) for t in record.new_tokens[:8])
    print(f"expanded {record.base_model}: {len(record.new_tokens)} new token(s), ids {record.old_tokens}.."
          f"{record.old_tokens + len(record.new_tokens) - 1} (first: {sample})")
    print(f"tokens per word on the corpus ({record.corpus['words']} words): {tpw['before']:.3f} -> "
          f"{tpw['after']:.3f} ({_change(tpw['before'], tpw['after'])})")
    fallback = "merge" if record.init == "align" else "mean"
    fell = f", {len(rep.get('fell_back', []))} fell back to {fallback}" if rep.get("fell_back") else ""
    print(f"init {record.init}: {rep.get('rows')} row(s) in {rep.get('matrices')} matrix(es){fell}; embedding rows "
          f"{record.old_rows} -> {model.get_input_embeddings().weight.shape[0]}")
    print(f"model written to {out} (record: {RECORD_FILE})")
    return 0


def _trim(args: argparse.Namespace) -> int:
    from lmadapt.fsutil import atomic_dir, atomic_write_json
    from lmadapt.models.loading import model_display_name
    from lmadapt.vocab.corpus import read_corpus
    from lmadapt.vocab.trim import trim

    texts, files = read_corpus(args.corpus, args.text_field)
    keep, held = split_held_out(texts, args.check_fraction)
    _say(args, f"{len(keep)} text(s) to trim by, {len(held)} held out; loading {args.model}")
    model, tokenizer = _load(args.model, args.dtype)
    _say(args, "counting tokens and trimming")
    model, new_tok, report = trim(model, tokenizer, keep, min_count=args.min_count, keep_tokens=args.keep_token,
                                  pad_to_multiple_of=args.pad_to_multiple_of)
    check = check_encodings(tokenizer, new_tok, held)
    report = {"base_model": model_display_name(args.model), **report,
              "corpus": {"files": files, "texts": len(keep), "held_out": len(held)}, "held_out_check": check}
    _say(args, f"writing {args.output}")
    with atomic_dir(args.output, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        new_tok.save_pretrained(tmp)
        atomic_write_json(tmp / TRIM_REPORT, report)
    print(f"trimmed {report['base_model']}: {report['tokens_before']} -> {report['tokens_after']} tokens "
          f"({report['tokens_removed']} removed; kept: {_reasons(report['kept_by_reason'])})")
    print(f"parameters {report['model_params_before']:,} -> {report['model_params_after']:,} "
          f"({report['params_saved']:,} saved, {report['bytes_saved'] / 2**20:.1f} MiB in {report['dtype']}); "
          f"corpus coverage {report['corpus_coverage']:.1%}")
    if check["texts"]:
        print(f"held-out check ({check['texts']} text(s)): {check['covered_share']:.1%} use only kept tokens and all "
              f"of them encode to the same pieces; {check['decoded_identical_share']:.1%} decode identically")
    else:
        print("held-out check: skipped (--check-fraction 0, or too few texts)")
    print(f"model written to {args.output} (report: {TRIM_REPORT})")
    return 0


def split_held_out(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """``(rest, held_out)``: ``floor(fraction * len)`` texts drawn with seed 0 (at least one when ``fraction > 0``
    and there are two texts or more), the rest in their order."""
    n = int(len(texts) * fraction)
    if fraction > 0 and n == 0 and len(texts) >= 2:
        n = 1
    chosen = set(random.Random(0).sample(range(len(texts)), n))
    return [t for i, t in enumerate(texts) if i not in chosen], [t for i, t in enumerate(texts) if i in chosen]


def check_encodings(old: Any, new: Any, texts: list[str]) -> dict[str, Any]:
    """The trim's promise on ``texts`` (held out): a text whose old pieces are all kept encodes to the same pieces;
    every text decodes to the same string. ``VocabError`` (nothing is written) when either fails."""
    if not texts:
        return {"texts": 0}
    old_enc = old.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    new_enc = new.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    kept = new.get_vocab()
    covered = [i for i, e in enumerate(old_enc) if all(t in kept for t in e.tokens)]
    changed = [texts[i] for i in covered if old_enc[i].tokens != new_enc[i].tokens]
    old_text = old.backend_tokenizer.decode_batch([e.ids for e in old_enc], skip_special_tokens=False)
    new_text = new.backend_tokenizer.decode_batch([e.ids for e in new_enc], skip_special_tokens=False)
    differ = [t for t, a, b in zip(texts, old_text, new_text) if a != b]
    if changed or differ:
        what = (f"{len(changed)} held-out text(s) whose tokens are all kept encode to other pieces (e.g. "
                f"{changed[0][:80]!r})" if changed else f"{len(differ)} held-out text(s) decode differently (e.g. "
                f"{differ[0][:80]!r})")
        raise _vocab_error(f"the trimmed tokenizer breaks its promise: {what}; nothing was written. Please report it "
                             "with the model and corpus.")
    return {"texts": len(texts), "covered": len(covered), "covered_share": len(covered) / len(texts),
            "identical_pieces": len(covered), "decoded_identical_share": 1.0,
            "tokens": sum(len(e.ids) for e in old_enc),
            "covered_tokens": sum(t in kept for e in old_enc for t in e.tokens)}


def _propagate(args: argparse.Namespace) -> int:
    from lmadapt.fsutil import atomic_dir, atomic_write_json
    from lmadapt.models.loading import model_display_name
    from lmadapt.vocab.lep import propagate

    _say(args, f"loading {args.base}, {args.instruct} and {args.donor}")
    base, old_tok = _load(args.base, args.dtype)
    instruct, instruct_tok = _load(args.instruct, args.dtype)
    donor, new_tok = _load(args.donor, args.dtype)
    if instruct_tok.get_vocab() != old_tok.get_vocab():
        raise _vocab_error(f"--instruct {args.instruct} has another vocabulary than --base {args.base}; LEP needs the "
                             "instruct variant of this very base (same tokenizer)")
    _say(args, f"propagating ({args.mode})")
    model, rep = propagate(base, instruct, donor, old_tok, new_tok, mode=args.mode, averaging=args.averaging,
                           keep_shared=args.keep_shared)
    tokenizer = instruct_tokenizer(new_tok, instruct_tok)
    remapped = remap_config_ids(model, instruct_tok, tokenizer)
    names = {k: model_display_name(getattr(args, k)) for k in ("base", "instruct", "donor")}
    report = {**{f"{k}_model": v for k, v in names.items()}, **rep.to_dict(), "config_token_ids": remapped}
    _say(args, f"writing {args.output}")
    with atomic_dir(args.output, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / LEP_REPORT, report)
    fit = ", ".join(f"{k} {v:.4f}" for k, v in rep.residuals.items())
    print(f"propagated the vocabulary of {names['donor']} ({rep.tokens} tokens, {rep.rows} rows) into "
          f"{names['instruct']} by LEP {rep.mode}: relative fit residual {fit} over {rep.fit_rows} rows")
    missing = f"; not in the old tokenizer: {rep.special_tokens_missing}" if rep.special_tokens_missing else ""
    kept = f" and {rep.shared_rows_kept} shared token row(s)" if args.keep_shared else ""
    print(f"{rep.special_rows_copied} special/added token row(s){kept} kept from the instruct model{missing}; "
          f"{rep.empty_encodings} token(s) the old tokenizer cannot spell (zero rows)")
    print(f"model written to {args.output} (report: {LEP_REPORT})")
    return 0


def instruct_tokenizer(new_tok: Any, instruct_tok: Any) -> Any:
    """The donor's tokenizer with the instruct tokenizer's chat template and its bos/eos/pad/unk tokens (those the
    donor's vocabulary holds), so the result is prompted and stops as the instruct model did."""
    vocab = new_tok.get_vocab()
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(instruct_tok, key, None)
        if token is not None and str(token) in vocab:
            setattr(new_tok, key, str(token))
    if getattr(instruct_tok, "chat_template", None) is not None:
        new_tok.chat_template = instruct_tok.chat_template
    return new_tok


def remap_config_ids(model: Any, old_tok: Any, new_tok: Any) -> dict[str, Any]:
    """Rewrite the special token ids of the model's config and generation config from ``old_tok``'s ids to
    ``new_tok``'s (by token string); returns them. ``VocabError`` for a token ``new_tok`` lacks."""
    from lmadapt.vocab.trim import CONFIG_TOKEN_KEYS

    vocab, out = new_tok.get_vocab(), {}
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in (*CONFIG_TOKEN_KEYS, "unk_token_id") if cfg is not None else ():
            value = getattr(cfg, key, None)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            tokens = old_tok.convert_ids_to_tokens(ids)
            lost = [f"{i} ({t!r})" for i, t in zip(ids, tokens) if t not in vocab]
            if lost:
                raise _vocab_error(f"the instruct model's {key} {', '.join(lost)} is not a token of the donor's "
                                   "tokenizer; give a donor whose tokenizer keeps the instruct model's special tokens")
            new = [vocab[t] for t in tokens]
            setattr(cfg, key, new if isinstance(value, list) else new[0])
            out[f"{type(cfg).__name__}.{key}"] = getattr(cfg, key)
    return out


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def _reasons(kept: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in kept.items() if n)


def _inspect(folder: Path) -> int:
    """Print what a folder written by ``lmadapt vocab`` holds (its JSON record)."""
    from lmadapt.jsonfile import read_json_object
    from lmadapt.vocab.expansion import RECORD_FILE, read_expansion

    if not folder.is_dir():
        raise _vocab_error(f"{folder} is not a folder; give one written by lmadapt vocab expand, trim or propagate")
    if (folder / RECORD_FILE).is_file():
        tok, rec = read_expansion(folder)
        tpw = rec.tokens_per_word
        words = ", ".join(repr(tok.convert_tokens_to_string([t.token])) for t in rec.new_tokens[:10])
        print(f"{folder}: vocabulary expansion of {rec.base_model}: {len(rec.new_tokens)} new token(s) after "
              f"{rec.old_tokens} old, init {rec.init} (seed {rec.seed})")
        print(f"  corpus: {rec.corpus.get('texts')} text(s), {rec.corpus.get('words')} words from "
              f"{', '.join(rec.corpus.get('files') or []) or '?'}")
        if tpw:
            print(f"  tokens per word: {tpw.get('before', 0):.3f} -> {tpw.get('after', 0):.3f}")
        print(f"  first new tokens: {words}")
    elif (folder / TRIM_REPORT).is_file():
        r = read_json_object(folder / TRIM_REPORT)
        check = r.get("held_out_check") or {}
        held = (f"{check['texts']} held-out text(s), {check.get('covered_share', 0):.1%} only kept tokens, all "
                "encoding the same" if check.get("texts") else "no held-out check")
        print(f"{folder}: trim of {r.get('base_model')}: {r.get('tokens_before')} -> {r.get('tokens_after')} tokens, "
              f"{r.get('params_saved', 0):,} parameters saved; {held}")
    elif (folder / LEP_REPORT).is_file():
        r = read_json_object(folder / LEP_REPORT)
        print(f"{folder}: LEP ({r.get('mode')}) of {r.get('donor_model')}'s vocabulary into {r.get('instruct_model')}"
              f": {r.get('tokens')} tokens, relative fit residual "
              + ", ".join(f"{k} {v:.2e}" for k, v in (r.get("residuals") or {}).items()))
    else:
        raise _vocab_error(f"{folder} has no {RECORD_FILE}, {TRIM_REPORT} or {LEP_REPORT}: it was not written by "
                             "lmadapt vocab expand, trim or propagate")
    return 0
