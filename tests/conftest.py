"""Shared fixtures: small real competitions the suite makes itself, and slices of ../shared/data.

The suite must pass on a fresh clone with no ../shared. Tests about behaviour (loaders, runner,
resume, bad input...) use competitions made here from real images: scikit-learn's handwritten
digits (``kaggle_small``, ``folders_small``) and scikit-image's bundled photographs
(``photo_files``). Tests about the shared data sets themselves are marked ``shared_data`` and are
skipped, with one line of reason, where ../shared/data is absent; a fixture that reads ../shared
skips the same way, so a test that forgot the marker skips instead of erroring.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from competition.config import REPO_ROOT, load_config

SHARED = REPO_ROOT.parent / "shared" / "data"
TRASHNET = SHARED / "trashnet"
HYMENOPTERA = SHARED / "hymenoptera"
CUB50 = SHARED / "cub50"
SHARED_REASON = "needs ../shared/data (the shared data sets); CI has it"

#: The classes of ``kaggle_small``: the digits 0-5, named like the built-in demo's.
KAGGLE_SMALL_CLASSES = [f"digit_{d}" for d in range(6)]
#: The classes of ``folders_small`` (class-folder names).
FOLDERS_SMALL_CLASSES = ["digit_0", "digit_1"]
#: scikit-image's bundled photographs (real photos, no download), as used by ``photo_files``.
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``shared_data`` when ../shared/data is absent."""
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=SHARED_REASON)
    for item in items:
        if item.get_closest_marker("shared_data") is not None:
            item.add_marker(skip)


def require_shared(path: Path = SHARED) -> Path:
    """Skip the calling test or fixture (with the one-line reason) unless ``path`` exists."""
    if not path.exists():
        pytest.skip(SHARED_REASON)
    return path


# -- real images, made here ---------------------------------------------------------


def digit_images(side: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as uint8 images of ``side``.

    Returns (images (n, side, side) uint8, targets (n,) int), in the data set's own order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(x).resize((side, side), Image.BICUBIC)) for x in small]
    )
    return images, digits.target


def save_digit(gray: np.ndarray, path: Path, canvas: tuple[int, int] | None = None) -> None:
    """Write a grey digit as an RGB image (format from the suffix), centred on a black canvas."""
    image = Image.fromarray(gray).convert("RGB")
    if canvas is not None:
        framed = Image.new("RGB", canvas)
        framed.paste(image, ((canvas[0] - image.width) // 2, (canvas[1] - image.height) // 2))
        image = framed
    image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def photo(name: str, long_side: int = 96) -> Image.Image:
    """One of scikit-image's bundled photographs, RGB, resized to ``long_side`` (aspect kept)."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()[..., :3])
    scale = long_side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def placeholder_gif(path: Path) -> Path:
    """A two-frame palette GIF with a transparent colour saying "image not found".

    What a scraped data set holds where a photo went missing (like hymenoptera's
    train/ants/imageNotFound.gif): a loader must decode it (first frame, palette and transparency
    to RGB) like any other image.
    """
    frames = []
    for shade in (200, 120):
        frame = Image.new("RGB", (64, 48), (255, 255, 255))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((4, 4, 59, 43), outline=(shade, shade, shade), width=2)
        draw.text((8, 12), "image", fill=(90, 90, 90))
        draw.text((8, 24), "not found", fill=(90, 90, 90))
        frames.append(frame.convert("P", palette=Image.ADAPTIVE, colors=16))
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=500, loop=0, transparency=0
    )
    return path


@pytest.fixture(scope="session")
def kaggle_small(tmp_path_factory) -> Path:
    """A Kaggle-layout competition of real handwritten digits, a drop-in for ``trashnet_small``.

    train.csv (image_id,label) + train/<id>.jpg: 8 images of each of the 6 classes digit_0..digit_5
    (48 rows, ids t0000..t0047, the classes interleaved in the data set's order); test/<id>.jpg:
    12 unlabelled images (2 per class, ids t0048..t0059); sample_submission.csv (image_id,label).
    Images are 40x40 RGB JPEGs upscaled from scikit-learn's 8x8 digits. Same columns and file
    naming as trashnet, so ``trashnet_config(kaggle_small, tmp_path)`` works. Read-only: copy it
    before changing anything.
    """
    root = tmp_path_factory.mktemp("kaggle_small")
    images, targets = digit_images(40)
    chosen = {"train": [], "test": []}
    seen = dict.fromkeys(range(len(KAGGLE_SMALL_CLASSES)), 0)
    for i, target in enumerate(targets):
        if target in seen and seen[target] < 10:
            chosen["train" if seen[target] < 8 else "test"].append(i)
            seen[target] += 1
    ids = iter(f"t{n:04d}" for n in range(10_000))
    tables = {}
    for split, index in chosen.items():
        (root / split).mkdir()
        rows = []
        for i in index:
            image_id = next(ids)
            save_digit(images[i], root / split / f"{image_id}.jpg")
            rows.append((image_id, KAGGLE_SMALL_CLASSES[targets[i]]))
        tables[split] = pd.DataFrame(rows, columns=["image_id", "label"])
    tables["train"].to_csv(root / "train.csv", index=False)
    sample = tables["test"].assign(label=KAGGLE_SMALL_CLASSES[0])  # test labels are withheld
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


@pytest.fixture(scope="session")
def folders_small(tmp_path_factory) -> Path:
    """A class-folder competition of real handwritten digits, in hymenoptera's layout.

    train/<class>/f*.jpg: 6 images per class (48x40 JPEG, the digit on a wider black canvas) plus
    train/digit_0/imageNotFound.gif, a placeholder GIF (two frames, palette, transparency);
    val/<class>/f*.png: 4 labelled images per class (40x40 PNG). Classes: digit_0, digit_1.
    Read-only: copy it before changing anything.
    """
    root = tmp_path_factory.mktemp("folders_small")
    images, targets = digit_images(40)
    for target, label in enumerate(FOLDERS_SMALL_CLASSES):
        index = np.flatnonzero(targets == target)
        for split, part, suffix in (("train", index[:6], ".jpg"), ("val", index[6:10], ".png")):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in part:
                canvas = (48, 40) if split == "train" else None
                save_digit(images[i], folder / f"f{i:04d}{suffix}", canvas)
    placeholder_gif(root / "train" / FOLDERS_SMALL_CLASSES[0] / "imageNotFound.gif")
    return root


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory) -> dict[str, Path]:
    """scikit-image's bundled photographs as JPEG files, 96 px on the long side (aspect kept).

    Keys: chelsea (a cat), coffee, astronaut, rocket. Read-only: copy before changing.
    """
    root = tmp_path_factory.mktemp("photos")
    files = {}
    for name in PHOTO_NAMES:
        files[name] = root / f"{name}.jpg"
        photo(name).save(files[name], quality=92)
    return files


# -- slices of ../shared/data (skipped where it is absent) ---------------------------


@pytest.fixture(scope="session")
def trashnet_small(tmp_path_factory) -> Path:
    """A Kaggle-layout slice of trashnet: 8 train images per class and 12 test images."""
    require_shared(TRASHNET)
    root = tmp_path_factory.mktemp("trashnet_small")
    train = pd.read_csv(TRASHNET / "train.csv", dtype=str)
    train = train.groupby("label", group_keys=False).head(8).reset_index(drop=True)
    sample = pd.read_csv(TRASHNET / "sample_submission.csv", dtype=str).head(12)
    (root / "train").mkdir()
    (root / "test").mkdir()
    for image_id in train["image_id"]:
        shutil.copy(TRASHNET / "train" / f"{image_id}.jpg", root / "train")
    for image_id in sample["image_id"]:
        shutil.copy(TRASHNET / "test" / f"{image_id}.jpg", root / "test")
    train.to_csv(root / "train.csv", index=False)
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


# -- configs and run folders ------------------------------------------------------------


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Settings for a seconds-long CPU run: a tiny timm model at 32 px, one epoch, no workers."""
    return [
        "model.backbone=resnet10t",
        "model.pretrained=null",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


@pytest.fixture
def run_paths(tmp_path) -> dict:
    """Run, fold and submission folders inside the test's temp dir (never the repo's)."""
    return {
        "runs_dir": tmp_path / "runs",
        "folds_dir": tmp_path / "folds",
        "submissions_dir": tmp_path / "submissions",
    }


def trashnet_config(root: Path, tmp_path: Path, *extra: str):
    """configs/trashnet.yaml on ``root`` (``kaggle_small`` or ``trashnet_small``): tiny, 2 folds."""
    return load_config(
        REPO_ROOT / "configs" / "trashnet.yaml",
        [f"competition.root={root}", "folds.k=2", "name=t", *tiny_overrides(tmp_path), *extra],
    )
