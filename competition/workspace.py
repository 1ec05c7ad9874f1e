"""What every producer of a run shares: the competition's tables, folds, cached images, loaders,
plugins, the device and the components the config names (model, loss, batch augmentations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from competition import distributed
from competition.config import REPO_ROOT, Config
from competition.data import Competition, read_competition
from competition.device import amp_dtype, select_device
from competition.errors import PluginError
from competition.folds import FOLDS_DIR, load_or_make_folds
from competition.images import MappedImages, cache_path, cached_images
from competition.io import remove_orphan_temporaries
from competition.loaders import ImageDataset, SamplePipeline, make_loader
from competition.manager import get_plugin_manager, resolve
from competition.metrics import get_metric
from competition.predict import tta_views


class Workspace:
    """A config resolved against its data: tables, folds, images, loaders and components."""

    def __init__(self, config: Config, folds_dir: Path = FOLDS_DIR, log=print):
        self.config = config
        self.log = log
        self.pm = get_plugin_manager()
        self.metric = get_metric(config.metric)
        self.device = distributed.setup(select_device(config.device))
        amp_dtype(self.device, config.amp)  # amp=fp16 on a CPU fails here, not mid-epoch
        self.competition: Competition = read_competition(config)
        self.classes = self.competition.classes
        self.fold_of = load_or_make_folds(
            self.competition.train, config.competition.name, config.folds, folds_dir, log
        )
        data = config.data
        self.eval_size = data.eval_image_size or data.image_size
        self.cache_side = round(max(data.image_size, self.eval_size) / data.crop_pct)
        self._images: dict[str, MappedImages] = {}
        self.views = tta_views(config.tta, self.pm)
        remove_orphan_temporaries(REPO_ROOT / data.cache_dir)
        self._refuse_unreadable_images()

    @property
    def targets(self) -> np.ndarray:
        """Class index of every train row."""
        return self.competition.train["target"].to_numpy()

    def split_names(self) -> list[str]:
        """The unlabelled or held-out splits this competition has: ``test`` and/or ``holdout``."""
        return [s for s in ("test", "holdout") if getattr(self.competition, s) is not None]

    # -- data -------------------------------------------------------------------------------------

    def _cache_path(self, split: str) -> Path:
        data = self.config.data
        return cache_path(
            list(getattr(self.competition, split)["path"]),
            self.cache_side,
            REPO_ROOT / data.cache_dir,
            data.resize,
            f"{self.config.competition.name}-{split}",
        )

    def _refuse_unreadable_images(self) -> None:
        """Before any work: every image of a split not cached yet opens (all bad ones listed)."""
        from competition.audit import raise_if_unreadable

        cc, kaggle = self.config.competition, self.config.competition.layout == "kaggle"
        sources = {
            "train": cc.train_csv if kaggle else f"{cc.train_dir}/",
            "test": (cc.test_csv or cc.sample_submission or cc.test_images)
            if kaggle
            else cc.test_dir,
            "holdout": f"{cc.holdout_dir}/",
        }
        for split in ("train", *self.split_names()):
            if not self._cache_path(split).is_file():
                table = getattr(self.competition, split)
                workers = max(1, self.config.data.num_workers)
                raise_if_unreadable(table, sources[split], workers, csv_rows=kaggle)

    def images(self, split: str) -> MappedImages:
        """The cached uint8 images of ``train``, ``test`` or ``holdout``."""
        if split not in self._images:
            table = getattr(self.competition, split)
            data = self.config.data
            self._images[split] = cached_images(
                list(table["path"]),
                self.cache_side,
                REPO_ROOT / data.cache_dir,
                data.resize,
                data.num_workers,
                desc=f"{self.config.competition.name}-{split}",
            )
        return self._images[split]

    def loader(self, split: str, index=None, train: bool = False, seed: int = 0, extra=None):
        """Batches of ``split`` (rows ``index``): training transforms when ``train``, else eval.

        Under torchrun, evaluation loaders hold this process's shard of the rows
        (:func:`competition.distributed.gather_rows` puts the predictions back together).
        ``extra`` (:class:`ExtraRows`) appends images of another split with given targets
        (pseudo-labels); soft targets make every row's target a soft row.
        """
        data = self.config.data
        table = getattr(self.competition, split)
        images = self.images(split)
        targets = table["target"].to_numpy() if "target" in table else None
        if not train and distributed.active():  # this process's rows; gather_rows joins them
            index = distributed.shard(np.arange(len(table)) if index is None else index)
        if index is not None:
            images = _Subset(images, index)
            targets = None if targets is None else targets[index]
        soft = None
        if extra is not None:
            images = _Concat(images, _Subset(self.images(extra.split), extra.index))
            targets, soft = extra.join(targets, len(self.classes))
        specs, size, key = (
            (self.config.augment.train, data.image_size, "augment.train")
            if train
            else (self.config.augment.eval, self.eval_size, "augment.eval")
        )
        pipeline = SamplePipeline(specs, size, key, self.pm)
        if len(images):  # fail here, not in a worker, if the output size is wrong
            pipeline(np.array(images[0]))
        dataset = ImageDataset(images, targets, pipeline, soft)
        batch = data.batch_size if train else (data.eval_batch_size or data.batch_size * 2)
        sampler = None
        if train and targets is not None:
            factory = resolve("samplers", data.sampler.name, "data.sampler.name", self.pm)
            num_classes, params = len(self.classes), data.sampler.params

            def sampler(generator):
                return factory(targets, num_classes, generator, **params)

        return make_loader(
            dataset, batch, train, data.num_workers, seed, self.device.type == "cuda", sampler
        )

    # -- components -------------------------------------------------------------------------------

    def create_model(self) -> torch.nn.Module:
        model = self.pm.hook.competition_create_model(
            config=self.config, num_classes=len(self.classes)
        )
        if model is None:
            raise PluginError(
                "no plugin answered competition_create_model; is plugins.backbones blocked?"
            )
        return model

    def create_loss(self, class_counts: list[int]) -> torch.nn.Module:
        factory = resolve("losses", self.config.loss.name, "loss.name", self.pm)
        return factory(len(self.classes), class_counts, **self.config.loss.params)

    def create_batch_augments(self, model: torch.nn.Module) -> list:
        augments = []
        for i, spec in enumerate(self.config.augment.batch):
            augment = resolve("batch_augments", spec.name, f"augment.batch[{i}].name", self.pm)(
                **spec.params
            )
            if hasattr(augment, "attach"):
                augment.attach(model)
            augments.append(augment)
        return augments


@dataclass(frozen=True)
class ExtraRows:
    """Images of ``split`` (rows ``index``) added to a loader's rows with ``targets``: class
    indices (M,) or soft rows (M, K) summing to one (pseudo-labels, :mod:`competition.pseudo`)."""

    split: str
    index: np.ndarray
    targets: np.ndarray

    def join(self, targets: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Class indices of all rows (what samplers see), and soft rows of all rows or ``None``."""
        extra = np.asarray(self.targets)
        if extra.ndim == 1:
            return np.concatenate([targets, extra]), None
        hard = np.concatenate([targets, extra.argmax(1)])
        soft = np.concatenate([np.eye(num_classes, dtype=np.float32)[targets], extra])
        return hard, soft.astype(np.float32)


class _Concat:
    """Two arrays one after the other, read lazily."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]


class _Subset:
    """Rows ``index`` of an array, read lazily (keeps the memory map)."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.index[i]]


__all__ = ["ExtraRows", "Workspace"]
