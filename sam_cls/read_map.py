"""A metric refit for classes added later: a d x d map on the embeddings, fitted by the read's own loss.

An encoder trained on some classes puts a class it never saw wherever its features happen to, often close to a
trained class, and a read over that space lends the new class's queries to its neighbour (docs/MEMORY.md, "New
classes"). The map is the method's metric, learned again on the memory it now holds: the read's leave-one-out
log-likelihood of every class's cells, each class's queries weighed alike and the class prior (alpha = 1) in the
loss, over every cell (the dense read) or a seeded sample of them. It is then folded into the encoder's
projection, so queries, cells and the index stay one space: normalise(normalise(h) W) = normalise(h W), and
h W is the projection's output with weight W^T A and bias b W.

A map is kept only where it reads held-out cells (a share of each class, never a query of the fit) better for
the small classes and no worse for the others: new classes may not be bought with old ones. Too few held-out
cells of small classes to tell (classes of a few examples) and nothing is fitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_cls.backbones import last_layer

# ----------------------------------------------------------------------------- hyper-parameters, all here
STEPS = 100  # Adam steps: on MNIST the held-out scores stop moving after about 100
BATCH = 256  # queries a step
LR = 0.002
HELD_OUT = 0.2  # each class's share of cells scored, not fitted
FIT_CELLS = 65536  # cells a step reads at most (a seeded sample; small classes whole): seconds, not minutes
CHECK_QUERIES = 2000  # held-out queries at most
# Held-out cells of small classes a decision needs: with fewer (5 classes of 5 examples hold out 5) one query is
# 20 points, and a map kept on such a count read MNIST's new test images worse (docs/MEMORY.md).
MIN_SMALL_QUERIES = 20
SMALL_SHARE = 0.25  # a class under this share of the largest class's cells is small (sam_cls/tune.py's rule)
STEP_SHARES = (1.0, 0.75, 0.5, 0.25)  # the share of the fitted map's change from the identity a map may keep
CHUNK = 65536  # cells mapped at once by map_cells


def read_log_probs(q: torch.Tensor, cells: torch.Tensor, labels: torch.Tensor, q_origins: torch.Tensor,
                    origins: torch.Tensor, temperature: float, counts: torch.Tensor, topk: int | None) -> torch.Tensor:
    """Class log-probabilities of queries read leave-one-out (their own source's cells excluded), class prior 1.

    topk None: the dense read over every cell (the fit's loss); else a top-K read (the held-out score)."""
    scores = (q @ cells.T) / temperature
    scores = scores.masked_fill(q_origins.unsqueeze(1) == origins.unsqueeze(0), float("-inf"))
    if topk is not None:
        top, ids = scores.topk(min(topk, scores.shape[1]), dim=1)
        p = torch.softmax(top, dim=1)
        per_class = torch.zeros(len(q), len(counts), dtype=p.dtype).scatter_add_(1, labels[ids], p)
    else:
        per_class = torch.softmax(scores, dim=1) @ F.one_hot(labels, len(counts)).to(scores.dtype)
    # The prior divides each class's mass by its cell count: a class of 100 cells is not outvoted by one of 6,000.
    return per_class.clamp_min(1e-12).log() - counts.clamp_min(1).log()


def split_cells(labels: torch.Tensor, num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and held-out query rows: HELD_OUT of each class held out (one at least, where a class has two cells);
    a class of one cell has no other to be read against, so it is neither."""
    fit, held = [], []
    for c in range(num_classes):
        rows = (labels == c).nonzero().squeeze(1)
        if len(rows) < 2:
            continue
        rows = rows[torch.randperm(len(rows), generator=g)]
        cut = max(1, int(HELD_OUT * len(rows)))
        held.append(rows[:cut])
        fit.append(rows[cut:])
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat(fit) if fit else empty, torch.cat(held) if held else empty


def held_out_scores(w: torch.Tensor, cells, labels, origins, held, mem, small, num_classes, temperature,
                    topk) -> tuple:
    """(small classes', other classes') mean per-class accuracy of the held-out queries, in %, under map w,
    read against the cells `mem`."""
    counts = torch.bincount(labels[mem], minlength=num_classes).float()
    mapped = F.normalize(cells[mem] @ w, dim=1)
    right = []
    for start in range(0, len(held), 512):
        q = held[start:start + 512]
        lp = read_log_probs(F.normalize(cells[q] @ w, dim=1), mapped, labels[mem], origins[q], origins[mem],
                            temperature, counts, topk)
        right.append(lp.argmax(1) == labels[q])
    right = torch.cat(right)
    truth = labels[held]
    per_class = torch.bincount(truth[right], minlength=num_classes) / torch.bincount(truth, minlength=num_classes)
    present = ~per_class.isnan()
    is_small = torch.zeros(num_classes, dtype=torch.bool)
    is_small[small] = True
    mean = lambda mask: 100.0 * per_class[mask & present].mean().item() if (mask & present).any() else 0.0
    return mean(is_small), mean(~is_small)


@torch.enable_grad()
def fit_map(cells: torch.Tensor, labels: torch.Tensor, origins: torch.Tensor, num_classes: int,
            temperature: float, topk: int, seed: int = 0) -> tuple[torch.Tensor | None, dict]:
    """The map for this memory (cells: (N, d) L2-normalised) and a report; None where it reads no better or the
    memory holds no small class to fit it for."""
    cells, labels, origins = cells.detach().float().cpu(), labels.cpu(), origins.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    small = ((counts > 0) & (counts < SMALL_SHARE * counts.max())).nonzero().squeeze(1)
    report = {"small_classes": small.tolist(), "kept": False}
    if not len(small):
        return None, {**report, "reason": "no small class"}
    g = torch.Generator().manual_seed(seed)
    fit, held = split_cells(labels, num_classes, g)
    held = held[torch.randperm(len(held), generator=g)[:CHECK_QUERIES]].sort().values
    if not torch.isin(labels[fit], small).any() or int(torch.isin(labels[held], small).sum()) < MIN_SMALL_QUERIES:
        return None, {**report, "reason": f"fewer than {MIN_SMALL_QUERIES} held-out cells of small classes to "
                                          "check a map on"}
    # The fit reads a sample of the memory (small classes whole where they fit in it), with each class's count as
    # it is in the sample.
    in_small = torch.isin(labels, small)
    draw = torch.rand(len(labels), generator=g)
    keep = torch.where(in_small, draw < FIT_CELLS / int(in_small.sum()), draw < FIT_CELLS / len(labels))
    mem = keep.nonzero().squeeze(1)
    fit = fit[keep[fit]]
    fit_counts = torch.bincount(labels[mem], minlength=num_classes).float()
    position = torch.full((len(labels),), -1, dtype=torch.long)
    position[mem] = torch.arange(len(mem))
    weights = (1.0 / counts.float())[labels[fit]]  # each class's queries alike
    w = torch.eye(cells.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=LR)
    for _ in range(STEPS):
        q = fit[torch.multinomial(weights, BATCH, replacement=True, generator=g)]
        mapped = F.normalize(cells[mem] @ w, dim=1)
        lp = read_log_probs(mapped[position[q]], mapped, labels[mem], origins[q], origins[mem], temperature,
                             fit_counts, None)
        loss = F.nll_loss(lp, labels[q])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The map, or a step part of the way to it from the identity: the largest harmonic mean of the held-out
    # scores among those that lose nothing on either side (a full step can buy small classes with large ones).
    eye = torch.eye(cells.shape[1])
    score = lambda m: held_out_scores(m, cells, labels, origins, held, mem, small, num_classes, temperature, topk)
    harmonic = lambda s: 2 * s[0] * s[1] / max(1e-9, s[0] + s[1])
    with torch.no_grad():
        before = score(eye)
        tried = [(t, score(eye + t * (w.detach() - eye))) for t in STEP_SHARES]
    better = [(harmonic(s), t, s) for t, s in tried if s[0] > before[0] and s[1] >= before[1]]
    kept = bool(better)
    report.update(kept=kept, held_out_queries=len(held), steps=STEPS, small_before=round(before[0], 3),
                  others_before=round(before[1], 3),
                  tried={str(t): {"small": round(s[0], 3), "others": round(s[1], 3)} for t, s in tried})
    if kept:
        _, t, after = max(better)
        w = eye + t * (w.detach() - eye)
        report.update(step_share=t, small_after=round(after[0], 3), others_after=round(after[1], 3))
    else:
        report["reason"] = "no step of the map read the held-out cells of the small classes better without " \
                           "reading the others worse"
    return (w if kept else None), report


def fold_map(encoder: nn.Module, w: torch.Tensor) -> bool:
    """Fold the map into the encoder's projection (its body's last Linear) in place; False where there is none
    to fold it into (a body that ends in another layer, or a softmax head that reads the features)."""
    _, projection = last_layer(encoder.body)
    if not isinstance(projection, nn.Linear) or getattr(encoder, "head", None) is not None:
        return False
    with torch.no_grad():  # (z A^T + b) W = z (W^T A)^T + b W
        w = w.to(projection.weight)
        projection.weight.copy_(w.T @ projection.weight)
        if projection.bias is not None:
            projection.bias.copy_(projection.bias @ w)
    return True


def map_cells(cells: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The cells as the folded encoder would write them: normalise(m W), in chunks."""
    w = w.to(cells)
    return torch.cat([F.normalize(cells[s:s + CHUNK] @ w, dim=1) for s in range(0, len(cells), CHUNK)])
