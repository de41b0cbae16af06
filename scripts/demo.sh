#!/usr/bin/env bash
# The main job on bundled demo data, end to end: demo data -> extract -> train -> evaluate -> sweep -> score.
# Installs what it needs first (scripts/bootstrap.sh) and is safe to run again: extraction resumes,
# the sweep continues, the other steps overwrite their outputs.
#
# Environment knobs: MIRIP_DEMO_DIR (default: data/demo), MIRIP_DEMO_RUNS (runs/demo),
# MIRIP_DEMO_BACKBONE (facebook/dinov2-small on CPU, facebook/dinov2-large on a GPU),
# MIRIP_DEMO_IMAGE_SIZE (224 on CPU, 768 on a GPU), MIRIP_DEMO_IMAGES (200).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"

data="${MIRIP_DEMO_DIR:-data/demo}"
runs="${MIRIP_DEMO_RUNS:-runs/demo}"
gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$gpu" = 1 ]; then default_backbone=facebook/dinov2-large; default_size=768; else default_backbone=facebook/dinov2-small; default_size=224; fi
backbone="${MIRIP_DEMO_BACKBONE:-$default_backbone}"
size="${MIRIP_DEMO_IMAGE_SIZE:-$default_size}"

weights=()
if python -c "import sys; from mirip.ml.backbones import pretrained_available as ok; sys.exit(0 if ok('$backbone') else 1)"; then
  echo "== mirip demo: pretrained $backbone at ${size}px"
else
  export HF_HUB_OFFLINE=1
  weights=(--random-init)
  echo "=================================================================================="
  echo "== mirip demo: $backbone weights cannot be downloaded here (offline)."
  echo "== Using RANDOM backbone weights: the pipeline runs end to end, but the features"
  echo "== carry no learned meaning and every cache, checkpoint and report says so."
  echo "=================================================================================="
fi
cache="cache/demo-$(basename "$backbone")-${size}px-bank${weights:+-random}.h5"

# Each step's header says how long the demo has run, so a slow step is seen, not guessed at.
SECONDS=0
step() { echo "== $1 [$((SECONDS / 60)) min $((SECONDS % 60)) s so far]"; }
step "1/6 demo data"
python scripts/make_demo_data.py --output "$data" --num-images "${MIRIP_DEMO_IMAGES:-200}" --image-size 256
step "2/6 stage one: extract a small feature bank (blocks -4 and -1 x cls, mean, std: 6 entries)"
python scripts/extract.py --metadata "$data/metadata.csv" --image-dir "$data/images" --output "$cache" \
  --backbone "$backbone" "${weights[@]}" --image-size "$size" --layers -4 -1 --pooling cls mean std
step "3/6 stage two: train the head"
python scripts/train.py --features "$cache" --metadata "$data/metadata.csv" --output-dir "$runs/train" \
  --max-epochs 40 --pairs-per-epoch 4000 --learning-rate 1e-3 --early-stopping-patience 10 --overwrite
step "4/6 evaluate the best head on the test split"
python scripts/evaluate.py --checkpoint "$runs/train/best.pt" --features "$cache" --metadata "$data/metadata.csv" \
  --split test --json "$runs/train/evaluation.json"
# The sweep shows how to compare feature specs (the question a bank answers) with seeds for the spread: two
# specs x two margins x 2 seeds = 8 heads. Wider heads (hidden 512) tied hidden 256 on every spec here, so they
# would only double the time (a few minutes on 2 shared cores is the budget for this step).
step "5/6 sweep two feature specs x two margins (stacked heads, 2 seeds)"
python scripts/sweep.py --features "$cache" --metadata "$data/metadata.csv" --output-dir "$runs/sweep" \
  --feature cls@-1 "cls@-4,-1+mean@-1+std@-1" \
  --margin 0.5 1.0 --hidden-dim 256 --projector-dim 128 --seeds 0 1 \
  --max-epochs 20 --pairs-per-epoch 2000 --learning-rate 1e-3
step "6/6 score the images in full-image mode, with an HTML report"
python scripts/score.py --checkpoint "$runs/train/best.pt" "$data/images" --metadata "$data/metadata.csv" \
  --output "$runs/scores.csv" --html "$runs/report.html"
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s: $cache, $runs/train (best.pt, curves, test metrics), $runs/sweep (results.csv, summary.md, best.json),"
echo "   $runs/scores.csv and $runs/report.html"
