"""Training of one fold: optimiser, schedule, batch augmentation, validation, checkpoints, resume.

The engine knows no specific model, augmentation or loss: it gets them built from plugins. Recipe:
SGD with momentum or AdamW without weight decay on norm and bias parameters, cosine schedule with
linear warm-up (Loshchilov & Hutter 2017; Goyal et al. 2017), optional EMA of weights
(Polyak & Juditsky 1992), autocast (bf16 also on CPU) and channels_last, optional torch.compile.
``last.pt`` is written atomically every epoch so a killed run resumes where it stopped;
``best.pt`` keeps the best epoch by the metric. Under torchrun the model is wrapped in
DistributedDataParallel (SyncBatchNorm on GPUs) and rank 0 alone writes
(:mod:`competition.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from competition import distributed
from competition.config import Config, OptimConfig
from competition.device import amp_dtype, autocast, needs_grad_scaler, to_device
from competition.errors import ConfigError, DamagedFileError, DivergenceError
from competition.io import load_torch, save_torch, write_csv
from competition.loaders import reseed
from competition.metrics import Metric, log_loss
from competition.predict import predict_probs
from competition.progress import progress
from competition.runs import FoldResult


def config_hash(config: Config) -> str:
    """Identifies the training recipe, so a resume never mixes two recipes in one checkpoint."""
    return hashlib.sha1(
        json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
    ).hexdigest()


def _cause(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one short line: its type and the start of its message."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(path: Path, label: str, fix: str, keys=("model",), map_location="cpu") -> dict:
    """A checkpoint this template wrote, loaded with ``weights_only=True``.

    A missing, truncated or corrupt file, or one without ``keys``, is a :class:`DamagedFileError`
    naming ``label`` (e.g. ``fold_0/last.pt``) and ``fix`` (what makes it again), never a raw
    pickle or zip traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{label} is missing ({path}); {fix}")
    try:
        state = load_torch(path, map_location)
    except Exception as exc:  # truncated: RuntimeError or OSError; garbage: UnpicklingError
        raise DamagedFileError(f"{label} is damaged ({_cause(exc)}); {fix}") from exc
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else keys
    if missing:
        raise DamagedFileError(
            f"{label} is damaged (not a checkpoint of this template: no "
            f"{', '.join(missing)}); {fix}"
        )
    return state


def _mismatch(label: str, exc: BaseException, fix: str) -> DamagedFileError:
    return DamagedFileError(
        f"{label} does not fit this model ({_cause(exc)}): it was saved from another "
        f"architecture, class list or plugin version; {fix}"
    )


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
        log=print,
    ):
        self.fold = fold
        self.config = config
        self.metric = metric
        self.fold_dir = Path(fold_dir)
        self.device = device
        self.num_classes = num_classes
        self.channels_last = config.model.channels_last
        self.amp = config.amp
        if distributed.active() and device.type == "cuda":  # batch statistics over all GPUs
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model = self.model  # what training steps call: DDP-wrapped and/or compiled
        if distributed.active():
            ids = [device.index] if device.type == "cuda" else None
            # static graph: the same parameters take part in every step, and a backbone may hold
            # some that never do (timm's unused classifier norms), which plain DDP refuses
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, static_graph=True
            )
        self.loss_fn = loss_fn.to(device)
        self.batch_augments = batch_augments
        self.on_epoch_end = on_epoch_end
        self.log = log
        self._compiled = self._compile(self.train_model) if config.model.compile else None
        self._compiled_ran = False
        self.optimizer = make_optimizer(self.model, config.optim)
        self.ema = None
        if config.optim.ema_decay:
            self.ema = AveragedModel(
                self.model,
                multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay),
                use_buffers=True,
            )
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, self.amp))
        self._saved_epoch: int | None = None  # the epoch (0-based) last.pt holds

    # -- torch.compile ----------------------------------------------------------------------------

    def _compile(self, module: torch.nn.Module):
        """``torch.compile(module)``; ``None`` (train eagerly, with a message) if it cannot."""
        backend = self.config.model.compile_backend
        try:
            return torch.compile(module, backend=backend)
        except Exception as exc:  # an unknown backend fails here; a missing compiler at 1st call
            self._compile_failed(exc)
            return None

    def _compile_failed(self, exc: BaseException) -> None:
        backend = self.config.model.compile_backend
        hint = ""
        if backend == "inductor":
            hint = " (inductor needs a C++ compiler on CPU, triton on GPU)"
        self.log(
            f"model.compile: torch.compile with backend {backend!r} failed{hint}: {_cause(exc)}. "
            "Training eagerly; set model.compile=false to skip the attempt, or "
            "model.compile_backend=aot_eager."
        )

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """The training forward: compiled if ``model.compile`` and it compiles, else eager."""
        if self._compiled is None:
            return self.train_model(images)
        if self._compiled_ran:
            return self._compiled(images)
        try:  # the first call compiles: a missing backend or compiler fails here
            logits = self._compiled(images)
        except Exception as exc:
            self._compile_failed(exc)
            self._compiled = None
            return self.train_model(images)
        self._compiled_ran = True
        return logits

    # -- checkpoints ------------------------------------------------------------------------------

    def _eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _save_last(
        self, scheduler, epoch: int, best: float | None, best_epoch: int, history
    ) -> None:
        rngs = distributed.all_objects(torch.get_rng_state())  # each process's dropout stream
        self._saved_epoch = epoch
        if not distributed.is_main():
            return
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
            "torch_rng": rngs[0],
            "torch_rng_ranks": rngs,
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        save_torch(self.fold_dir / "last.pt", state)

    def _resume(self, scheduler):
        path = self.fold_dir / "last.pt"
        if not path.is_file():
            return 0, None, -1, []
        label = f"{self.fold_dir.name}/last.pt"
        fix = f"delete it to retrain fold {self.fold} from scratch: rm {path}"
        keys = ("model", "optimizer", "scheduler", "scaler", "epoch", "config_hash", "torch_rng")
        state = load_checkpoint(path, label, fix, keys)
        if state["config_hash"] != config_hash(self.config):
            raise ConfigError(
                f"{path}: this checkpoint was trained with another config. Choose a new run name "
                f"(name=...) or delete {self.fold_dir.parent} to start over."
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            rngs = state.get("torch_rng_ranks") or []
            same_world = len(rngs) == distributed.world_size()
            torch.set_rng_state(rngs[distributed.rank()] if same_world else state["torch_rng"])
            if state.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["cuda_rng"])  # dropout, kornia draw on the GPU
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise _mismatch(label, exc, fix) from exc
        self._saved_epoch = state["epoch"]
        self.log(f"fold {self.fold}: resumed after epoch {state['epoch'] + 1} from {path}")
        return state["epoch"] + 1, state["best_score"], state["best_epoch"], state["history"]

    # -- training ---------------------------------------------------------------------------------

    def _train_epoch(self, loader, scheduler, epoch: int) -> tuple[float, int]:
        self.model.train()
        epochs, mix_off = self.config.optim.epochs, self.config.augment.mix_off_last_epochs
        samplers = (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None))
        for part in (self.loss_fn, *samplers):  # epoch-aware components
            if callable(getattr(part, "set_epoch", None)):
                part.set_epoch(epoch, epochs)
        augments = [
            a
            for a in self.batch_augments
            if not (getattr(a, "mixes", False) and epoch >= epochs - mix_off)
        ]
        total = torch.zeros((), device=self.device)
        # the first step whose loss is not finite, and that loss; kept on the device (no sync)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), device=self.device)
        seen = 0
        bar = progress(loader, desc=f"fold {self.fold} epoch {epoch + 1}/{epochs}", unit="batch")
        for step, (images, targets) in enumerate(bar):
            images = to_device(images, self.device, self.channels_last)
            targets = targets.to(self.device, non_blocking=True)
            if augments and targets.ndim == 1:  # soft rows (pseudo-labels) are mixed as they are
                targets = F.one_hot(targets, self.num_classes).float()
                for augment in augments:
                    images, targets = augment(images, targets)
            with autocast(self.device, self.amp):
                logits = self._forward(images)
            loss = self.loss_fn(logits.float(), targets)
            # only the loss: non-finite fp16 gradients are normal, GradScaler skips those steps
            new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach()).all()
            first_bad = torch.where(new_bad, step, first_bad)
            bad_loss = torch.where(new_bad, loss.detach().float().sum(), bad_loss)
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
                self._check_loss(first_bad, bad_loss, epoch, bar)
                bar.set_postfix(loss=f"{total.item() / seen:.4f}")
        self._check_loss(first_bad, bad_loss, epoch, bar)
        total, seen = distributed.all_sum([total.item(), seen])  # the global batch's figures
        return total / max(seen, 1), int(seen)

    def _check_loss(self, first_bad: torch.Tensor, bad_loss: torch.Tensor, epoch: int, bar):
        """Raise :class:`DivergenceError` if a step of this epoch had a non-finite loss. Called
        before anything of the epoch is saved, so last.pt and best.pt never hold its weights."""
        step = int(first_bad)
        if step >= 0:
            bar.close()
            raise self._diverged(
                f"the training loss became {float(bad_loss)} at epoch {epoch + 1}, step {step} "
                "(batch index within the epoch, from 0)"
            )

    def _diverged(self, what: str) -> DivergenceError:
        optim = self.config.optim
        fixes = [f"lower optim.lr (now {optim.lr:g})"]
        if optim.grad_clip:
            fixes.append(f"lower optim.grad_clip (now {optim.grad_clip:g})")
        else:
            fixes.append("set optim.grad_clip (e.g. optim.grad_clip=1.0)")
        if amp_dtype(self.device, self.amp) is not None:
            fixes.append("turn mixed precision off (amp=false)")
        if self._saved_epoch is None:
            kept = f"none yet (no epoch of fold {self.fold} finished)"
        else:
            kept = f"{self.fold_dir / 'last.pt'} after epoch {self._saved_epoch + 1}"
        return DivergenceError(
            f"fold {self.fold} diverged: {what}. Nothing of this epoch was saved; last good "
            f"checkpoint: {kept}. Fix: {', '.join(fixes[:-1])} or {fixes[-1]}; a changed config "
            f"is a new run, so rerun with a new name (name=...) or delete {self.fold_dir.parent}."
        )

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
            probs = distributed.gather_rows(probs)  # under torchrun: every process's shard
            finite = np.isfinite(probs).all(axis=1)
            if not finite.all():
                raise self._diverged(
                    f"validation produced non-finite probabilities at epoch {epoch + 1} "
                    f"({int((~finite).sum())} of {len(probs)} images; the model outputs nan or inf)"
                )
            score = self.metric(val_targets, probs)
            val_loss = log_loss(val_targets, probs)
            improved = self.metric.better(score, best)
            if improved:
                best, best_epoch = score, epoch
            if improved and distributed.is_main():
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
            if distributed.is_main():
                write_csv(self.fold_dir / "log.csv", pd.DataFrame(history))
            self._save_last(scheduler, epoch, best, best_epoch, history)
            self.log(
                f"fold {self.fold} epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  "
                f"val_loss {val_loss:.4f}  val_{self.metric.name} {score:.4f} (no TTA)"
                f"{'  *' if improved else ''}  {row['train_images_per_s']:.0f} img/s"
            )
            if self.on_epoch_end is not None and distributed.is_main():
                self.on_epoch_end(epoch, row)
        distributed.barrier()  # best.pt is written before any process loads it
        return FoldResult(
            self.fold, best_epoch + 1, float(best), history, time.perf_counter() - started
        )

    def load_best(self) -> torch.nn.Module:
        """The evaluation model with the best epoch's weights."""
        model = self._eval_model()
        path = self.fold_dir / "best.pt"
        label = f"{self.fold_dir.name}/best.pt"
        # best.pt alone cannot be remade: a finished last.pt would skip training
        fix = (
            f"delete the fold's folder to retrain fold {self.fold} from scratch: "
            f"rm -r {self.fold_dir}"
        )
        state = load_checkpoint(path, label, fix, map_location=self.device)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise _mismatch(label, exc, fix) from exc
        return model
