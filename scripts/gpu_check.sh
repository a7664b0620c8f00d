#!/usr/bin/env bash
# One command on a fresh one-GPU machine, repo at cwd (under 10 minutes; the budget below):
#
#   bash scripts/gpu_check.sh                       # output in docs/results/<gpu>-<date>/ (commit it)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # the dry run: every step, tiny, on CPU over gloo
#   bash scripts/gpu_check.sh --dry-run             # the same
#
# Every step, timed, in priority order: nvidia-smi; versions; the suite's CUDA tests; the comm Functions
# at world size 1 under NCCL, forced through them (scripts/comm_world1.py); the check under NCCL with one
# process and one stream (torchrun --nproc_per_node=1 launch/check.py --streams 1); the check of streams
# against single on the device in fp32, bf16 and fp64; training steps under
# torch.cuda.set_sync_debug_mode("error") (launch/train.py --sync-debug: no host synchronisation inside a
# step); the graph count of the single layout (torch._dynamo.explain, scripts/graph_count.py); the bench's
# sweep (batch 64, 128, 256, ... until out of memory; 30 measured steps; single against torchvision's
# AlexNet, and the device's bound) in fp32 and in bf16; a profiled bench (the LRN share on the device's
# clock); training of the single and streams layouts in fp32 and bf16; the link model fed the fp32
# bench.json; the split with two ranks on the one GPU over gloo (NCCL refuses two ranks on one
# device: "Duplicate GPU detected"; gloo's CUDA collectives stage through host memory, so its
# communication figures are not a GPU link's); and the data path (scripts/gpu_data_check.sh: GPU JPEG
# decoding, a JPEG-folder training run at batch 256), last, in what the budget leaves.
#
# The whole output goes to $OUT, by default docs/results/<gpu>-<date>/ (the GPU's name from nvidia-smi,
# lower case, dashes; the UTC date): gpu_check.log (everything printed), timings.csv (step, exit, ms),
# logs/<step>.log (each step's own output) and every step's files (bench-*/bench.json, ...). Every
# command has a timeout and the whole script a budget (GPU_CHECK_BUDGET, default 540 s: a step's
# timeout is cut to what is left, and steps past it are skipped and listed), so one failure cannot eat
# the 10 minutes. The dry run (default $OUT: ${TMPDIR:-/tmp}/gpu_check_dry/cpu-<date>) runs the same
# steps with device cpu, backend gloo, 67 px and batches of 4 (the CUDA tests then report skipped), with
# a budget of 1800 s and every timeout x5 (GPU_CHECK_TIMEOUT_SCALE): a shared CPU can be that slow.
set -u
DRY=${GPU_CHECK_DRY_RUN:-}
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    *) echo "error: unknown argument $a: use --dry-run or nothing" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
DATE=$(date -u +%Y-%m-%d)
if [ -n "$DRY" ]; then
  DEV=cpu; DEV0=cpu; BACKEND=gloo; GPU=cpu-dry-run
  OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check_dry/cpu-$DATE}
  BUDGET=${GPU_CHECK_BUDGET:-1800}; SCALE=${GPU_CHECK_TIMEOUT_SCALE:-5}   # a busy CPU: five times the timeouts
  SIZE="--image-size 67"; BATCH=4; SWEEP=8; STEPS="--steps 1 --warmup 0"; SHORT=$STEPS; TRAIN_STEPS=3
  CHECK="--image-size 67 --batch-size 4 --steps 1 --modes eval"; ONE="--image-size 67 --num-classes 10 --batch-size 2"
  TRAIN="--train-size 64 --val-size 16 --batch-size 8"; EXPLAIN="--image-size 67 --batch-size 2 --modes train"
else
  DEV=cuda; DEV0=cuda:0; BACKEND=nccl
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
        | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
  GPU=${GPU:-unknown-gpu}
  OUT=${OUT:-docs/results/$GPU-$DATE}
  BUDGET=${GPU_CHECK_BUDGET:-540}; SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}
  SIZE=""; BATCH=64; SWEEP=128,256,512,1024; STEPS="--steps 30 --warmup 3"; SHORT="--steps 5 --warmup 2"; TRAIN_STEPS=100
  CHECK=""; ONE=""; TRAIN=""; EXPLAIN=""
fi
mkdir -p "$OUT/logs"
exec > >(tee "$OUT/gpu_check.log") 2>&1   # everything printed, also in the results folder
TEE=$!
T0=$(date +%s)

step() {  # step SECONDS NAME cmd...: echo, run with a timeout, time it, never stop the script
  local limit=$(( $1 * SCALE )) name=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))   # the whole script stays within BUDGET seconds
  if [ $left -lt 10 ]; then
    echo; echo "SKIPPED: $name (the ${BUDGET}s budget is spent)"; echo "$name,skipped,0" >> "$OUT/timings.csv"; return 0
  fi
  [ $limit -le $left ] || limit=$left
  echo; echo "=== $name  (timeout ${limit}s, t+$(( $(date +%s) - T0 ))s)"; echo "+ $*"
  local s=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log"; local rc=${PIPESTATUS[0]}
  local ms=$(( ($(date +%s%N) - s) / 1000000 ))
  [ $rc -eq 0 ] || echo "FAILED: $name (exit $rc)"
  echo "=== $name: $(( ms / 1000 )).$(( ms % 1000 / 100 )) s, exit $rc"
  echo "$name,$rc,$ms" >> "$OUT/timings.csv"
  return 0
}

skip() {  # skip NAME WHY: a step that cannot run here, listed as such
  echo; echo "SKIPPED: $1 ($2)" | tee "$OUT/logs/$1.log"; echo "$1,skipped,0" >> "$OUT/timings.csv"
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEV ($GPU), backend $BACKEND, out $OUT," \
     "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')${DRY:+, DRY RUN}"
echo "step,exit,ms" > "$OUT/timings.csv"
if [ -n "$DRY" ]; then
  step 20 nvidia-smi echo "dry run: no nvidia-smi"
else
  step 20 nvidia-smi nvidia-smi -L
fi

# --- the environment: torch is preinstalled there; the package may not be installed
if ! $PY -c 'import torch' 2>/dev/null; then echo "FAILED: python cannot import torch ($PY)"; exit 1; fi
if ! $PY -c 'import split_alexnet, torchvision' 2>/dev/null; then
  step 120 pip-install $PY -m pip install -e . --no-deps
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step 60 versions $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'

# --- the CUDA tests of the suite (they report skipped on CPU): the fast LRN, single vs streams on one GPU,
# NCCL's refusal
step 90 pytest-gpu $PY -m pytest -q -rs -p no:cacheprovider tests/test_lrn.py::test_cuda_matches_cpu \
  tests/test_layouts.py::test_single_and_streams_on_one_gpu tests/test_distributed.py::test_nccl_follows_the_hardware

# --- NCCL at world size 1 through the comm Functions (forced; one stream skips them otherwise)
step 60 comm-world1 $PY -m torch.distributed.run --standalone --nproc_per_node=1 scripts/comm_world1.py \
  --backend $BACKEND --device "$DEV0" $ONE --out "$OUT/comm-world1.json"

# --- the check under NCCL, one process, one stream: the split layout's process group, the check's host sums
step 90 check-nccl-1proc $PY -m torch.distributed.run --standalone --nproc_per_node=1 launch/check.py \
  --backend $BACKEND --device "$DEV0" --streams 1 $CHECK

# --- streams equals single, on the device: fp32, bf16 (autocast: values in bf16, derivatives float64), fp64
for prec in fp32 bf16 fp64; do
  step 90 "check-$prec" $PY launch/check.py --device "$DEV0" --precision $prec $CHECK
done

# --- no host synchronisation inside a training step (torch.cuda.set_sync_debug_mode("error"))
if $PY launch/train.py --help 2>/dev/null | grep -q -- '--sync-debug'; then
  step 75 sync-debug $PY launch/train.py --layout single --device "$DEV0" --sync-debug --max-steps $TRAIN_STEPS \
    --log-every $TRAIN_STEPS $TRAIN --out "$OUT/train-sync-debug"
else
  skip sync-debug "launch/train.py has no --sync-debug flag yet"
fi

# --- the graph count: torch._dynamo.explain of the single layout, train and eval mode
step 90 graph-count $PY scripts/graph_count.py --device "$DEV0" $EXPLAIN --out "$OUT/graph-count.json"

# --- the bench's sweep: single against torchvision's AlexNet, batch 64 up until out of memory, fp32 and bf16;
# each prints the device's bound and the fraction reached
for prec in fp32 bf16; do
  step 150 "bench-$prec" $PY launch/bench.py --layouts single,torchvision --device "$DEV0" --precision $prec \
    --batch-size $BATCH --sweep-batch $SWEEP $STEPS $SIZE --out "$OUT/bench-$prec"
done
step 60 bench-profile $PY launch/bench.py --layouts single,streams,torchvision --device "$DEV0" --batch-size $BATCH \
  --sweep-batch none $SHORT $SIZE --profile "$OUT/prof" --out "$OUT/bench-prof"

# --- training steps each (shapes data set, generated: no network), fp32 and bf16 (autocast);
# the last log line is the mean images/s and the final validation
for prec in fp32 bf16; do
  for layout in single streams; do
    step 60 "train-$layout-$prec" $PY launch/train.py --layout $layout --device "$DEV0" --precision $prec \
      --max-steps $TRAIN_STEPS --log-every $TRAIN_STEPS $TRAIN --out "$OUT/train-$layout-$prec"
  done
done

# --- two GPUs on paper, with this GPU's measured compute (the single row)
step 30 link $PY launch/bench.py --link --link-from "$OUT/bench-fp32/bench.json" --batch-size $BATCH $SIZE --out "$OUT/link"

# --- the split with two ranks on this one GPU: NCCL refuses (one GPU per rank); gloo with CUDA tensors
step 120 bench-split-gloo-1gpu $PY -m torch.distributed.run --standalone --nproc_per_node=2 launch/bench.py \
  --backend gloo --device "$DEV" --layouts split,split-overlap --batch-size $BATCH --sweep-batch none \
  $SHORT $SIZE --out "$OUT/bench-split-gloo"

# --- the data path (docs/training.md, "Training on ImageNet"): GPU JPEG decoding against the CPU's, and
# the single layout on a JPEG folder at batch 256, data-bound or not (scripts/gpu_data_check.sh)
if [ -n "$DRY" ]; then
  step 120 data-path env OUT="$OUT/data" GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash scripts/gpu_data_check.sh
else
  step 150 data-path env OUT="$OUT/data" bash scripts/gpu_data_check.sh
fi

echo; echo "gpu_check done in $(( $(date +%s) - T0 )) s; timings in $OUT/timings.csv:"; cat "$OUT/timings.csv"
exec >&- 2>&-; wait $TEE 2>/dev/null   # gpu_check.log complete when the script returns
