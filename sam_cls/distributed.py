"""Past one process: the process group torchrun describes, collectives that count their bytes, and which rank
owns which memory cell.

Rank r of P owns the contiguous block of cells shard_range(N, r, P): cell (training example) e lives on the
rank whose block holds it, so a global cell id needs no table to find its owner, and the shards concatenated in
rank order are the memory in example order (what a single process reading the run gathers; shard_files.py).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sam_cls.config import ConfigError

# torchrun (torch.distributed.run) sets these for every worker it starts.
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A lost peer fails a collective at once (gloo: connection closed); a rank that hangs without dying is what
# this bounds. Long enough for the slowest work between two collectives: a rank's index build or checkpoint.
TIMEOUT = datetime.timedelta(minutes=30)


def launched() -> bool:
    """Whether this process is a worker of a torchrun job (then `sam-cls train` trains distributed)."""
    return all(name in os.environ for name in ENV)


def init(device_type: str) -> Comm:
    """Join torchrun's process group: NCCL where the ranks train on GPUs, gloo on CPUs."""
    if not launched():
        raise ConfigError(f"distributed training runs under torchrun, which sets {', '.join(ENV)}: "
                          f"torchrun --nproc_per_node P -m sam_cls train ...")
    _exit_with_agent()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU a rank, before any tensor is made
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return Comm(torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu"))


_watching: list[int] = []  # the agent this process watches (once per process)


def _exit_with_agent() -> None:
    """End this rank when its torchrun agent (its parent) dies: left alone it would train on for nobody, rank 0
    holding the run's lock. A watch on the parent's pid, as PR_SET_PDEATHSIG fires on the death of the parent's
    thread that started the rank, not of the agent. SIGKILL, as a power cut: every commit survives one."""
    if _watching:
        return
    _watching.append(os.getppid())

    def watch() -> None:
        while os.getppid() == _watching[0]:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the cells rank `rank` of `world` owns: contiguous blocks whose sizes differ by at most 1."""
    return rank * n // world, (rank + 1) * n // world


def split_counts(n: int, world: int) -> list[int]:
    """How many of n rows (a global batch, a test chunk) each rank takes: blocks in rank order, as shard_range."""
    return [b - a for a, b in (shard_range(n, r, world) for r in range(world))]


@dataclass
class Traffic:
    """Bytes this rank sent, by collective, since the counter was last reset (what benchmarks/distributed.py
    reports). Logical payload, not wire bytes: an all_gather sends a rank's tensor to each of the P - 1 others,
    an all_to_all its chunks for other ranks, an all_reduce 2 (P - 1) / P of its tensor (ring)."""

    sent: Counter
    calls: Counter

    def add(self, name: str, nbytes: float) -> None:
        self.sent[name] += int(nbytes)
        self.calls[name] += 1


class Comm:
    """The collectives a sharded memory needs, on the default process group, each counted in `traffic`."""

    def __init__(self, device: torch.device):
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self.traffic = Traffic(Counter(), Counter())

    def all_gather(self, name: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order; rank r gives counts[r] rows (padded to equal sizes on
        the wire, as gloo and NCCL need)."""
        width = max(counts)
        pad = x.new_zeros((width, *x.shape[1:]))
        pad[: len(x)] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad.to(self.device))
        self.traffic.add(name, x.element_size() * x.numel() * (self.world - 1))
        return torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)]).to(x.device)

    def all_to_all(self, name: str, chunks: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
        """chunks[q], a block of rows, goes to rank q; rank q's block for this rank has rows[q] rows. The
        blocks share their trailing shape and dtype, and may differ in length (all_to_all_single's splits)."""
        x = torch.cat(chunks).to(self.device).contiguous()
        out = x.new_empty((sum(rows), *x.shape[1:]))
        dist.all_to_all_single(out, x, rows, [len(c) for c in chunks])
        self.traffic.add(name, sum(c.element_size() * c.numel() for q, c in enumerate(chunks) if q != self.rank))
        return list(out.to(chunks[0].device).split(rows))

    def exchange(self, name: str, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """all_to_all of row blocks whose lengths the receivers do not know yet: the lengths go first."""
        rows = self.all_to_all(f"{name} counts", [torch.tensor([len(c)]) for c in chunks], [1] * self.world)
        return self.all_to_all(name, chunks, [int(r) for r in rows])

    def all_reduce(self, name: str, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """x reduced over the ranks (a new tensor on x's device)."""
        y = x.detach().clone().to(self.device)
        dist.all_reduce(y, op=op)
        self.traffic.add(name, 2 * (self.world - 1) / self.world * y.element_size() * y.numel())
        return y.to(x.device)

    def all_gather_object(self, name: str, obj) -> list:
        """A small picklable value from every rank (file names and checksums at a commit; errors): between
        this job's own ranks only, never from a file."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: Exception | None) -> None:
        """Raise on every rank if any rank failed a check, so no rank waits alone at its next collective."""
        errors = self.all_gather_object("errors", None if error is None else (type(error).__name__, str(error)))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            if error is not None:
                raise error
            rank, (_kind, message) = failed[0]
            raise ConfigError(f"rank {rank}: {message}")

    def barrier(self) -> None:
        dist.barrier()


def ddp_traffic_hook(traffic: Traffic):
    """A DDP communication hook: DDP's own gradient all_reduce, counted (as Comm counts its collectives)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        world = dist.get_world_size()
        traffic.add("gradients", 2 * (world - 1) / world * bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    return hook
