#!/usr/bin/env bash
# Offsite-tuning through a hand-written plan, on one task, with the offsite table's budget: build the
# emulator of the kept layers (no sharing), train its adapter (layers 0, 1, L-2, L-1) per seed, plug
# it into the full model and evaluate. Outputs: OUT/emulator, OUT/seed<S>/{adapter,plugin.json}.
# Compare with a run directory's rows item by item:
#   benchmarks/task_gains.py RUN_DIR --column TASK --paired OUT,greedy
#
#   benchmarks/plan_transfer.sh "0,1,...,29" runs/plan_transfer/NAME [TASK] [MODEL] [SEEDS]
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 KEPT_LAYERS OUT [TASK=arc_easy] [MODEL=smollm2-135m] [SEEDS=1,2,3]" >&2
    exit 2
fi
KEPT=$1 OUT=$2 TASK=${3:-arc_easy} MODEL=${4:-smollm2-135m} SEEDS=${5:-1,2,3}
BIN=$(dirname "$0")/../.venv/bin
LAYERS=$("$BIN/python" -c "from crashlm.core.models import load_config; print(load_config('$MODEL').num_hidden_layers)")
mkdir -p "$OUT"
"$BIN/python" - "$KEPT" "$LAYERS" "$OUT/plan.json" <<'PY'
import sys
from crashlm.emulators.plans import LayerPlan
kept, layers = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
LayerPlan(layers, "custom", kept, [0, 1, layers - 2, layers - 1]).save(sys.argv[3])
PY
[ -d "$OUT/emulator" ] || "$BIN/crashlm" emulator --model "$MODEL" --plan "$OUT/plan.json" --strategy uniform \
    --out "$OUT/emulator"
for SEED in ${SEEDS//,/ }; do
    D=$OUT/seed$SEED
    [ -d "$D/adapter" ] || "$BIN/crashlm" train --emulator "$OUT/emulator" --task "$TASK" --train-samples 300 \
        --val-samples 64 --epochs 1 --lr 1e-4 --batch-size 8 --max-length 96 --seed "$SEED" --out "$D/adapter"
    [ -f "$D/plugin.json" ] || "$BIN/crashlm" eval --tasks "$TASK" --model "$MODEL" --adapter "$D/adapter" \
        --limit 100 --max-length 96 --out "$D/plugin.json"
done
