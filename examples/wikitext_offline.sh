#!/usr/bin/env bash
# README's word-level run: a small all-attention model and its FF twin, trained on real
# WikiText-103 text without the (offline unavailable) training split.
#   train  the first ~90% of wiki.valid.tokens, cut at an article title
#   valid  the rest of wiki.valid.tokens (validation during training)
#   test   wiki.test.tokens, scored at the end
# The vocabulary is that training part's words (count order, DESIGN §2.8); test (and valid)
# words it lacks are scored as WikiText's own `<unk>` (`prepare --unknown-as '<unk>'`).
# Usage: bash examples/wikitext_offline.sh DIR [OUT]   DIR holds wiki.{valid,test}.tokens.gz
set -euo pipefail
src=${1:?usage: $0 DIR_WITH_wiki.valid.tokens.gz_AND_wiki.test.tokens.gz [OUT]}
out=${2:-runs/wikitext-offline}
py=${PYTHON:-.venv/bin/python}
data=$out/data
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
zcat "$src/wiki.valid.tokens.gz" >"$work/valid"
lines=$(wc -l <"$work/valid")
cut=$(grep -n '^ = [^=]' "$work/valid" | awk -F: -v n="$lines" '$1 <= 0.9 * n { c = $1 } END { print c }')
head -n $((cut - 1)) "$work/valid" >"$work/wiki.train.tokens"
tail -n +"$cut" "$work/valid" >"$work/wiki.valid.tokens"
zcat "$src/wiki.test.tokens.gz" >"$work/wiki.test.tokens"
# --no-verify: the training file here is not the official wiki.train.tokens.
"$py" -m allattn prepare wikitext-103 --source "$work" --out "$data" --unknown-as '<unk>' \
    --no-verify --force
for preset in wt_small wt_small_ff; do
    start=$(date +%s)
    "$py" -m allattn train --preset "$preset" --data "$data" --out "$out/$preset" --force --no-progress
    "$py" -m allattn eval --checkpoint "$out/$preset" --split test --json | tee "$out/$preset/test.json"
    echo "$preset: $(( $(date +%s) - start )) s (training and evaluation)"
done
