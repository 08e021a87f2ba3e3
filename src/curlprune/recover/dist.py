"""Several processes (``torchrun --nproc_per_node=N``): process group, sharding, collectives.

Every helper here also works in a single plain process (world size 1), where it does nothing
or the obvious thing, so the training stages call them unconditionally.

* The process group is initialised from the environment variables torchrun sets (``env://``)
  when ``WORLD_SIZE > 1``: NCCL when training on CUDA, gloo on CPU.
* ``batch_size`` in the stage configs is the GLOBAL batch: each process takes
  ``batch_size / world_size`` samples per step, so the schedule, the learning rate and the label
  step are the same whatever the number of processes.
* Sharding is DistributedSampler's: one seeded permutation (identical on every rank), padded by
  repeating its head to a multiple of the world size, then rank ``r`` takes ``order[r::world]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from curlprune.errors import CurlpruneError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and draws the progress bar."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Device collectives run on: CUDA for NCCL, CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` means this process's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CurlpruneError(f"device {device!r} was asked for but CUDA is not available here: use device 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device(f"cuda:{local_rank}")
    return resolved


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> DistContext:
    """Join the torchrun process group when there is one (idempotent), and pick the device.

    ``timeout`` bounds every collective (torch's default when None); the first call sets it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not torch_dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return DistContext(
        rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), local_rank=local_rank, device=resolved
    )


def shutdown(wait: bool = True) -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    A rank that exits while the group's background threads still run aborts ("terminate called
    without an active exception"), failing the torchrun job after all work is done. After an
    error, ``wait=False`` skips the barrier, which the failed ranks might never reach.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in one process)."""
    if ctx.enabled:
        torch_dist.barrier()


def all_gather(ctx: DistContext, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order, on the tensor's device."""
    if not ctx.enabled:
        return [tensor]
    local = tensor.detach().to(ctx.comm_device).contiguous()
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    torch_dist.all_gather(parts, local)
    return [part.to(tensor.device) for part in parts]


def all_gather_object(ctx: DistContext, obj: object) -> list[object]:
    """Every rank's JSON-like ``obj``, in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum each value over the ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device)
    torch_dist.all_reduce(total)
    return total.cpu().tolist()


def gather_rows(ctx: DistContext, local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate the rank-contiguous row chunks of :func:`chunk_range` into the full ``total`` rows."""
    if not ctx.enabled:
        return local
    chunk = -(-total // ctx.world_size)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]] = local
    return torch.cat(all_gather(ctx, padded))[:total]


def chunk_range(ctx: DistContext, total: int) -> range:
    """This rank's contiguous slice of ``range(total)`` for work done once per sample (evaluation, labels)."""
    chunk = -(-total // ctx.world_size)
    return range(min(ctx.rank * chunk, total), min((ctx.rank + 1) * chunk, total))


def shard(ctx: DistContext, order: torch.Tensor) -> torch.Tensor:
    """This rank's part of a permutation, DistributedSampler style (pad with the head, stride by rank)."""
    if not ctx.enabled:
        return order
    padding = (-len(order)) % ctx.world_size
    if padding:
        order = torch.cat([order, order[:padding]])
    return order[ctx.rank :: ctx.world_size]


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch each
    rank holds the statistics of its own last batch; this makes them identical before evaluating
    and saving.
    """
    if not ctx.enabled:
        return
    for buffer in module.buffers():
        if buffer.device.type != ctx.comm_device.type:
            staged = buffer.detach().to(ctx.comm_device)
            torch_dist.broadcast(staged, src=0)
            buffer.data.copy_(staged)
        else:
            torch_dist.broadcast(buffer.data, src=0)


def wrap_ddp(ctx: DistContext, model: nn.Module) -> nn.Module:
    """The module to call in training: ``model`` itself, or wrapped in DistributedDataParallel."""
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def on_main(ctx: DistContext, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only while the other ranks wait.

    Args:
        ctx: this process's context (single-process: ``work`` just runs).
        work: the job; its result must be picklable (JSON-like).
    Returns:
        ``work()``'s result, on every rank.
    Raises:
        CurlpruneError: on every rank when ``work`` failed on rank 0 (rank 0 re-raises its own
            error), so a failure on rank 0 never leaves the others waiting.
    """
    if not ctx.enabled:
        return work()
    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            outcome = {"value": work()}
        except CurlpruneError as exc:
            outcome, failure = {"error": str(exc)}, exc
        except BaseException as exc:  # tell the others, then fail loudly here
            outcome, failure = {"error": f"rank 0 failed ({type(exc).__name__}: {exc}); see its traceback"}, exc
    shared = all_gather_object(ctx, outcome)[0]
    if failure is not None:
        raise failure
    if "error" in shared:
        raise CurlpruneError(shared["error"])
    return shared["value"]
