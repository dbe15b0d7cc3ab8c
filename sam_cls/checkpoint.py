"""A run directory's files: committed together, written by one process at a time, read without running code.

A commit (RunDir.commit) makes an epoch's checkpoint and index visible together: the index is written beside
the run under its checksum's name, the checkpoint (which names the index by that checksum) replaces the old
one atomically, then the index takes its place. The generation before stays as checkpoint.prev.pt and
index.prev.faiss, so a damaged latest checkpoint falls back to it. config.yaml mirrors the checkpoint's
config for people; the checkpoint's own copy is what every command reads.

Every writer holds the run's lock (runlock.py) and commits only over the generation it loaded (integrity.py:
the checksum over the whole checkpoint, the generation's number and run id). Work after the commit point that
fails (a full disk) is a warning, and the next writer finishes it; files are opened as regular files only
(files.py), so nothing planted in the directory is followed or blocks.
"""

import contextlib
import errno
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from sam_cls import runlock
from sam_cls.config import Config, save_config
from sam_cls.fault import FAULT_ENV, fault_point  # noqa: F401 -- FAULT_ENV: where tests look for it
from sam_cls.files import NotRegularFileError, check_regular, open_file
from sam_cls.index.store import digest, read_header
from sam_cls.integrity import (
    CHECKSUM_KEY,
    LEGACY_CHECKSUM_KEY,
    describe,
    generation,
    identity,
    next_generation,
    seal,
    verify,
)
from sam_cls.metrics_file import MetricsFile


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched run file; the message names the file and the fix."""


class RunLockedError(CheckpointError):
    """Another process is writing the run directory."""


# Options a resumed run may not change: they define what the checkpoint's tensors and optimizer state mean.
# freeze_backbone too: its optimiser holds no momentum for a frozen backbone, and unfreezing it mid-run would train
# a network the run never said it trains.
STRUCTURAL = ("dataset", "validation", "copies", "copy_kind", "copy_strength", "encoder", "head", "dim",
              "synthetic_train", "synthetic_classes", "synthetic_shape", "seed", "batch_size", "lr", "momentum",
              "weight_decay", "warmup_epochs", "freeze_backbone")


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


class StaleRunError(CheckpointError):
    """The run committed a generation since this writer loaded it: saving would lose that commit."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class RunDir(MetricsFile):
    """Where a run keeps its config, checkpoint, inference memory, index and per-epoch metrics."""

    def __init__(self, path: str | Path, log=None):
        self.path = Path(path)
        self.log = log or _stderr  # warnings (a fallback, post-commit work left for later); stdout stays clean
        self.config = self.path / "config.yaml"
        self.checkpoint = self.path / "checkpoint.pt"
        self.index = self.path / "index.faiss"
        self.previous = self.path / "checkpoint.prev.pt"  # the generation before the latest
        self.previous_index = self.path / "index.prev.faiss"
        self.metrics = self.path / "metrics.jsonl"
        self.unfinished = self.path / ".commit-unfinished"  # present from before a commit point to its last step
        self.base: dict | None = None  # the generation this writer loaded or committed last (see commit)
        self._lock_fd: int | None = None
        self._current = False  # whether `base` is known to be the run's latest (checked under the lock)
        self._fell_back = False  # whether `base` is the previous generation, the latest being unreadable

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's write lock (runlock.py: on the directory, gone with the process); a second writer fails
        at once. A RunDir that holds it already holds it once (a command around the API's save())."""
        if self._lock_fd is not None:
            yield self
            return
        try:
            fd = runlock.acquire(self.path)
        except runlock.Locked as e:
            raise RunLockedError(f"{self.path} is being written by process {e.args[0]}: wait for it to finish, "
                                 "or use another --out") from None
        self._lock_fd = fd
        try:
            self._clean()
            yield self
        finally:
            self._lock_fd, self._current = None, False
            runlock.release(fd)

    def _clean(self) -> None:
        """Finish or remove what an interrupted writer left: temporary files, side indices no checkpoint names,
        and a commit's work after its commit point (index rename, config.yaml, metrics), rolled forward."""
        for stale in self.path.iterdir():
            if TEMPORARY.search(stale.name):
                stale.unlink(missing_ok=True)
        sides = list(self.path.glob(".index-*.next"))
        if sides:  # a crash between a commit's steps
            latest, previous = self._named_side(self.checkpoint), self._named_side(self.previous)
            for side in sides:
                if side == latest:  # the latest commit's rename never happened: finish it
                    os.replace(side, self.index)
                elif side != previous:
                    side.unlink(missing_ok=True)
        if self.unfinished.exists():
            try:
                state = load_tensors(self.checkpoint)
            except CheckpointError:  # readers fall back to the previous generation; the next commit replaces it
                return
            if self._finish(state):
                self.unfinished.unlink(missing_ok=True)

    def finish_unfinished(self) -> None:
        """A reader that finds a commit's work after its commit point undone (its writer was killed there, and
        no writer may come: the run is complete) does it, where no writer holds the run and the run may be
        written; otherwise it leaves it to the next writer. Never blocks."""
        if self._lock_fd is not None or not self.unfinished.exists():
            return
        with contextlib.suppress(CheckpointError, OSError), self.lock():
            pass

    def _named_side(self, checkpoint: Path) -> Path | None:
        """The side index a checkpoint names, or None (no checkpoint, an unreadable one, or no digest)."""
        try:
            want = load_tensors(checkpoint).get("index_digest") if checkpoint.is_file() else None
        except (CheckpointError, OSError):
            return None
        return self.pending_index(want) if isinstance(want, dict) and "payload_crc32" in want else None

    def pending_index(self, want: dict) -> Path:
        """Where an index waits, named by its checksum, between its write and the checkpoint that names it."""
        return self.path / f".index-{want['payload_crc32']:08x}.next"

    def commit(self, state: dict, index, op: str | None = None) -> dict:
        """Save an index and the checkpoint it belongs to so that a crash at any point leaves a consistent
        pair: the index goes to a side file named by its checksum, the current generation is kept as the
        previous one, the checkpoint (naming the index by that checksum) replaces the old one (the commit
        point), then the index takes its place and config.yaml and metrics.jsonl follow. Returns the new
        generation; work after the commit point that fails is a warning, finished by the next holder of the
        lock (finish_unfinished).

        The writer holds the run's lock (taken here if it does not), and commits only over the generation it
        loaded or committed last: a run changed by another writer since is a StaleRunError, nothing written.
        `op` (a digest of the change, e.g. the images added) is stored with the generation, so a retried
        command can tell it was already applied.

        index=None commits a checkpoint that names other files itself (a sharded run's shards, each with its
        own index built at load: shard_files.py); the index of an earlier generation is left as it is."""
        with self.lock():
            self._check_current()
            gen = next_generation(self.base, op)
            state = {**state, "generation": gen}
            pending = None
            if index is not None:
                scratch = self.path / ".index.next.tmp"
                want = digest(index.save(scratch, {"generation": gen}))
                pending = self.pending_index(want)
                os.replace(scratch, pending)
                state["index_digest"] = want
            fault_point("index")
            self.unfinished.unlink(missing_ok=True)  # whatever stood there: the marker is a file of its own
            open_file(self.unfinished, "wb").close()  # before the commit point: a failure leaves the run as it was
            if self.checkpoint.is_file() and not self._fell_back:  # never keep an unreadable latest as previous
                _keep(self.checkpoint, self.previous)
                if self.index.is_file():
                    _keep(self.index, self.previous_index)
            state = atomic_save(state, self.checkpoint)  # the commit point
            self.base, self._current, self._fell_back = summary(state), True, False
            fault_point("checkpoint")
            if pending is not None:
                try:
                    os.replace(pending, self.index)
                except OSError as e:  # readers find it by its checksum; the next writer puts it in place
                    self.log(f"warning: committed {describe(state, str(self.checkpoint))}, but its index is still "
                             f"{pending.name} ({e.strerror}): the next writer moves it to {self.index.name}")
            if self._finish(state):
                self.unfinished.unlink(missing_ok=True)
            for stale in self.path.glob(".index-*.next"):  # left by a crash before an earlier commit's rename
                if stale != pending:
                    stale.unlink(missing_ok=True)
            return gen

    def _finish(self, state: dict) -> bool:
        """config.yaml and metrics.jsonl as the committed state says; False (and a warning) where one cannot be
        written now (a full disk): the next writer retries, and the commit stands either way."""
        fault_point("config")
        done = True
        for what, write in (("config.yaml", lambda: self.save_config(state["config"])),
                            ("metrics.jsonl", lambda: self.sync_metrics(state))):
            try:
                write()
            except OSError as e:
                done = False
                self.log(f"warning: committed {describe(state, str(self.checkpoint))}, but could not write "
                         f"{what} ({e.strerror or e}): the next writer of the run writes it")
        return done

    def _check_current(self) -> None:
        """Under the lock: refuse to commit over a generation this writer has not seen."""
        if self._current:
            return
        if not self.checkpoint.exists() and not self.checkpoint.is_symlink():
            latest = None
        else:
            try:
                latest = summary(load_tensors(self.checkpoint))
            except CheckpointError:
                if self._fell_back:  # loaded from the previous generation because this one is unreadable
                    self._current = True
                    return
                raise
        if identity(latest) != identity(self.base):
            have = describe(self.base, "the generation it loaded") if self.base else "none (a new run)"
            now = describe(latest, "a newer generation") if latest else "no checkpoint"
            raise StaleRunError(f"{self.path} was changed by another writer: it holds {now} but this writer has "
                                f"{have}; load the run again and redo the change (saving now would lose the other "
                                "writer's commit)")
        self._current = True

    def load_state(self, map_location: str | torch.device = "cpu", log=None) -> dict:
        """The latest committed checkpoint; where it cannot be read, the previous one of the same run, and say so
        (naming both generations)."""
        log = log or self.log
        self.require_checkpoint()
        try:
            state = load_tensors(self.checkpoint, map_location)
            self._fell_back = False
        except CheckpointError as e:
            if not self.previous.is_file():
                raise
            try:
                state = load_tensors(self.previous, map_location)
            except CheckpointError as before:
                raise CheckpointError(f"{e}; and the previous generation cannot be used either ({before})") from None
            latest = self._latest_generation()
            run, other = generation(state).get("run"), latest.get("run")
            if other and run != other:
                raise CheckpointError(f"{e}; {describe(state, str(self.previous))} is from another run than the "
                                      f"latest (run {other}): refusing to fall back to it; restore the run's own "
                                      "files or train it again") from None
            was = (f"generation {latest.get('number')} of run {other}" if other else "the latest")
            log(f"warning: {e}; using the previous checkpoint {describe(state, str(self.previous))} instead of "
                f"{was}")
            self._fell_back = True
        self.base, self._current = summary(state), self._lock_fd is not None
        return state

    def _latest_generation(self) -> dict:
        """The newest generation an index beside the run was committed with ({} if none says): what a damaged
        latest checkpoint was, as its index (in place, or still waiting beside it) records it."""
        found = [read_header(p).get("generation") for p in (self.index, *self.path.glob(".index-*.next"))]
        found = [g for g in found if isinstance(g, dict) and isinstance(g.get("number"), int)]
        return max(found, key=lambda g: g["number"], default={})

    def index_file(self, state: dict) -> Path:
        """The index file that belongs to this checkpoint (after a crash between the commit point and the
        rename, the one still waiting beside it); any other is an error that says how to rebuild it."""
        want = state.get("index_digest")
        if self.index.is_symlink() or (self.index.exists() and not self.index.is_file()):
            check_regular(self.index)  # a FIFO would block the read forever: say what stands there instead
        if want is None:  # a checkpoint from before indices were named by checksum
            return self.index
        if not isinstance(want, dict) or not isinstance(want.get("payload_crc32"), int):
            raise CheckpointError(f"{self.checkpoint} names its index with {want!r}: the file is corrupt")
        header = read_header(self.index)
        if digest(header) == want:
            return self.index
        for other in (self.pending_index(want), self.previous_index):
            # A crash between the commit point and the rename leaves the index beside the run (reading moves
            # nothing: the next holder of the lock puts it in place); a fallback checkpoint has the previous one.
            if digest(read_header(other)) == want:
                return other
        holds = f"holds {header['size']} cells but " if "size" in header else ""
        raise CheckpointError(f"{self.index} {holds}is not the index {self.checkpoint.name} was saved with (a file "
                              f"from another run or epoch, or damaged): run `sam-cls rebuild-index --run {self.path}`")

    def require_checkpoint(self) -> None:
        if not (self.checkpoint.exists() or self.checkpoint.is_symlink()):
            raise CheckpointError(
                f"no checkpoint in {self.path} (expected {self.checkpoint.name}): point --run at a directory "
                f"written by `sam-cls train --out DIR`"
            )

    def save_config(self, cfg: Config | dict) -> None:
        """config.yaml, a copy for people of the config a checkpoint holds (written after its commit)."""
        tmp = self.config.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # save_config writes by name: no symlink may stand there
        save_config(cfg, tmp)
        os.replace(tmp, self.config)


# Temporary files the writers create: name.tmp (atomic_save, _keep, config, metrics, the lock's holder) and
# .name.tmp<pid> (write_index_file), removed when the next writer starts.
TEMPORARY = re.compile(r"\.tmp\d*$")


def summary(state: dict) -> dict:
    """What a writer keeps of the generation it loaded: enough to name it and to tell it from any other."""
    return {key: state[key] for key in ("generation", CHECKSUM_KEY, LEGACY_CHECKSUM_KEY, "epoch", "step")
            if key in state}


def _keep(path: Path, as_path: Path) -> None:
    """as_path becomes the file path is now (a hard link: no copy), atomically."""
    tmp = as_path.with_name(as_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copy2(path, tmp)
    os.replace(tmp, as_path)


def atomic_save(obj: dict, path: Path) -> dict:
    """Write, flush to disk, then rename, so an interrupted or failed save leaves the previous file whole;
    returns the state as saved, with the checksum over all of it that load_tensors checks."""
    obj = seal(obj)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # torch.save writes through a name: no symlink may stand there
        torch.save(obj, tmp)
        with open_file(tmp) as f:
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
    return obj


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True (tensors and plain containers only, never pickled code), of a regular
    file only, checked against the checksum it carries. A file that cannot be opened for a reason other than
    damage (a permission) raises that OSError, not a CheckpointError."""
    try:
        f = open_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}: restore it, or train the run again with `sam-cls train`") from None
    except NotRegularFileError as e:
        raise CheckpointError(f"{path} {e.strerror}") from None
    with f:
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or not a sam-cls "
                                  "file; restore it, or train the run again") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a sam-cls checkpoint (a {type(state).__name__}, not a dict)")
    damage = verify(state)
    if damage:
        raise CheckpointError(f"{path}: {damage}, the file is corrupt")
    return state
