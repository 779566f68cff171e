#!/usr/bin/env bash
# Issue 20's GPU measurement in one device call (about 6 minutes on an H200 with its setup):
# step times at batch 32, C = 50 of the online, offline and cached modes (real-size random-weight
# ViT-L/14 teacher and ViT-B/32 student, bf16), eager variants first (the Trainer's step, then the
# fused step), then the step captured as one CUDA graph, then the captured step compiled with
# inductor (slowest to start, hence last and in its own time limit: a stopped part keeps the runs it
# finished in its JSON). Each JSON holds the commit measured and its command.
#
#   bash benchmarks/gpu_measurement.sh                   # writes benchmarks/results/step_gpu_b32_c50*.json
#   OUT_DIR=$OUT bash benchmarks/gpu_measurement.sh      # on the device machine (files under $OUT come back)
#
# The device image lacks some wheels: prepare them here with `bash ../shared/tools/device_wheels.sh`
# (into .whl/, carried with the run), and begin the device command with `bash .whl/device_setup.sh &&`.
# Set FDBPL_COMMIT where the checkout has no .git. The full benchmark (more modes, batch 256, C = 500,
# table builds) is `benchmarks/speed_real.py`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-benchmarks/results}
PY=${PYTHON:-python}
COMMIT=${FDBPL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
started=$(date +%s)

part() {  # part LIMIT_S NAME VARIANTS...
    local limit=$1 name=$2
    shift 2
    timeout "$limit" $PY benchmarks/step_gpu.py --batch 32 --classes 50 --variants "$@" --commit "$COMMIT" \
        --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} at $(( $(date +%s) - started )) s" | tee -a "$OUT/$name.log"
}

part 240 step_gpu_b32_c50 standard fused cuda_graph      # eager first, then the captured step
part 270 step_gpu_b32_c50_compiled cuda_graph_compiled   # inductor compiles: minutes
