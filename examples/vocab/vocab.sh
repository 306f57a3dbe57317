#!/usr/bin/env bash
# The three `lmadapt vocab` commands on the built-in SmolLM2-135M-Instruct (CPU, about a minute; nothing is
# downloaded). See docs/vocab.md and examples/vocab/README.md.
#
#   bash examples/vocab/vocab.sh                      # German sample text, outputs under runs/vocab/
#   bash examples/vocab/vocab.sh my_corpus.txt        # your own target-language text, one text per line
#   OUT=/tmp/vocab N=200 bash examples/vocab/vocab.sh big_corpus.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS="${1:-examples/vocab/de_sample.txt}"
OUT="${OUT:-runs/vocab}"
N="${N:-40}"
MODEL="${MODEL:-smollm2-135m-instruct}"

# 1. Expansion: N new tokens learned by continued BPE on the corpus, rows initialised by the merge rule.
#    Writes a full model folder + vocab_expansion.json (tokens per word before/after on the corpus).
lmadapt vocab expand --model "$MODEL" --corpus "$CORPUS" --n "$N" --init merge --output "$OUT/expanded" --overwrite

# 2. (Not run here.) Train the new rows on target text: the new_tokens method reads $OUT/expanded
#    (docs/methods/new_tokens.md, examples/methods/new_tokens.yaml); `lmadapt merge` then writes the trained donor.

# 3. Trimming to German + English: keep the tokens these texts use (plus special, byte and merge-path tokens).
#    --text-field prompt: the English texts are the "prompt" field of the topics data; .txt files ignore it.
#    10% of the texts are held out to check that kept text encodes to the same pieces.
lmadapt vocab trim --model "$MODEL" --corpus "$CORPUS" examples/data/topics_train.jsonl --text-field prompt \
    --output "$OUT/trimmed" --overwrite

# 4. LEP: carry the donor's new rows into an instruct model. No base/instruct pair of SmolLM2 ships offline, so the
#    instruct model stands in for the base as well (then P = identity up to rounding): this shows the plumbing only.
#    With a real pair: --base BASE --instruct INSTRUCT --donor (BASE expanded and trained).
lmadapt vocab propagate --base "$MODEL" --instruct "$MODEL" --donor "$OUT/expanded" --output "$OUT/propagated" \
    --overwrite

for folder in expanded trimmed propagated; do
    lmadapt vocab inspect "$OUT/$folder"
done
