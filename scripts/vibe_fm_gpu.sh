#!/usr/bin/env bash
# VIBE-FM-F / VIBE-FM-A on all of CIFAR-10 on a GPU (docs/vibe.md "FM-A / FM-F on all of CIFAR-10 on a GPU").
# Runs the vibe_fm_gpu bench when a local HuggingFace foundation checkpoint is present, else says what is missing.
#   BDSEAL_FM_CHECKPOINT=/data/dinov2-giant scripts/vibe_fm_gpu.sh /data/cifar10.npz [extra bench overrides...]
set -euo pipefail
data=${1:?usage: scripts/vibe_fm_gpu.sh PATH/cifar10.npz [overrides...]}; shift
ckpt=${BDSEAL_FM_CHECKPOINT:-}
if [ -z "$ckpt" ] || [ ! -f "$ckpt/config.json" ]; then
  echo "vibe_fm_gpu: no foundation checkpoint (set BDSEAL_FM_CHECKPOINT to a local HuggingFace directory with config.json); skipping"
  exit 0
fi
bdseal=${BDSEAL:-.venv/bin/bdseal}
"$bdseal" bench bench=vibe_fm_gpu dataset.root="$data" "$@"
"$bdseal" report bench/vibe_fm_gpu
