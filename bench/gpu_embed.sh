#!/usr/bin/env bash
# Embedding benchmark on a GPU machine: CLIP ViT-L/14 at 224 and 336 px
# (random weights, bf16), the Ray Data job against the bare loops.
#   bash bench/gpu_embed.sh OUT_DIR
set -euo pipefail
out="${1:-bench/results}"
mkdir -p "$out"
common=(--preset phi3-mini --set vision.pretrained=null --workdir "${WORKDIR:-/tmp/embed-bench}")
python3 bench/embed_bench.py "${common[@]}" --set vision.model=ViT-L-14 --images 6000 --batch-size 256 \
  --out "$out/embed-vit-l-14-224.json"
python3 bench/embed_bench.py "${common[@]}" --images 4000 --batch-size 128 \
  --out "$out/embed-vit-l-14-336.json"
