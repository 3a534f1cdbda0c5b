#!/usr/bin/env bash
# Lifelong and gradual CIFAR-10-C runs of BENCHMARKS.md (cifar_resnet20, generated data, one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
export TTA_DATA_DIR="${TTA_DATA_DIR:-../shared/data}"
export PATH="$PWD/.venv/bin:$PATH"  # the tta command of `make install`
C=configs/cifar10c
O="data.source=generate threads=1 progress=false"
# 10 rounds of the 15 corruptions (200 images each, 3,000 a round), never reset: TENT vs ETA vs LCoTTA
tta table $C/lifelong.yaml --methods tent eta lcotta --seeds 1 --out results/bench/r20_lifelong10 \
  $O data.n_examples=200 stream.rounds=10
# 50 rounds of 2,000 images (the first 10 corruptions, 200 images each), LCoTTA and EATA: no NaN?
tta table $C/lifelong.yaml $C/eata.yaml --seeds 1 --out results/bench/r20_lifelong50 $O data.n_examples=200 \
  setting=lifelong stream.rounds=50 \
  "data.corruptions=[gaussian_noise,shot_noise,impulse_noise,defocus_blur,glass_blur,motion_blur,zoom_blur,snow,frost,fog]"
# CoTTA's gradual schedule (severities 5..1, then 1..5..1 per later corruption), 200 images per visit
tta table $C/gradual.yaml --methods source norm tent eta lcotta --seeds 1 --out results/bench/r20_gradual \
  $O data.n_examples=200
