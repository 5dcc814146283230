#!/usr/bin/env bash
# Outside encoders on CIFAR-10 (JPEG q75): k-NN and the fast linear probe of models that mae-bench
# did not train, through `eval --checkpoint timm:... / hf:...`, beside the mae-bench run they are
# compared with. Every job is one `mae-bench eval` call that appends its rows to $OUT/results.jsonl;
# a job whose log already ends in a finished table is skipped, so the script resumes. k-NN and
# the probe of one encoder share one feature extraction (the feature cache).
#
#   RUN=/path/to/mae-run bash results/outside-encoders-cifar10/run.sh
#
# Environment (defaults in brackets):
#   RUN      a mae-bench pretraining run on CIFAR-10, exported and evaluated back   [required]
#   DATA     CIFAR-10 folder (train.tar.gz / test.tar.gz)     [../shared/data/cifar10-jpeg75]
#   OUT      results folder                                    [results/outside-encoders-cifar10]
#   EXPORTS  where the exported models go (weights: never committed)   [/tmp/mae-bench-exports]
#   ONLY     run only the jobs whose tag contains this          [all]
set -euo pipefail
: "${RUN:?set RUN to the mae-bench run folder}"
DATA=${DATA:-../shared/data/cifar10-jpeg75}
OUT=${OUT:-results/outside-encoders-cifar10}
EXPORTS=${EXPORTS:-/tmp/mae-bench-exports}
ONLY=${ONLY:-}
mkdir -p "$OUT/logs" "$EXPORTS"

# The run, exported to both formats when a job first needs it (each export is loaded back and
# checked against mae-bench's features before its folder is put in place); kept once it exists.
export_once() {
  [[ -d $EXPORTS/mae-$1 ]] || mae-bench export "$RUN" --to "$1" --out "$EXPORTS/mae-$1" \
      > "$OUT/logs/export-$1.txt" 2>&1
}

jobs_list() {
  for p in knn linear; do
    echo "$p-timm-resnet18|--protocol $p --checkpoint timm:resnet18"
    echo "$p-timm-vit_tiny_patch16_224|--protocol $p --checkpoint timm:vit_tiny_patch16_224"
    echo "$p-mae-native|--protocol $p --checkpoint $RUN"
    echo "$p-mae-via-timm|--protocol $p --checkpoint timm:$EXPORTS/mae-timm"
    echo "$p-mae-via-hf|--protocol $p --checkpoint hf:$EXPORTS/mae-hf"
    echo "$p-random-vit_mini_patch4|--protocol $p --checkpoint random --arch vit_mini_patch4"
  done
}

common="--dataset cifar10 --data-dir $DATA --results-dir $OUT --no-progress"
jobs_list | while IFS='|' read -r tag args; do
  [[ -z $ONLY || $tag == *"$ONLY"* ]] || continue
  log="$OUT/logs/$tag.txt"
  if [[ -f $log ]] && grep -q "rows appended to" "$log"; then
    echo "skip $tag (done)"; continue
  fi
  case $tag in *via-timm) export_once timm ;; *via-hf) export_once hf ;; esac
  echo "run  $tag"
  start=$(date +%s)
  # shellcheck disable=SC2086
  { echo "\$ mae-bench eval $args $common"; mae-bench eval $args $common; } > "$log" 2>&1
  echo "     $tag: $(( $(date +%s) - start )) s"
done
