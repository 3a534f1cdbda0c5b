#!/usr/bin/env bash
# The ImageNet-A / -R / -V2 / -Sketch table of every CLIP method with OpenAI CLIP ViT-B/16, for a user who has
# the weights and the data sets (nothing here is downloaded without a network; no number from this script is in
# BENCHMARKS.md, because neither the weights nor the data sets can be had on the development machine).
#
#   TTA_DATA_DIR=/data bash benchmarks/clip_imagenet_variants.sh            # preflight, then every cell, then the table
#   TTA_DATA_DIR=/data bash benchmarks/clip_imagenet_variants.sh --check    # resolve every config + preflight only
#   SETS="imagenet_r" METHODS="source tda zero" bash benchmarks/clip_imagenet_variants.sh
#
# Needs, under $TTA_DATA_DIR (layouts: tta/data/folders.py and the comments of configs/<set>_clip/base.yaml):
#   models/openclip/ViT-B-16.pt (or ViT-B-16-openai.pt; or CHECKPOINT=<file>)
#   imagenet-a/<wnid>/*   imagenet-r/<wnid>/*   imagenetv2-matched-frequency-format-val/<0..999>/*
#   ImageNet-Sketch/sketch/<wnid>/*
#   DiffTPT only: models/sd-image-variations-diffusers/ (lambdalabs/sd-image-variations-diffusers, revision v2.0,
#   a diffusers folder) and pip install 'tta[diffusion]'.
#
# Environment: SETS (default: all four), METHODS (default: every CLIP method below), OUT (results/clip_imagenet_variants),
# DEVICE (auto), CHECKPOINT (a ViT-B/16 weights file), PY (python), DIFFTPT_N (1000: DiffTPT's images per set),
# EXTRA (overrides appended to every cell, e.g. EXTRA="data.n_examples=500" for a quick look), MODEL (the model the
# preflight loads; default openclip:ViT-B-16/openai, the configs' model).
#
# Each cell is `tta run configs/<set>_clip/base.yaml` (CLIP's own preprocessing, seeded random order, the data set's
# class names, "a photo of a {}.") with the method's options as overrides: the official ImageNet-family values of
# ../shared/docs/METHODS-VLM.md (per-set TDA/BoostAdapter/DPE constants and prompt sets; no label-searched DMN weight;
# C-TPT lambda 20). The batch only groups images for the per-image methods (their views are seeded per image: results
# do not depend on it); WATT and CLIPArTT adapt per batch of 128, CLIPTTA per batch of 256 (its ImageNet setting).
# A finished cell (results.json) is not run again; an interrupted one restarts. DiffTPT generates 63 Stable Diffusion
# images per test image (50 denoising steps each): it runs on the first DIFFTPT_N images of each set's seeded order
# (the official code used a 1,000-image ImageNet-R subset).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-results/clip_imagenet_variants}
DEVICE=${DEVICE:-auto}
SETS=${SETS:-imagenet_a imagenet_r imagenet_v2 imagenet_sketch}
METHODS=${METHODS:-source source_clip80 tpt cliptta adte_views zero mta vte tda boostadapter dpe dmn_zs ctpt tps watt clipartt difftpt}
DIFFTPT_N=${DIFFTPT_N:-1000}
MODEL=${MODEL:-openclip:ViT-B-16/openai}
EXTRA=${EXTRA:-}
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

# per-set constants (METHODS-VLM V.1 TDA alpha+/beta+, V.4 BoostAdapter delta, V.9 DPE alpha/beta/lr/align, prompt sets)
declare -A TDA_ALPHA=([imagenet_a]=2 [imagenet_v2]=1 [imagenet_r]=1 [imagenet_sketch]=2.363)
declare -A TDA_BETA=([imagenet_a]=5 [imagenet_v2]=8 [imagenet_r]=8 [imagenet_sketch]=7.45)
declare -A BOOST_DELTA=([imagenet_a]=3 [imagenet_v2]=1 [imagenet_r]=3 [imagenet_sketch]=1)
declare -A DPE_ALPHA=([imagenet_a]=6 [imagenet_v2]=3 [imagenet_r]=3 [imagenet_sketch]=7)
declare -A DPE_BETA=([imagenet_a]=5 [imagenet_v2]=8 [imagenet_r]=8 [imagenet_sketch]=7.45)
declare -A DPE_LR=([imagenet_a]=0.0003 [imagenet_v2]=0.0005 [imagenet_r]=0.0006 [imagenet_sketch]=0.0006)
declare -A DPE_ALIGN=([imagenet_a]=2.5 [imagenet_v2]=0.5 [imagenet_r]=0.0 [imagenet_sketch]=0.2)
declare -A DPE_QUERY=([imagenet_a]=views [imagenet_v2]=original [imagenet_r]=original [imagenet_sketch]=original)
declare -A TDA_PROMPTS=([imagenet_a]=tip7 [imagenet_v2]=tip7 [imagenet_r]=clip80 [imagenet_sketch]=clip80)

# the overrides of one cell: method_args SET ROW
method_args() {
  local s=$1 row=$2
  local tpt="method.optimizer=adamw method.lr=0.005 method.weight_decay=0.01 method.steps=1 method.views=64 method.keep=0.1"
  case $row in
    source) echo "method.name=source" ;;
    source_clip80) echo "method.name=source model.options.templates=clip80" ;;
    tpt) echo "stream.batch_size=16 method.name=tpt $tpt method.policy=crop_flip" ;;
    ctpt) echo "stream.batch_size=16 method.name=ctpt $tpt method.lam=20 method.policy=crop_flip" ;;  # official: augmix
    tps) echo "stream.batch_size=16 method.name=tps $tpt method.policy=crop_flip method.prototypes=template method.templates=clip80" ;;
    cliptta) echo "stream.batch_size=256 method.name=cliptta method.optimizer=adam method.lr=0.0001 method.eps=1.0e-6 method.steps=10 method.k_shot=16 method.sample_size=64 method.memory_only=true" ;;
    watt) echo "stream.batch_size=128 method.name=watt method.optimizer=adam method.lr=0.0001 method.steps=2 method.rounds=5 method.mode=sequential method.templates=watt8" ;;
    clipartt) echo "stream.batch_size=128 method.name=clipartt method.optimizer=adam method.lr=0.001 method.steps=10 method.k=3" ;;
    adte_views) echo "stream.batch_size=16 method.name=adte_views method.views=64 method.policy=crop_flip method.chunk=4" ;;
    zero) echo "stream.batch_size=16 method.name=zero method.views=64 method.policy=crop_flip method.gamma=0.3 method.chunk=4" ;;
    mta) echo "stream.batch_size=16 method.name=mta method.views=64 method.policy=crop_flip method.chunk=4" ;;
    vte) echo "stream.batch_size=16 method.name=vte method.views=64 method.policy=crop_flip method.templates=clip80 method.chunk=4" ;;
    tda) echo "stream.batch_size=16 method.name=tda method.views=64 method.policy=augmix method.chunk=4 method.templates=${TDA_PROMPTS[$s]} method.pos_alpha=${TDA_ALPHA[$s]} method.pos_beta=${TDA_BETA[$s]}" ;;
    boostadapter) echo "stream.batch_size=16 method.name=boostadapter method.views=64 method.policy=crop_flip method.chunk=4 method.templates=${TDA_PROMPTS[$s]} method.delta=${BOOST_DELTA[$s]} method.historical=selected method.pos_alpha=${TDA_ALPHA[$s]} method.pos_beta=${TDA_BETA[$s]}" ;;
    dpe) echo "stream.batch_size=16 method.name=dpe method.views=64 method.policy=augmix method.chunk=4 method.templates=${TDA_PROMPTS[$s]} method.optimizer=adamw method.eps=0.001 method.weight_decay=0.1 method.steps=1 method.lr=${DPE_LR[$s]} method.alpha=${DPE_ALPHA[$s]} method.beta=${DPE_BETA[$s]} method.align=${DPE_ALIGN[$s]} method.query=${DPE_QUERY[$s]}" ;;
    dmn_zs) echo "stream.batch_size=16 method.name=dmn_zs method.views=32 method.policy=crop_flip method.chunk=4 method.templates=tip7 method.weight=1.0" ;;  # official: + CuPL (method.cupl=<file>)
    difftpt) echo "stream.batch_size=1 data.n_examples=$DIFFTPT_N method.name=difftpt method.optimizer=adamw method.lr=0.005 method.weight_decay=0.01 method.steps=4 method.views=65 method.policy=crop_flip method.diffusion_views=63 method.generator=sd_image_variations method.chunk=1" ;;
    *) echo "unknown row $row" >&2; return 1 ;;
  esac
}

common_args() {  # run_name = the row
  local s=$1 row=$2
  echo "device=$DEVICE progress=false output.dir=$OUT/$s output.run_name=$row${CHECKPOINT:+ model.checkpoint=$CHECKPOINT} $EXTRA"
}

# 1. every cell's config resolves (tta.config.load: keys, types, method options, names), in one process
for s in $SETS; do
  for row in $METHODS; do
    args=$(method_args "$s" "$row") || exit 2
    echo "configs/${s}_clip/base.yaml $args $(common_args "$s" "$row")"
  done
done | PYTHONWARNINGS=ignore $PY -c '
import sys
from tta import config
from tta.errors import TTAError
bad = 0
for line in sys.stdin:
    path, *overrides = line.split()
    try:
        c = config.load(path, overrides)
        print("ok  ", path, c["output"]["run_name"], "| method", c["method"]["name"], "| batch", c["stream"]["batch_size"],
              "| classes", c["model"]["options"].get("classes"), "| templates", c["method"].get("templates") or
              c["model"]["options"].get("templates"))
    except TTAError as e:
        bad += 1
        print("error:", path, " ".join(overrides), ":", e)
sys.exit(1 if bad else 0)
' || { echo "config errors above" >&2; exit 2; }

# 2. preflight: the weights and each data set, one clear message each (tta's own errors)
PYTHONWARNINGS=ignore $PY - "$MODEL" "${CHECKPOINT:-}" $SETS <<'EOF'
import sys
from tta.errors import TTAError
model, checkpoint, sets = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
failed = False
try:
    from tta.data.folders import load_manifest
    for s in sets:
        try:
            m = load_manifest(s)
            print(f"data {s}: {len(m.paths)} images under {m.root}")
        except TTAError as e:
            failed = True
            print(f"error: {e}")
    import tta
    tta.models.load(model, checkpoint)
    print(f"weights {model}: ok")
except TTAError as e:
    failed = True
    print(f"error: {e}")
sys.exit(1 if failed else 0)
EOF
[[ $? == 0 ]] || { echo "preflight failed: see the message(s) above" >&2; exit 2; }
[[ $CHECK == 1 ]] && { echo "check done"; exit 0; }

# 3. the cells
mkdir -p "$OUT"
for s in $SETS; do
  for row in $METHODS; do
    [[ -f "$OUT/$s/$row/results.json" ]] && { echo "done $s $row"; continue; }
    echo "run  $s $row"
    # shellcheck disable=SC2086
    $PY -m tta.cli run "configs/${s}_clip/base.yaml" $(method_args "$s" "$row") $(common_args "$s" "$row") \
      > "$OUT/$s.$row.log" 2>&1 || { echo "FAILED $s $row (log: $OUT/$s.$row.log)"; tail -3 "$OUT/$s.$row.log"; }
  done
done 2>&1 | tee -a "$OUT/progress.log"

# 4. the table: top-1 accuracy, ECE, img/s and its ratio to zero-shot, peak memory
$PY - "$OUT" "$SETS" "$METHODS" <<'EOF'
import json, sys
from pathlib import Path
out, sets, rows = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
res = {(s, r): json.loads(p.read_text()) for s in sets for r in rows if (p := out / s / r / "results.json").exists()}
names = {"imagenet_a": "A", "imagenet_r": "R", "imagenet_v2": "V2", "imagenet_sketch": "Sketch"}
cols = [names.get(s, s) for s in sets]
lines = ["Top-1 accuracy (%) / ECE (%), OpenAI CLIP ViT-B/16; img/s and its ratio to zero-shot's (mean over sets), peak memory (max):", "",
         "| method | " + " | ".join(cols) + " | mean | " + " | ".join(f"ECE {c}" for c in cols) + " | img/s | x zero-shot | peak MiB |",
         "|---" * (2 * len(sets) + 5) + "|"]
for r in rows:
    got = [res.get((s, r)) for s in sets]
    acc = [100 - g["mean_error"] if g else None for g in got]
    done = [a for a in acc if a is not None]
    speed = [g["img_per_s"] for g in got if g and g.get("img_per_s")]
    ratio = [g["img_per_s"] / z["img_per_s"] for s, g in zip(sets, got)
             if g and (z := res.get((s, "source"))) and g.get("img_per_s") and z.get("img_per_s")]
    peak = [g["peak_memory_mb"] for g in got if g]
    cells = [f"{a:.2f}" if a is not None else "-" for a in acc]
    cells.append(f"{sum(done) / len(done):.2f}" if done else "-")
    cells += [f"{g['mean_ece']:.2f}" if g else "-" for g in got]
    cells.append(f"{sum(speed) / len(speed):.1f}" if speed else "-")
    cells.append(f"{sum(ratio) / len(ratio):.3f}" if ratio else "-")
    cells.append(f"{max(peak):.0f}" if peak else "-")
    lines.append(f"| {r} | " + " | ".join(cells) + " |")
text = "\n".join(lines) + "\n"
(out / "table.md").write_text(text)
print(text)
EOF
