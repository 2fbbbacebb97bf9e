#!/usr/bin/env bash
# One device window of `bdseal reproduce`: restore CIFAR-10 from the JPEG-q90 copy carried with the call
# (scripts/cifar_jpeg.py), run the next cells of a
# paper's table for BUDGET seconds, and copy the store (results.sqlite, small) to $OUT when set.
#
#   bash scripts/gpu_window.sh PAPER [BUDGET_S] [bdseal reproduce keys/overrides...]
#   e.g. run(command="bash scripts/gpu_window.sh pgbd 540", carry=[".gpudata"], timeout_s=600)
#
# GPU_DATA: the packed copy (default .gpudata/cifar10_q90.npz); DATA_ROOT: an .npz to use as is instead.
# Cache, checkpoints and run dirs stay under bench/gpu/<paper>/ (git-ignored), so the next call on the same
# warm machine resumes a cut cell; a fresh machine re-runs the unfinished cell from its start.
set -euo pipefail
paper=${1:?usage: gpu_window.sh PAPER [BUDGET_S] [overrides...]}
budget=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
root=${DATA_ROOT:-/tmp/cifar10.npz}
if [ -z "${DATA_ROOT:-}" ] && [ ! -f "$root" ]; then
  python scripts/cifar_jpeg.py unpack "${GPU_DATA:-.gpudata/cifar10_q90.npz}" "$root"
fi
python -m bdseal.cli reproduce "$paper" budget_s="$budget" dataset.root="$root" "$@"  # runs from the checkout, no install
if [ -n "${OUT:-}" ]; then
  if [ -d bench/gpu ]; then find bench/gpu -name results.sqlite -exec cp --parents {} "$OUT"/ \; ; fi
fi
