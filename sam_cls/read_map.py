"""A metric refit for classes added later: a d x d map on the embeddings, fitted by the read's own loss.

An encoder trained on some classes puts a class it never saw wherever its features happen to, often close to a
trained class, and a read over that space lends the new class's queries to its neighbour (docs/MEMORY.md, "New
classes"). The map is the method's metric, learned again on the memory it now holds: the read's leave-one-out
log-likelihood of the cells of every class, each class's queries weighed alike, over every cell (the dense read)
or a seeded sample of them. It is then folded into the encoder's
projection, so queries, cells and the index stay one space: normalise(normalise(h) W) = normalise(h W), and
h W is the projection's output with weight W^T A and bias b W.

A map is kept only where it reads held-out cells (a share of each class, neither a query nor a neighbour in the
fit), with the class prior, better for the small classes and no worse for the others: new classes may not be
bought with old ones. Too few held-out
cells of small classes to tell (classes of a few examples) and nothing is fitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_cls.backbones import last_layer
from sam_cls.read import class_log_probs, class_prior
from sam_cls.tune import class_accuracy, harmonic, mean_accuracy, small_classes

# ----------------------------------------------------------------------------- hyper-parameters, all here
STEPS = 100  # Adam steps: on MNIST the held-out scores stop moving after about 100
BATCH = 256  # queries a step
LR = 0.002
HELD_OUT = 0.2  # each class's share of cells scored, not fitted
# Cells a fit reads: a seeded sample of about this many of the memory, plus the small classes whole (or as many
# of theirs): seconds at any memory size, where every cell would be minutes at 10^7.
FIT_CELLS = 65536
CHECK_QUERIES = 2000  # held-out queries at most, counting every small class's (which are never cut)
# Held-out cells of small classes a decision needs: with fewer (5 classes of 5 examples hold out 5) one query is
# 20 points, and a map kept on such a count read MNIST's new test images worse (docs/MEMORY.md).
MIN_SMALL_QUERIES = 20
STEP_SHARES = (1.0, 0.75, 0.5, 0.25)  # the share of the fitted map's change from the identity a map may keep
CHUNK = 65536  # cells mapped at once by map_cells


def read_log_probs(q: torch.Tensor, cells: torch.Tensor, labels: torch.Tensor, q_origins: torch.Tensor,
                   origins: torch.Tensor, temperature: float, num_classes: int, topk: int | None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Class log-probabilities of queries read leave-one-out (their own source's cells excluded).

    topk None: the dense read over every cell (the fit's loss); else a top-K read. counts: the class prior
    (alpha = 1) the held-out score reads with; the loss goes without it, since a prior that only shifts each
    class's log-probability adds a constant to a query's loss and no gradient."""
    scores = (q @ cells.T) / temperature
    scores = scores.masked_fill(q_origins.unsqueeze(1) == origins.unsqueeze(0), float("-inf"))
    if topk is not None:  # the read's own top-K class log-probabilities
        top, ids = scores.topk(min(topk, scores.shape[1]), dim=1)
        log_probs = class_log_probs(top, labels[ids], num_classes)
    else:  # index_add, not a one-hot matrix: (N, C) floats would be gigabytes for a memory of many classes
        per_class = torch.zeros(len(q), num_classes, dtype=scores.dtype).index_add_(1, labels, scores.softmax(1))
        log_probs = per_class.clamp_min(1e-12).log()
    # The prior divides each class's mass by its cell count: a class of 100 cells is not outvoted by one of 6,000.
    return log_probs if counts is None else class_prior(log_probs, 1.0, counts)


def split_cells(labels: torch.Tensor, num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and held-out rows: HELD_OUT of each class held out (one at least, where a class has two cells); a class
    of one cell has no other to be read against, so it is neither."""
    order = torch.randperm(len(labels), generator=g)
    grouped = order[labels[order].argsort(stable=True)]  # each class's rows together, in a seeded random order
    fit, held = [], []
    for rows in grouped.split(torch.bincount(labels, minlength=num_classes).tolist()):
        if len(rows) >= 2:
            cut = max(1, int(HELD_OUT * len(rows)))
            held.append(rows[:cut])
            fit.append(rows[cut:])
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat(fit) if fit else empty, torch.cat(held) if held else empty


def held_out_scores(w: torch.Tensor, cells, labels, origins, held, mem, small, num_classes, temperature,
                    topk) -> tuple:
    """(small classes', other classes') mean per-class accuracy of the held-out queries, in %, under map w,
    read with the class prior against the cells `mem` (positions in cells, labels and origins)."""
    counts = torch.bincount(labels[mem], minlength=num_classes).float()
    mapped = F.normalize(cells[mem] @ w, dim=1)
    log_probs = torch.cat([read_log_probs(F.normalize(cells[q] @ w, dim=1), mapped, labels[mem], origins[q],
                                          origins[mem], temperature, num_classes, topk, counts)
                           for q in held.split(512)])
    truth = labels[held]
    per_class = class_accuracy(log_probs, truth, torch.bincount(truth, minlength=num_classes).float())
    is_small = torch.zeros(num_classes, dtype=torch.bool)
    is_small[small] = True
    return mean_accuracy(per_class, is_small), mean_accuracy(per_class, ~is_small)


def fit_map(cells: torch.Tensor, labels: torch.Tensor, origins: torch.Tensor, num_classes: int,
            temperature: float, topk: int | None, seed: int = 0) -> tuple[torch.Tensor | None, dict]:
    """The map for this memory (cells: (N, d) L2-normalised, on any device) and a report; None where it reads no
    better, or the memory holds no small class to fit it for or too few of its cells to tell."""
    labels, origins = labels.cpu(), origins.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    small = small_classes(counts)
    report = {"small_classes": small.tolist(), "kept": False}
    if not len(small):
        return None, {**report, "reason": "no small class"}
    g = torch.Generator().manual_seed(seed)
    fit, held_all = split_cells(labels, num_classes, g)
    in_small = torch.isin(labels, small)
    # Every held-out cell of a small class is a query; the others are capped (each class's accuracy is a mean
    # over its own queries, so the cap does not tilt the score).
    held_small, held_other = held_all[in_small[held_all]], held_all[~in_small[held_all]]
    held_other = held_other[torch.randperm(len(held_other), generator=g)[:max(0, CHECK_QUERIES - len(held_small))]]
    held = torch.cat([held_small, held_other]).sort().values
    if not in_small[fit].any() or len(held_small) < MIN_SMALL_QUERIES:
        return None, {**report, "reason": f"fewer than {MIN_SMALL_QUERIES} held-out cells of small classes to "
                                          "check a map on"}
    # A seeded sample of the memory (small classes whole where they fit in it). The fit reads its fit rows only:
    # a held-out cell is neither a query nor a neighbour of the fit, so the check is on cells it never saw.
    draw = torch.rand(len(labels), generator=g)
    sample = torch.where(in_small, draw < FIT_CELLS / int(in_small.sum()), draw < FIT_CELLS / len(labels))
    is_held = torch.zeros(len(labels), dtype=torch.bool)
    is_held[held_all] = True
    fit = fit[sample[fit]]
    rows = (sample | torch.isin(torch.arange(len(labels)), held)).nonzero().squeeze(1)  # the cells used at all
    position = torch.full((len(labels),), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    local = cells[rows.to(cells.device)].detach().float().cpu().clone()  # only these leave the device
    fit_mem = position[(sample & ~is_held).nonzero().squeeze(1)]
    score_mem = position[sample.nonzero().squeeze(1)]
    local_labels, local_origins = labels[rows], origins[rows]
    fit_counts = torch.bincount(labels[fit], minlength=num_classes).float()
    weights = (1.0 / fit_counts)[labels[fit]]  # each class's queries alike
    eye = torch.eye(local.shape[1])
    # inference_mode(False): a caller's torch.inference_mode() would otherwise leave nothing to differentiate.
    with torch.inference_mode(False), torch.enable_grad():
        w = eye.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=LR)
        base = local[fit_mem].clone()
        for _ in range(STEPS):
            q = position[fit[torch.multinomial(weights, BATCH, replacement=True, generator=g)]]
            mapped = F.normalize(base @ w, dim=1)
            lp = read_log_probs(F.normalize(local[q] @ w, dim=1), mapped, local_labels[fit_mem], local_origins[q],
                                local_origins[fit_mem], temperature, num_classes, None)
            loss = F.nll_loss(lp, local_labels[q])
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = w.detach().clone()
    # The map, or a step part of the way to it from the identity: the largest harmonic mean of the held-out
    # scores among those that read the small classes better and the others no worse (a full step can buy small
    # classes with large ones).
    score = lambda m: held_out_scores(m, local, local_labels, local_origins, position[held], score_mem, small,
                                      num_classes, temperature, topk)
    with torch.no_grad():
        before = score(eye)
        tried = [(t, score(eye + t * (w - eye))) for t in STEP_SHARES]
    better = [(harmonic(*s), t, s) for t, s in tried if s[0] > before[0] and s[1] >= before[1]]
    kept = bool(better)
    report.update(kept=kept, held_out_queries=len(held), small_held_out=len(held_small), steps=STEPS,
                  small_before=round(before[0], 3), others_before=round(before[1], 3),
                  tried={str(t): {"small": round(s[0], 3), "others": round(s[1], 3)} for t, s in tried})
    if not kept:
        report["reason"] = "no step of the map read the held-out cells of the small classes better without " \
                           "reading the others worse"
        return None, report
    _, t, after = max(better)
    report.update(step_share=t, small_after=round(after[0], 3), others_after=round(after[1], 3))
    return eye + t * (w - eye), report


def projection(encoder: nn.Module) -> nn.Linear | None:
    """The Linear a map folds into (the body's last layer), or None: a body that ends in another layer, or a
    softmax head that reads the features the map would move."""
    _, layer = last_layer(encoder.body)
    return layer if isinstance(layer, nn.Linear) and getattr(encoder, "head", None) is None else None


@torch.no_grad()
def fold_map(encoder: nn.Module, w: torch.Tensor) -> None:
    """Fold the map into the encoder's projection in place (see projection(): the caller checks there is one)."""
    layer = projection(encoder)
    w = w.to(layer.weight)
    layer.weight.copy_(w.T @ layer.weight)  # (z A^T + b) W = z (W^T A)^T + b W
    if layer.bias is not None:
        layer.bias.copy_(layer.bias @ w)


@torch.no_grad()
def map_cells(cells: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The cells as the folded encoder would write them: normalise(m W), in chunks."""
    w = w.to(cells)
    return torch.cat([F.normalize(cells[s:s + CHUNK] @ w, dim=1) for s in range(0, len(cells), CHUNK)])
