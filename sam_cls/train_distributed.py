"""Data-parallel training under torchrun: DDP for the encoder, the memory sharded by rank (shards.py).

Every rank draws the same batch order from the same seed and takes its share of each global batch, so the
global batch, seed and schedule mean what they mean in one process: with an exact index the loss and the
weights follow the single-process run to float rounding (tests/test_distributed.py). Rank 0 writes the run's
shared files (checkpoint, metrics, config); every rank writes its own shard (shard_files.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sam_cls.checkpoint import CheckpointError, RunDir, check_resumable, fault_point
from sam_cls.config import Config, ConfigError, TrainingError, make_config
from sam_cls.distributed import Comm, ddp_traffic_hook, init, shard_range, split_counts
from sam_cls.evaluate import encode_all
from sam_cls.memory import MemoryBank
from sam_cls.setup import index_params, resolve_device, start_network
from sam_cls.shard_files import load_shard, sweep_shards, write_shard
from sam_cls.shards import Shard, ShardedMemory, ShardRefresher
from sam_cls.train import Trainer, fresh_run_dir, rebuild_policy


def check_options(cfg: Config, world: int) -> None:
    """What a sharded memory cannot do (yet), as one error naming the option."""
    unsupported = {"--topk 0 (the dense read over every cell)": cfg.topk == 0,
                   "--support-sample": cfg.support_sample > 0, "--head softmax": cfg.head != "memory",
                   # A background build finishes at a different step on each rank, and the ranks' indices
                   # would then rebuild apart: the policy must be decided alike everywhere.
                   "--background-rebuild": cfg.background_rebuild,
                   "--copies": cfg.copies > 1, "--deform-queries": cfg.deform_queries > 0,
                   "--thin-classes": cfg.thin_classes > 0}
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise ConfigError(f"{', '.join(named)} is not supported by distributed training (torchrun); train it in "
                          "one process with `sam-cls train`")
    if cfg.batch_size < world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the job's {world} ranks: each rank takes "
                          f"a share of every global batch")


class DistributedTrainer(Trainer):
    """A Trainer whose memory is this rank's shard and whose steps take this rank's share of each batch."""

    tunes_read = False  # each rank holds a share of the cells; `sam-cls evaluate --tune` tunes the whole memory

    def __init__(self, cfg: Config, comm: Comm, log=print):
        check_options(cfg, comm.world)
        super().__init__(cfg, log)
        self.comm = comm
        n = len(self.train_y)
        last = n % cfg.batch_size
        if 0 < last < comm.world:
            raise ConfigError(f"the last batch of an epoch holds {last} examples ({n} mod --batch-size "
                              f"{cfg.batch_size}), fewer than the job's {comm.world} ranks: change --batch-size")
        self.ranges = [shard_range(n, r, comm.world) for r in range(comm.world)]
        self.start, self.stop = self.ranges[comm.rank]
        smallest = min(b - a for a, b in self.ranges)
        if smallest < cfg.topk + 1:  # each shard returns its K + 1 best, the query's own cell among them
            raise ConfigError(f"a shard holds {smallest} cells ({n} over {comm.world} ranks), fewer than --topk "
                              f"{cfg.topk} + 1: use --topk <= {smallest - 1} or fewer ranks")
        self.step_losses: list[torch.Tensor] | None = None  # each step's local loss sum, where asked (benchmarks)
        self._counts: list[int] = []  # each rank's share of the current step's batch (step_batch)

    # -- the memory: this rank's shard --------------------------------------------------------------------
    def encode_memory(self) -> torch.Tensor:
        return encode_all(self.encoder, self.train_x[self.start : self.stop], self.cfg.eval_batch_size,
                          desc="memory")

    def prepare(self) -> None:
        cfg, comm = self.cfg, self.comm
        if self.memory is None:
            start_network(self.encoder, cfg, self.train_x, self.log)  # the same sample on every rank
            self.memory = MemoryBank(self.encode_memory(), self.train_y[self.start : self.stop])
        shard = Shard(self.memory, self.ranges, comm.rank)
        self.refresher = shard.refresher = ShardRefresher(
            comm, self.memory.embeddings, index_params(cfg, self.device), k=cfg.topk + 1, rebuild_every=rebuild_policy(cfg),
            staleness_threshold=cfg.staleness_threshold, log=self.log, seed=cfg.seed,
            centroids=self.resume_centroids, reorder=self.memory.reorder)
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.encoder.modules())
        if norms and self.device.type == "cuda":  # batch statistics over the global batch, as one process has
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)  # same parameters: opt holds them
        # On a CPU BatchNorm normalises by each rank's share (SyncBatchNorm needs a GPU); DDP's buffer sync then
        # gives every rank rank 0's running statistics (a few floats a layer a step).
        ddp = DistributedDataParallel(self.encoder, device_ids=None if self.device.index is None else [self.device.index])
        ddp.register_comm_hook(None, ddp_traffic_hook(comm.traffic))
        self.mode = ShardedMemory(cfg, ddp, self.encoder, shard, comm, self.data.num_classes)

    # -- steps: Trainer.train_epoch's loop, each rank on its share of every global batch --------------------
    @property
    def shows_progress(self) -> bool:
        return self.comm.rank == 0

    def step_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = split_counts(len(idx), self.comm.world)
        lo = sum(counts[: self.comm.rank])
        mine = idx[lo : lo + counts[self.comm.rank]]
        self._counts = counts  # for this step's read
        # Crops are drawn for the whole batch, so each image gets the crop it gets in one process.
        cfg = self.cfg
        x = self.batch(idx)[lo : lo + len(mine)] if cfg.augment and self.data.natural else self.train_x[mine]
        return x, self.train_y[mine]

    def step_read(self, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        try:
            return self.mode.log_probs(u, idx, self._counts)
        except FloatingPointError:  # every rank saw the same embeddings: all stop at this step
            raise self.diverged("nan") from None

    def step_loss(self, log_probs: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        nll = F.nll_loss(log_probs, y, reduction="sum")
        # DDP averages gradients over the ranks: this scale makes that average the global batch's mean.
        return nll * (self.comm.world / batch), nll.detach()

    def mean_loss(self, nll: torch.Tensor, batch: int) -> float:
        # Every rank sees the same global value, so all stop together.
        return float(self.comm.all_reduce("loss check", nll)) / batch

    def after_step(self, idx: torch.Tensor, u: torch.Tensor, nll: torch.Tensor) -> None:
        if self.step_losses is not None:
            self.step_losses.append(nll.cpu() / len(idx))
        fault_point(f"step-{self.comm.rank}")
        self.mode.after_step(self.step)

    def step_seconds(self, elapsed: float) -> float:
        if self.cfg.max_seconds:  # the slowest rank's time, so every rank stops at the same step
            elapsed = float(self.comm.all_reduce("clock", torch.tensor([elapsed]), dist.ReduceOp.MAX))
        return elapsed

    def epoch_totals(self, totals: torch.Tensor) -> list[float]:
        return self.comm.all_reduce("epoch totals", totals).tolist()

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint rank 0 commits: encoder, optimiser, schedule, generators; the cells are in shards."""
        return {k: v for k, v in super().state_dict().items() if k not in ("memory", "index_centroids")}

    def save(self, run: RunDir) -> None:
        """Two-phase: every rank's shard on disk, then rank 0's checkpoint naming them all (the commit point)."""
        comm = self.comm
        record = write_shard(run, self.mode.shard.state_dict(self.step), self.step, comm.rank, comm.world)
        fault_point(f"shard-{comm.rank}")
        records = comm.all_gather_object("commit", record)  # returns once every shard is written
        if comm.rank == 0:
            shards = {"world_size": comm.world, "cells": len(self.train_y), "ranges": [list(r) for r in self.ranges],
                      "files": [r["file"] for r in records], "crc32": [r["crc32"] for r in records]}
            run.commit({**self.state_dict(), "shards": shards}, None)
            sweep_shards(run)
        comm.barrier()

    def load_state_dict(self, state: dict, run: RunDir | None = None) -> None:
        """Trainer.load_state_dict, with this rank's shard as the memory (its file checked against state)."""
        check_resumable(state, self.cfg, self.device.type, self.comm.world)
        if state["shards"]["ranges"] != [list(r) for r in self.ranges]:
            raise CheckpointError(f"the run's shards cover {state['shards']['ranges']}, not this data set's "
                                  f"{len(self.train_y)} cells: check --dataset/--data-dir")
        shard = load_shard(run, state, self.comm.rank)
        self.load_training(state)
        self.memory = MemoryBank.from_state_dict(shard["memory"], self.device)
        self.resume_centroids = shard.get("index_centroids")

    def global_step_losses(self) -> list[float]:
        """Each recorded step's loss over the global batch (one all_reduce; for benchmarks and tests)."""
        return self.comm.all_reduce("losses", torch.stack(self.step_losses).double()).tolist()


def _quiet(_line: str) -> None:
    pass


def train(cfg: Config, resume: bool = False, log=print) -> dict | None:
    """sam_cls.train.train under torchrun: the summary on rank 0, None on the other ranks."""
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if not cfg.out:  # every rank must name the same directory: rank 0's choice is not theirs to see
        comm = init(resolve_device(cfg.device).type)
        cfg.out = comm.all_gather_object("out", str(fresh_run_dir(cfg)))[0]
    return _fit(RunDir(cfg.out), lambda state: cfg, resume, log)


def resume(out: str, log=print, **overrides) -> dict | None:
    """sam_cls.train.resume under torchrun (the same number of ranks the run trained with)."""
    return _fit(RunDir(out), lambda state: make_config(None, **{**state["config"], **overrides, "out": str(out)}),
                True, log)


def _fit(run: RunDir, config_for, resume: bool, log) -> dict | None:
    cfg = config_for(run.load_state(log=log) if resume else None)  # the device says which process group
    comm = init(resolve_device(cfg.device).type)
    lead = comm.rank == 0
    log = log if lead else _quiet
    run.log = log
    with contextlib.ExitStack() as stack:
        error = None
        if lead:  # one writer of the run: rank 0 holds its lock for the job
            try:
                stack.enter_context(run.lock())
            except CheckpointError as e:
                error = e
        comm.agree(error)
        if not resume and run.checkpoint.exists():
            raise ConfigError(f"{run.path} already holds a run: pass --resume to continue it, or a new --out")
        state = run.load_state(log=log) if resume else None
        trainer = DistributedTrainer(cfg, comm, log)
        if state is not None:
            error = None
            try:
                trainer.load_state_dict(state, run)
            except CheckpointError as e:  # a shard file is each rank's own: all must hear of one bad one
                error = e
            comm.agree(error)
            if trainer.out_of_time() or trainer.epoch >= cfg.epochs:
                raise ConfigError(f"{run.path} has already trained {trainer.epoch} epochs (or used its "
                                  f"--max-seconds): pass --epochs N with N > {trainer.epoch} to train it further")
            log(f"resuming {run.path} at epoch {trainer.epoch}, step {trainer.step} on {comm.world} ranks")
        if lead:
            run.truncate_metrics(trainer.step)
            if state is not None and "history" not in state:  # a checkpoint from before it kept its records
                trainer.history = run.load_metrics()
        try:
            result = trainer.fit(run)  # each rank writes its shard; rank 0 alone commits
        except dist.DistBackendError as e:  # a peer died or hung: its rank's torchrun log says why
            kept = f"the checkpoint of epoch {trainer.epoch} is intact" if trainer.committed else "no checkpoint was written"
            raise TrainingError(f"a rank of the job was lost ({str(e).splitlines()[0]}); {kept}: resume with the "
                                f"same torchrun command and --resume --out {run.path}") from e
        comm.barrier()
    # Leave the group before the interpreter exits: gloo's threads torn down at exit while a peer still talks
    # can abort the process (SIGABRT) after a run that finished.
    dist.destroy_process_group()
    return {**result, "ranks": comm.world} if lead else None
