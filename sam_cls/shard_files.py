"""A sharded run's files: one shard file a rank a generation, named by the checkpoint that commits them.

A distributed commit is two-phase. Each rank writes its shard (its cells, their labels and its index's learned
centroids) to shard-<step>-<r>-of-<P>.pt, atomically; once every rank has, rank 0 commits checkpoint.pt (the
commit point), which names each shard file with its checksum. A crash of any rank before that leaves the
previous checkpoint naming the previous generation's shards, which are still there: the names differ by step.
A reader verifies each shard against the checkpoint's checksum, so a shard of another generation or a damaged
one is an error, never a mixed memory. A single process reading the run gathers the shards into one memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sam_cls.checkpoint import CheckpointError, RunDir, atomic_save, load_tensors
from sam_cls.integrity import checksum
from sam_cls.memory import MemoryBank


def shard_name(step: int, rank: int, world: int) -> str:
    return f"shard-{step:09d}-{rank}-of-{world}.pt"


def write_shard(run: RunDir, state: dict, step: int, rank: int, world: int) -> dict:
    """Write one rank's shard of the generation at `step`; returns what the checkpoint records of it."""
    name = shard_name(step, rank, world)
    return {"file": name, "crc32": checksum(atomic_save(state, run.path / name))}


def load_shard(run: RunDir, state: dict, rank: int, map_location: str | torch.device = "cpu") -> dict:
    """Rank `rank`'s shard of the generation `state` (a sharded checkpoint) commits, checked against it."""
    record = state["shards"]
    name = record["files"][rank]
    path = run.path / Path(name).name  # a name, never a path: the checkpoint cannot point outside the run
    shard = load_tensors(path, map_location)
    if checksum(shard) != record["crc32"][rank] or shard.get("rank") != rank:
        raise CheckpointError(f"{path} is not the shard {run.checkpoint.name} committed (a file of another "
                              f"generation, or damaged): the run cannot be read; train it again")
    return shard


def is_sharded(state: dict) -> bool:
    return "shards" in state


def gather_shards(run: RunDir, state: dict, map_location: str | torch.device = "cpu") -> dict:
    """A sharded checkpoint as a single process reads a run: every shard's cells in one memory, example order.

    Rank r's cells are the examples [start_r, stop_r), each shard laid out in its own index's order: each
    goes back to example order (MemoryBank.rows) before they are concatenated.
    """
    if not is_sharded(state):
        return state
    parts = []
    for rank, (start, stop) in enumerate(state["shards"]["ranges"]):
        bank = MemoryBank.from_state_dict(load_shard(run, state, rank, map_location)["memory"])
        if bank.size != stop - start:
            raise CheckpointError(f"shard {rank} of {run.checkpoint} holds {bank.size} cells, not the {stop - start} "
                                  "its checkpoint records: the file is corrupt")
        rows = bank.rows
        parts.append((bank.embeddings[rows], bank.labels[rows], bank.last_written[rows]))
    embeddings, labels, last_written = (torch.cat(list(column)) for column in zip(*parts, strict=True))
    memory = {"embeddings": embeddings, "labels": labels, "last_written": last_written,
              "example_ids": torch.arange(len(labels))}
    return {**{k: v for k, v in state.items() if k != "shards"}, "memory": memory,
            "gathered_from": state["shards"]["world_size"]}


def sweep_shards(run: RunDir) -> None:
    """Delete shard files that neither the latest nor the previous checkpoint names (a crashed commit's)."""
    keep: set[str] = set()
    for checkpoint in (run.checkpoint, run.previous):
        try:
            state = load_tensors(checkpoint) if checkpoint.is_file() else {}
        except CheckpointError:
            return  # a damaged checkpoint's shards cannot be told apart: delete nothing
        keep.update(state.get("shards", {}).get("files", []))
    for path in run.path.glob("shard-*-of-*.pt"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
