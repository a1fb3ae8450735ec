#!/usr/bin/env bash
# The whole reproduction study: every claim over 3 seeds, then the report (docs/REPRODUCTION.md).
#   bash reproduction/run_all.sh           the study (sized for about 2 hours on 2 CPU cores)
#   bash reproduction/run_all.sh --quick   a few steps per run (minutes): checks the machinery
# Extra arguments (--data DIR, --seeds 0,1,2) go to every claim script. Finished runs are kept
# in reproduction/results/, so a second call continues an interrupted study.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
quick=()
for arg in "$@"; do [[ $arg == --quick ]] && quick=(--quick); done
start=$(date +%s)
for claim in claim1_matches_transformer claim2_no_memory claim3_n_sweep claim4_integration; do
    "$PY" "$claim.py" "$@"
done
machine="$(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$PY" collect.py "${quick[@]}" --seconds $(( $(date +%s) - start )) --machine "$machine"
