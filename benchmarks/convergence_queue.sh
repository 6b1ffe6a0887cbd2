#!/bin/bash
# Runs convergence.py once per line of a queue file (its arguments), two at a time, niced;
# logs in benchmarks/results/conv_logs/. Usage: benchmarks/convergence_queue.sh QUEUE_FILE [PARALLEL]
queue=$(realpath "$1"); cd "$(dirname "$0")" || exit 1
export PYTHONPATH="$(cd .. && pwd)" HF_HUB_OFFLINE=1
PY=${PYTHON:-/work/main/.venv/bin/python}
grep -v "^\s*$" "$queue" | xargs -P "${2:-2}" -I{} bash -c \
  'out=$(echo "{}" | sed -E "s/.*--out [^ ]*\/([^ ]*)\.json.*/\1/"); nice -n 5 '"$PY"' convergence.py {} > results/conv_logs/$out.log 2>&1'
