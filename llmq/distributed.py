"""Several processes quantizing one model, on torch.distributed (gloo on CPUs, NCCL on GPUs), launched by torchrun.

    torchrun --nproc-per-node N -m llmq quantize ...

Every rank streams the same decoder layer; the calibration windows are split between them.  Per layer:

- each rank runs the layer over its own windows; statistics (GPTQ's Hessians) are summed over the
  ranks in rank order (``Ranks.sum``), so every rank holds what one process would have accumulated;
- the layer's independent solves (its linears, and above all a MoE layer's experts) are dealt out
  round-robin (``Ranks.deal``) and the codes shared (``Ranks.share``): every rank needs the whole
  quantized layer to make its next inputs;
- rank 0 alone writes the output, under the same lock and atomicity rules as a single process.

Windows are cut at multiples of the forward batch, so every batch holds the same windows as in a
one-process run, and statistics are summed in float64: the integer codes do not depend on N.
A rank that dies ends the run: torchrun stops the others (SIGTERM, which llmq handles as Ctrl-C), or a
rank waiting for it in a collective stops with a one-line error (PeerLost); either way no output is left.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from llmq.errors import LlmqError

T = TypeVar("T")


class PeerLost(LlmqError):
    """Another process of the launch stopped answering (it died, or was stopped) in a collective."""


def _collective(fn):
    """Turns a collective's failure (gloo and NCCL raise RuntimeError when a peer's connection drops) into
    one line; torchrun reports which rank died and why."""
    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PeerLost(f"rank {self.rank}: another process of this torchrun launch stopped ({first[:160]})") from e
    return wrapped


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run (the default: alone)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        """The rank that writes the output and shows progress."""
        return self.rank == 0

    def windows(self, n: int, batch: int) -> slice:
        """This rank's calibration windows: a contiguous share, cut at multiples of ``batch``."""
        batches = -(-n // batch)
        lo, hi = (batches * r // self.world for r in (self.rank, self.rank + 1))
        return slice(min(lo * batch, n), min(hi * batch, n))

    @_collective
    def sum(self, t: torch.Tensor, to: int | None = None) -> torch.Tensor | None:
        """The sum over ranks of ``t``, added in rank order ((t0 + t1) + t2 ...), on every rank, or only
        on rank ``to`` (None elsewhere).

        A chain instead of an all-reduce: the order of the additions then never depends on the
        collective's algorithm."""
        if self.world == 1:
            return t
        t = t.contiguous()
        last = self.world - 1
        if self.rank > 0:
            before = torch.empty_like(t)
            dist.recv(before, self.rank - 1)
            t = before + t
        if self.rank < last:
            dist.send(t, self.rank + 1)
        else:
            t = t.clone()
        if to is None:
            dist.broadcast(t, src=last)
            return t
        if to != last and self.rank in (to, last):
            if self.rank == last:
                dist.send(t, to)
            else:
                dist.recv(t, last)
        return t if self.rank == to else None

    def deal(self, jobs: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's share of ``jobs`` (round-robin), with each job's index."""
        return [(i, j) for i, j in enumerate(jobs) if i % self.world == self.rank]

    def share(self, mine: dict[int, Any]) -> dict[int, Any]:
        """Every rank's results, by job index, on every rank."""
        return {k: v for part in self.gather_objects(mine) for k, v in part.items()}

    @_collective
    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts


def join(device: str) -> tuple[Ranks, str]:
    """The run's ranks from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), and
    this rank's device: with CUDA, rank r of a node uses GPU LOCAL_RANK.  Alone without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if ":" in device:
            raise LlmqError("under torchrun pass --device cuda: each rank takes the GPU of its LOCAL_RANK")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # A rank that stops answering ends everyone's wait after this long (torchrun usually stops them first).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return Ranks(rank, world), device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
