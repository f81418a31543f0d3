"""`train` and `tune` under torchrun: one process group, DDP, each rank its share of every batch.

Every rank draws the same global batch from the same seeded stream and keeps its contiguous
share (as DistributedSampler would split one global batch); the loss is each rank's *sum*
divided by the global count, times the world size, so that DDP's averaging of the gradients
gives exactly the gradient of the mean over the global batch: 2 ranks × B/2 rows step like
1 process × B rows. Rank 0 evaluates, prints and writes; a failure on rank 0 is sent to the
others, which stop with it rather than wait in the next collective.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from pspctl.errors import InputError, PspctlError, one_line

__all__ = ["DEFAULT_TIMEOUT_S", "RankFailed", "World", "launch", "under_torchrun"]

DEFAULT_TIMEOUT_S = 1800  # torch's own default for gloo and nccl
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


class RankFailed(PspctlError):
    """Another rank failed; this one stops with the same exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; `World()` is one process, no process group."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to step: `model` itself in one process, else DDP around it.

        find_unused_parameters when the model has per-context copies: only the active
        context's get a gradient; the others stay at None on every rank (DDP leaves globally
        unused gradients alone), so Adam skips them as in one process. No buffer sync per
        forward: the contexts are the same on every rank by construction (and rotation
        matrices are large), and rank 0's norm statistics are the ones written.
        """
        if not self.grouped:
            return model
        from torch.nn.parallel import DistributedDataParallel

        from pspctl.nn import Stacked

        unused = any(isinstance(m, Stacked) and m.trainable and len(m.items) > 1 for m in model.modules())
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=unused, forward_sync_buffers=False
        )

    def share(self, batch: Any) -> tuple[Any, int]:
        """This rank's contiguous share of `batch` (a tensor, or tuples, lists and dicts of
        tensors), on this rank's device, and the global number of rows (0 in one process on
        CPU, where the batch is returned as it is).

        Raises:
            InputError: the batch has fewer rows than there are ranks.
        """
        if not self.grouped and self.device.type == "cpu":
            return batch, 0
        rows = _rows(batch)
        if rows < self.size:
            raise InputError(
                f"a batch of {rows} rows cannot be split over {self.size} processes; "
                "use larger batches or fewer processes"
            )
        if not self.grouped:
            return _map(batch, lambda t: t.to(self.device)), rows
        return _map(batch, lambda t: torch.tensor_split(t, self.size)[self.rank].to(self.device)), rows

    def global_loss(self, loss: Tensor) -> float:
        """The mean loss over the global batch, the same value on every rank (for the NaN guard)."""
        value = loss.detach()
        if self.grouped:
            import torch.distributed as dist

            value = value.clone()
            with _collective("a training step"):
                dist.all_reduce(value)
            value = value / self.size
        return float(value)

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; if it raises, every rank raises (the others `RankFailed`).

        Returns `fn`'s result on rank 0 and None elsewhere.
        """
        result: T | None = None
        failure: Exception | None = None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, on every rank
                failure = exc
        if self.grouped:
            import torch.distributed as dist

            news: list[Any] = [None]
            if failure is not None:
                news = [(str(failure), getattr(failure, "exit_code", 1))]
            with _collective("waiting for rank 0"):
                dist.broadcast_object_list(news, src=0)
            if news[0] is not None and not self.main:
                message, code = news[0]
                raise RankFailed(f"rank 0 failed: {message}", code)
        if failure is not None:
            raise failure
        return result

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn`'s result on rank 0, sent to every rank (each must call this at the same point).
        A value rank 0 decides, such as whether to try again, that all ranks then follow."""
        value: list[Any] = [self.on_main(fn)]
        if self.grouped:
            import torch.distributed as dist

            with _collective("waiting for rank 0"):
                dist.broadcast_object_list(value, src=0)
        return value[0]

    def on_cpu(self, model: M) -> M:
        """`model` itself on CPU; a CPU copy when the ranks train on GPUs (evaluation, saving)."""
        return model if self.device.type == "cpu" else copy.deepcopy(model).cpu()


@contextmanager
def launch(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """The process group that torchrun set up for this process, or `World()` without torchrun.

    gloo on CPU, nccl with this rank's GPU (cuda:LOCAL_RANK) when CUDA is available. A
    collective that waits longer than `timeout_s` (a rank that died, or hangs) raises instead
    of waiting forever. The group is destroyed on the way out, error or not.

    Raises:
        InputError: RANK/WORLD_SIZE are malformed, MASTER_ADDR/MASTER_PORT missing, or the
            timeout is not positive.
    """
    if not under_torchrun():
        yield World()
        return
    if timeout_s <= 0:
        raise InputError(f"--dist-timeout must be positive, got {timeout_s}")
    import torch.distributed as dist

    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise InputError(f"RANK and WORLD_SIZE are set but {missing[0]} is not: launch with torchrun")
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    try:
        yield World(rank, size, device)
        # Every rank done (rank 0 has written the output) before any tears its group down: a
        # rank that exits while another still talks to it can abort in gloo's threads.
        with suppress(RuntimeError):  # a rank that died: its error is reported already
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """A collective that fails because another rank died or went silent: one clear line."""
    try:
        yield
    except RuntimeError as exc:  # gloo and nccl raise plain RuntimeErrors (or DistErrors, subclasses)
        raise RankFailed(f"another process failed or stopped answering ({what}): {one_line(exc)}", 1) from exc


def _rows(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return _rows(first)


def _map(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: _map(value, fn) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(b, fn) for b in batch)
    return batch  # not a tensor: the same on every rank
