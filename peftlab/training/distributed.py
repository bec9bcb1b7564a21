"""Data-parallel training under ``torchrun``: one process per device, each global batch split across them.

    torchrun --standalone --nproc_per_node=N -m peftlab.cli train ...   (gloo on CPU, NCCL on CUDA)

    every rank   same config, data, shuffled order and adapter init (then broadcast from rank 0)
    each step    global batch of trainer.batch_size rows ─► rank r takes a contiguous slice
                 loss_r × share_r ─► backward ─► all-reduce mean of the trainable gradients and the loss
                 ─► the same after_backward / clip / optimizer step on every rank
    rank 0 only  evaluation (its metrics are broadcast), result.json, adapter/, metrics.jsonl, W&B

Why one all-reduce per step instead of ``DistributedDataParallel``: the gradients
to average are the adapter's (tens of thousands of values for LoRA), so DDP's
overlap of communication with the backward pass buys almost nothing, while its
requirements would reach into every method and task: ``task.loss(model, batch)``
would have to receive the DDP wrapper while the method hooks (``extra_loss``,
``after_backward``) keep the bare model, every trainable parameter must take part
in every forward (or ``find_unused_parameters``), and gradient accumulation needs
``no_sync``. Averaging the gradients after the accumulation loop leaves the model,
the hooks and the loss call exactly as in one process, for every method. The
cost: the all-reduce starts after the backward pass instead of overlapping it,
which a large ``method=full`` run on many GPUs would feel.

Equal to one process: ``task.loss`` is a mean over ``task.loss_units(batch)``
(examples, or predicted tokens for causal LM). With u_r units on rank r and U in
the global batch, the global loss is Σ_r (u_r / U) · loss_r, so rank r scales its
loss by ``share_r = world_size · u_r / U`` and the mean over ranks of the scaled
gradients is the one-process gradient of the same global batch, even when the
shards hold different numbers of tokens. Method regularisers (``extra_loss``) are
the same on every rank and survive the mean unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from peftlab.errors import ConfigError

T = TypeVar("T")
Batch = dict[str, torch.Tensor]

# Rank 0 evaluates (validation, test, probes) while the others wait in a broadcast; the
# default collective timeouts (10 min on NCCL) are shorter than a full evaluation of a large model.
WAIT_TIMEOUT = timedelta(hours=2)
BUCKET_ELEMENTS = 2**23  # gradients are all-reduced in flat buckets of at most this many values (32 MiB fp32)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the ranks torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that evaluates, logs and writes files."""
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "local_world_size": self.local_world_size, "backend": self.backend}

    # ---------------------------------------------------------------- training
    def shard(self, batch: Batch, units: Callable[[Batch], int]) -> tuple[Batch, float]:
        return shard_batch(batch, units, self.rank, self.world_size)

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], loss: float) -> float:
        """Replace each gradient by its mean over ranks; return the mean of ``loss`` over ranks.

        Every rank runs the same forward graph, so the same parameters have a gradient on
        every rank; parameters without one (unused by this method) are left without one.
        """
        if not self.active:
            return loss
        for bucket in buckets([p.grad for p in params if p.grad is not None]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= self.world_size
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        total = torch.tensor([loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable values (the seeded init already agrees; this makes sure)."""
        if self.active:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def seed_dropout(self, seed: int) -> None:
        """Give ranks > 0 their own random stream, so shards do not share dropout masks.

        Rank 0 keeps the stream of a one-process run. Called after the adapter init,
        which must stay identical on every rank.
        """
        if self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    # ------------------------------------------------------------ rank 0 only
    def main_only(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0 alone; every rank returns its value (the others wait for it)."""
        if not self.active:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def from_env() -> Distributed:
    """Rank and sizes from the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Distributed(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun prepared; returns the context and this rank's device.

    CUDA: rank with local rank i uses ``cuda:i`` and NCCL. CPU: gloo. Without torchrun
    (or with one process) nothing is initialised and ``device`` is returned unchanged.
    """
    context = from_env()
    if not context.active:
        return replace(context, device=device), device
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if context.local_rank >= available:
            raise ConfigError("trainer.device", f"{context.local_world_size} torchrun processes on this node, "
                                                f"{available} CUDA devices; allowed: --nproc_per_node <= {available}")
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT_TIMEOUT)
    return replace(context, backend=dist.get_backend(), device=device), device


def teardown() -> None:
    """Leave the process group (end of a torchrun process); a no-op when none was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(batch: Batch, units: Callable[[Batch], int], rank: int, world_size: int) -> tuple[Batch, float]:
    """This rank's rows of a global batch and ``share``, the factor its loss is scaled by.

    Rows are split into contiguous slices whose sizes differ by at most one; every
    tensor keeps the global batch's padded width, so each row is computed exactly as
    in one process. ``share = world_size · units(shard) / units(batch)`` (see the
    module docstring). A rank left without rows (a batch smaller than the world)
    takes row 0 with share 0: it still runs forward and backward, so every rank
    reaches the gradient all-reduce with the same gradients defined.
    """
    if world_size == 1:
        return batch, 1.0
    rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(world_size)[rank]
    if len(rows) == 0:
        return {key: value[:1] for key, value in batch.items()}, 0.0
    start, stop = int(rows[0]), int(rows[-1]) + 1
    shard = {key: value[start:stop] for key, value in batch.items()}
    return shard, world_size * units(shard) / units(batch)


def buckets(tensors: list[torch.Tensor], limit: int = BUCKET_ELEMENTS) -> list[list[torch.Tensor]]:
    """Consecutive tensors grouped for one all-reduce each: same dtype and device, at most ``limit`` values."""
    groups: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        last = groups[-1] if groups else None
        if last is None or t.dtype != last[0].dtype or t.device != last[0].device or size + t.numel() > limit:
            groups.append([t])
            size = t.numel()
        else:
            last.append(t)
            size += t.numel()
    return groups
