#!/bin/bash
# Runs convergence.py once per line of a queue file (each line: its arguments, with --out), with
# WORKERS processes at a time, niced; logs in benchmarks/results/conv_logs/. Lines may be appended
# while it runs: each worker claims the next line whose run is neither finished nor claimed.
#   benchmarks/convergence_queue.sh benchmarks/results/conv_queue.txt [WORKERS]
queue=$(realpath "$1"); workers=${2:-2}
cd "$(dirname "$0")" || exit 1
export PYTHONPATH="$(cd .. && pwd)" HF_HUB_OFFLINE=1
PY=${PYTHON:-/work/main/.venv/bin/python}
mkdir -p results/conv_logs
worker() {
  while true; do
    local line="" name
    while IFS= read -r candidate; do
      [[ -z "${candidate// }" || "$candidate" == \#* ]] && continue
      name=$(sed -E 's/.*--out [^ ]*\/([^ ]*)\.json.*/\1/' <<< "$candidate")
      [[ -e "results/$name.json" ]] && continue
      mkdir "results/conv_logs/$name.claim" 2>/dev/null || continue
      line=$candidate; break
    done < "$queue"
    [[ -z "$line" ]] && return
    # shellcheck disable=SC2086
    nice -n 5 "$PY" convergence.py $line > "results/conv_logs/$name.log" 2>&1
    rmdir "results/conv_logs/$name.claim"
  done
}
for _ in $(seq "$workers"); do worker & done
wait
