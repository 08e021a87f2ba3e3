#!/usr/bin/env bash
# One-command GPU check (issue 20, item 6), under 10 minutes on one GPU:
#  1. the prune stage (benchmarks/gpu_check.py, at most 380 s): exact KL scores of ResNet-56 (CIFAR-10,
#     ../shared) on the GPU vs the CPU (agreement: Spearman per group, largest differences, plan
#     overlap; time), then `curlprune prune --device cuda` end to end;
#  2. mixed precision in the training stages (benchmarks/gpu_amp.py, the time left, at least 200 s):
#     one `distill` epoch in float32 and with amp: bf16 (time, images/s, top-1);
#  3. opt-in (GPU_CHECK_PARTS="kl amp scale"; not in the default 10 minutes): the ResNet-50 and MobileNetV2
#     scoring samples at 224 on the GPU (benchmarks/scale.py --device cuda, at most 150 s), written to
#     benchmarks/results/scale_gpu.json and scale_gpu.md.
# Prints the report and writes it to benchmarks/results/gpu_check.md (or the path given); a part that
# fails or runs out of time is missing from it and the exit status is non-zero.
# Usage: benchmarks/gpu_check.sh [report.md]   (PYTHON=... to choose the interpreter; CURLPRUNE_SHARED=... for ../shared;
#        GPU_CHECK_PARTS="kl amp" to choose the parts; GPU_CHECK_DEVICE=cpu GPU_CHECK_CALIB=16: a dry run on the CPU)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
report="${1:-$repo/benchmarks/results/gpu_check.md}"
parts="${GPU_CHECK_PARTS:-kl amp}"
rm -f "$report"  # no stale part from an earlier run
started=$SECONDS
status=0
if [[ " $parts " == *" kl "* ]]; then
  timeout 380 "${PYTHON:-python}" benchmarks/gpu_check.py "$report" || status=$?
fi
if [[ " $parts " == *" amp "* ]]; then
  timeout $((585 - (SECONDS - started))) "${PYTHON:-python}" benchmarks/gpu_amp.py "$report" || status=$?
fi
if [[ " $parts " == *" scale "* ]]; then
  timeout 150 "${PYTHON:-python}" benchmarks/scale.py --device "${GPU_CHECK_DEVICE:-cuda}" --parts resnet50,mobilenet_v2 \
    --redo resnet50 --redo mobilenet_v2 --json benchmarks/results/scale_gpu.json || status=$?
fi
exit $status
