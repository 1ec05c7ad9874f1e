#!/usr/bin/env bash
# Issue 12 GPU throughput (bench/gpu_throughput.py) on a lent device machine, in one call under
# 8 minutes on one H200: resnet50 at 224, the template end to end (cub50 uint8 cache, 12 workers,
# kornia RandAugment + mixup on the GPU, bf16, channels_last) vs a synthetic batch on the GPU, then
# `competition train` on 1 process and, with more than one GPU, under torchrun.
#
# Prepare here:  bash bench/prepare_device.sh gpu      (.whl/ and .devdata/cub50, ~45 MiB)
# Device call:   run(command="bash bench/gpu_run.sh", carry=[".whl", ".devdata/cub50"], timeout_s=600)
# Extra arguments go to bench/gpu_throughput.py (e.g. --quick, --steps 200, --no-cli).
# Results: $OUT/gpu_throughput.{log,json,md}; the .md is the summary for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$python" -c "import torch, timm, kornia, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'kornia', kornia.__version__, 'albumentations', albumentations.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
# the script time-boxes its parts; this outer limit keeps the call's output even if one hangs
timeout 500 "$python" bench/gpu_throughput.py --json "$OUT/gpu_throughput.json" \
  --markdown "$OUT/gpu_throughput.md" "$@" 2>&1 | tee "$OUT/gpu_throughput.log"
