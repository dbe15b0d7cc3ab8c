"""Classifying with the memory: encode, find K cells, read them; shared by training and the CLI."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder
from sam_cls.read import (
    ReadRule,
    candidate_scores,
    class_prior,
    dense_read,
    rank_in_group,
    rule_log_probs,
    sparse_read,
)

# On a CPU an encoding batch's activations should stay in the caches: conv1 and cnn encode more images a second
# in batches of 128 than of 1024 (results/encode_batch.json). A GPU wants the larger batch, to fill it.
CPU_ENCODE_BATCH = 128


def encode_batch(batch_size: int, device: torch.device) -> int:
    """Images an encoder pass takes at once: the asked batch on a GPU, at most CPU_ENCODE_BATCH on a CPU."""
    return batch_size if device.type == "cuda" else min(batch_size, CPU_ENCODE_BATCH)


@torch.no_grad()
def encode_all(encoder: Encoder, images: torch.Tensor, batch_size: int, desc: str = "encode",
               fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Embeddings (or `fn`'s output, e.g. encoder.logits) of every image in eval mode, on the encoder's device."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    fn = fn or encoder
    batch_size = encode_batch(batch_size, device)
    chunks = [
        fn(images[i : i + batch_size].to(device))
        for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch")
    ]
    encoder.train(was_training)
    return torch.cat(chunks)


# Classes this small (in cells) are scanned exactly for every query of a per-class read, as a side index:
# a search over the whole memory may return none of their cells. Up to SIDE_CELLS cells in all, smallest first.
SMALL_CLASS_CELLS, SIDE_CELLS = 2048, 16384
# A per-source read first fetches K times this many candidates (or K times the copies, if fewer): a source's
# copies are seldom all near one query (a median of 235 distinct sources among 256 cells of a memory of 10
# copies), and rows still short of K sources search again, deeper.
PER_SOURCE_FETCH = 4


@dataclass
class CellFacts:
    """What a rule needs to know of the memory beyond its rows: each cell's source image, class sizes, side cells."""

    origins: torch.Tensor | None  # (N,) source image of each cell; None: every cell is its own
    copies: int  # cells a source image has at most (how many candidates a per-source read must fetch)
    class_cells: torch.Tensor  # (C,) cells of each class
    class_sources: torch.Tensor  # (C,) distinct source images of each class
    side: torch.Tensor  # rows of the small classes, scanned exactly by a per-class read

    @classmethod
    def of(cls, labels: torch.Tensor, num_classes: int, origins: torch.Tensor | None = None) -> "CellFacts":
        labels = labels.cpu()
        cells = torch.bincount(labels, minlength=num_classes)
        if origins is None:
            sources, copies = cells, 1
        else:
            origins = origins.cpu()
            pairs = torch.unique(origins * num_classes + labels)
            sources = torch.bincount(pairs % num_classes, minlength=num_classes)
            copies = int(torch.unique(origins, return_counts=True)[1].max()) if len(origins) else 1
        small = [c for c in cells.argsort().tolist() if 0 < cells[c] <= SMALL_CLASS_CELLS]
        budget = torch.cumsum(cells[small], 0) <= SIDE_CELLS if small else torch.zeros(0, dtype=torch.bool)
        small = torch.tensor(small, dtype=torch.long)[budget]
        side = torch.isin(labels, small).nonzero().squeeze(1)
        return cls(origins, copies, cells, sources, side)

    def counts(self, rule: ReadRule) -> torch.Tensor:
        return self.class_sources if rule.per_source else self.class_cells


@torch.no_grad()
def classify(u: torch.Tensor, memory: MemoryBank, index, rule: ReadRule, num_classes: int,
             facts: CellFacts | None = None):
    """Class log-probabilities under a read rule, and the memory rows searched (None for the dense read).

    The search fetches what the rule needs: K cells, K distinct source images (more candidates, doubled until
    every query has them or the memory is exhausted), or each class's k best (a small class's cells from an
    exact scan of its own). Scores are recomputed exactly, so a compressed index only chooses the candidates.
    """
    if not (rule.per_source or rule.class_k):  # the read training made: one shared top K, or every cell
        if rule.alpha:
            facts = facts or CellFacts.of(memory.labels, num_classes)
        if rule.topk == 0 or index is None:
            log_probs, ids = dense_read(u, memory.embeddings, memory.labels, num_classes, rule.temperature), None
        else:
            _, ids = index.search(u, rule.topk)
            ids = ids.to(memory.embeddings.device)
            log_probs = sparse_read(u, ids, memory.embeddings, memory.labels, num_classes, rule.temperature)
        return (class_prior(log_probs, rule.alpha, facts.counts(rule)) if rule.alpha else log_probs), ids
    if index is None:
        raise ValueError("per-source and per-class reads search the index: this memory has none (a dense run)")
    facts = facts or CellFacts.of(memory.labels, num_classes)
    n = memory.size
    # A per-source read reaches past the K nearest cells for K distinct images: a deep search (index/base.py).
    search = index.search_deep if rule.per_source else index.search
    ids = search(u, min(n, rule.fetch(num_classes, min(facts.copies, PER_SOURCE_FETCH)) or n))[1]
    if rule.per_source and facts.origins is not None:
        # Rows whose candidates hold fewer than K source images search again, twice as deep, until they do.
        while ids.shape[1] < n:
            short = (distinct_sources(facts.origins.to(ids.device)[ids.clamp_min(0)], ids >= 0) < rule.topk)
            if not short.any():
                break
            deeper = search(u[short], min(n, 2 * ids.shape[1]))[1]
            ids = torch.cat([ids, ids.new_full((len(ids), deeper.shape[1] - ids.shape[1]), -1)], 1)
            ids[short] = deeper
    ids = ids.to(memory.embeddings.device)
    found = ids >= 0  # faiss pads a short result with -1
    ids = ids.clamp_min(0)
    scores = candidate_scores(u, ids, memory.embeddings).masked_fill(~found, float("-inf"))
    origins = facts.origins.to(ids.device)[ids] if facts.origins is not None else None
    labels = memory.labels[ids]
    if rule.class_k and len(facts.side):  # the small classes, read exactly: every class present has its cells
        side = facts.side.to(ids.device)
        in_side = torch.zeros(n, dtype=torch.bool, device=ids.device)
        in_side[side] = True
        scores = scores.masked_fill(in_side[ids], float("-inf"))  # each side cell counted once, from the scan
        scores = torch.cat([scores, u @ memory.embeddings[side].T], dim=1)
        labels = torch.cat([labels, memory.labels[side].expand(len(u), -1)], dim=1)
        if origins is not None:
            origins = torch.cat([origins, facts.origins.to(ids.device)[side].expand(len(u), -1)], dim=1)
    log_probs = rule_log_probs(scores, labels, rule, num_classes, origins, facts.counts(rule).to(scores.device))
    return log_probs, ids


def distinct_sources(origins: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) how many distinct source images each row's valid candidates hold."""
    return ((rank_in_group(origins, valid) == 0) & valid).sum(1)


@torch.no_grad()
def accuracy(
    encoder: Encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    memory: MemoryBank,
    index,
    topk: int,
    num_classes: int,
    temperature: float,
    batch_size: int = 1024,
    rule: ReadRule | None = None,
    facts: CellFacts | None = None,
    embeddings: torch.Tensor | None = None,
) -> float:
    """Percent of `images` whose most probable class under the memory read is their label (`embeddings`: the
    images' own, where the caller encoded them already)."""
    u = encode_all(encoder, images, batch_size, desc="test") if embeddings is None else embeddings
    rule = rule or ReadRule(topk, temperature)
    if facts is None and (rule.alpha or rule.class_k or rule.per_source):
        facts = CellFacts.of(memory.labels, num_classes)
    correct = 0
    for i in range(0, len(u), batch_size):
        log_probs, _ = classify(u[i : i + batch_size], memory, index, rule, num_classes, facts)
        correct += (log_probs.argmax(1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
    return 100.0 * correct / len(labels)


@torch.no_grad()
def head_accuracy(encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Percent correct of the softmax head (the parametric baseline)."""
    logits = encode_all(encoder, images, batch_size, desc="test", fn=encoder.logits)
    return 100.0 * (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()
