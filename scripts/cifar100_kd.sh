#!/usr/bin/env bash
# Reproduce the classic CIFAR-100 KD table (resnet32x4 -> resnet8x4, mdistiller recipe) on
# a GPU machine. Needs the CIFAR-100 python files and the resnet32x4 teacher on disk:
#   CIFAR=/data/cifar-100-python TEACHER=/ckpt/resnet32x4_vanilla/ckpt_epoch_240.pth \
#     bash scripts/cifar100_kd.sh [seed ...]
# Each run resumes by itself if restarted. Add hydra/launcher=submitit_slurm with -m to run
# the same sweep on SLURM (pip install "distillkit[slurm]").
# Published (mdistiller): student 72.50, KD 73.33, DKD 76.32 top-1.
set -euo pipefail
: "${CIFAR:?set CIFAR to the cifar-100-python folder}"
: "${TEACHER:?set TEACHER to the resnet32x4 checkpoint}"
SEEDS=("${@:-0}")
for seed in "${SEEDS[@]}"; do
  distill experiment=cifar100_student dataset.data_dir="$CIFAR" seed="$seed"
  distill experiment=cifar100_kd dataset.data_dir="$CIFAR" teacher.checkpoint="$TEACHER" seed="$seed"
  distill experiment=cifar100_dkd dataset.data_dir="$CIFAR" teacher.checkpoint="$TEACHER" seed="$seed"
done
for exp in cifar100_student cifar100_kd cifar100_dkd; do
  for f in runs/"$exp"/*/results.json; do
    printf '%s\t%s\t' "$exp" "$(dirname "$f")"
    python -c 'import json,sys; r=json.load(open(sys.argv[1])); print("test/acc=%.2f%%" % (100*r["test/acc"]))' "$f"
  done
done
