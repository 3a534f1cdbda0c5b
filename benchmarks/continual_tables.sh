#!/usr/bin/env bash
# The continual CIFAR-10-C (severity 5) tables of BENCHMARKS.md, on generated data (engine seed 0).
# Each lane runs single-threaded; two lanes fill the two cores. Cells are cached under results/bench/,
# so a rerun only computes what is missing. N sets the images per corruption (10000 = the full set).
set -euo pipefail
cd "$(dirname "$0")/.."
export TTA_DATA_DIR="${TTA_DATA_DIR:-../shared/data}"
export PATH="$PWD/.venv/bin:$PATH"  # the tta command of `make install`
N="${N:-1000}"
C=configs/cifar10c
O="data.source=generate data.n_examples=$N threads=1 progress=false"
lane_a() {  # cifar_resnet20: every method, seed 1; then the issue-5 methods over seeds 1 2 3
  tta table $C/source.yaml $C/norm.yaml $C/tent.yaml $C/eta.yaml $C/eata.yaml $C/sar.yaml $C/deyo.yaml \
    $C/tent_wisdom.yaml $C/tsallis.yaml $C/adte.yaml $C/rdumb.yaml $C/lcotta.yaml --seeds 1 \
    --out results/bench/r20_continual $O
  tta table $C/source.yaml $C/norm.yaml $C/tent.yaml $C/eata.yaml $C/sar.yaml $C/deyo.yaml $C/lcotta.yaml \
    --seeds 1 2 3 --out results/bench/r20_continual $O
}
lane_b() {  # CoTTA (35 forwards a batch) on cifar_resnet20, then every method on cifar_resnet56, seed 1
  tta table $C/cotta.yaml --seeds 1 --out results/bench/r20_continual $O
  tta table $C/source.yaml $C/norm.yaml $C/tent.yaml $C/eta.yaml $C/eata.yaml $C/sar.yaml $C/deyo.yaml \
    $C/tent_wisdom.yaml $C/tsallis.yaml $C/adte.yaml --seeds 1 --out results/bench/r56_continual \
    $O model.name=cifar_resnet56
}
case "${1:-all}" in
  a) lane_a ;;
  b) lane_b ;;
  all) lane_a & lane_b & wait ;;
esac
