#!/usr/bin/env bash
# clbench's GPU check, one script for the GPU machine we are sometimes lent (one H200 with
# torch, timm and transformers but neither avalanche-lib nor POT, and no network). It ends
# within 8 minutes: throughput and peak GPU memory of clbench's l2p / hide-prompt / norga
# against Avalanche's LearningToPrompt on ViT-B/16 (random weights) at batch 64 and 128 in
# bf16 and fp32 (SDPA), the bf16-vs-fp32 agreement of l2p's logits on the GPU and the bf16
# agreement tests. scripts/_gpu_check.py holds the steps and says what each does.
#
#   bash scripts/gpu_check.sh prepare           # here, with the package index: wheels
#                                               #   into .gpu_wheels/ (about 35 MiB)
#   bash scripts/gpu_check.sh run [--out DIR]   # there, offline: install the wheels the
#                                               #   machine lacks, measure, test
#   bash scripts/gpu_check.sh run --dry-run     # anywhere: the same steps on the CPU with a
#                                               #   tiny ViT, to test the script
#
# Bring .gpu_wheels/ along to the GPU machine (it is ignored by git). Results: DIR
# (default .gpu_check/): gpu_check.log, gpu_check.json and one bench_batch<N>.json per batch.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheels="${GPU_CHECK_WHEELS:-.gpu_wheels}"
usage="usage: bash scripts/gpu_check.sh prepare | run [--dry-run] [--out DIR] [--batch-sizes N ...]"

step="${1:-}"
[[ $# -gt 0 ]] && shift
case "$step" in
  prepare) exec "$python" scripts/_gpu_check.py prepare --wheels "$wheels" "$@" ;;
  run) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

dry_run=0
for argument in "$@"; do
  [[ "$argument" == --dry-run ]] && dry_run=1
done
# fail fast, before installing anything, where there is no GPU
if [[ $dry_run == 0 ]] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  found="$("$python" -c 'import torch; print("torch", torch.__version__, "sees no CUDA device")' 2>/dev/null || echo "no torch")"
  echo "gpu_check: CUDA is not available to $python ($found): this check needs the GPU machine; 'bash scripts/gpu_check.sh run --dry-run' tests its steps on a CPU" >&2
  exit 3
fi
if ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in $wheels: run 'bash scripts/gpu_check.sh prepare' where the package index is reachable, and bring the folder along" >&2
  exit 3
fi

site="${GPU_CHECK_SITE:-/tmp/clbench-gpu-check-site}"
"$python" scripts/_gpu_check.py install --wheels "$wheels" --target "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# the run step keeps to its own budget (--budget-s, 380 s); on the GPU this is the hard stop
stop=()
[[ $dry_run == 0 ]] && stop=(timeout 430)
exec "${stop[@]}" "$python" scripts/_gpu_check.py run --wheels "$wheels" "$@"
