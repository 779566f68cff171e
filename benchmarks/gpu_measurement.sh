#!/usr/bin/env bash
# The whole GPU measurement of issue 20 in ONE device call (an H200: one `run`, timeout_s=600).
#
# 1. Prepare here, in the project root (.venv installed; ../shared/tools beside the checkout):
#        bash ../shared/tools/device_wheels.sh && git rev-parse HEAD > .whl/commit
#    (the device machine has no .git: the commit measured travels in .whl/commit; commit first)
# 2. The device call, exactly (carry [".whl"], timeout_s 600):
#        bash .whl/device_setup.sh && FDBPL_COMMIT=$(cat .whl/commit) OUT_DIR=$OUT bash benchmarks/gpu_measurement.sh
# 3. Copy the files it returns (from $OUT) into benchmarks/results/ and commit them.
#
# Timeline (TOTAL_S=540 s from this script's start; the wheels' setup took ~35 s before it):
#   eager   : builds vs bare models, then b32 C=50, b256 C=50, b32 C=500, every mode in 2 rounds
#             (~240 s by the step times measured on H200s; limit EAGER_S=330 s)
#   tuned   : the best configuration, TUNED_ARGS (default: the captured step, "--train_arg
#             train_step=cuda_graph", for every mode, the online baseline included; TUNED_ARGS= skips
#             the stage), configs TUNED_CONFIGS
#   compiled: COMPILE=reduce-overhead (CUDA graphs; "default" = plain torch.compile, "none" skips it),
#             b32 C=50 only, online first (the baseline gets what the others get), one round, in the time left
#   goals   : benchmarks/speed_goals.py over every JSON: PASS / MISS / INCOMPLETE / NOT MEASURED lines
# Every stage has its own time limit and writes its JSON after every mode run, so a compile that runs
# long never eats the eager figures. Files (<= 8, as the device tool returns them): speed_gpu_eager.json
# and .log, speed_gpu_tuned.json and .log, speed_gpu_compiled.json and .log, speed_gpu_goals.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-benchmarks/results}
PY=${PYTHON:-python3}
COMPILE=${COMPILE:-reduce-overhead}
TOTAL_S=${TOTAL_S:-540}
EAGER_S=${EAGER_S:-330}
EAGER_CONFIGS=${EAGER_CONFIGS:-"32x50 256x50 32x500"}
TUNED_ARGS=${TUNED_ARGS-"--train_arg train_step=cuda_graph"}
TUNED_CONFIGS=${TUNED_CONFIGS:-"32x50 256x50"}
COMPILED_CONFIGS=${COMPILED_CONFIGS:-"32x50"}
EXTRA=${EXTRA_ARGS:-}   # e.g. "--device cpu --size small --quick" for a smoke run
COMMIT=${FDBPL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
# the checkout first; /tmp/site holds the wheels when device_setup.sh could not install them in place
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
deadline=$((started + TOTAL_S))
left() { echo $((deadline - $(date +%s))); }
if [[ "$EXTRA" != *"--device cpu"* ]]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
fi

stage() {  # stage NAME LIMIT_S ARGS...: one speed_real.py process with its own time limit
  local name=$1 limit=$2; shift 2
  if (( limit < 20 )); then echo "stage $name skipped: $limit s left" | tee "$OUT/speed_gpu_$name.log"; return; fi
  echo "stage $name: limit $limit s, $(left) s left in all"
  timeout --kill-after=10 "$limit" $PY benchmarks/speed_real.py --variant "$name" --commit "$COMMIT" \
      --json "$OUT/speed_gpu_$name.json" "$@" $EXTRA 2>&1 | tee "$OUT/speed_gpu_$name.log"
  echo "stage $name: exit ${PIPESTATUS[0]} at $(( $(date +%s) - started )) s" | tee -a "$OUT/speed_gpu_$name.log"
}

min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }

# shellcheck disable=SC2086  # word splitting of the config lists is meant
stage eager "$(min "$EAGER_S" $(( $(left) - 60 )))" --builds --configs $EAGER_CONFIGS
if [ -n "$TUNED_ARGS" ]; then
  share=$(( $(left) - 15 )); [ "$COMPILE" != none ] && share=$(( share / 2 ))
  # shellcheck disable=SC2086
  stage tuned "$share" --configs $TUNED_CONFIGS --no-pieces $TUNED_ARGS
fi
if [ "$COMPILE" != none ]; then
  compile_args=(--compile)
  [ "$COMPILE" != default ] && compile_args+=("$COMPILE")
  # shellcheck disable=SC2086
  stage compiled $(( $(left) - 15 )) "${compile_args[@]}" --configs $COMPILED_CONFIGS --rounds 1 --no-pieces \
      --modes online offline cached "cached workers" "pure student step" "pure text step"
fi
$PY benchmarks/speed_goals.py "$OUT"/speed_gpu_*.json | tee "$OUT/speed_gpu_goals.md"
echo "done in $(( $(date +%s) - started )) s"
# The pure steps without Trainer or data, variant by variant (standard, fused, captured): benchmarks/step_gpu.py.
