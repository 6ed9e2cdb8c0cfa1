#!/usr/bin/env bash
# The runs behind BENCHMARKS.md section 5.1 (issue 42): classical x1/x1.25/x1.5/x2 and deepopt at
# budgets 1/1.25/1.5/2 on the zoo's cheap setups (5 seeds) and the setups with headroom (3 seeds),
# one thread, one process at a time; resumable (finished runs are skipped).
# and the zoo's other setups (the rest stage, 5 seeds, seed by seed).
# Run from the repository's root: bash benchmarks/scripts/budget_runs.sh [cheap|headroom|cost|announced|rest|radius|radius-more|all]
# (CHEAP_SEEDS, SEEDS: the seeds of the cheap and headroom stages; the defaults are 0-4 and 0-2)
set -euo pipefail
OUT=benchmarks/results/budget/zoo-budget.jsonl
DATA=${CIFAR:-../shared/data/cifar10-jpeg.tar}
CHEAP="noisy4-mlp-sgdm-none mnist1d-mlp-sgdm-step mnist1d-gru-adam-plateau mnist1d-lstm-rmsprop-none
       mnist1d-cnn-adamw-cosine friedman-mlp-sgdm-cosine diabetes-mlp-adam-none breast-mlp-rmsprop-none"
HEADROOM="cifar-resnet-aug-sgdm-cosine cifar-vit-adamw-warmcos pydoc-charlm-adamw-warmcos"
REST="breast-mlp-sgdm-cosine friedman-mlp-adamw-onecycle digits-mlp-adam-none digits-cnnbn-sgd-none
      mnist1d-cnnbn-nesterov-onecycle digits-transformer-adam-none mnist1d-transformer-adamw-warmup
      mnist1d-mlpdrop-sgd-none mnist1d-resnet-sgdm-multistep cifar-seednet6-sgdm-drops cifar-resnet-adam-cosine
      cifar-cnn-sgdm-none"
CLASSICAL="classical classical-x1.25 classical-x1.5 classical-x2"
DEEPOPT=(deepopt 'deepopt:{"budget": 1.25}' 'deepopt:{"budget": 1.5}' 'deepopt:{"budget": 2}')
# the same budgets where the loop tells deepopt the run's length (optimizer.total_steps = steps):
# the setups whose schedule announces none (constant LR, LambdaLR warm-ups, StepLR)
ANNOUNCED=('deepopt:{"budget": 1.25, "announce_length": true}' 'deepopt:{"budget": 1.5, "announce_length": true}'
           'deepopt:{"budget": 2, "announce_length": true}')
UNANNOUNCED="noisy4-mlp-sgdm-none mnist1d-lstm-rmsprop-none diabetes-mlp-adam-none breast-mlp-rmsprop-none
             mnist1d-mlp-sgdm-step"
# budget 1.5 at other radii, at full radius from its first step (no 1,000-step ramp), and ASAM's scale-adaptive radius (Kwon et al., ICML 2021: rho 0.5-1
# on CIFAR): chosen on the validation split (BENCHMARKS.md, section 5.2)
RADII=()
for r in 0.02 0.1 0.2; do RADII+=('deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":'$r'}]}'); done
for r in 0.05 0.1; do RADII+=('deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":'$r',"warmup":0}]}'); done
for r in 0.5 1.0; do RADII+=('deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":'$r',"adaptive":true}]}'); done
# and periodic SAM (two passes every 3rd step from the start: a share of 1/3, whatever the schedule)
RADII+=('deepopt:{"experimental":[{"class":"TwoPassSAM","rho":0.05,"warmup":1000,"every":3}]}')
# radius-more: the screen's closest variants where SAM steps run at 1.5 but the cheap stage's
# budget does not (the setups with headroom, 3 seeds; the no-end setups with their length announced)
CLOSEST=('deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.1,"warmup":0}]}'
         'deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.1}]}'
         'deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.2}]}'
         'deepopt:{"experimental":[{"class":"BudgetSAM","budget":1.5,"rho":0.5,"adaptive":true}]}')
CLOSEST_TOLD=()
for m in "${CLOSEST[@]}"; do CLOSEST_TOLD+=("${m%\}}, \"announce_length\": true}"); done
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
    --setups $CHEAP $HEADROOM $REST --modes "${DEEPOPT[@]}"
fi
if [[ $what == announced || $what == all ]]; then
  zoo --setups $UNANNOUNCED --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes "${ANNOUNCED[@]}"
fi
if [[ $what == rest || $what == all ]]; then
  for seed in ${CHEAP_SEEDS:-0 1 2 3 4}; do
    zoo --setups $REST --seeds $seed --modes $CLASSICAL "${DEEPOPT[@]}"
  done
fi
if [[ $what == radius || $what == all ]]; then
  zoo --setups $CHEAP --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes "${RADII[@]}"
fi
if [[ $what == radius-more || $what == all ]]; then
  for seed in ${SEEDS:-0 1 2}; do
    zoo --setups $HEADROOM --seeds $seed --modes "${CLOSEST[@]}"
  done
  zoo --setups $UNANNOUNCED --seeds ${CHEAP_SEEDS:-0 1 2 3 4} --modes "${CLOSEST_TOLD[@]}"
fi
