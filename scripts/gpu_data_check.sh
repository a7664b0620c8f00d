#!/usr/bin/env bash
# The data path on one GPU (docs/training.md, "Training on ImageNet"), repo at cwd:
#
#   OUT=/tmp/out bash scripts/gpu_data_check.sh 2>&1 | tee /tmp/out/gpu_data_check.log
#
# Draws a folder of photos (tests/test_data_path.py's: 500 x 375 colour fields with noise, JPEG q90),
# then: the data bench with CUDA rows (decode-gpu, delivered-gpu-decode) at batch 256; and 60 steps of
# the single layout on that folder at batch 256, 227 px, paper preprocessing, --decode cpu then --decode
# gpu: each run's last log lines say whether it was data-bound (metrics.jsonl: data_s, step_s).
# Targets: decode-gpu / delivered-gpu-decode >= 5,000 images/s; the --decode gpu run not data-bound.
#
# Dry run without a GPU (tiny sizes, cpu):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 OUT=/tmp/gpu-data-dry bash scripts/gpu_data_check.sh
set -u
OUT=${OUT:-/tmp/out}
DEV=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's split_alexnet
if [ -n "${GPU_CHECK_TINY:-}" ]; then
  N=8; BATCH=4; STEPS=1; TRAIN_STEPS=3; SIZE=67; IMAGES=16
else
  N=640; BATCH=256; STEPS=4; TRAIN_STEPS=60; SIZE=227; IMAGES=1280
fi
FAILED=0
run() { echo; echo "+ $*"; local t=$(date +%s); timeout 600 "$@"; local rc=$?; echo "(exit $rc, $(( $(date +%s) - t )) s)"
        [ $rc -eq 0 ] || FAILED=$((FAILED + 1)); }

run $PY -c "import sys; sys.path.insert(0, 'tests'); from test_data_path import jpeg_folder; \
jpeg_folder('$OUT/photos', train=$N, val=2)"
run $PY launch/bench.py --data "$OUT/photos" --device "$DEV" --workers "$WORKERS" --batch-size $BATCH \
  --steps $STEPS --data-images $IMAGES --image-size $SIZE --out "$OUT/data-bench"
for decode in cpu gpu; do
  run $PY launch/train.py --layout single --dataset imagefolder --data-dir "$OUT/photos" --device "$DEV" \
    --image-size $SIZE --batch-size $BATCH --max-steps $TRAIN_STEPS --workers "$WORKERS" --decode $decode --no-plot \
    --log-every 10 --out "$OUT/train-decode-$decode"
done
[ $FAILED -eq 0 ] || { echo "gpu_data_check: $FAILED command(s) failed (above)"; exit 1; }
