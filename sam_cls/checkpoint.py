"""A run directory's files, written atomically and read without executing code from them."""

import json
import os
from pathlib import Path

import torch

from sam_cls.config import Config, ConfigError, make_config, save_config


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched run file; the message names the file and the fix."""


class RunDir:
    """Where a run keeps its config, checkpoint, inference memory, index and per-epoch metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.checkpoint = self.path / "checkpoint.pt"
        self.index = self.path / "index.faiss"
        self.metrics = self.path / "metrics.jsonl"

    def require_checkpoint(self) -> None:
        if not self.checkpoint.is_file():
            raise CheckpointError(
                f"no checkpoint in {self.path} (expected {self.checkpoint.name}): point --run at a directory "
                f"written by `sam-cls train --out DIR`"
            )

    def load_config(self, **overrides) -> Config:
        if not self.config.is_file():
            raise CheckpointError(f"no {self.config.name} in {self.path}: is it a sam-cls run directory?")
        try:
            return make_config(self.config, **overrides)
        except ConfigError as e:
            raise CheckpointError(f"bad {self.config}: {e}") from e

    def save_config(self, cfg: Config) -> None:
        tmp = self.config.with_suffix(".tmp")
        save_config(cfg, tmp)
        os.replace(tmp, self.config)

    def append_metrics(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _lines(self) -> list[tuple[str, dict | None]]:
        """Each metrics line with its record; None for a line cut short by an interrupted write."""
        if not self.metrics.is_file():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append((line, record if isinstance(record, dict) else None))
        return out

    def load_metrics(self) -> list[dict]:
        """The per-epoch records, oldest first."""
        return [record for _, record in self._lines() if record is not None]

    def truncate_metrics(self, steps_done: int) -> None:
        """Drop metrics of epochs whose checkpoint never landed, so a resumed run does not repeat lines."""
        if not self.metrics.is_file():
            return
        kept = [line for line, record in self._lines() if record is not None and record.get("step", steps_done + 1) <= steps_done]
        self.metrics.write_text("".join(ln + "\n" for ln in kept))


def atomic_save(obj: dict, path: Path) -> None:
    """Write then rename, so an interrupted save leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}: rebuild it with `sam-cls rebuild-index --run {path.parent}`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a sam-cls file; "
                              f"re-run training or `sam-cls rebuild-index --run {path.parent}`") from e
