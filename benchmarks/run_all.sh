#!/usr/bin/env bash
# The benchmark set behind docs/PERFORMANCE.md. Writes JSON to benchmarks/results/ and prints
# the tables. About 5 minutes on a 2-core machine. Run from anywhere: bash benchmarks/run_all.sh
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
# bfloat16 autocast against float32: the chunked layer at `paper` size, and the d 512 step
"$A" bench layer --sizes paper --precisions fp32,bf16 --out benchmarks/results/layer_bf16.json
D512=(--preset tiny --model.n_layers 4 --model.d_model 512 --model.n_persistent 1024
    --model.attn_span 1024 --model.span_init 1.0 --train.block_size 512 --train.batch_size 4)
for precision in fp32 bf16; do
    "$A" bench train-step "${D512[@]}" --steps 3 --runtime.precision "$precision" \
        --out "benchmarks/results/train_step_d512_${precision}.json"
done
# generation: incremental decoding against recomputing the window, spans at their full length
"$A" bench generate --preset tiny --model.span_init 1.0 --out benchmarks/results/generate_tiny.json
"$A" bench generate --preset enwik8_small --model.attn_span 1024 --model.span_init 1.0 \
    --out benchmarks/results/generate_18l.json
