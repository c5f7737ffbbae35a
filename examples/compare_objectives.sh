#!/usr/bin/env bash
# docs/RESULTS.md's measurement: the four objectives trained on the photo scenes' train split at
# equal images seen (STEPS steps of the tiny preset's batch of 32), for each seed of SEEDS; each
# run's teacher and student evaluated beside random init and the controls (docs/EVALUATION.md);
# then each objective's seeds combined (intervals over seeds and test images). About 50 minutes
# of training and 30 of evaluation on 2 CPU cores for the defaults (docs/RESULTS.md).
#   bash examples/compare_objectives.sh                 # STEPS=250 SEEDS="0 1 2" OUT=runs/compare
# A run already evaluated is kept, so an interrupted comparison continues where it stopped.
set -euo pipefail
STEPS=${STEPS:-250}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-runs/compare}
OBJECTIVES="loca densecl gtsa mmc"
for seed in $SEEDS; do
    for objective in $OBJECTIVES; do
        run="$OUT/$objective-seed$seed"
        [ -f "$run/eval.json" ] && continue
        python -m loca_train --objective "$objective" --scenes photos --steps "$STEPS" --seed "$seed" \
            --output-dir "$run" --overwrite --no-progress
        python -m loca_train.evaluate --run-dir "$run" > "$run/eval.txt"
    done
done
for objective in $OBJECTIVES; do
    python -m loca_train.evaluate --combine "$OUT/$objective"-seed*/eval.json --output "$OUT/$objective.json" \
        > "$OUT/$objective.txt"
done
