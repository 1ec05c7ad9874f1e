"""Training of one fold: optimiser, schedule, batch augmentation, validation, checkpoints, resume.

The engine knows no specific model, augmentation or loss: it gets them built from plugins. Recipe:
SGD with momentum or AdamW without weight decay on norm and bias parameters, cosine schedule with
linear warm-up (Loshchilov & Hutter 2017; Goyal et al. 2017), optional EMA of weights
(Polyak & Juditsky 1992), autocast and channels_last on GPU. ``last.pt`` is written atomically every
epoch so a killed run resumes where it stopped; ``best.pt`` keeps the best epoch by the metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from competition.config import Config, OptimConfig
from competition.device import autocast, bf16_supported, to_device
from competition.errors import ConfigError
from competition.io import load_torch, save_torch, write_csv
from competition.loaders import reseed
from competition.metrics import METRICS, Metric
from competition.predict import predict_probs


@dataclass
class FoldResult:
    """What one fold's training produced."""

    fold: int
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def config_hash(config: Config) -> str:
    """Identifies the training recipe, so a resume never mixes two recipes in one checkpoint."""
    return hashlib.sha1(
        json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
    ).hexdigest()


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Optimiser groups: the model's LR scales, and no weight decay on norm and bias parameters."""
    if hasattr(model, "param_groups"):
        groups = model.param_groups()
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    result = []
    for group in groups:
        scale = float(group.get("lr_scale", 1.0))
        params = [p for p in group["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for members, wd in ((decay, optim.weight_decay), (no_decay, 0.0)):
            if members:
                result.append({"params": members, "lr": optim.lr * scale, "weight_decay": wd})
    if not result:
        raise ConfigError("model: no trainable parameters; check model.finetune")
    return result


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, optim)
    if optim.name == "sgd":
        return torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=optim.lr)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class FoldTrainer:
    """Trains one fold; call :meth:`fit`."""

    def __init__(
        self,
        fold: int,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        batch_augments: list,
        config: Config,
        metric: Metric,
        fold_dir: Path,
        device: torch.device,
        num_classes: int,
        on_epoch_end=None,
        log=tqdm.write,
    ):
        self.fold = fold
        self.config = config
        self.metric = metric
        self.fold_dir = Path(fold_dir)
        self.device = device
        self.num_classes = num_classes
        self.channels_last = config.model.channels_last
        self.amp = config.amp and device.type == "cuda"
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_fn.to(device)
        self.batch_augments = batch_augments
        self.on_epoch_end = on_epoch_end
        self.log = log
        self.optimizer = make_optimizer(self.model, config.optim)
        self.ema = None
        if config.optim.ema_decay:
            self.ema = AveragedModel(
                self.model,
                multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay),
                use_buffers=True,
            )
        fp16 = self.amp and not bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    # -- checkpoints ------------------------------------------------------------------------------

    def _eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _save_last(
        self, scheduler, epoch: int, best: float | None, best_epoch: int, history
    ) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "best_score": best,
            "best_epoch": best_epoch,
            "history": history,
            "config_hash": config_hash(self.config),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        save_torch(self.fold_dir / "last.pt", state)

    def _resume(self, scheduler):
        path = self.fold_dir / "last.pt"
        if not path.is_file():
            return 0, None, -1, []
        state = load_torch(path)
        if state["config_hash"] != config_hash(self.config):
            raise ConfigError(
                f"{path}: this checkpoint was trained with another config. Choose a new run name "
                f"(name=...) or delete {self.fold_dir.parent} to start over."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])  # dropout, kornia draws on the GPU
        self.log(f"fold {self.fold}: resumed after epoch {state['epoch'] + 1} from {path}")
        return state["epoch"] + 1, state["best_score"], state["best_epoch"], state["history"]

    # -- training ---------------------------------------------------------------------------------

    def _train_epoch(self, loader, scheduler, epoch: int) -> tuple[float, int]:
        self.model.train()
        epochs, mix_off = self.config.optim.epochs, self.config.augment.mix_off_last_epochs
        augments = [
            a
            for a in self.batch_augments
            if not (getattr(a, "mixes", False) and epoch >= epochs - mix_off)
        ]
        total = torch.zeros((), device=self.device)
        seen = 0
        bar = tqdm(
            loader, desc=f"fold {self.fold} epoch {epoch + 1}/{epochs}", unit="batch", leave=False
        )
        for step, (images, targets) in enumerate(bar):
            images = to_device(images, self.device, self.channels_last)
            targets = targets.to(self.device, non_blocking=True)
            if augments:
                targets = F.one_hot(targets, self.num_classes).float()
                for augment in augments:
                    images, targets = augment(images, targets)
            with autocast(self.device, self.amp):
                logits = self.model(images)
            loss = self.loss_fn(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total += loss.detach() * len(images)
            seen += len(images)
            if step % 20 == 0:  # the only host sync, at log intervals
                bar.set_postfix(loss=f"{total.item() / seen:.4f}")
        return total.item() / max(seen, 1), seen

    def fit(self, train_loader, val_loader, val_targets: np.ndarray) -> FoldResult:
        epochs = self.config.optim.epochs
        steps = len(train_loader)
        if steps == 0:
            raise ConfigError(
                f"fold {self.fold}: the train loader is empty; lower data.batch_size "
                f"({self.config.data.batch_size})"
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(epochs * steps, round(self.config.optim.warmup_epochs * steps)),
        )
        start, best, best_epoch, history = self._resume(scheduler)
        started = time.perf_counter()
        for epoch in range(start, epochs):
            tick = time.perf_counter()
            reseed(train_loader, self.config.seed * 100_003 + self.fold * 1_009 + epoch)
            train_loss, seen = self._train_epoch(train_loader, scheduler, epoch)
            train_seconds = time.perf_counter() - tick
            probs = predict_probs(
                self._eval_model(),
                val_loader,
                self.device,
                amp=self.amp,
                channels_last=self.channels_last,
                desc="validate",
            )
            score = self.metric(val_targets, probs)
            val_loss = METRICS["log_loss"](val_targets, probs)
            improved = self.metric.better(score, best)
            if improved:
                best, best_epoch = score, epoch
                save_torch(
                    self.fold_dir / "best.pt",
                    {"model": self._eval_model().state_dict(), "epoch": epoch},
                )
            row = {
                "epoch": epoch + 1,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "val_loss": val_loss,
                f"val_{self.metric.name}": score,
                "train_images_per_s": seen / train_seconds,
                "seconds": time.perf_counter() - tick,
            }
            history.append(row)
            write_csv(self.fold_dir / "log.csv", pd.DataFrame(history))
            self._save_last(scheduler, epoch, best, best_epoch, history)
            self.log(
                f"fold {self.fold} epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  "
                f"val_loss {val_loss:.4f}  val_{self.metric.name} {score:.4f}"
                f"{'  *' if improved else ''}  {row['train_images_per_s']:.0f} img/s"
            )
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, row)
        return FoldResult(
            self.fold, best_epoch + 1, float(best), history, time.perf_counter() - started
        )

    def load_best(self) -> torch.nn.Module:
        """The evaluation model with the best epoch's weights."""
        model = self._eval_model()
        model.load_state_dict(load_torch(self.fold_dir / "best.pt", self.device)["model"])
        return model
