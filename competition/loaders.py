"""Datasets and DataLoaders over the decode-once cache, with per-sample CPU transforms.

Images stay uint8 until they reach the device; normalisation is the model's job.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from competition import distributed
from competition.config import TransformSpec
from competition.errors import PluginError
from competition.manager import resolve


class SamplePipeline:
    """Per-sample transforms applied in order; checks the output is (size, size, 3) uint8."""

    def __init__(self, specs: list[TransformSpec], image_size: int, key: str, pm=None):
        self.image_size = image_size
        self.names = [spec.name for spec in specs]
        self.transforms = []
        for i, spec in enumerate(specs):
            factory = resolve("sample_transforms", spec.name, f"{key}[{i}].name", pm)
            self.transforms.append(factory(image_size, **spec.params))

    def set_seed(self, seed: int) -> None:
        for i, transform in enumerate(self.transforms):
            if hasattr(transform, "set_seed"):
                transform.set_seed(seed + i)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            image = transform(image)
        if image.shape != (self.image_size, self.image_size, 3) or image.dtype != np.uint8:
            raise PluginError(
                f"sample transforms {self.names} returned {image.dtype} {image.shape}, "
                f"expected uint8 ({self.image_size}, {self.image_size}, 3). "
                "End the pipeline with a transform that "
                "outputs the image size (e.g. RandomResizedCrop or CenterCrop)."
            )
        return image


class ImageDataset(Dataset):
    """Items ``(uint8 HWC tensor, target)``; target is -1 for unlabelled images.

    With ``soft`` (float (N, K) rows summing to one, e.g. pseudo-labels) every target is its soft
    row (a float32 tensor); ``targets`` stay the class indices (what samplers see).
    """

    def __init__(self, images: np.ndarray, targets, transform: SamplePipeline | None, soft=None):
        self.images = images
        self.targets = np.full(len(images), -1) if targets is None else np.asarray(targets)
        self.transform = transform
        self.soft = None if soft is None else np.asarray(soft, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = np.array(self.images[index])  # a writable copy of the memory-mapped row
        if self.transform is not None:
            image = self.transform(image)
        if self.soft is not None:
            return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(self.soft[index])
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.targets[index])


def collate_channels_last(items) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack HWC uint8 images into a (B, 3, H, W) batch stored channels-last.

    Stacking as HWC and permuting the batch is a plain copy; permuting each sample first would
    make the stack a slow transposing copy (and the device would transpose it back).
    """
    images = torch.stack([image for image, _ in items]).permute(0, 3, 1, 2)
    targets = [target for _, target in items]
    if isinstance(targets[0], torch.Tensor):  # soft rows (B, K)
        return images, torch.stack(targets)
    return images, torch.tensor(targets)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    transform = info.dataset.transform
    if transform is not None:
        transform.set_seed(int(info.seed % 2**31))


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    pin: bool = False,
    sampler=None,
) -> DataLoader:
    """A loader that shuffles (and drops a ragged last batch) only for training.

    ``sampler(generator) -> Sampler`` (training only) chooses the rows of an epoch from the
    loader's generator (see ``competition_register_samplers``); without it training shuffles.
    Under torchrun each process loads its chunk of every global batch of ``batch_size``
    (:class:`~competition.distributed.RankBatches`). Workers are started per epoch (not
    persistent) so :func:`reseed` makes every epoch's shuffle and augmentation a function of the
    seed alone: a resumed run repeats an uninterrupted one.
    """
    generator = torch.Generator()
    chosen = sampler(generator) if train and sampler is not None else None
    n = len(chosen) if chosen is not None else len(dataset)
    batches = {
        "batch_size": batch_size,
        "shuffle": train and chosen is None,
        "sampler": chosen,
        "drop_last": train and n > batch_size,
    }
    if train and distributed.active():  # this rank's chunk of each global batch
        order = chosen if chosen is not None else RandomSampler(dataset, generator=generator)
        rank, size = distributed.rank(), distributed.world_size()
        batches = {"batch_sampler": distributed.RankBatches(order, batch_size, rank, size)}
    loader = DataLoader(
        dataset,
        **batches,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_seed_worker,
        collate_fn=collate_channels_last,
        generator=generator,
    )
    reseed(loader, seed)
    return loader


def reseed(loader: DataLoader, seed: int) -> None:
    """Seed the next pass over ``loader``: shuffle order and per-sample transforms."""
    loader.generator.manual_seed(seed)
    transform = loader.dataset.transform
    if loader.num_workers == 0 and transform is not None:
        transform.set_seed(seed)
