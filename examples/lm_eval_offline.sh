#!/usr/bin/env bash
# README's lm-evaluation-harness run, offline: a local rolling-log-likelihood task (the harness's
# `wikitext` task type) over a prepared corpus's test split, scored by the harness through the
# `allattn` model, then the same text scored by `allattn eval` for comparison.
#   documents  the test split cut at blank lines (tiny-shakespeare: one speech per document)
#   harness    bits_per_byte and byte/word perplexity over those documents, each read alone
#              (its first character predicted from a line break), so with less context than
#   allattn    `allattn eval --protocol independent`: every character of the split once, each
#              with the model's whole receptive field of the text before it
# Usage: bash examples/lm_eval_offline.sh RUN_DIR [DATA_DIR] [OUT]  (needs the lm-eval extra)
set -euo pipefail
run=${1:?usage: $0 RUN_DIR [DATA_DIR] [OUT]}
data=${2:-data/tiny-shakespeare}
out=${3:-$run/lm-eval}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out/task"
"$py" - "$data" "$out/task" <<'EOF'
import json, sys
from pathlib import Path
from allattn.data import load_corpus

corpus, task = load_corpus(sys.argv[1]), Path(sys.argv[2]).resolve()
text = corpus.vocab.decode(corpus.splits["test"].tolist())
documents = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
with (task / "documents.jsonl").open("w") as f:
    for document in documents:
        f.write(json.dumps({"page": document}) + "\n")
(task / "allattn_test_split.yaml").write_text(
    "task: allattn_test_split\n"
    "dataset_path: json\n"
    f"dataset_kwargs:\n  data_files:\n    test: {task / 'documents.jsonl'}\n"
    "test_split: test\noutput_type: loglikelihood_rolling\n"
    'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
    "  - metric: bits_per_byte\n"
)
print(f"{len(documents)} documents, {sum(map(len, documents)):,} characters")
EOF
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_DATASETS_CACHE="$out/cache" "$py" -m allattn lm-eval \
    --model_args "checkpoint=$run" --batch_size 8 --device cpu \
    --tasks allattn_test_split --include_path "$out/task" --output_path "$out/results"
"$py" -m allattn eval --checkpoint "$run" --data "$data" --split test --protocol independent
