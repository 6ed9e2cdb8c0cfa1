#!/usr/bin/env bash
# The runs behind BENCHMARKS.md section 5.1 (issue 42): classical x1/x1.25/x1.5/x2 and deepopt at
# budgets 1/1.25/1.5/2 on the zoo's cheap setups (5 seeds) and the setups with headroom (3 seeds),
# one thread, one process at a time; resumable (finished runs are skipped).
# Run from the repository's root: bash benchmarks/scripts/budget_runs.sh [cheap|headroom|cost|announced|all]
# (CHEAP_SEEDS, SEEDS: the seeds of the cheap and headroom stages; the defaults are 0-4 and 0-2)
set -euo pipefail
OUT=benchmarks/results/budget/zoo-budget.jsonl
DATA=${CIFAR:-../shared/data/cifar10-jpeg.tar}
CHEAP="noisy4-mlp-sgdm-none mnist1d-mlp-sgdm-step mnist1d-gru-adam-plateau mnist1d-lstm-rmsprop-none
       mnist1d-cnn-adamw-cosine friedman-mlp-sgdm-cosine diabetes-mlp-adam-none breast-mlp-rmsprop-none"
HEADROOM="cifar-resnet-aug-sgdm-cosine cifar-vit-adamw-warmcos pydoc-charlm-adamw-warmcos"
CLASSICAL="classical classical-x1.25 classical-x1.5 classical-x2"
DEEPOPT=(deepopt 'deepopt:{"budget": 1.25}' 'deepopt:{"budget": 1.5}' 'deepopt:{"budget": 2}')
# the same budgets where the loop tells deepopt the run's length (optimizer.total_steps = steps):
# the setups whose schedule announces none (constant LR, LambdaLR warm-ups, StepLR)
ANNOUNCED=('deepopt:{"budget": 1.25, "announce_length": true}' 'deepopt:{"budget": 1.5, "announce_length": true}'
           'deepopt:{"budget": 2, "announce_length": true}')
UNANNOUNCED="noisy4-mlp-sgdm-none mnist1d-lstm-rmsprop-none diabetes-mlp-adam-none breast-mlp-rmsprop-none
             mnist1d-mlp-sgdm-step"
zoo() { python -m benchmarks zoo --observers --threads 1 --out "$OUT" --data "$DATA" "$@"; }
what=${1:-all}
if [[ $what == cheap || $what == all ]]; then
  zoo --setups $CHEAP --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes $CLASSICAL
  zoo --setups $CHEAP --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes "${DEEPOPT[@]}"
fi
if [[ $what == headroom || $what == all ]]; then
  for seed in ${SEEDS:-0 1 2}; do  # seed by seed: a cut-short run leaves whole seeds
    zoo --setups $HEADROOM --seeds $seed --modes $CLASSICAL "${DEEPOPT[@]}"
  done
fi
if [[ $what == cost || $what == all ]]; then
  python -m benchmarks zoo --cost --threads 1 --data "$DATA" --out benchmarks/results/budget/zoo-budget-cost.jsonl \
    --setups $CHEAP $HEADROOM --modes "${DEEPOPT[@]}"
fi
if [[ $what == announced || $what == all ]]; then
  zoo --setups $UNANNOUNCED --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes "${ANNOUNCED[@]}"
fi
