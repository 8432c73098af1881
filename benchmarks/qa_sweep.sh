#!/usr/bin/env bash
# Answer quality of every mode and codec on real QA rows, one JSON per run in results/,
# then the table: `qkvcomm report results/*.json`. ~3 min per run of 100 rows on a 2-core CPU.
# DATASETS, REFERENCE (the text modes), CODECS and N (rows) narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
QA=${QA:-../shared/data/qa}
N=${N:-100}
DATASETS=${DATASETS:-squad hotpotqa}
REFERENCE=${REFERENCE-baseline skyline}
CODECS=${CODECS:-fp16 int8 seed-8 seed-6 seed-4 seed-adaptive kivi-4 kivi-3 kivi-2 budget-4 budget-3 tokenmix-4 tokenmix-3}
run() { .venv/bin/qkvcomm eval --limit "$N" --json "results/$1.json" "${@:2}"; }
for data in $DATASETS; do
  field=context; [ "$data" = hotpotqa ] && field=context_gold
  for mode in $REFERENCE; do
    run "$data-$mode" --data "$QA/$data.jsonl" --context-field "$field" --mode "$mode"
  done
  for codec in $CODECS; do
    run "$data-kv-$codec" --data "$QA/$data.jsonl" --context-field "$field" --mode kv --codec "$codec"
  done
done
