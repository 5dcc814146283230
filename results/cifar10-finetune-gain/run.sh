#!/usr/bin/env bash
# MAE's fine-tuning gain on CIFAR-10 (JPEG q75): one MAE run against the same recipe from scratch
# at 100 %, 10 % and 1 % of the labels, with k-NN and the fast linear probe of the same encoder
# beside. Every job is one `mae-bench eval` call that appends its rows to $OUT/results.jsonl;
# a job whose log already ends in a finished table is skipped, so the script resumes.
#
#   RUN=/path/to/mae-run bash results/cifar10-finetune-gain/run.sh
#
# Environment (defaults in brackets):
#   RUN     the MAE pretraining run (folder) to evaluate       [required]
#   DATA    CIFAR-10 folder (train.tar.gz / test.tar.gz)        [../shared/data/cifar10-jpeg75]
#   OUT     results folder                                      [results/cifar10-finetune-gain]
#   SEEDS   seeds of the label subsets, heads and fine-tunes    ["0 1"]
#   FRACS   label fractions                                     ["1.0 0.1 0.01"]
#   EPOCHS  fine-tuning epochs per fraction, "frac:epochs ..."  ["1.0:8 0.1:40 0.01:100"]
#   FT_FRACS  label fractions that are also fine-tuned            [FRACS]
#   JOBS    jobs at once, one torch thread each                 [2]
#   SEEDS_FULL  seeds at 100 % of the labels (the costly ones)  [first of SEEDS]
set -euo pipefail
: "${RUN:?set RUN to the MAE run folder}"
DATA=${DATA:-../shared/data/cifar10-jpeg75}
OUT=${OUT:-results/cifar10-finetune-gain}
SEEDS=${SEEDS:-"0 1"}
FRACS=${FRACS:-"1.0 0.1 0.01"}
EPOCHS=${EPOCHS:-"1.0:8 0.1:40 0.01:100"}
FT_FRACS=${FT_FRACS:-$FRACS}
JOBS=${JOBS:-2}
SEEDS_FULL=${SEEDS_FULL:-${SEEDS%% *}}
mkdir -p "$OUT/logs"

epochs_for() {  # (never a non-zero status: set -e would end the job list early)
  for pair in $EPOCHS; do if [[ ${pair%%:*} == "$1" ]]; then echo "${pair##*:}"; fi; done
}

common="--dataset cifar10 --data-dir $DATA --results-dir $OUT --no-progress"
{
  # the cheap frozen-feature protocols first: k-NN and the fast probe of both encoders
  for seed in $SEEDS; do
    for frac in $FRACS; do
      for ck in "$RUN" "random --arch vit_mini_patch4"; do
        tag=$( [[ $ck == random* ]] && echo random || echo mae )
        if [[ $frac == 1.0 ]]; then
          [[ $seed == "${SEEDS_FULL%% *}" ]] || continue
          echo "knn-$tag-$frac-s$seed|--protocol knn --checkpoint $ck --seed $seed"
          echo "linear-$tag-$frac-s$seed|--protocol linear --checkpoint $ck --seed $seed"
        else
          echo "knn-$tag-$frac-s$seed|--protocol knn --checkpoint $ck --label-fraction $frac --seed $seed"
          echo "fewshot-$tag-$frac-s$seed|--protocol fewshot --checkpoint $ck --label-fraction $frac --seed $seed"
        fi
      done
    done
  done
  # then the fine-tunes, the cheapest fractions first
  for frac in $(echo "$FT_FRACS" | tr ' ' '\n' | sort -g); do
    ep=$(epochs_for "$frac")
    seeds=$SEEDS; [[ $frac == 1.0 ]] && seeds=$SEEDS_FULL
    for seed in $seeds; do
      for init in pretrained random; do
        echo "ft-$init-$frac-s$seed|--protocol finetune --checkpoint $RUN --init $init --label-fraction $frac --epochs $ep --seed $seed"
      done
    done
  done
} | while IFS='|' read -r name args; do
  log="$OUT/logs/$name.txt"
  if [[ -f $log ]] && grep -q "rows appended to" "$log"; then continue; fi
  printf '%s\0' "OMP_NUM_THREADS=1 /usr/bin/time -f 'wall %e s' mae-bench eval $args $common > $log 2>&1"
done | xargs -0 -P "$JOBS" -I{} bash -c {}
mae-bench results --results-dir "$OUT" --where metric=top1
