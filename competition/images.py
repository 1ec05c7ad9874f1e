"""Decode-once image cache: every image is decoded and resized once into a uint8 array on disk.

Epochs 2..N (and every fold) read the memory-mapped array and never touch a JPEG again. The cache
file's name is a hash of the image paths, their sizes and modification times, the side and the
resize mode, so a changed file or size builds a new cache.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from competition.errors import DataError
from competition.io import atomic_path
from competition.progress import progress


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (palette, grayscale, RGBA, 16-bit, CMYK, animated GIF) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        scale = 255.0 / (65535.0 if high > 255 else max(high, 255.0))
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        array = (array - low) / ((high - low) or 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode(path: str | Path, side: int, mode: str = "crop") -> np.ndarray:
    """Read an image as (side, side, 3) uint8: shorter side resized + centre crop, or squashed."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = to_rgb(image)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read image ({type(exc).__name__}: {exc}). Replace or remove it."
        ) from exc
    if mode == "squash":
        image = image.resize((side, side), Image.BICUBIC)
    else:
        image = ImageOps.fit(image, (side, side), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class MappedImages:
    """The cache file as a read-only memory map that pickles as its path.

    DataLoader workers started with spawn (macOS, Windows) receive the dataset pickled; a plain
    memory map would travel as a full copy of the cache every epoch, this reopens the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.array, dtype=dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def cache_key(paths: list[Path], side: int, mode: str) -> str:
    digest = hashlib.sha1(f"{side}:{mode}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_path(paths: list[Path], side: int, cache_dir: Path, mode: str, desc: str) -> Path:
    """Where :func:`cached_images` keeps the cache of ``paths`` (it may not exist yet)."""
    paths = [Path(p) for p in paths]
    return Path(cache_dir) / f"{desc}-{side}px-{mode}-{cache_key(paths, side, mode)}.npy"


def _decode_args(args):
    return decode(*args)


def cached_images(
    paths: list[Path],
    side: int,
    cache_dir: Path,
    mode: str = "crop",
    workers: int = 2,
    desc="cache",
) -> MappedImages:
    """The uint8 images (N, side, side, 3) of ``paths`` as :class:`MappedImages`, built once."""
    paths = [Path(p) for p in paths]
    cache_dir = Path(cache_dir)
    target = cache_path(paths, side, cache_dir, mode, desc)
    if target.is_file():
        return MappedImages(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        array = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(paths), side, side, 3)
        )
        jobs = [(p, side, mode) for p in paths]
        bar = progress(total=len(paths), desc=f"decoding {desc} images", unit="img")
        if workers > 1 and len(paths) > 64:
            with ProcessPoolExecutor(workers) as pool:
                for i, image in enumerate(pool.map(_decode_args, jobs, chunksize=16)):
                    array[i] = image
                    bar.update()
        else:
            for i, job in enumerate(jobs):
                array[i] = _decode_args(job)
                bar.update()
        bar.close()
        array.flush()
        del array
    return MappedImages(target)
