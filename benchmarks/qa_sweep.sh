#!/usr/bin/env bash
# Answer quality of every mode and codec on real QA rows, one JSON per run in results/,
# then the table: `qkvcomm report results/*.json`. ~3 min per run of 100 rows on a 2-core CPU.
# DATASETS, CODECS and N (rows) narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
QA=${QA:-../shared/data/qa}
N=${N:-100}
DATASETS=${DATASETS:-squad hotpotqa}
CODECS=${CODECS:-fp16 int8 seed-4 kivi-4 kivi-2}
run() { .venv/bin/qkvcomm eval --limit "$N" --json "results/$1.json" "${@:2}"; }
for data in $DATASETS; do
  field=context; [ "$data" = hotpotqa ] && field=context_gold
  run "$data-baseline" --data "$QA/$data.jsonl" --context-field "$field" --mode baseline
  run "$data-skyline" --data "$QA/$data.jsonl" --context-field "$field" --mode skyline
  for codec in $CODECS; do
    run "$data-kv-$codec" --data "$QA/$data.jsonl" --context-field "$field" --mode kv --codec "$codec"
  done
done
