"""GPU training throughput (issue 12): the template end to end against the bare limit.

All rows train the same network (``Workspace.create_model``: timm resnet50 at 224 px in the
template's wrapper, random init), the engine's AdamW param groups (``make_optimizer``), batch
``--batch``, bf16 autocast (``amp=true``) and channels_last:

1. ``bare``: a minimal loop on a synthetic float batch already on the GPU (the upper limit);
2. ``engine + loader``: ``FoldTrainer._train_epoch`` over ``Workspace.loader`` on the cub50 uint8
   decode-once cache (rows repeated to fill the epoch), per-sample RandomResizedCrop +
   HorizontalFlip on ``--workers`` workers, pinned memory, and the batch augmentations
   ``--batch-augment`` on the GPU (kornia RandAugment + mixup by default);
3. the same without batch augmentation (what the GPU augmentation costs);
4. ``competition train`` (one process) on cub50 fold 0, train img/s of its epochs from log.csv;
5. the same under ``torchrun --nproc-per-node N`` when N > 1 GPUs (or ``--nproc``).

Every part is time-boxed (``--steps`` and ``--part-seconds``), so the whole stays under 8 minutes
on one H200. img/s of an epoch includes the loader's start-up (workers are started per epoch, as in
training); "steady" counts from the first batch. Targets: end to end >= 90% of the bare limit and
>= 3,000 img/s on the H200.

Usage::

    bash bench/gpu_run.sh                                  # on the device machine (see there)
    .venv/bin/python bench/gpu_throughput.py --quick       # CPU smoke run (tiny model, 32 px)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from competition.config import load_config  # noqa: E402
from competition.device import autocast  # noqa: E402
from competition.engine import FoldTrainer, make_optimizer, warmup_cosine  # noqa: E402
from competition.workspace import Workspace  # noqa: E402

ANCHORS = (
    "ResNet-50 AMP training: 2,470 img/s on one A100 (NVIDIA reference scripts); "
    "1,218 img/s on an RTX 3090 with channels_last (timm)"
)
BATCH_AUGMENT = "[{name: randaugment}, {name: mixup, alpha: 0.2}]"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Boxed:
    """A loader that stops after ``steps`` batches or ``seconds``, and notes its first batch."""

    def __init__(self, loader, steps: int, seconds: float):
        self.loader, self.steps, self.seconds = loader, steps, seconds
        self.first: float | None = None

    def __getattr__(self, name):  # sampler, batch_sampler, dataset: the engine's set_epoch
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self):
        start = time.perf_counter()
        for step, batch in enumerate(self.loader):
            if step == 0:
                self.first = time.perf_counter()
            yield batch
            if step + 1 >= self.steps or time.perf_counter() - start > self.seconds:
                break


def bare_limit(model, config, device, args, num_classes: int) -> dict:
    """The minimal loop on one synthetic batch already on the device."""
    batch, size = args.batch, args.size
    optimizer = make_optimizer(model, config.optim)
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, args.warmup))
    images = torch.rand(batch, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, num_classes, (batch,), device=device)
    smoothing = float(config.loss.params.get("label_smoothing", 0.0))
    model.train()

    def step():
        with autocast(device, config.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    start, steps = time.perf_counter(), 0
    while steps < args.steps and time.perf_counter() - start < args.part_seconds:
        step()
        steps += 1
    sync(device)
    seconds = time.perf_counter() - start
    rate = steps * batch / seconds
    return {"steps": steps, "seconds": seconds, "img_s": rate, "steady_img_s": rate}


def engine_epoch(run: Workspace, model, config, augments, args, tmp: Path, label: str) -> dict:
    """``FoldTrainer._train_epoch`` over ``Workspace.loader``: a warm-up epoch, a timed one."""
    device = run.device
    n = len(run.competition.train)
    rows = args.batch * (args.warmup + args.steps + 1)
    index = np.resize(np.arange(n), rows)  # the table repeated: one long epoch
    counts = np.bincount(run.targets, minlength=len(run.classes)).tolist()
    trainer = FoldTrainer(
        0,
        model,
        run.create_loss(counts),
        augments,
        config,
        run.metric,
        tmp / label,
        device,
        len(run.classes),
        log=lambda *a, **k: None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, warmup_cosine(args.warmup + args.steps, args.warmup)
    )
    warm = Boxed(run.loader("train", index, train=True, seed=0), args.warmup, args.part_seconds)
    trainer._train_epoch(warm, scheduler, 0)  # workers, pinned buffers, cudnn, kornia
    timed = Boxed(run.loader("train", index, train=True, seed=1), args.steps, args.part_seconds)
    sync(device)
    start = time.perf_counter()
    _, seen = trainer._train_epoch(timed, scheduler, 1)
    sync(device)
    end = time.perf_counter()
    steps = seen // args.batch
    steady = (steps * args.batch) / (end - timed.first) if timed.first else float("nan")
    return {
        "steps": steps,
        "seconds": end - start,
        "startup_s": (timed.first or end) - start,
        "img_s": seen / (end - start),
        "steady_img_s": steady,
    }


def cli_train(args, overrides: list[str], name: str, nproc: int) -> dict:
    """``competition train`` (under torchrun when ``nproc`` > 1) on fold 0; img/s from log.csv."""
    base = [sys.executable, "-m", "competition", "train"]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        base += ["-m", "competition", "train"]
    command = [
        *base,
        str(ROOT / "configs" / "cub50.yaml"),
        *overrides,
        f"name={name}",
        f"optim.epochs={args.cli_epochs}",
        "optim.warmup_epochs=0",
        "--folds",
        "0",
    ]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.cli_seconds,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        parts = (exc.stdout, exc.stderr)
        output = "".join(p.decode() if isinstance(p, bytes) else p or "" for p in parts)
        code = "timeout"
    wall = time.perf_counter() - start
    print("\n".join(str(output).splitlines()[-6:]), flush=True)
    logs = sorted((ROOT / "runs").glob(f"{name}*/fold_0/log.csv"))
    result = {"exit": code, "wall_s": wall, "nproc": nproc}
    if logs:
        log = pd.read_csv(logs[-1])
        # under torchrun rank 0 logs the images of all processes (the engine sums them per epoch)
        rates = log["train_images_per_s"].tolist()
        later = rates[1:] or rates  # the first epoch pays for cudnn, kornia and the caches
        result |= {"epochs": len(rates), "epoch_img_s": rates, "img_s": statistics.median(later)}
    for path in (ROOT / "runs").glob(f"{name}*"):
        shutil.rmtree(path, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = ROOT / ".devdata" / "cub50"
    if not default_data.is_dir():
        default_data = ROOT.parent / "shared" / "data" / "cub50"
    parser.add_argument("--data", type=Path, default=default_data, help="a cub50-like folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per part")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps per part")
    parser.add_argument("--part-seconds", type=float, default=45.0, help="time box per part")
    parser.add_argument("--batch-augment", default=BATCH_AUGMENT, help="augment.batch (YAML)")
    parser.add_argument("--cli-epochs", type=int, default=4)
    parser.add_argument("--cli-seconds", type=float, default=150.0, help="time box per CLI run")
    parser.add_argument("--nproc", type=int, default=None, help="DDP processes (default: GPUs)")
    parser.add_argument("--no-cli", action="store_true", help="skip the competition train rows")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet10t, 32 px")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.batch, args.workers = "resnet10t", 32, 32, 2
        args.steps, args.warmup, args.cli_epochs, args.cli_seconds = 4, 1, 1, 600.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench(args, tmp: Path) -> None:
    began = time.perf_counter()
    overrides = [
        f"device={args.device}",
        f"competition.root={args.data.resolve()}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.cache_dir={tmp / 'cache'}",
        f"model.backbone={args.backbone}",
        "model.pretrained=null",
        "model.finetune=full",
        "model.drop_rate=0.0",
        "amp=true",
        "model.channels_last=true",
    ]
    config = load_config(ROOT / "configs" / "cub50.yaml", [*overrides, "augment.batch=[]"])
    run = Workspace(config, folds_dir=tmp / "folds", log=lambda *a, **k: None)
    device = run.device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    )
    machine = f"{name}, {gpus} GPU(s), {os.cpu_count()} CPU cores, torch {torch.__version__}"
    print(machine, flush=True)
    start = time.perf_counter()
    run.images("train")
    print(f"cache: {len(run.competition.train)} images, {time.perf_counter() - start:.1f} s")

    results: dict = {"machine": machine, "settings": vars(args) | {"data": str(args.data)}}
    torch.manual_seed(0)
    model = run.create_model()
    rows: dict[str, dict] = {}

    rows["bare (synthetic batch on the device)"] = bare_limit(
        copy.deepcopy(model).to(device).to(memory_format=torch.channels_last),
        config,
        device,
        args,
        len(run.classes),
    )
    print("bare:", rows["bare (synthetic batch on the device)"], flush=True)

    aug_config = load_config(
        ROOT / "configs" / "cub50.yaml", [*overrides, f"augment.batch={args.batch_augment}"]
    )
    names = ", ".join(spec.name for spec in aug_config.augment.batch)
    for label, cfg in (
        (f"engine + loader + batch aug ({names})", aug_config),
        ("engine + loader, no batch aug", config),
    ):
        run.config = cfg
        torch.manual_seed(0)
        net = copy.deepcopy(model)
        augments = run.create_batch_augments(net)
        rows[label] = engine_epoch(run, net, cfg, augments, args, tmp, f"fold-{len(rows)}")
        print(f"{label}:", rows[label], flush=True)
        del net, augments
        if device.type == "cuda":
            torch.cuda.empty_cache()

    cli: dict[str, dict] = {}
    if not args.no_cli:
        cli_overrides = [o for o in overrides if not o.startswith("data.cache_dir")]
        cli_overrides += [
            f"data.cache_dir={tmp / 'cache'}",
            f"augment.batch={args.batch_augment}",
            "tta=[identity]",
        ]
        cli["competition train, 1 process"] = cli_train(args, cli_overrides, "bench-gpu-1", 1)
        nproc = args.nproc if args.nproc is not None else gpus
        if nproc > 1:
            cli[f"competition train, DDP {nproc} processes"] = cli_train(
                args, cli_overrides, f"bench-gpu-{nproc}", nproc
            )
        for label, result in cli.items():
            print(f"{label}: {result}", flush=True)

    results |= {"rows": rows, "cli": cli, "wall_s": time.perf_counter() - began}
    summary = summarise(args, machine, rows, cli, time.perf_counter() - began)
    print("\n" + summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(summary + "\n")


def summarise(args, machine: str, rows: dict, cli: dict, wall: float) -> str:
    """The markdown to paste into bench/RESULTS.md."""
    bare = next(iter(rows.values()))["img_s"]
    lines = [
        f"{machine}; {args.backbone} at {args.size} px, batch {args.batch}, AdamW, bf16 autocast "
        f"(amp=true), channels_last, {args.workers} loader workers; cub50 uint8 cache "
        f"({args.data.name}); {args.steps} timed steps per part after {args.warmup} warm-up; "
        f"whole script {wall:.0f} s.",
        "",
        "| training | img/s (epoch, start-up incl.) | img/s steady | % of bare | steps |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['img_s']:.0f} | {r['steady_img_s']:.0f} | "
            f"{100 * r['img_s'] / bare:.1f} | {r['steps']} |"
        )
    for label, r in cli.items():
        if "img_s" in r:
            epochs = " / ".join(f"{x:.0f}" for x in r["epoch_img_s"])
            lines.append(
                f"| {label} (cub50 fold 0, {r['epochs']} epochs: {epochs}; median after the "
                f"first; wall {r['wall_s']:.0f} s) | {r['img_s']:.0f} | | "
                f"{100 * r['img_s'] / bare:.1f} | |"
            )
        else:
            lines.append(f"| {label}: failed ({r['exit']}) | | | | |")
    end_to_end = [r["img_s"] for label, r in rows.items() if label.startswith("engine")]
    best = end_to_end[0] if end_to_end else float("nan")
    lines += [
        "",
        f"End to end (batch aug) / bare: {best / bare:.3f} (target >= 0.90: "
        f"{'met' if best >= 0.9 * bare else 'NOT met'}); end to end {best:.0f} img/s "
        f"(target >= 3,000 on the H200: {'met' if best >= 3000 else 'NOT met'}).",
        f"Anchors: {ANCHORS}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
