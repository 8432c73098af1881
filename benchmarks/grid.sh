#!/usr/bin/env bash
# Run the eval lines of grid files, one result per line: `NAME ARGS...` -> results/NAME.json.
# A name that already has a result is skipped, so a stopped grid resumes where it was.
#   benchmarks/grid.sh benchmarks/grids/presets.txt [more grid files]
# JOBS: runs in parallel (default: one per core), each with cores/JOBS threads. On the 2-core
# CPU two 1-thread runs finish 1.6x the rows of one 2-thread run in the same time, with the same
# answers; several runs share one GPU well, the model is small.
# QA: the data folder ({qa} in the lines; default QKVCOMM_DATA_DIR, else data/qa). EVAL_FLAGS: added to every run, e.g.
# "--device cuda --dtype float32 --no-relevance". QKVCOMM: the command (default the venv's).
# Afterwards: `qkvcomm report results/*.json --out RESULTS.md`.
set -euo pipefail
cd "$(dirname "$0")/.."
export QA=${QA:-${QKVCOMM_DATA_DIR:-data/qa}} QKVCOMM=${QKVCOMM:-.venv/bin/qkvcomm} EVAL_FLAGS=${EVAL_FLAGS:-}
JOBS=${JOBS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))}
mkdir -p results logs
[ -f "$QA/squad_longctx.jsonl" ] || python3 data/qa/make_longctx.py --squad "$QA/squad.jsonl" --out "$QA/squad_longctx.jsonl"
grep -hv '^\s*\(#\|$\)' "$@" | while read -r name args; do
  [ -f "results/$name.json" ] || printf '%s %s\n' "$name" "${args//\{qa\}/$QA}"
done | xargs -P "$JOBS" -L 1 sh -c '
  name=$1; shift
  if $QKVCOMM eval --json "results/$name.json" $EVAL_FLAGS "$@" > "logs/$name.log" 2>&1
  then echo "$(date +%T) done $name: $(tail -1 "logs/$name.log")"
  else echo "$(date +%T) FAILED $name (logs/$name.log)"; fi' sh
