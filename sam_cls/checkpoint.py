"""A run directory's files: committed together, written by one process at a time, read without running code.

A commit (RunDir.commit) makes an epoch's checkpoint and index visible together: the index is written beside
the run under its checksum's name, the checkpoint (which names the index by that checksum) replaces the old
one atomically, then the index takes its place. The generation before stays as checkpoint.prev.pt and
index.prev.faiss, so a damaged latest checkpoint falls back to it. config.yaml mirrors the checkpoint's
config for people; the checkpoint's own copy is what every command reads.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import zlib
from pathlib import Path

import torch

from sam_cls.config import Config, save_config
from sam_cls.index.store import digest, read_header


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched run file; the message names the file and the fix."""


class RunLockedError(CheckpointError):
    """Another process is writing the run directory."""


FAULT_ENV = "SAM_CLS_FAULT_AT"  # for fault-injection tests only: "<point>[:<n>]" SIGKILLs at the n-th <point>
_faults_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here, as a power cut would, when a fault-injection test asks for it (see FAULT_ENV); else nothing."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point == name:
        _faults_seen[name] = _faults_seen.get(name, 0) + 1
        if _faults_seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# Options a resumed run may not change: they define what the checkpoint's tensors and optimizer state mean.
STRUCTURAL = ("dataset", "validation", "copies", "encoder", "head", "dim", "synthetic_train", "synthetic_classes",
              "synthetic_shape", "seed", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs")


def check_resumable(state: dict, cfg: Config, device_type: str, world_size: int = 1) -> None:
    """A checkpoint continues only under the options, device and number of ranks it was trained with; else say
    which differ."""
    trained = state.get("shards", {}).get("world_size", 1)
    if trained != world_size:  # each rank's shard is a block of cells: another P would need a reshard
        how = "`sam-cls train --resume`" if trained == 1 else f"torchrun with {trained} ranks in all"
        raise CheckpointError(f"the run was trained on {trained} rank(s) and this job has {world_size}: resume it "
                              f"with {how} (the memory is sharded by rank and is not resharded)")
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
        self.previous = self.path / "checkpoint.prev.pt"  # the generation before the latest
        self.previous_index = self.path / "index.prev.faiss"
        self.metrics = self.path / "metrics.jsonl"

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's write lock (an OS file lock, gone with the process); a second writer fails at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path} is being written by process {holder}: wait for it to finish, or "
                                 "use another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._clean()
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _clean(self) -> None:
        """Remove what an interrupted writer left: temporary files, and side indices no checkpoint names."""
        for stale in [*self.path.glob("*.tmp"), *self.path.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        sides = list(self.path.glob(".index-*.next"))
        if not sides:  # the usual case: no crash between a commit's steps, nothing to read
            return
        latest, previous = self._named_side(self.checkpoint), self._named_side(self.previous)
        for side in sides:
            if side == latest:  # the latest commit's rename never happened: finish it
                os.replace(side, self.index)
            elif side != previous:
                side.unlink(missing_ok=True)

    def _named_side(self, checkpoint: Path) -> Path | None:
        """The side index a checkpoint names, or None (no checkpoint, an unreadable one, or no digest)."""
        try:
            want = load_tensors(checkpoint).get("index_digest") if checkpoint.is_file() else None
        except CheckpointError:
            return None
        return self.pending_index(want) if isinstance(want, dict) and "payload_crc32" in want else None

    def pending_index(self, want: dict) -> Path:
        """Where an index waits, named by its checksum, between its write and the checkpoint that names it."""
        return self.path / f".index-{want['payload_crc32']:08x}.next"

    def commit(self, state: dict, index) -> None:
        """Save an index and the checkpoint it belongs to so that a crash at any point leaves a consistent
        pair: the index goes to a side file named by its checksum, the current generation is kept as the
        previous one, the checkpoint (naming the index by that checksum) replaces the old one (the commit
        point), then the index takes its place and config.yaml follows.

        index=None commits a checkpoint that names other files itself (a sharded run's shards, each with its
        own index built at load: shard_files.py); the index of an earlier generation is left as it is."""
        if index is not None:
            scratch = self.path / ".index.next.tmp"
            want = digest(index.save(scratch))
            pending = self.pending_index(want)
            os.replace(scratch, pending)
            state = {**state, "index_digest": want}
        fault_point("index")
        if self.checkpoint.is_file():
            _keep(self.checkpoint, self.previous)
            if self.index.is_file():
                _keep(self.index, self.previous_index)
        atomic_save(state, self.checkpoint)
        fault_point("checkpoint")
        if index is not None:
            os.replace(pending, self.index)
        fault_point("config")
        self.save_config(state["config"])
        for stale in self.path.glob(".index-*.next"):  # left by a crash before an earlier commit's rename
            stale.unlink(missing_ok=True)

    def load_state(self, map_location: str | torch.device = "cpu", log=None) -> dict:
        """The latest committed checkpoint; where it cannot be read, the previous one, and say so."""
        self.require_checkpoint()
        try:
            return load_tensors(self.checkpoint, map_location)
        except CheckpointError as e:
            if not self.previous.is_file():
                raise
            state = load_tensors(self.previous, map_location)
            (log or print)(f"warning: {e}; using the previous checkpoint {self.previous.name} (epoch "
                           f"{state.get('epoch')}, step {state.get('step')}) instead")
            return state

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
        for other in (self.pending_index(want), self.previous_index):
            # A crash between the commit point and the rename leaves the index beside the run (a reader
            # writes nothing: the next writer puts it in place); a fallback checkpoint has the previous one.
            if digest(read_header(other)) == want:
                return other
        holds = f"holds {header['size']} cells but " if "size" in header else ""
        raise CheckpointError(f"{self.index} {holds}is not the index {self.checkpoint.name} was saved with (a file "
                              f"from another run or epoch, or damaged): run `sam-cls rebuild-index --run {self.path}`")

    def require_checkpoint(self) -> None:
        if not self.checkpoint.is_file():
            raise CheckpointError(
                f"no checkpoint in {self.path} (expected {self.checkpoint.name}): point --run at a directory "
                f"written by `sam-cls train --out DIR`"
            )

    def save_config(self, cfg: Config | dict) -> None:
        """config.yaml, a copy for people of the config a checkpoint holds (written after its commit)."""
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


def _keep(path: Path, as_path: Path) -> None:
    """as_path becomes the file path is now (a hard link: no copy), atomically."""
    tmp = as_path.with_name(as_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copy2(path, tmp)
    os.replace(tmp, as_path)


CHECKSUM_KEY = "tensors_crc32"  # a checkpoint's own checksum of its tensors' bytes


def tensors_crc32(obj, crc: int = 0) -> int:
    """CRC-32 of every tensor's bytes in a nested state, in a fixed order: torch.load does not check its data."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        return zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"", crc)
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if key != CHECKSUM_KEY:
                crc = tensors_crc32(obj[key], zlib.crc32(str(key).encode(), crc))
    elif isinstance(obj, list | tuple):
        for item in obj:
            crc = tensors_crc32(item, crc)
    return crc


def atomic_save(obj: dict, path: Path) -> None:
    """Write, flush to disk, then rename, so an interrupted or failed save leaves the previous file whole.

    The file carries a checksum of its tensors, so a flipped byte inside one is found when it is loaded.
    """
    obj = {**obj, CHECKSUM_KEY: tensors_crc32(obj)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data it names
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, e.filename or str(path)) from None  # say which file
        # torch reports a short write (a full disk, say) as a RuntimeError from its zip writer.
        free = shutil.disk_usage(path.parent).free
        code = errno.ENOSPC if free < 1 << 20 else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({free >> 20} MiB free; torch: {str(e).splitlines()[0].strip()})",
                      str(path)) from None
    os.replace(tmp, path)


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}: rebuild it with `sam-cls rebuild-index --run {path.parent}`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a sam-cls file; "
                              f"re-run training or `sam-cls rebuild-index --run {path.parent}`") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a sam-cls checkpoint (a {type(state).__name__}, not a dict)")
    if CHECKSUM_KEY in state and state[CHECKSUM_KEY] != tensors_crc32(state):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return state
