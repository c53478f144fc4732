#!/bin/sh
# Learning rate from the paper's grid {1e-4, 8e-5, 5e-5, 2e-5}, chosen on the validation loss of
# a uniform emulator's adapter on PIQA: 100 steps over 2000 training docs, 128 held-out training
# docs for the validation loss; no evaluation item is used. The emulator is the one an offsite
# run builds (default: `make demo`'s); results in benchmarks/results/offsite_smollm2.md.
#
#     sh benchmarks/lr_sweep.sh [EMULATOR_DIR] [OUT_DIR]
set -eu
EMULATOR=${1:-runs/demo/piqa/uniform/emulator}
OUT=${2:-runs/lr_sweep}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for lr in 1e-4 8e-5 5e-5 2e-5; do
  .venv/bin/crashlm train --emulator "$EMULATOR" --task piqa \
    --train-samples 2000 --val-samples 128 --max-steps 100 --eval-every 50 --lr "$lr" --batch-size 8 \
    --max-length 96 --seed 1 --out "$OUT/lr$lr"
done
