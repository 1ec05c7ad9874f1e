"""Augmentation throughput (issue 3): the loader, the batch augmentations and the model, in one run.

Measures on real images (trashnet-like or cub50-like folder), through the real core:

1. images/s of ``Workspace.loader`` (decode-once cache + albumentations per sample), 0-2 workers,
   for RandomResizedCrop + HorizontalFlip, and the same + ColorJitter;
2. images/s of the kornia / mixing batch augmentations on the device;
3. training images/s of the model (``FoldTrainer._train_epoch``: forward, backward, AdamW step);
4. loader / model ratio (target >= 3x after the first epoch);
5. batch augmentation time as a share of the training step (target <= 10% on GPU);
6. an epoch over ``--cache-images`` images with and without the decode-once cache.

Usage (from the repo root)::

    .venv/bin/python bench/augment.py                    # CPU, trashnet, ~5 min on 2 cores
    .venv/bin/python bench/augment.py --quick            # smoke run
    .venv/bin/python bench/augment.py --device cuda --data /path/to/trashnet --json $OUT/aug.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from competition.config import load_config, replace  # noqa: E402
from competition.device import autocast, to_device  # noqa: E402
from competition.engine import FoldTrainer, warmup_cosine  # noqa: E402
from competition.images import cached_images, decode  # noqa: E402
from competition.loaders import (  # noqa: E402
    ImageDataset,
    SamplePipeline,
    collate_channels_last,
    make_loader,
)
from competition.manager import resolve  # noqa: E402
from competition.workspace import Workspace  # noqa: E402

BATCH_AUGMENTS = ("randaugment", "trivialaugment", "mixup", "cutmix")
BASE_TRAIN = [
    {"name": "RandomResizedCrop", "params": {"scale": [0.35, 1.0]}},
    {"name": "HorizontalFlip", "params": {}},
]
JITTER = {
    "name": "ColorJitter",
    "params": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 1.0},
}


def data_config(data: Path) -> tuple[Path, list[str]]:
    """The shipped config that fits ``data`` (trashnet-like or cub50-like) and its root override."""
    data = data.resolve()
    if (data / "train.csv").is_file() and (data / "train").is_dir():
        config = ROOT / "configs" / "trashnet.yaml"
        extra = ["competition.test_images=null", "competition.sample_submission=null"]
    elif (data / "labels.csv").is_file() and (data / "images").is_dir():
        config, extra = ROOT / "configs" / "cub50.yaml", []
    else:
        sys.exit(
            f"--data {data}: expected a trashnet-like folder (train.csv + train/) "
            "or a cub50-like folder (labels.csv + images/)"
        )
    return config, [f"competition.root={data}", *extra]


class Timer:
    """Wall time of a region, synchronising CUDA before and after; one instance per region."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def loader_pass(loader) -> tuple[int, float]:
    """Images and seconds of one full pass (worker start-up included, as in training)."""
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        seen += len(images)
    return seen, time.perf_counter() - start


class Decoding:
    """Array-like over image files that decodes (and resizes) on every access: no cache."""

    def __init__(self, paths, side: int, mode: str):
        self.paths, self.side, self.mode = list(paths), side, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode(self.paths[i], self.side, self.mode)


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        f"\n{title}",
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
    ]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "trashnet")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument(
        "--loader-images", type=int, default=None, help="images per loader pass (1024; GPU 2048)"
    )
    parser.add_argument("--cache-images", type=int, default=512, help="images for cache on/off")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="0 1 2 (GPU: also 4 8 12)"
    )
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--quick", action="store_true", help="smoke run: few images and steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 on a busy CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.workers is None:
        more = [w for w in (4, 8, 12) if w <= (os.cpu_count() or 1)] if cuda else []
        args.workers = [0, 1, 2, *more]
    if args.loader_images is None:
        args.loader_images = 2048 if cuda else 1024
    if args.quick:
        args.loader_images, args.cache_images = 128, 64
    steps = args.train_steps or (2 if args.quick else (20 if cuda else 3))
    aug_reps = 3 if args.quick else (20 if cuda else 8)

    tmp = Path(tempfile.mkdtemp(prefix="bench-augment-"))
    try:
        bench(args, cuda, steps, aug_reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the caches are hundreds of MB


def bench(args, cuda: bool, steps: int, aug_reps: int, tmp: Path) -> None:
    config_path, overrides = data_config(args.data)
    overrides += [
        "name=bench-augment",
        f"device={args.device}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.cache_dir={tmp / 'cache'}",
        f"model.backbone={args.backbone}",
        "model.pretrained=null",  # speed does not depend on the weights
        "model.finetune=full",
        "augment.batch=[]",
    ]
    config = load_config(config_path, overrides)
    config = replace(config, {"augment.train": BASE_TRAIN})
    run = Workspace(config, folds_dir=tmp / "folds", log=lambda *a, **k: None)
    device = run.device
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "data": str(args.data),
        "settings": {
            "size": args.size,
            "batch": args.batch,
            "backbone": args.backbone,
            "cache_side": run.cache_side,
            "loader_images": args.loader_images,
            "cache_images": args.cache_images,
            "train_steps": steps,
            "amp": config.amp,
            "channels_last": config.model.channels_last,
        },
    }
    print(f"{results['machine']}; data {args.data} ({len(run.competition.train)} train images)")
    print(f"settings: {results['settings']}")
    out: list[str] = []

    # -- decode-once cache of the whole train set ------------------------------------------------
    start = time.perf_counter()
    run.images("train")
    build = time.perf_counter() - start
    n_train = len(run.competition.train)
    results["cache_build"] = {"images": n_train, "seconds": build, "images_per_s": n_train / build}
    print(f"cache build: {n_train} images in {build:.1f} s ({n_train / build:.0f} img/s)")

    # -- 1. loader alone --------------------------------------------------------------------------
    index = np.arange(min(args.loader_images, n_train))
    variants = {"RRC+HFlip": BASE_TRAIN, "RRC+HFlip+ColorJitter": [*BASE_TRAIN, JITTER]}
    loader_rows, loader_results = [], {}
    for variant, specs in variants.items():
        for workers in args.workers:
            run.config = replace(config, {"augment.train": specs, "data.num_workers": workers})
            loader = run.loader("train", index, train=True, seed=0)
            n1, t1 = loader_pass(loader)
            n2, t2 = loader_pass(loader)
            loader_results[(variant, workers)] = n2 / t2
            loader_rows.append([variant, workers, n1 / t1, n2 / t2])
            print(f"loader {variant} workers={workers}: {n1 / t1:.0f} / {n2 / t2:.0f} img/s")
    run.config = config
    results["loader"] = [
        dict(zip(["variant", "workers", "epoch1", "epoch2"], r, strict=True)) for r in loader_rows
    ]

    # -- real batches for the device parts --------------------------------------------------------
    run.config = replace(config, {"data.num_workers": 0})
    loader = run.loader("train", index[: args.batch * (steps + 2)], train=True, seed=0)
    batches = list(loader)
    run.config = config
    num_classes = len(run.classes)

    # -- 2. batch augmentations alone --------------------------------------------------------------
    augments = {
        name: resolve("batch_augments", name, f"augment.batch[{name}]", run.pm)()
        for name in BATCH_AUGMENTS
    }
    images = to_device(batches[0][0], device, config.model.channels_last)
    targets = F.one_hot(batches[0][1].to(device), num_classes).float()
    aug_rows, aug_speed = [], {}
    for name, augment in augments.items():
        for _ in range(2):
            augment(images, targets)
        with Timer(device) as t:
            for _ in range(aug_reps):
                augment(images, targets)
        per_batch = t.seconds / aug_reps
        aug_speed[name] = len(images) / per_batch
        aug_rows.append([name, per_batch * 1000, aug_speed[name]])
        print(f"batch augment {name}: {per_batch * 1000:.1f} ms/batch, {aug_speed[name]:.0f} img/s")
    results["batch_augment"] = [
        dict(zip(["name", "ms_per_batch", "images_per_s"], r, strict=True)) for r in aug_rows
    ]

    # -- 3. training step (the engine's own loop), in both memory formats ------------------------
    counts = np.bincount(run.competition.train["target"], minlength=num_classes).tolist()
    train_rows, trainers = [], {}
    for channels_last in (config.model.channels_last, not config.model.channels_last):
        variant = replace(config, {"model.channels_last": channels_last})
        torch.manual_seed(0)
        trainer = FoldTrainer(
            0,
            run.create_model(),
            run.create_loss(counts),
            [],
            variant,
            run.metric,
            tmp / "fold",
            device,
            num_classes,
            log=lambda *a, **k: None,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, warmup_cosine(10 * len(batches), len(batches))
        )
        trainer._train_epoch(batches[:2], scheduler, 0)  # warm-up (allocator, cudnn autotune)
        with Timer(device) as t:
            _, seen = trainer._train_epoch(batches[2:], scheduler, 0)
        trainers[channels_last] = trainer
        train_rows.append([channels_last, seen / t.seconds, 1000 * t.seconds / steps])
        print(f"training channels_last={channels_last}: {seen / t.seconds:.1f} img/s")
    train_speed = train_rows[0][1]  # the config's memory format
    results["train"] = [
        dict(zip(["channels_last", "images_per_s", "ms_per_step"], r, strict=True))
        for r in train_rows
    ]

    # -- 5. batch augmentation as a share of the training step -------------------------------------
    share_rows = []
    trainer = trainers[config.model.channels_last]
    model, loss_fn, optimizer = trainer.model, trainer.loss_fn, trainer.optimizer
    model.train()
    share_batches = batches[2:] if cuda else batches[2:4]  # CPU steps are slow
    for name, augment in augments.items():
        aug_time = step_time = 0.0
        for images, labels in share_batches:
            images = to_device(images, device, config.model.channels_last)
            targets = F.one_hot(labels.to(device, non_blocking=True), num_classes).float()
            with Timer(device) as ta:
                images, targets = augment(images, targets)
            with Timer(device) as ts:
                with autocast(device, trainer.amp):
                    logits = model(images)
                loss = loss_fn(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                trainer.scaler.scale(loss).backward()
                trainer.scaler.step(optimizer)
                trainer.scaler.update()
            aug_time += ta.seconds
            step_time += ts.seconds
        share = aug_time / (aug_time + step_time)
        n = len(share_batches)
        share_rows.append([name, 1000 * aug_time / n, 1000 * step_time / n, 100 * share])
        print(f"share {name}: {100 * share:.1f}% of the step")
    results["aug_share"] = [
        dict(zip(["name", "aug_ms", "step_ms", "share_percent"], r, strict=True))
        for r in share_rows
    ]

    # -- 6. an epoch with and without the decode-once cache ---------------------------------------
    table_ = run.competition.train.iloc[: args.cache_images]
    paths, labels = list(table_["path"]), table_["target"].to_numpy()
    side, mode = run.cache_side, config.data.resize

    def pipeline():
        return SamplePipeline(run.config.augment.train, args.size, "augment.train", run.pm)

    cache_rows, cache_results = [], {}
    for workers in args.workers:
        dataset = ImageDataset(Decoding(paths, side, mode), labels, pipeline())
        loader = make_loader(dataset, args.batch, True, workers, 0)
        n1, t1 = loader_pass(loader)
        n2, t2 = loader_pass(loader)
        start = time.perf_counter()
        cached = cached_images(
            paths, side, tmp / f"cache-{workers}", mode, max(workers, 1), desc="bench"
        )
        built = time.perf_counter() - start
        loader = make_loader(ImageDataset(cached, labels, pipeline()), args.batch, True, workers, 0)
        _, c1 = loader_pass(loader)
        _, c2 = loader_pass(loader)
        cache_results[workers] = {
            "no_cache_epoch1_s": t1,
            "no_cache_epoch2_s": t2,
            "cache_build_s": built,
            "cache_epoch1_s": built + c1,
            "cache_epoch2_s": c2,
        }
        cache_rows.append([workers, t1, t2, built, built + c1, c2, t2 / c2])
        print(
            f"cache workers={workers}: no cache {t1:.2f}/{t2:.2f} s, "
            f"cache {built + c1:.2f}/{c2:.2f} s"
        )
    results["cache"] = {str(k): v for k, v in cache_results.items()}

    # -- 7. host side of a batch: collate + to_device ----------------------------------------
    # Stacking per-sample CHW views of HWC arrays is a transposing copy; the loader's
    # collate_channels_last stacks the HWC arrays and permutes the batch (same values).
    dataset = ImageDataset(run.images("train"), None, pipeline())
    items = [dataset[i] for i in range(args.batch)]
    collates = {
        "per-sample CHW stack (before)": lambda: torch.stack(
            [x.permute(2, 0, 1) for x, _ in items]
        ),
        "collate_channels_last (now)": lambda: collate_channels_last(items)[0],
    }
    assert torch.equal(*(collate() for collate in collates.values()))
    collate_rows = []
    for label, collate in collates.items():
        batch = collate()
        with Timer(device) as t:
            for _ in range(aug_reps):
                collate()
        with Timer(device) as d:
            for _ in range(aug_reps):
                to_device(batch, device, config.model.channels_last)
        collate_rows.append([label, 1000 * t.seconds / aug_reps, 1000 * d.seconds / aug_reps])
    results["collate"] = [
        dict(zip(["collate", "ms", "to_device_ms"], r, strict=True)) for r in collate_rows
    ]

    # -- tables ---------------------------------------------------------------------------------
    out.append(
        table(
            f"Loader alone (Workspace.loader, {len(index)} images, batch {args.batch}, "
            f"{args.size} px, "
            f"cache side {run.cache_side}; images/s per pass, worker start-up included)",
            ["train transforms", "workers", "epoch 1 img/s", "epoch 2 img/s", "loader / model"],
            [[*r, r[3] / train_speed] for r in loader_rows],
        )
    )
    out.append(
        table(
            f"Batch augmentation alone on {device} (batch {args.batch} x 3 x {args.size}^2 float)",
            ["augment", "ms / batch", "img/s", "vs model img/s"],
            [[*r, r[2] / train_speed] for r in aug_rows],
        )
    )
    out.append(
        table(
            f"Training step: {args.backbone} at {args.size} px, full fine-tune, AdamW, batch "
            f"{args.batch}, {device}, amp={results['settings']['amp']} (FoldTrainer._train_epoch, "
            f"{steps} steps after 2 warm-up; first row = config's memory format)",
            ["channels_last", "images/s", "ms / step"],
            train_rows,
        )
    )
    out.append(
        table(
            "Batch augmentation share of the training step (aug / (aug + fwd/bwd/step))",
            ["augment", "aug ms / step", "fwd+bwd+step ms", "share %"],
            share_rows,
        )
    )
    out.append(
        table(
            f"Epochs over {len(paths)} images, with and without the decode-once cache (seconds; "
            "cache epoch 1 = build + pass)",
            [
                "workers",
                "no cache ep1",
                "no cache ep2",
                "cache build",
                "cache ep1",
                "cache ep2",
                "ep2 speed-up",
            ],
            cache_rows,
        )
    )
    out.append(
        table(
            f"Host side of one batch ({args.batch} x {args.size}^2 uint8, torch threads "
            f"{torch.get_num_threads()}, channels_last={config.model.channels_last})",
            ["collate", "collate ms", "to_device ms"],
            collate_rows,
        )
    )
    best = max(loader_results.values())
    worst = min(loader_results.values())
    out.append(
        f"\nloader / model training (epoch 2): best {best / train_speed:.1f}x, "
        f"worst {worst / train_speed:.1f}x (target >= 3x)"
    )
    print("\n".join(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
