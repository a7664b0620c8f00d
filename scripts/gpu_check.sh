#!/usr/bin/env bash
# One command on a fresh one-GPU machine, repo at cwd (target: under 5 minutes on one H100):
#
#   OUT=/tmp/out bash scripts/gpu_check.sh 2>&1 | tee /tmp/out/gpu_check.log
#
# Prints, each step timed: nvidia-smi -L; check (streams vs single on cuda: fp32, bf16 and fp64);
# 100 training steps of the single and of the streams layout on cuda, in fp32 and bf16; the bench's single and streams
# layouts against torchvision's AlexNet on that GPU in fp32 and bf16 (autocast); the link model fed the
# fp32 bench.json; and the split layout with two ranks on the one GPU over gloo (NCCL refuses two ranks
# on one device: "Duplicate GPU detected"; gloo's CUDA collectives stage through host memory, so its
# communication figures are not a GPU link's). Every command has a timeout, and the whole script a
# budget (GPU_CHECK_BUDGET, default 300 s: a step's timeout is cut to what is left, and steps past it
# are skipped and listed), so one failure cannot eat the 5 minutes; checks and training run first.
# Outputs go under ${OUT:-/tmp/out}.
#
# Dry run of everything but the GPU (catches typos; tiny sizes, cpu):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 GPU_CHECK_BUDGET=1800 OUT=/tmp/gpu-dry bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/out}
DEV=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ "$DEV" = cuda ]; then DEV0=cuda:0; else DEV0=$DEV; fi
if [ -n "${GPU_CHECK_TINY:-}" ]; then   # the dry run: 67 px, batch 4, few steps
  SIZE="--image-size 67"; BATCH=4; STEPS=1; WARM=1; TRAIN_STEPS=3; CHECK="--image-size 67 --batch-size 4 --steps 1"
  TRAIN="--train-size 64 --val-size 16 --batch-size 8"
else
  SIZE=""; BATCH=64; STEPS=10; WARM=2; TRAIN_STEPS=100; CHECK=""; TRAIN=""
fi
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-300}   # seconds for every step together; steps run in priority order

step() {  # step SECONDS NAME cmd...: echo, run with a timeout, time it, never stop the script
  local limit=$1 name=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))   # the whole script stays within BUDGET seconds
  if [ $left -lt 10 ]; then
    echo; echo "SKIPPED: $name (the ${BUDGET}s budget is spent)"; echo "$name,skipped,0" >> "$OUT/timings.csv"; return 0
  fi
  [ $limit -le $left ] || limit=$left
  echo; echo "=== $name  (timeout ${limit}s, t+$(( $(date +%s) - T0 ))s)"; echo "+ $*"
  local s=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  local ms=$(( ($(date +%s%N) - s) / 1000000 ))
  [ $rc -eq 0 ] || echo "FAILED: $name (exit $rc)"
  echo "=== $name: $(( ms / 1000 )).$(( ms % 1000 / 100 )) s, exit $rc"
  echo "$name,$rc,$ms" >> "$OUT/timings.csv"
  return 0
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEV, out $OUT, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "step,exit,ms" > "$OUT/timings.csv"
step 20 nvidia-smi nvidia-smi -L || true

# --- the environment: torch is preinstalled there; the package may not be installed
if ! $PY -c 'import torch' 2>/dev/null; then echo "FAILED: python cannot import torch ($PY)"; exit 1; fi
if ! $PY -c 'import split_alexnet, torchvision' 2>/dev/null; then
  step 120 pip-install $PY -m pip install -e . --no-deps
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step 60 versions $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'

# --- the CUDA tests of the suite (skipped on CPU): the fast LRN, single vs streams on one GPU, NCCL's refusal
if [ "$DEV" = cuda ]; then
  step 90 pytest-gpu $PY -m pytest -q -rs tests/test_lrn.py::test_cuda_matches_cpu \
    tests/test_layouts.py::test_single_and_streams_on_one_gpu tests/test_distributed.py::test_nccl_follows_the_hardware
fi

# --- streams equals single, on the device: fp32, bf16 (autocast: values in bf16, derivatives float64), fp64
for prec in fp32 bf16 fp64; do
  step 90 "check-$prec" $PY launch/check.py --device "$DEV0" --precision $prec $CHECK
done

# --- 100 training steps each (shapes data set, generated: no network), fp32 and bf16 (autocast);
# the last log line is the mean images/s and the final validation
for prec in fp32 bf16; do
  for layout in single streams; do
    step 75 "train-$layout-$prec" $PY launch/train.py --layout $layout --device "$DEV0" --precision $prec \
      --max-steps $TRAIN_STEPS --log-every $TRAIN_STEPS $TRAIN --out "$OUT/train-$layout-$prec"
  done
done

# --- the bench: single and streams against torchvision's AlexNet, fp32 and bf16 (autocast)
for prec in fp32 bf16; do
  step 150 "bench-$prec" $PY launch/bench.py --layouts single,streams,torchvision,torchvision-all --device "$DEV0" \
    --precision $prec --batch-size $BATCH --steps $STEPS --warmup $WARM $SIZE --out "$OUT/bench-$prec"
done
step 60 bench-profile $PY launch/bench.py --layouts single,torchvision --device "$DEV0" --batch-size $BATCH \
  --steps 2 --warmup 1 $SIZE --profile "$OUT/prof" --out "$OUT/bench-prof"

# --- two GPUs on paper, with this GPU's measured compute (streams/single rows)
step 30 link $PY launch/bench.py --link --link-from "$OUT/bench-fp32/bench.json" --batch-size $BATCH $SIZE --out "$OUT/link"

# --- the split with two ranks on this one GPU: NCCL refuses (one GPU per rank); gloo with CUDA tensors
step 150 bench-split-gloo-1gpu $PY -m torch.distributed.run --standalone --nproc_per_node=2 launch/bench.py \
  --backend gloo --device "$DEV" --layouts split,split-overlap --batch-size $BATCH --steps $STEPS --warmup $WARM \
  $SIZE --out "$OUT/bench-split-gloo"

echo; echo "gpu_check done in $(( $(date +%s) - T0 )) s; timings in $OUT/timings.csv:"; cat "$OUT/timings.csv"
