"""Data-parallel training over processes started by ``torchrun`` (PyTorch DDP, Li et al. VLDB 2020).

``torchrun --nproc-per-node N -m competition train CONFIG`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; ``competition train --nproc N`` runs that command for you.
Each process joins one group (``nccl`` on GPUs, ``gloo`` on CPU) and owns a device. The recipe
does not change with N: ``data.batch_size`` is the global batch, and every global batch of the
single-process order is split into N contiguous chunks, one per process (:class:`RankBatches`),
so DDP's mean of the per-process gradients is the single-process gradient. Evaluation rows are
split into N contiguous shards (:func:`shard`) and gathered back in their original order
(:func:`gather_rows`). Only rank 0 writes the run record; the other ranks read it.

Outside torchrun every helper here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from competition.errors import ConfigError

#: How long a collective waits for the slowest process (a fold's prediction may take a while).
TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; this process's device (``cuda:LOCAL_RANK``).

    ``device`` is the one the config chose; a GPU run takes the GPU of its local rank.
    """
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes per node "
                f"but this machine has {torch.cuda.device_count()} GPU(s): lower --nproc"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"device={device}: data-parallel training runs on CUDA or CPU")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes caches and folds), then the others (they reuse)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def from_main(compute):
    """``compute()`` evaluated on rank 0 only and sent to every rank (one decision for all)."""
    if not active():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_objects(value) -> list:
    """``value`` of every rank, in rank order."""
    if not active():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (epoch loss totals, images seen)."""
    if not active():
        return list(values)
    return [float(sum(parts)) for parts in zip(*all_objects(list(values)), strict=True)]


def shard(index: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of ``index`` (the parts, in rank order, make ``index``)."""
    if not active():
        return np.asarray(index)
    return np.array_split(np.asarray(index), world_size())[rank()]


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's :func:`shard` rows back in their original order."""
    if not active():
        return rows
    return np.concatenate(all_objects(np.asarray(rows)))


class RankBatches(Sampler):
    """This rank's chunk of every global batch of ``order`` (a sampler of dataset indices).

    The global batches are those one process would draw: ``batch_size`` consecutive indices,
    the ragged last batch dropped (unless it is the only one). Each is split into
    ``world_size`` contiguous chunks; rank ``r`` gets chunk ``r``. A per-epoch ``set_epoch`` is
    passed on to ``order`` (progressively-balanced sampling).
    """

    def __init__(self, order: Sampler, batch_size: int, rank: int, world_size: int):
        self.order, self.batch_size = order, batch_size
        self.rank, self.world_size = rank, world_size
        if len(order) < world_size:
            raise ConfigError(
                f"data-parallel training on {world_size} processes needs at least {world_size} "
                f"training images per epoch; this fold has {len(order)}"
            )
        if batch_size < world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is the global batch, split over {world_size} "
                f"processes: set it to at least {world_size}"
            )

    def _batches(self) -> int:
        return max(1, len(self.order) // self.batch_size)

    def __len__(self) -> int:
        return self._batches()

    def __iter__(self):
        order = list(self.order)
        for b in range(self._batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield np.array_split(np.asarray(batch), self.world_size)[self.rank].tolist()

    def set_epoch(self, epoch: int, epochs: int) -> None:
        if callable(getattr(self.order, "set_epoch", None)):
            self.order.set_epoch(epoch, epochs)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``competition <argv>`` on ``nproc`` processes with torchrun; its exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: the number of processes is at least 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), "-m", "competition", *argv]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command)


__all__ = [
    "RankBatches",
    "active",
    "all_objects",
    "all_sum",
    "barrier",
    "from_main",
    "gather_rows",
    "is_main",
    "launch",
    "launched",
    "main_first",
    "rank",
    "setup",
    "shard",
    "teardown",
    "world_size",
]
