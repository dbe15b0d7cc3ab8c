"""What a run is, in one report (`sam-cls info`): its data, encoder, classes, memory, index, read and history."""

from __future__ import annotations

import torch

from sam_cls.classifier import MemoryClassifier
from sam_cls.integrity import generation


def run_info(clf: MemoryClassifier) -> dict:
    """Everything a person needs to know to use or trust a run, read from its committed checkpoint and index."""
    cfg, state = clf.cfg, clf.state
    per_class = torch.bincount(clf.memory.labels.cpu().long(), minlength=len(clf.classes)).tolist()
    per_source = torch.bincount(clf.cell_source.long(), minlength=len(clf.sources)).tolist()
    stored = state.get("read")
    return {
        "run": str(clf.run.path),
        "generation": generation(state).get("number"),
        # add, forget and --copies change the memory training made: such a run no longer resumes
        "edited": bool(state.get("edited")),
        "dataset": cfg.dataset, "data_dir": cfg.data_dir, "image_shape": list(clf.image_shape),
        "encoder": cfg.encoder, "dim": cfg.dim, "head": cfg.head,
        "epochs": state.get("epoch"), "steps": state.get("step"),
        "classes": dict(zip(clf.classes, per_class, strict=True)),
        "memory": {"cells": clf.memory.size, "dim": int(clf.memory.embeddings.shape[1]),
                   "sources": [{"name": s["name"], "kind": s["kind"], "cells": n}
                               for s, n in zip(clf.sources, per_source, strict=True)]},
        "index": None if clf.index is None else {"kind": clf.index.kind, "description": clf.index.description,
                                                 "size": clf.index.size, "option": cfg.index},
        "read": {**clf.rule.as_dict(), "stored": stored is not None,
                 **({"accuracy": stored["report"]["tuned"]["accuracy"],
                     "accuracy_as_trained": stored["report"]["as_trained"]["accuracy"]}
                    if stored and "report" in stored else {})},
        "history": list(state.get("history", clf.run.load_metrics())),
    }


def refit_text(refit: dict) -> str:
    """What an add's metric refit did (sam_cls/read_map.py), as the tail of its history line."""
    if not refit.get("kept"):  # fitted and turned down, or not fitted at all (no "tried" steps)
        return f"; {'metric refit not kept' if 'tried' in refit else 'no metric refit'} ({refit.get('reason')})"
    return (f"; metric refit kept: held-out small classes {refit['small_before']} -> {refit['small_after']}%, "
            f"others {refit['others_before']} -> {refit['others_after']}%")


def commit_line(record: dict) -> str:
    """One line of a run's history: a training epoch with its test accuracy, or an add or forget."""
    if record.get("op") == "add":
        new = f", new classes {record['new_classes']}" if record.get("new_classes") else ""
        return (f"add     {record['added']} cells from {record['source']}{new} -> {record['cells']} cells"
                f"{refit_text(record['refit']) if 'refit' in record else ''}")
    if record.get("op") == "forget":
        what = ", ".join(f"{k} {record[k]!r}" for k in ("class", "source", "cell_numbers") if k in record)
        return f"forget  {record['forgotten']} cells ({what}) -> {record['cells']} cells"
    read = f"  read tuned {record['read']}" if "read" in record else ""
    return (f"epoch   {record.get('epoch')}  step {record.get('step')}  test accuracy {record.get('test_acc')}  "
            f"train loss {record.get('train_loss')}  {record.get('seconds')}s{read}")


def info_text(info: dict) -> str:
    """The report as lines for people (--json gives the dict itself)."""
    memory, index, read = info["memory"], info["index"], info["read"]
    width = max(len(name) for name in info["classes"]) if info["classes"] else 0
    accuracy = (f"  (chosen at {read['accuracy']}% against {read['accuracy_as_trained']}% as trained)"
                if "accuracy" in read else "")
    rule = ", ".join(f"{k} {read[k]}" for k in ("topk", "temperature", "alpha", "class_k", "per_source"))
    lines = [
        f"run        {info['run']}  generation {info['generation']}"
        + ("  (memory edited by add/forget: it no longer resumes training)" if info["edited"] else ""),
        f"data set   {info['dataset']}  (data dir {info['data_dir']})  images {'x'.join(map(str, info['image_shape']))}",
        (f"encoder    {info['encoder']}  embedding {info['dim']}  head {info['head']}  trained {info['epochs']} "
         f"epochs, {info['steps']} steps"),
        f"memory     {memory['cells']} cells of dimension {memory['dim']}: "
        + ", ".join(f"{s['name']} {s['cells']}" for s in memory["sources"]),
        "index      " + ("not loaded" if index is None else
                         f"{index['kind']} ({index['description']}), {index['size']} cells, --index {index['option']}"),
        f"read       {rule}  ({'stored' if read['stored'] else 'as trained'}){accuracy}",
        f"classes    {len(info['classes'])}, cells each:",
        *(f"  {name:<{width}}  {n}" for name, n in info["classes"].items()),
        f"history    {len(info['history'])} commits:",
        *(f"  {commit_line(record)}" for record in info["history"]),
    ]
    return "\n".join(lines)
