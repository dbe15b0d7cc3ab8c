"""Reading the memory: a temperature softmax over cells, summed per class, as log-probabilities.

`sparse_read` touches only the K candidate cells an index returned; `dense_read` is the exact reference
over all N cells, streamed in chunks with a running max so it never holds a B x N matrix.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sam_cls.phases import phase

# Floor for a class probability before its log: a class with no candidate among the K has P = 0.
TINY = 1e-30


def class_log_probs(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log P(c | x) = log sum_{i: label_i = c} softmax(scores)_i, for (B, K) scores and labels."""
    p = torch.softmax(scores, dim=1)
    per_class = torch.zeros(scores.shape[0], num_classes, dtype=p.dtype, device=p.device)
    per_class.scatter_add_(1, labels.expand_as(p), p)
    return per_class.clamp_min(TINY).log()


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Columns stay in search order (CSR would have them sorted): the CPU kernel computes each entry where it
    # stands, and tests/test_read.py holds it to the gathered product.
    return torch.sparse_csr_tensor(rows, cols, values, size=size, check_invariants=False)


# torch warns, once a process, that CSR tensors are a beta feature: take that warning here, at import, rather
# than filter warnings on every read (which would also reset Python's "shown once" records each step).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    _csr(torch.tensor([0, 1]), torch.tensor([0]), torch.zeros(1), (1, 1))


def candidate_scores(u: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, K) inner products u_b . m_{ids[b, k]} (no autograd), with no (B, K, d) copy of the cells on a CPU."""
    B, K = ids.shape
    if ids.numel() == 0:
        return u.new_zeros(B, K)
    if memory.is_cuda:  # a GPU's caching allocator makes one big gather and a batched product cheap
        cells = memory.index_select(0, ids.reshape(-1)).view(B, K, memory.shape[1])
        return torch.bmm(cells, u.unsqueeze(2)).squeeze(2)
    # A sampled matrix product (SDDMM): each (b, ids[b, k]) entry of u @ memory.T, dotted straight from the
    # memory's rows. A gather into a buffer and a batched product read every cell twice, and took 1.4x as
    # long on a CIFAR-10/conv1 run's memory (results/hot_path.json). torch makes a non-contiguous memory contiguous first (a full copy a call):
    # MemoryBank's cells are contiguous float32, which the CPU kernel also needs.
    lo, hi = torch.aminmax(ids)
    if lo < 0 or hi >= memory.shape[0]:  # the sparse kernel does not check its indices
        raise IndexError(f"cell ids must lie in [0, {memory.shape[0]}), got ids from {int(lo)} to {int(hi)}")
    rows = torch.arange(0, B * K + 1, K, device=ids.device)
    # Zeros, not empty: the kernel adds beta * values, and 0 * NaN from uninitialised memory would be NaN.
    pattern = _csr(rows, ids.reshape(-1), torch.zeros(B * K, dtype=u.dtype), (B, memory.shape[0]))
    return torch.sparse.sampled_addmm(pattern, u, memory.T, beta=0.0).values().view(B, K)


class SparseRead(torch.autograd.Function):
    """The K-candidate read with its backward written out: no (B, K, d) tensor is kept between the passes."""

    # Autograd through the same ops records ~15 nodes a step, gathers by advanced indexing and keeps the
    # gathered cells for the backward. Here the forward's scores are one sampled product (candidate_scores)
    # and the backward's weighted sum of cells is one embedding_bag: both read the rows straight from the
    # memory, and no tensor of tens of MB is allocated, kept or freed a step.
    @staticmethod
    def forward(ctx, u, ids, memory, labels, num_classes, temperature, exclude):
        scores = candidate_scores(u, ids, memory).div_(temperature)
        if exclude is not None:
            scores.masked_fill_(exclude, float("-inf"))
        cell_labels = labels.index_select(0, ids.reshape(-1)).view(ids.shape)
        p = torch.softmax(scores, dim=1)
        per_class = torch.zeros(len(ids), num_classes, dtype=p.dtype, device=p.device)
        per_class.scatter_add_(1, cell_labels, p)
        log_probs = per_class.clamp_min(TINY).log()
        # Saving the memory itself (not a copy) also makes autograd refuse a backward after a write to it.
        ctx.save_for_backward(ids, memory, cell_labels, p, per_class)
        ctx.temperature = temperature
        return log_probs

    @staticmethod
    @once_differentiable  # the formula treats p and the cells as constants: a second derivative would be wrong
    def backward(ctx, grad_out):
        with phase("read backward"):  # inside the trainer's "backward": the rest of it is the encoder's
            # (only training reads run a backward; the forward is labelled where training calls it, modes.py)
            return SparseRead._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        ids, memory, cell_labels, p, per_class = ctx.saved_tensors
        # log P_c = log sum_{i: label_i = c} p_i, so ds_i = p_i (g_{label_i} / P_{label_i} - sum_c g_c); a
        # class floored at TINY passes no gradient, as the clamp in the forward says.
        live = per_class > TINY
        ratio = torch.where(live, grad_out / per_class, torch.zeros_like(per_class))
        g_sum = torch.where(live, grad_out, torch.zeros_like(grad_out)).sum(dim=1, keepdim=True)
        d_scores = p * (ratio.gather(1, cell_labels) - g_sum)
        # grad_u = sum_k ds_k m_{ids[k]} / T: embedding_bag's weighted row sum, fused with the gather.
        grad_u = F.embedding_bag(ids, memory, mode="sum", per_sample_weights=d_scores)  # u, memory: one dtype
        return grad_u.div_(ctx.temperature), None, None, None, None, None, None


def sparse_read(
    u: torch.Tensor,
    ids: torch.Tensor,
    memory: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    temperature: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class log-probabilities from the K candidate cells `ids` (B, K); gradients reach u only."""
    return SparseRead.apply(u, ids, memory.detach(), labels, num_classes, temperature, exclude)


def exclusion_mask(ids: torch.Tensor, own: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Mask for a search of K + extra candidates that leaves exactly K: the query's own cells, then the farthest.

    own is each query's own row (B,), or a (B, K + extra) mask of the candidates that are its own (every copy of
    its source image in a memory of deformed copies); k defaults to one fewer than the candidates.
    """
    mask = own.clone() if own.dtype == torch.bool else ids == own.unsqueeze(1)
    k = ids.shape[1] - 1 if k is None else k
    # A query with fewer own cells among the candidates than the search allowed for drops its farthest others
    # instead, so every training read averages over the same number of cells.
    mask |= (~mask).cumsum(dim=1) > k
    return mask


def thinned_class(labels: torch.Tensor, share: float, most: int, seed: int, step: int) -> torch.Tensor | None:
    """The cells one class keeps in a thinned training step, or None: train as a class added from a few examples
    is read (Gidaris & Komodakis's "fake novel" classes, drawn from the memory's own)."""
    # A pure function of (seed, step): a resumed run thins exactly as an unbroken one, and no generator state
    # needs a place in the checkpoint.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if torch.rand((), generator=gen) >= share:
        return None
    classes = labels.unique()
    c = classes[torch.randint(len(classes), (), generator=gen)]
    cells = torch.nonzero(labels == c).squeeze(1)
    # 1 to `most` cells, log-uniform: a class of 1, 5, 20 or 100 examples is each as likely a lesson.
    keep = min(most, int(math.exp(float(torch.rand((), generator=gen)) * math.log(most + 1))))
    return cells[torch.randperm(len(cells), generator=gen)[:keep].to(cells.device)]


def thin_candidates(ids: torch.Tensor, exclude: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor,
                    own_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of a thinned step: the class's searched cells hidden, its kept cells scored for every query.

    A class of a few cells is rarely among a shared top K (read.py's per-class read answers that at test time),
    so the kept cells join every query's candidates; own_kept (B, n) masks a query's own cells among them.
    """
    hidden = exclude | (labels[ids] == labels[kept[0]])
    ids = torch.cat([ids, kept.to(ids.device).expand(len(ids), -1)], dim=1)
    thinned = torch.cat([hidden, own_kept], dim=1)
    # A query with nothing left to read (every candidate of the thinned class and the kept cells its own)
    # reads its step unthinned rather than a softmax over nothing.
    empty = thinned.all(dim=1, keepdim=True)
    return ids, torch.where(empty, torch.cat([exclude, torch.ones_like(own_kept)], dim=1), thinned)


def _chunk_scores(u, memory, start, stop, temperature, exclude_ids):
    scores = u @ memory[start:stop].T / temperature
    if exclude_ids is not None:
        rows = torch.nonzero((exclude_ids >= start) & (exclude_ids < stop)).squeeze(1)
        scores[rows, exclude_ids[rows] - start] = float("-inf")
    return scores


class DenseRead(torch.autograd.Function):
    """Exact read over all N cells; forward and backward both stream chunks of cells."""

    @staticmethod
    def forward(ctx, u, memory, labels, num_classes, temperature, exclude_ids, chunk):
        B = u.shape[0]
        running_max = torch.full((B,), float("-inf"), dtype=u.dtype, device=u.device)
        per_class = torch.zeros(B, num_classes, dtype=u.dtype, device=u.device)
        for start in range(0, memory.shape[0], chunk):
            stop = min(start + chunk, memory.shape[0])
            scores = _chunk_scores(u, memory, start, stop, temperature, exclude_ids)
            new_max = torch.maximum(running_max, scores.max(dim=1).values)
            # A row that has seen only its excluded cell so far has max -inf: shift by 0 there, not -inf.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            # Rescale what was summed under the old max; exp(-inf) = 0 handles the first chunk.
            per_class *= torch.exp(running_max - shift).unsqueeze(1)
            onehot = F.one_hot(labels[start:stop], num_classes).to(u.dtype)
            per_class += torch.exp(scores - shift.unsqueeze(1)) @ onehot
            running_max = new_max
        total = per_class.sum(dim=1)
        log_probs = per_class.clamp_min(TINY).log() - total.log().unsqueeze(1)
        ctx.save_for_backward(u, memory, labels, log_probs, running_max + total.log())
        ctx.temperature, ctx.exclude_ids, ctx.chunk = temperature, exclude_ids, chunk
        return log_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, memory, labels, log_probs, log_total = ctx.saved_tensors
        probs = log_probs.exp()
        # d log P_c / d s_i = [label_i = c] p_i / P_c - p_i, so ds_i = p_i (g_{label_i} / P_{label_i} - sum_c g_c).
        ratio = torch.where(probs > TINY, grad_out / probs, torch.zeros_like(probs))
        g_sum = grad_out.sum(dim=1, keepdim=True)
        grad_u = torch.zeros_like(u)
        for start in range(0, memory.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, memory.shape[0])
            scores = _chunk_scores(u, memory, start, stop, ctx.temperature, ctx.exclude_ids)
            p = torch.exp(scores - log_total.unsqueeze(1))
            d_scores = p * (ratio[:, labels[start:stop]] - g_sum)
            grad_u += d_scores @ memory[start:stop] / ctx.temperature
        return grad_u, None, None, None, None, None, None


def dense_read(
    u: torch.Tensor,
    memory: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    temperature: float,
    exclude_ids: torch.Tensor | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """Exact class log-probabilities over every cell (the reference, and `--topk 0`)."""
    return DenseRead.apply(u, memory.detach(), labels, num_classes, temperature, exclude_ids, chunk)


# ----------------------------------------------------------------------------- read rules (using a trained run)
@dataclass(frozen=True)
class ReadRule:
    """How a prediction reads the memory. The defaults are the read training used (`as trained`)."""

    topk: int = 256  # K: candidate cells read per query (0 = every cell, the dense read)
    temperature: float = 0.05
    # Class prior: a class's mass divided by its cell count ** alpha (0 = each class's share of the memory,
    # as trained; 1 = every class weighed alike, which a class added from a few examples needs).
    alpha: float = 0.0
    per_source: bool = False  # each source image votes once, with its best copy: K distinct examples
    # Each class's own k best cells (an image-to-class score, as NBNN): a class of 100 cells among 30,000 is
    # never crowded out of a shared top K. 0 = the shared top K.
    class_k: int = 0

    def fetch(self, num_classes: int, copies: int = 1) -> int:
        """Candidates one search should return for this rule (more for per-source and per-class reads)."""
        need = self.topk * (copies if self.per_source else 1)
        return max(need, self.class_k * num_classes if self.class_k else 0)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ReadRule":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown read rule field(s) {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**values)


def rank_in_group(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each valid entry's rank among the valid entries of its row with the same key, in column order."""
    # A stable sort by key keeps each group in column (score) order; an entry's rank is its place in the group.
    sentinel = keys.max() + 1 if keys.numel() else 0
    keys = torch.where(valid, keys, sentinel)  # invalid entries form a group of their own, never counted
    sorted_keys, perm = keys.sort(dim=1, stable=True)
    pos = torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
    starts = torch.ones_like(valid)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    group_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    rank = torch.empty_like(pos)
    rank.scatter_(1, perm, pos - group_start)
    return rank


def rule_log_probs(scores: torch.Tensor, labels: torch.Tensor, rule: ReadRule, num_classes: int,
                   origins: torch.Tensor | None = None, class_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) class log-probabilities under `rule` from (B, F) candidate similarities (-inf: not a candidate).

    labels and origins are the candidates' classes and source images, (B, F). class_counts (C,) are the cells
    (or, per source, the source images) each class holds, for the class prior.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    scores, labels = scores.gather(1, order), labels.gather(1, order)
    origins = origins.gather(1, order) if origins is not None else None
    keep = select_cells(scores, labels, rule, origins)
    return weigh_cells(scores, labels, keep, rule, num_classes, class_counts)


def select_cells(scores: torch.Tensor, labels: torch.Tensor, rule: ReadRule,
                 origins: torch.Tensor | None = None, ranks: dict | None = None) -> torch.Tensor:
    """(B, F) mask of the candidates a rule reads, from candidates sorted best first in each row.

    ranks: a dict kept between calls over the same candidates, so rules that differ only in k share one ranking."""
    ranks = {} if ranks is None else ranks
    keep = torch.isfinite(scores)
    per_source = rule.per_source and origins is not None
    if per_source:  # the best copy of each source image stands for it
        if "source" not in ranks:
            ranks["source"] = rank_in_group(origins, keep)
        keep &= ranks["source"] == 0
    if rule.class_k:  # each class's own k best
        if ("class", per_source) not in ranks:
            ranks["class", per_source] = rank_in_group(labels, keep)
        keep &= ranks["class", per_source] < rule.class_k
    elif rule.topk:  # one shared top K
        keep &= keep.cumsum(dim=1) <= rule.topk
    return keep


def weigh_cells(scores: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, rule: ReadRule, num_classes: int,
                class_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The temperature softmax over the cells kept, summed per class, under the rule's class prior."""
    logits = (scores / rule.temperature).masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a row with no candidate at all: zero mass everywhere
    per_class = torch.zeros(len(scores), num_classes, dtype=p.dtype, device=p.device)
    per_class.scatter_add_(1, labels, p)
    log_probs = per_class.clamp_min(TINY).log()
    return class_prior(log_probs, rule.alpha, class_counts) if rule.alpha and class_counts is not None else log_probs


def class_prior(log_probs: torch.Tensor, alpha: float, class_counts: torch.Tensor) -> torch.Tensor:
    """Each class's mass divided by its count ** alpha, renormalised (post-hoc logit adjustment, Menon et al.)."""
    return torch.log_softmax(log_probs - alpha * class_counts.clamp_min(1).to(log_probs).log(), dim=1)
