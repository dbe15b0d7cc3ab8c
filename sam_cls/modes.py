"""Training read modes: how a step turns a batch's embeddings into class log-probabilities, and what it writes.

Each mode has one small interface, so the training loop has no branches for them:
    embed(x)                 the encoder's output a read needs (embeddings; logits for the softmax head)
    log_probs(u, idx, step)  class log-probabilities of the batch of examples idx; own cells never count
    after_step(idx, u, step) what the mode writes once the optimiser has stepped
    accuracy(data)           test accuracy of the classifier this mode trains
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sam_cls.config import Config
from sam_cls.data import Dataset
from sam_cls.evaluate import CellFacts, accuracy, head_accuracy
from sam_cls.index import IndexRefresher
from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder
from sam_cls.phases import phase
from sam_cls.read import (
    ReadRule,
    class_log_probs,
    dense_read,
    exclusion_mask,
    sparse_read,
    thin_candidates,
    thinned_class,
)


class MemoryRead:
    """What the memory modes share: the encoder's embeddings in, the memory classifier's accuracy out."""

    def __init__(self, cfg: Config, encoder: Encoder, memory: MemoryBank, refresher: IndexRefresher,
                 num_classes: int):
        self.cfg, self.encoder, self.memory, self.refresher = cfg, encoder, memory, refresher
        self.num_classes = num_classes
        self.rule = ReadRule(cfg.topk, cfg.temperature)  # the read evaluation uses: as trained, until tuned

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def checks_finite(self, u: torch.Tensor) -> bool:
        """Whether a step checks its embeddings for NaN before reading: free on a CPU, a host sync on a GPU."""
        return not u.is_cuda

    def after_step(self, idx: torch.Tensor, u: torch.Tensor, step: int) -> None:
        """Nothing by default: the support-sample read keeps no per-example state."""

    def write(self, idx: torch.Tensor, u: torch.Tensor, step: int) -> None:
        """The batch's own cells move towards its embeddings: m <- normalise(eta m + (1 - eta) u)."""
        with phase("memory write"):
            self.memory.write(idx, u, self.cfg.eta, step)

    def accuracy(self, data: Dataset, embeddings: torch.Tensor | None = None) -> float:
        """Test accuracy under the current rule; `embeddings`: the test split's, where the caller has them."""
        cfg = self.cfg
        return accuracy(self.encoder, data.test_x, data.test_y, self.memory, self.refresher.index, cfg.topk,
                        self.num_classes, cfg.temperature, cfg.eval_batch_size, self.rule,
                        self.facts() if self.rule.alpha or self.rule.class_k or self.rule.per_source else None,
                        embeddings)

    def facts(self) -> CellFacts:
        """Class sizes and each cell's source image (cell c * N + e is copy c of image e), for the read rules."""
        n = self.memory.size // self.cfg.copies
        return CellFacts.of(self.memory.labels, self.num_classes, self.memory.example_ids % n)


class DenseMemory(MemoryRead):
    """`--topk 0`: the exact reference, a streamed softmax over every cell but the query's own; no index read."""

    def log_probs(self, u: torch.Tensor, idx: torch.Tensor, step: int = 0) -> torch.Tensor:
        mem = self.memory
        return dense_read(u, mem.embeddings, mem.labels, self.num_classes, self.cfg.temperature,
                          exclude_ids=mem.rows[idx])

    def after_step(self, idx: torch.Tensor, u: torch.Tensor, step: int) -> None:
        self.write(idx, u, step)


class SparseMemory(MemoryRead):
    """The method: the K nearest cells from the index, the query's own cell excluded; momentum writes."""

    def checks_finite(self, u: torch.Tensor) -> bool:
        # Diverged weights show first as non-finite embeddings, which a faiss index cannot search: check
        # before such a search (it syncs with the host anyway). A GPU torch index ranks NaN like any value,
        # so that step leaves the NaN to the trainer's loss check rather than wait for the GPU every step.
        return super().checks_finite(u) or not self.refresher.index.searches_non_finite

    def log_probs(self, u: torch.Tensor, idx: torch.Tensor, step: int = 0) -> torch.Tensor:
        copies = self.cfg.copies
        # K + copies candidates so that dropping the query's own cells (its image and its deformed copies: a
        # near-duplicate would make the loss trivial) still leaves K.
        with phase("search"):
            _, ids = self.refresher.search(u.detach(), self.cfg.topk + copies)
        ids = ids.to(u.device)
        exclude = exclusion_mask(ids, self.own_cells(ids, idx), self.cfg.topk)
        kept = (thinned_class(self.memory.labels, self.cfg.thin_classes, self.cfg.thin_cells, self.cfg.seed, step)
                if self.cfg.thin_classes else None)
        if kept is not None:
            ids, exclude = thin_candidates(ids, exclude, self.memory.labels, kept,
                                           self.own_cells(kept.expand(len(ids), -1), idx))
        with phase("read forward"):
            return sparse_read(u, ids, self.memory.embeddings, self.memory.labels, self.num_classes,
                               self.cfg.temperature, exclude=exclude)

    def own_cells(self, ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, F) mask of the candidate cells that are each query's own: its image's cell and every copy of it."""
        copies = self.cfg.copies
        if copies == 1:  # the batch's own rows: the memory keeps its index's layout, not examples'
            return ids == self.memory.rows[idx].unsqueeze(1)
        n = self.memory.size // copies  # cell c * N + e is copy c of image e: own cells share e
        return self.memory.example_ids[ids] % n == (idx % n).unsqueeze(1)

    def after_step(self, idx: torch.Tensor, u: torch.Tensor, step: int) -> None:
        self.write(idx, u, step)
        with phase("index refresh"):  # the index follows the memory it reads
            self.refresher.step(step)


class SupportSample(MemoryRead):
    """The seed's method: M random training images re-encoded with gradients every batch, a dense softmax over
    them. The memory serves evaluation only."""

    def __init__(self, cfg: Config, encoder: Encoder, memory: MemoryBank, refresher: IndexRefresher,
                 num_classes: int, train_y: torch.Tensor, batch: Callable[[torch.Tensor], torch.Tensor],
                 generator: torch.Generator):
        super().__init__(cfg, encoder, memory, refresher, num_classes)
        # The batch-order generator: a resumed run continues the support stream where the checkpoint left it.
        self.train_y, self.batch, self.generator = train_y, batch, generator

    def log_probs(self, u: torch.Tensor, idx: torch.Tensor, step: int = 0) -> torch.Tensor:
        support = torch.randperm(len(self.train_y), generator=self.generator)[: self.cfg.support_sample]
        support = support.to(u.device)
        s = self.encoder(self.batch(support))
        scores = (u @ s.T / self.cfg.temperature).masked_fill(support[None, :] == idx[:, None], float("-inf"))
        return class_log_probs(scores, self.train_y[support][None, :], self.num_classes)


class SoftmaxHead(MemoryRead):
    """The parametric baseline: the same encoder with a linear softmax head; the memory is not read."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.logits(x)

    def checks_finite(self, u: torch.Tensor) -> bool:
        return False  # logits are never searched: the loss check catches a divergence

    def log_probs(self, u: torch.Tensor, idx: torch.Tensor, step: int = 0) -> torch.Tensor:
        return F.log_softmax(u, dim=1)

    def accuracy(self, data: Dataset) -> float:
        return head_accuracy(self.encoder, data.test_x, data.test_y, self.cfg.eval_batch_size)


def make_mode(cfg: Config, encoder: Encoder, memory: MemoryBank, refresher: IndexRefresher, num_classes: int,
              train_y: torch.Tensor, batch: Callable[[torch.Tensor], torch.Tensor],
              generator: torch.Generator) -> MemoryRead:
    """The read mode a config asks for."""
    shared = (cfg, encoder, memory, refresher, num_classes)
    if cfg.head == "softmax":
        return SoftmaxHead(*shared)
    if cfg.support_sample:
        return SupportSample(*shared, train_y, batch, generator)
    return DenseMemory(*shared) if cfg.topk == 0 else SparseMemory(*shared)


def lays_out_memory(cfg: Config) -> bool:
    """Whether training reads search the index, so the memory should follow its list order (MemoryBank.reorder)."""
    return cfg.head == "memory" and not cfg.support_sample and cfg.topk > 0
