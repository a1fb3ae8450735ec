#!/usr/bin/env bash
# The benchmark set behind docs/PERFORMANCE.md. Writes JSON to benchmarks/results/ and prints
# the tables. About 10 minutes on a 2-core machine. Run from anywhere: bash benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A="${ALLATTN:-.venv/bin/allattn}"
mkdir -p benchmarks/results
"$A" bench layer --out benchmarks/results/layer_kept.json
"$A" bench layer --default-allocator --out benchmarks/results/layer_default.json
"$A" bench train-step --preset tiny --model.n_layers 4 --model.d_model 512 \
    --model.n_persistent 1024 --model.attn_span 1024 --model.span_init 1.0 \
    --train.block_size 512 --train.batch_size 4 --steps 4 --compare \
    --out benchmarks/results/train_step_d512.json
"$A" bench train-step --preset tiny --steps 20 --compare --out benchmarks/results/train_step_tiny.json
# bfloat16 autocast against float32, eager and under --runtime.compile: the chunked layer at
# `paper` size, the d 512 step (two rounds), and the tiny step compiled against eager
"$A" bench layer --sizes paper --impls chunked --precisions fp32,bf16 --compile false,true \
    --out benchmarks/results/layer_precision_compile.json
D512=(--preset tiny --model.n_layers 4 --model.d_model 512 --model.n_persistent 1024
    --model.attn_span 1024 --model.span_init 1.0 --train.block_size 512 --train.batch_size 4)
for round in 1 2; do
    for case in "fp32 false" "bf16 false" "bf16 true" "fp32 true"; do
        set -- $case
        "$A" bench train-step "${D512[@]}" --steps 3 --runtime.precision "$1" \
            --runtime.compile "$2" --out "benchmarks/results/train_step_d512_${1}_compile_${2}_${round}.json"
    done
done
for compile in false true; do
    "$A" bench train-step --preset tiny --steps 20 --runtime.compile "$compile" \
        --out "benchmarks/results/train_step_tiny_compile_${compile}.json"
done
# training quality at bf16 against fp32 (and fp32 with the dense kernel: rounding alone), three
# seeds of `tiny`: about 20 minutes, so not run here:
#   .venv/bin/python benchmarks/precision_quality.py --seeds 0,1,2
# generation: incremental decoding against recomputing the window, spans at their full length
"$A" bench generate --preset tiny --model.span_init 1.0 --out benchmarks/results/generate_tiny.json
"$A" bench generate --preset enwik8_small --model.attn_span 1024 --model.span_init 1.0 \
    --out benchmarks/results/generate_18l.json
