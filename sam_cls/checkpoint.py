"""A run directory's files, written atomically and read without executing code from them."""

import json
import os
from pathlib import Path

import torch

from sam_cls.config import Config, ConfigError, make_config, save_config
from sam_cls.index.store import digest, read_header


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched run file; the message names the file and the fix."""


# Options a resumed run may not change: they define what the checkpoint's tensors and optimizer state mean.
STRUCTURAL = ("dataset", "validation", "encoder", "head", "dim", "synthetic_train", "synthetic_classes",
              "synthetic_shape", "seed", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs")


def check_resumable(state: dict, cfg: Config, device_type: str) -> None:
    """A checkpoint continues only under the options and device it was trained with; else say which differ."""
    saved = state.get("config", {})
    changed = [k for k in STRUCTURAL if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise CheckpointError(f"checkpoint was trained with {', '.join(f'{k}={saved[k]!r}' for k in changed)}; "
                              f"resume with the same values or start a new run with --out")
    if state.get("device_type", device_type) != device_type:
        # The crop generator's state is device-specific; a run continues where it was trained.
        raise CheckpointError(f"checkpoint was trained on {state['device_type']}: resume it with --device "
                              f"{state['device_type']}")


class RunDir:
    """Where a run keeps its config, checkpoint, inference memory, index and per-epoch metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.checkpoint = self.path / "checkpoint.pt"
        self.index = self.path / "index.faiss"
        self.metrics = self.path / "metrics.jsonl"

    def pending_index(self, want: dict) -> Path:
        """Where an index waits, named by its checksum, between its write and the checkpoint that names it."""
        return self.path / f".index-{want['payload_crc32']:08x}.next"

    def commit(self, state: dict, index) -> None:
        """Save an index and the checkpoint it belongs to so that a crash at any point leaves one consistent
        pair: the index goes to a side file named by its checksum, the checkpoint (naming the index by that
        checksum) replaces the old one (the commit point), then the index takes its place."""
        scratch = self.path / ".index.next.tmp"
        want = digest(index.save(scratch))
        pending = self.pending_index(want)
        os.replace(scratch, pending)
        atomic_save({**state, "index_digest": want}, self.checkpoint)
        os.replace(pending, self.index)
        for stale in self.path.glob(".index-*.next"):  # left by a crash before an earlier commit's rename
            stale.unlink(missing_ok=True)

    def index_file(self, state: dict) -> Path:
        """The index file that belongs to this checkpoint (after a crash between the commit point and the
        rename, the one still waiting beside it); any other is an error that says how to rebuild it."""
        want = state.get("index_digest")
        if want is None:  # a checkpoint from before indices were named by checksum
            return self.index
        if not isinstance(want, dict) or not isinstance(want.get("payload_crc32"), int):
            raise CheckpointError(f"{self.checkpoint} names its index with {want!r}: the file is corrupt")
        header = read_header(self.index)
        if digest(header) == want:
            return self.index
        pending = self.pending_index(want)
        if digest(read_header(pending)) == want:  # a crash between the commit and the rename
            return pending  # a reader writes nothing: the next commit puts its own index in place
        holds = f"holds {header['size']} cells but " if "size" in header else ""
        raise CheckpointError(f"{self.index} {holds}is not the index {self.checkpoint.name} was saved with (a file "
                              f"from another run or epoch, or damaged): run `sam-cls rebuild-index --run {self.path}`")

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
