#!/usr/bin/env bash
# The whole GPU measurement of issue 16 in one run, under 8 minutes on an H200 (four timed parts):
#   batch 32 (the paper's) and batch 256, C = 50 and 500 classes, interleaved rounds, every mode eager
#   AND compiled in the same rounds: online teacher, offline RIL table, student-feature cache, and
#   device-resident replay (online store, offline store), plus the pure-step limits.
# Real-size random-weight models (ViT-L/14 teacher, ViT-B/32 student; nothing is downloaded).
# Writes benchmarks/results/speed_gpu_b{32,256}_c{50,500}.{json,log}; each JSON holds the commit it
# measured (FDBPL_COMMIT, else git) and its command. One part per (batch, C), each with its own time
# limit, so a slow compile cannot eat the others' time; a part stopped by its limit keeps the modes it
# finished (`partial_step_ms`). Compiled kernels are reused across parts through inductor's disk cache.
#
#   bash benchmarks/gpu_measurement.sh                    # COMPILE=reduce-overhead (CUDA graphs)
#   COMPILE=default bash benchmarks/gpu_measurement.sh    # plain torch.compile instead
set -u
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-benchmarks/results}
COMPILE=${COMPILE:-reduce-overhead}
PY=${PYTHON:-python}
COMMIT=${FDBPL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
started=$(date +%s)

part() {  # part LIMIT_S BATCH CLASSES STEPS WARMUP
    local name="speed_gpu_b$2_c$3"
    timeout "$1" $PY benchmarks/speed_real.py --batch "$2" --classes "$3" --rounds 2 --steps "$4" --warmup "$5" \
        --compile "$COMPILE" --commit "$COMMIT" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} at $(( $(date +%s) - started )) s" | tee -a "$OUT/$name.log"
}

part 120 32 50 10 4     # the paper's batch first
part 110 32 500 10 4
part 115 256 50 5 3
part 115 256 500 5 3
