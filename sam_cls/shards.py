"""The memory sharded across ranks: the training read that searches every shard, merges the exact global top-K
and fetches its cells from their owners; writes by the owner; one rebuild policy on every shard.

A step of P ranks, each holding B_r of the global batch's B queries (d: embedding size, K: cells read):
    queries      all_gather of the batch's embeddings: every shard searches every query (and, as it holds
                 the whole batch, writes its own cells from it after the step: writes cost nothing more)
    candidates   all_to_all: each shard's K + 1 best (score, global id) for rank q's queries go to rank q,
                 which merges them into the global K + 1 (merge_topk: ties by global id, so the same K on any
                 rank that merges the same candidates)
    requests     all_to_all: the distinct cells a rank's merged lists hold, to their owners
    cells        all_to_all: each owner's reply, embeddings and labels
The read and its gradient are then local: the fetched cells are a small memory of their own for sparse_read,
and gradients reach u only (the memory is a constant in the read), so nothing else crosses ranks but DDP's.
"""

from __future__ import annotations

import torch

from sam_cls.config import Config
from sam_cls.data import Dataset
from sam_cls.distributed import Comm, split_counts
from sam_cls.evaluate import encode_all
from sam_cls.index import IndexRefresher
from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder
from sam_cls.read import exclusion_mask, sparse_read


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row's candidates (from every shard) by score, equal scores by smaller global id.

    A total order: any rank that merges the same candidates gets the same k cells in the same order.
    """
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    best = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # stable: equal scores stay in id order
    return scores.gather(1, best), ids.gather(1, best)


class ShardRefresher(IndexRefresher):
    """A shard's own index, rebuilt on the same steps as every other shard's.

    Steps-based and forced rebuilds happen at the same step everywhere by construction; `auto` decides by
    staleness, which is measured here over all shards (one all_reduce), so the decision is the same on all.
    """

    def __init__(self, comm: Comm, *args, **kwargs):
        self.comm = comm
        super().__init__(*args, **kwargs)

    def staleness(self) -> float:
        local = torch.tensor([super().staleness()], dtype=torch.float64)
        return float(self.comm.all_reduce("staleness", local)) / self.comm.world


class Shard:
    """Rank r's cells, the examples [start, stop) (`ranges` holds every rank's), and the index over them."""

    def __init__(self, memory: MemoryBank, ranges: list[tuple[int, int]], rank: int):
        self.memory, self.ranges, self.rank = memory, ranges, rank
        self.start, self.stop = ranges[rank]
        self.refresher: ShardRefresher | None = None  # set once the shard's index is built
        # Where each rank's block ends, for bucketize: owner(e) = the number of block ends <= e.
        self.ends = torch.tensor([stop for _, stop in ranges[:-1]], device=memory.embeddings.device)

    def global_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Global cell ids (training examples) of rows of this shard's memory (as laid out by its index)."""
        return self.memory.example_ids[rows] + self.start

    def local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """This shard's memory rows of global ids it owns."""
        return self.memory.rows[ids - self.start]

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(ids, self.ends, right=True)

    def state_dict(self, step: int) -> dict:
        """What a shard file holds: its cells, what its index learned, and where it belongs."""
        centroids = self.refresher.centroids() if self.refresher is not None else None
        return {"memory": {k: v.cpu() for k, v in self.memory.state_dict().items()},
                **({"index_centroids": centroids} if centroids is not None else {}),
                "rank": self.rank, "world_size": len(self.ranges), "range": [self.start, self.stop], "step": step}


class ShardedMemory:
    """The method's training read (modes.SparseMemory's interface) over a memory sharded across ranks."""

    def __init__(self, cfg: Config, embed, encoder: Encoder, shard: Shard, comm: Comm, num_classes: int):
        # embed: the DDP-wrapped encoder (its forward is what DDP synchronises); encoder: the module itself,
        # for evaluation, which must not run DDP's collectives.
        self.cfg, self.embed, self.encoder, self.shard, self.comm = cfg, embed, encoder, shard, comm
        self.num_classes = num_classes
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (global ids, embeddings) for the write

    def search(self, queries: torch.Tensor, counts: list[int], k: int, training: bool = True):
        """(scores, global ids), each (counts[rank], k), of the global top-k of this rank's queries; `queries`
        holds every rank's (counts[r] rows each, in rank order), as all ranks call this together."""
        index = self.shard.refresher.index
        scores, rows = index.search(queries, k, training=training)
        ids = self.shard.global_ids(rows.to(self.shard.memory.example_ids.device))
        mine = [counts[self.comm.rank]] * self.comm.world
        got_scores = self.comm.all_to_all("candidates", list(scores.split(counts)), mine)
        got_ids = self.comm.all_to_all("candidates", list(ids.to(scores.device).split(counts)), mine)
        return merge_topk(torch.cat(got_scores, 1), torch.cat(got_ids, 1), k)

    def fetch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cells `ids` (global, any shape) from their owners: (embeddings (n, d), labels (n,), rows) where
        rows, shaped as ids, index the n distinct cells. All ranks call this together."""
        memory = self.shard.memory
        distinct, rows = torch.unique(ids.to(memory.embeddings.device), return_inverse=True)  # sorted: by owner
        per_owner = torch.bincount(self.shard.owners(distinct), minlength=self.comm.world).tolist()
        asked = self.comm.exchange("requests", list(distinct.split(per_owner)))
        local = [self.shard.local_rows(a) for a in asked]
        cells = self.comm.all_to_all("cells", [memory.embeddings.index_select(0, r) for r in local],
                                     per_owner)
        labels = self.comm.all_to_all("cells", [memory.labels.index_select(0, r) for r in local],
                                      per_owner)
        return torch.cat(cells), torch.cat(labels), rows.view(ids.shape)

    def log_probs(self, u: torch.Tensor, batch_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Class log-probabilities of this rank's queries u, the examples batch_ids (the global batch, every
        rank's share in rank order, counts[r] each); the query's own cell never counts."""
        everyone = self.comm.all_gather("queries", u.detach(), counts)
        # Every rank sees every query: a diverged one stops all ranks at the same step, not one alone.
        if not torch.isfinite(everyone).all():
            raise FloatingPointError("non-finite embeddings")
        self._batch = (batch_ids, everyone)
        lo = sum(counts[: self.comm.rank])
        own = batch_ids[lo : lo + counts[self.comm.rank]].to(u.device)
        _, ids = self.search(everyone, counts, self.cfg.topk + 1)  # K + 1: dropping the own cell leaves K
        cells, labels, rows = self.fetch(ids)
        return sparse_read(u, rows.to(u.device), cells.to(u), labels.to(u.device), self.num_classes,
                           self.cfg.temperature, exclude=exclusion_mask(ids.to(u.device), own))

    def after_step(self, step: int) -> None:
        """Write the cells this shard owns of the last batch (every rank's queries came with the search), then
        let its index follow."""
        batch_ids, u = self._batch
        shard = self.shard
        batch_ids = batch_ids.to(shard.memory.embeddings.device)
        owned = (batch_ids >= shard.start) & (batch_ids < shard.stop)
        shard.memory.write(batch_ids[owned] - shard.start, u[owned.to(u.device)], self.cfg.eta, step)
        shard.refresher.step(step)

    @torch.no_grad()
    def accuracy(self, data: Dataset) -> float:
        """Test accuracy of the memory classifier: each rank encodes a share of every test chunk, which is read
        against all shards."""
        cfg, comm = self.cfg, self.comm
        n, correct = len(data.test_y), torch.zeros((), dtype=torch.long)
        for c0 in range(0, n, cfg.eval_batch_size):
            counts = split_counts(min(cfg.eval_batch_size, n - c0), comm.world)
            lo = c0 + sum(counts[: comm.rank])
            x = data.test_x[lo : lo + counts[comm.rank]]
            u = encode_all(self.encoder, x, cfg.eval_batch_size) if len(x) else \
                torch.zeros(0, self.shard.memory.dim, device=self.shard.memory.embeddings.device)
            _, ids = self.search(comm.all_gather("evaluation", u, counts), counts, cfg.topk, training=False)
            cells, labels, rows = self.fetch(ids)
            log_probs = sparse_read(u, rows.to(u.device), cells.to(u), labels.to(u.device), self.num_classes,
                                    cfg.temperature)
            correct += (log_probs.argmax(1).cpu() == data.test_y[lo : lo + len(x)].cpu()).sum()
        return 100.0 * int(comm.all_reduce("evaluation", correct)) / n
