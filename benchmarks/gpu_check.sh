#!/usr/bin/env bash
# One-command GPU check of the prune stage (issue 20, item 6), under 10 minutes on one GPU:
# exact KL scores of ResNet-56 (CIFAR-10, ../shared) on the GPU vs the CPU (agreement: Spearman per
# group, largest differences, plan overlap; time), then `curlprune prune --device cuda` end to end.
# Prints the report and writes it to benchmarks/results/gpu_check.md (or the path given).
# Usage: benchmarks/gpu_check.sh [report.md]   (PYTHON=... to choose the interpreter; CURLPRUNE_SHARED=... for ../shared)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 570 "${PYTHON:-python}" benchmarks/gpu_check.py "${1:-$repo/benchmarks/results/gpu_check.md}"
