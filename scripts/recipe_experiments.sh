#!/usr/bin/env bash
# The experiments of docs/training.md ("The init question at the paper's input scale" and "The paper's
# one-GPU comparison"): every run is `launch/train.py --recipe paper` on one thread, single layout, 67 px.
#   scripts/recipe_experiments.sh init   # 3 inits x (MNIST fixture, shapes), 200 steps each
#   scripts/recipe_experiments.sh long   # Caffe's init on shapes, 500 steps
#   NET=paper scripts/recipe_experiments.sh half; NET=half scripts/recipe_experiments.sh half
#                                         # --net paper vs --net half, same recipe, seeds and data
#   NET=paper scripts/recipe_experiments.sh half-fast; NET=half ...      # the same on He + standardised input
#   python scripts/plot_recipe.py        # docs/init-curves.png and the tables
# OUT (default runs/recipe) holds one folder per run; MNIST reads a copy of the fixture in OUT/mnist (so
# the mean image is cached there, not in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/recipe}
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[ -d "$OUT/mnist" ] || cp -r tests/fixtures/mnist "$OUT/mnist"
MNIST=(--dataset mnist --data-dir "$OUT/mnist" --split-test 500 --image-size 67 --batch-size 64 --no-flip)
SHAPES=(--dataset shapes --image-size 67 --batch-size 64)
COMMON=(--recipe paper --layout single --seed 0 --dropout-seed 0 --quiet)

run() {  # name, args...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.jsonl" ] && { echo "skip $name (done)"; return; }
  echo "run $name: $*"
  /usr/bin/time -f "$name wall %e s" $PY launch/train.py "${COMMON[@]}" "$@" --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 || echo "$name: exit $? (see $OUT/$name.log)"
}

case "${1:-init}" in
  init)   # 200 steps, validation (centre crop) every 50 steps
    for init in paper caffe kaiming; do
      run "init-mnist-$init" "${MNIST[@]}" --init "$init" --max-steps 200 --eval-every 50 --no-ten-crop &
      run "init-shapes-$init" "${SHAPES[@]}" --init "$init" --max-steps 200 --eval-every 50 --no-ten-crop
      wait
    done ;;
  long)   # Caffe's init, the one of the three that left the flat start within 200 steps on MNIST:
          # shapes for 500 steps (validation, centre crop, every 100)
    run "init-shapes-caffe-500" "${SHAPES[@]}" --init caffe --max-steps 500 --eval-every 100 --no-ten-crop ;;
  half)   # both nets, same recipe (the paper's with INIT, default Caffe's), seeds and data: 8 epochs of the
          # MNIST fixture (312 steps), ten-crop validation every 2 epochs (78 steps), as the paper reports
    INIT=${INIT:-caffe}
    run "half-mnist-$NET" "${MNIST[@]}" --net "$NET" --init "$INIT" --epochs 8 --eval-every 78 ;;
  half-fast)  # the same pair on the recipe that learns within tens of steps (He's init on standardised
              # input, docs/training.md): 3 epochs (117 steps), ten-crop validation each epoch
    run "halffast-mnist-$NET" "${MNIST[@]}" --net "$NET" --recipe paper-he --preprocess channel --epochs 3 ;;
esac
