"""Choosing a run's read rule (K, temperature, class prior, per-source and per-class reads) on its own data.

Queries are the run's validation share where it trained with one, else a sample of its memory's own cells read
leave-one-out (each query's source image excluded, as training reads exclude it), as many of each class as it
has up to an equal share. Two scores decide:
  plain    accuracy on the queries against the memory as it is, each class's queries weighed alike;
  small    where the memory holds small classes (added from a few examples: under SMALL_SHARE of the largest
           class), the harmonic mean of their queries' accuracy and the others'; where it holds none, the same
           for a few classes in turn cut to THIN_CELLS cells (a class added later, simulated on trained ones).
Every rule of the grid is tried under every class prior. The chosen rule has the best small-class score among
the rules whose plain accuracy is at least the read-as-trained's, so a tuned read never loses to the read as
trained on the queries it was tuned on.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from sam_cls.evaluate import CellFacts
from sam_cls.memory import MemoryBank
from sam_cls.read import ReadRule, candidate_scores, class_prior, select_cells, weigh_cells

# ----------------------------------------------------------------------------- hyper-parameters, all here
QUERIES = 2000  # validation queries (a seeded sample where there are more)
FETCH = 1024  # candidates searched once per query; every rule of the grid reads from these
TOPKS = (16, 32, 64, 128, 256, 512)
TEMPERATURE_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)  # times the trained temperature
CLASS_KS = (0, 4, 16, 64)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
THIN_CELLS = 20  # the few-example class the thinned score simulates
SMALL_SHARE = 0.25  # a class under this share of the largest class's cells counts as small
THIN_CLASSES = 4  # classes thinned in turn (a seeded choice)


class Pool:
    """Candidate cells of each query, sorted best first, and what every rule reads of them (selections cached:
    the temperature and the class prior only re-weigh them)."""

    def __init__(self, scores: torch.Tensor, labels: torch.Tensor, origins: torch.Tensor, counts: dict, classes: int):
        order = scores.argsort(dim=1, descending=True, stable=True)
        self.scores, self.labels, self.origins = scores.gather(1, order), labels.gather(1, order), origins.gather(1, order)
        self.counts, self.classes, self.kept, self.weighed, self.ranks = counts, classes, {}, {}, {}

    def log_probs(self, rule: ReadRule) -> torch.Tensor:
        key = (0 if rule.class_k else rule.topk, rule.class_k, rule.per_source)  # a per-class read ignores K
        if key not in self.kept:  # the selected cells packed to the left: a rule of K = 16 weighs 16 columns
            keep = select_cells(self.scores, self.labels, rule, self.origins, self.ranks)
            width = max(1, int(keep.sum(1).max()))
            if rule.class_k or rule.per_source:
                cols = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
                self.kept[key] = (self.scores.gather(1, cols), self.labels.gather(1, cols), keep.gather(1, cols))
            else:  # a shared top K keeps a prefix of each sorted row (the -inf of masked cells sort last)
                self.kept[key] = (self.scores[:, :width], self.labels[:, :width], keep[:, :width])
        # The softmax over the kept cells is the work; the class prior only shifts its result, so each
        # (selection, temperature) is weighed once for the ALPHAS that stage 2 tries on it.
        weighed = key + (rule.temperature,)
        if weighed not in self.weighed:
            scores, labels, keep = self.kept[key]
            self.weighed[weighed] = weigh_cells(scores, labels, keep, replace(rule, alpha=0.0), self.classes)
        counts = self.counts[rule.per_source]
        log_probs = self.weighed[weighed]
        return class_prior(log_probs, rule.alpha, counts) if rule.alpha and counts is not None else log_probs


def candidates(u: torch.Tensor, memory: MemoryBank, index, facts: CellFacts, own: torch.Tensor | None,
               num_classes: int) -> tuple[Pool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's FETCH nearest cells with exact similarities, its own source masked: a Pool, and the raw
    (scores, labels, origins) a thinned memory is cut from."""
    _, ids = index.search(u, min(memory.size, FETCH))
    ids = ids.to(memory.embeddings.device)
    found = ids >= 0
    ids = ids.clamp_min(0)
    scores = candidate_scores(u, ids, memory.embeddings).masked_fill(~found, float("-inf"))
    origins = facts.origins.to(ids.device)[ids] if facts.origins is not None else ids
    if own is not None:  # leave-one-out: a query's own source image is not evidence about it
        scores = scores.masked_fill(origins == own.unsqueeze(1), float("-inf"))
    labels = memory.labels[ids]
    counts = {False: facts.class_cells, True: facts.class_sources}
    return Pool(scores, labels, origins, counts, num_classes), scores, labels, origins


def thinned_pool(u: torch.Tensor, memory: MemoryBank, facts: CellFacts, raw: tuple, own: torch.Tensor | None,
                 c: int, keep: torch.Tensor, num_classes: int) -> Pool:
    """The pool of a memory whose class c is cut to rows `keep`: its other cells masked, the kept ones scored
    exactly wherever the search ranked them."""
    scores, labels, origins = raw
    scores = scores.masked_fill(labels == c, float("-inf"))
    kept = u @ memory.embeddings[keep].T
    kept_origins = (facts.origins[keep.cpu()] if facts.origins is not None else keep).to(kept.device)
    if own is not None:
        kept = kept.masked_fill(kept_origins == own.unsqueeze(1), float("-inf"))
    b = len(scores)
    cells, sources = facts.class_cells.clone(), facts.class_sources.clone()
    cells[c], sources[c] = len(keep), min(int(sources[c]), len(keep))
    return Pool(torch.cat([scores, kept], 1), torch.cat([labels, memory.labels[keep].expand(b, -1)], 1),
                torch.cat([origins, kept_origins.expand(b, -1)], 1), {False: cells, True: sources}, num_classes)


def stratified(truth: torch.Tensor, num_classes: int, total: int, g: torch.Generator) -> torch.Tensor:
    """Up to total queries: an equal share of each class, a small class's unused share going to the larger ones."""
    order = torch.randperm(len(truth), generator=g)
    key = truth[order]
    grouped = order[key.argsort(stable=True)]  # each class's rows together, in the random order
    by_class = sorted((b for b in grouped.split(torch.bincount(key, minlength=num_classes).tolist()) if len(b)),
                      key=len)
    picks, left = [], total
    for i, b in enumerate(by_class):  # smallest first: what a class cannot use goes to the ones after it
        picks.append(b[: left // (len(by_class) - i)])
        left -= len(picks[-1])
    return torch.cat(picks).sort().values


def class_accuracy(log_probs: torch.Tensor, truth: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Each class's accuracy in % over its queries (queries: their count by class; NaN where a class has none)."""
    right = torch.bincount(truth[log_probs.argmax(1) == truth], minlength=len(queries))
    return 100.0 * right / queries


def mean_accuracy(per_class: torch.Tensor, classes: torch.Tensor | None = None) -> float:
    """Accuracy with each class's queries weighed alike: a class the sample could not give its equal share of
    queries (a class of a few cells) counts as much as the others, as it does in a test set of equal classes."""
    values = per_class if classes is None else per_class[classes]
    values = values[~values.isnan()]
    return values.mean().item() if len(values) else 0.0


def harmonic(a: float, b: float) -> float:
    """The harmonic mean of two accuracies (0 where both are): high only where neither side is given up."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def small_classes(cells: torch.Tensor) -> torch.Tensor:
    """The classes with cells but under SMALL_SHARE of the largest class's: classes added from a few examples."""
    return ((cells > 0) & (cells < SMALL_SHARE * cells.max())).nonzero().squeeze(1)


def tune_read(u: torch.Tensor, truth: torch.Tensor, memory: MemoryBank, index, base: ReadRule, num_classes: int,
              facts: CellFacts, own: torch.Tensor | None = None, seed: int = 0) -> tuple[ReadRule, dict]:
    """The rule for this memory (see the module docstring) and a report of the scores that chose it.

    u, truth: query embeddings and classes; own: each query's source image where it is a memory cell (leave-one-
    out), else None. base: the read as trained, the rule to beat.
    """
    g = torch.Generator().manual_seed(seed)
    pick = stratified(truth.cpu(), num_classes, QUERIES, g)
    u, truth = u[pick.to(u.device)], truth[pick.to(truth.device)]
    own = own[pick.to(own.device)] if own is not None else None
    truth = truth.to(memory.labels.device)
    queries = torch.bincount(truth, minlength=num_classes).float()  # by class: each class's accuracy is over its own
    pool, *raw = candidates(u, memory, index, facts, own, num_classes)
    n_per_source = facts.copies if facts.origins is not None else 1

    def plain(rule: ReadRule) -> float:
        return mean_accuracy(class_accuracy(pool.log_probs(rule), truth, queries))

    # Stage 1, plain accuracy: every K, temperature, per-class k and (for memories of copies) per-source vote.
    topks = sorted({k for k in TOPKS if k <= min(FETCH, memory.size - n_per_source)} | {base.topk})
    per_source = (False, True) if n_per_source > 1 else (False,)
    grid = [ReadRule(k if not ck else base.topk, round(base.temperature * t, 6), 0.0, ps, ck)
            for k, t, ck, ps in itertools.product(topks, TEMPERATURE_SCALES, CLASS_KS, per_source)
            if not ck or k == topks[0]]
    baseline = plain(base)
    stage1 = {rule: plain(rule) for rule in grid}
    # Stage 2, small classes: every rule under every class prior, on the memory's own small classes, or on
    # trained classes cut to a few cells where it has none.
    cells = facts.class_cells
    small = small_classes(cells)
    scenarios, thin = [], []  # (which classes are small, as a (C,) mask; the pool that reads them so)

    def only(classes) -> torch.Tensor:
        mask = torch.zeros(num_classes, dtype=torch.bool, device=truth.device)
        mask[classes] = True
        return mask

    if len(small) and torch.isin(truth.cpu(), small).any():
        scenarios.append((only(small.to(truth.device)), pool))
    else:
        present = (cells > THIN_CELLS).nonzero().squeeze(1)
        thin = present[torch.randperm(len(present), generator=g)[:THIN_CLASSES]].tolist()
        for c in thin:
            rows = (memory.labels.cpu() == c).nonzero().squeeze(1)
            keep = rows[torch.randperm(len(rows), generator=g)[:THIN_CELLS]].to(memory.labels.device)
            scenarios.append((only(c), thinned_pool(u, memory, facts, raw, own, c, keep, num_classes)))

    def small_score(rule: ReadRule) -> float:
        means = []
        for is_small, scenario in scenarios:
            per_class = class_accuracy(scenario.log_probs(rule), truth, queries)
            a_c, a_o = mean_accuracy(per_class, is_small), mean_accuracy(per_class, ~is_small)
            means.append(harmonic(a_c, a_o))
        return sum(means) / max(1, len(means))

    # Every rule of the grid under every class prior: K and the temperature are chosen with the prior, since a
    # prior that lets small classes in wants a wider, softer read than the best read without it (a read chosen at
    # alpha 0 and then given a prior leans to the trained classes; docs/MEMORY.md, "New classes"). A rule stays in
    # only if its own plain accuracy, prior included, is the read as trained's or better.
    finalists = [base, *grid, *(replace(rule, alpha=a) for rule in grid for a in ALPHAS if a)]
    scored = []
    for rule in finalists:
        acc = stage1[rule] if rule in stage1 else plain(rule)
        if acc >= baseline:
            scored.append((small_score(rule), acc, rule))
    # The best small-class score; ties go to the higher plain accuracy, then to the earlier (simpler) rule.
    chosen_small, chosen_acc, chosen = max(scored, key=lambda t: (t[0], t[1], -scored.index(t)))
    report = {"queries": len(u), "leave_one_out": own is not None, "rules_tried": len(grid) + len(finalists),
              "as_trained": {"rule": base.as_dict(), "accuracy": round(baseline, 3),
                             "small_classes_score": round(small_score(base), 3)},
              "tuned": {"rule": chosen.as_dict(), "accuracy": round(chosen_acc, 3),
                        "small_classes_score": round(chosen_small, 3)},
              "small_classes": small.tolist(), "thin_cells": THIN_CELLS, "thinned_classes": thin}
    return chosen, report


def tune_memory(memory: MemoryBank, index, base: ReadRule, num_classes: int, facts: CellFacts,
                validation: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """What a run stores as its read: the rule tuned on validation embeddings and classes if given, else on
    its own cells read leave-one-out; and the report of the scores that chose it."""
    if validation is not None:
        u, truth, own = validation[0], validation[1], None
    else:  # every cell a candidate query; tune_read draws its class-stratified sample
        u, truth = memory.embeddings, memory.labels
        own = facts.origins.to(u.device) if facts.origins is not None else torch.arange(memory.size, device=u.device)
    rule, report = tune_read(u, truth, memory, index, base, num_classes, facts, own, seed)
    return {"rule": rule.as_dict(), "report": report}
