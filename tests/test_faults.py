"""Crash safety of a run directory, end to end with real `sam-cls train` processes.

A run killed (SIGKILL) at any step of a commit or at a random moment, a second writer started beside a running
one, any of its files damaged, or a disk that fills up during a save: `sam-cls evaluate` must then print the
accuracy of the checkpoint the run holds (what the uninterrupted run measured at that step), or fail with exit
status 2 and one `error:` line -- never another number, never a traceback -- and `--resume` must end at the
very weights of the uninterrupted run. benchmarks/faults.py runs the same checks as a larger campaign.

Training runs as subprocesses (they must be SIGKILLable); evaluate and resume run in this process through
click's CliRunner, which calls the same command as `sam-cls` and saves a ~3 s interpreter start each.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sam_cls.cli import main

FAULT_ENV = "SAM_CLS_FAULT_AT"
EPOCHS = 3
TINY = ["--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100", "--synthetic-classes",
        "5", "--synthetic-shape", "1,6,6", "--encoder", "linear", "--dim", "16", "--topk", "16", "--batch-size",
        "32", "--device", "cpu"]
POINTS = ["metrics", "index", "checkpoint", "config"]  # the fault hook's points, in the order a commit passes them
FILES = ["checkpoint.pt", "index.faiss", "config.yaml", "metrics.jsonl"]
DAMAGES = ["truncate", "zero", "random", "swap"]
RANDOM_KILLS = 3
# A process that imports sam-cls, says "ready", waits for a line on stdin, then runs the command in argv: a kill
# timed from that line lands in the command, not in the interpreter's start.
WARM = ("import sys, sam_cls.train, sam_cls.classifier, sam_cls.cli as c; print('ready', flush=True); "
        "sys.stdin.readline(); c.main(sys.argv[1:], prog_name='sam-cls')")
TIMEOUT = 120  # seconds any one process may take before the test gives up on it


# ----------------------------------------------------------------------------------------------- processes
def child_env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    return {**env, FAULT_ENV: fault} if fault else env


def train_argv(out: Path, *extra: str, seed: int = 0) -> list[str]:
    return ["train", *TINY, "--seed", str(seed), "--epochs", str(EPOCHS), "--out", str(out), *extra]


def cli_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "sam_cls.cli", *argv]


class Warm:
    """A `sam-cls` process started ahead: go() runs its command at once (it has imported everything)."""

    def __init__(self, argv: list[str], log: Path, fault: str | None = None):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", WARM, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("wb"), env=child_env(fault))
        self.pid = self.proc.pid

    def ready(self) -> Warm:
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", f"warm process did not start: {self.stderr()[-2000:]}"
        return self

    def go(self) -> float:
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def run_batch(jobs: list[tuple[list[str], Path, str | None]], parallel: int = 2) -> list[tuple[int, str]]:
    """(returncode, stderr) of each `sam-cls` command (argv, log file, fault), `parallel` at a time."""
    out: list[tuple[int, str] | None] = [None] * len(jobs)
    running: list[tuple[int, subprocess.Popen]] = []
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            i, (argv, log, fault) = pending.pop(0)
            running.append((i, subprocess.Popen(cli_cmd(argv), stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                                                 env=child_env(fault))))
        i, proc = running.pop(0)
        rc = proc.wait(TIMEOUT)
        out[i] = (rc, jobs[i][1].read_text(errors="replace"))
    return out


# ----------------------------------------------------------------------------------------------- in process
@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    trace: str


def cli(*argv) -> Result:
    """A `sam-cls` command in this process; code 1 and the traceback when it raised."""
    r = CliRunner().invoke(main, [str(a) for a in argv])
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    trace = "".join(traceback.format_exception(*r.exc_info)) if exc is not None else ""
    return Result(r.exit_code, r.stdout, r.stderr, exc, trace)


def evaluate(run: Path) -> Result:
    return cli("evaluate", "--run", run, "--device", "cpu", "--json")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_clear_error(r: Result, what: str) -> str:
    assert r.exception is None and "Traceback" not in r.stderr, f"{what}: traceback\n{r.trace or r.stderr}"
    assert r.code == 2, f"{what}: exit {r.code}, expected 2\n{r.stderr[-2000:]}"
    errors = error_lines(r.stderr)
    assert len(errors) == 1, f"{what}: expected one error line, got {errors}\n{r.stderr[-2000:]}"
    return errors[0]


def load_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


# ----------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    path: Path
    acc: dict[int, float]  # test_acc by step, from metrics.jsonl
    history: list[tuple[int, float]]
    encoder: dict[str, torch.Tensor]
    seconds: float  # from the command's start (imports done) to the process's exit

    @property
    def final(self) -> float:
        return self.history[-1][1]


def metrics_history(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["test_acc"]) for r in map(json.loads, lines)]


def reference(run: Path, seconds: float) -> Reference:
    history = metrics_history(run)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    return Reference(run, dict(history), history, state["encoder"], seconds)


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> tuple[Reference, Reference]:
    """Two uninterrupted runs: seed 0 (the reference every test compares with), seed 1 (files to swap in)."""
    root = tmp_path_factory.mktemp("reference")
    warm = Warm(train_argv(root / "seed0"), root / "seed0.log")
    try:
        [(rc, err)] = run_batch([(train_argv(root / "seed1", seed=1), root / "seed1.log", None)])
        assert rc == 0, err[-2000:]
        start = warm.ready().go()
        assert warm.wait() == 0, warm.stderr()[-2000:]
        seconds = time.perf_counter() - start
    finally:
        warm.cleanup()
    ref, other = reference(root / "seed0", seconds), reference(root / "seed1", 0.0)
    assert len(ref.history) == EPOCHS and ref.history != other.history
    return ref, other


@pytest.fixture(scope="module")
def ref(refs) -> Reference:
    return refs[0]


# ----------------------------------------------------------------------------------------------- invariants
def assert_right_number_or_clear_error(r: Result, run: Path, ref: Reference, what: str) -> float | None:
    """evaluate printed the accuracy the reference measured at the step of the checkpoint it used (the latest,
    or the previous one when it said so), or failed in one clear line; the accuracy, or None."""
    if r.code != 0:
        assert_clear_error(r, what)
        return None
    assert r.exception is None and "Traceback" not in r.stderr, f"{what}: traceback\n{r.trace or r.stderr}"
    accuracy = json.loads(r.stdout.strip().splitlines()[-1])["accuracy"]
    used = run / ("checkpoint.prev.pt" if "previous" in r.stderr else "checkpoint.pt")
    try:
        step = load_step(used)
    except Exception as e:  # noqa: BLE001 -- any failure to read it means the number came from nowhere
        pytest.fail(f"{what}: evaluate printed {accuracy} from {used.name}, which cannot be read ({e!r})")
    assert step in ref.acc, f"{what}: {used.name} is at step {step}, which the reference never committed"
    assert accuracy == ref.acc[step], (f"{what}: evaluate printed {accuracy} but the run at step {step} measured "
                                       f"{ref.acc[step]}\n{r.stderr[-2000:]}")
    return accuracy


def assert_same_as_reference(run: Path, ref: Reference, what: str) -> None:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == ref.history[-1][0], f"{what}: ended at step {state['step']}"
    assert state["encoder"].keys() == ref.encoder.keys()
    differ = [k for k in ref.encoder if not torch.equal(state["encoder"][k], ref.encoder[k])]
    assert not differ, f"{what}: encoder weights {differ} differ from the uninterrupted run's"
    assert metrics_history(run) == ref.history, f"{what}: metrics.jsonl {metrics_history(run)} != {ref.history}"
    r = evaluate(run)
    assert r.code == 0 and r.exception is None, f"{what}: evaluate after recovery failed\n{r.trace or r.stderr}"
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] == ref.final


def check_recovery(run: Path, ref: Reference, what: str) -> None:
    """After a crash: evaluate is right or clearly refuses; then training completes to the reference."""
    r = evaluate(run)
    assert_right_number_or_clear_error(r, run, ref, what)
    if not (run / "checkpoint.pt").exists():  # killed before the first commit: there is no run yet
        assert r.code == 2, f"{what}: evaluate printed a number with no checkpoint in {run}"
        t = cli(*train_argv(run))
        assert t.code == 0, f"{what}: a new train in a directory with no checkpoint failed\n{t.trace or t.stderr}"
    else:
        try:
            done = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] >= EPOCHS
        except Exception:  # noqa: BLE001 -- resume decides what to do with an unreadable checkpoint
            done = False
        if not done:  # a kill after the last commit leaves nothing to resume
            t = cli("train", "--out", run, "--resume", "--epochs", EPOCHS)
            assert t.code == 0, f"{what}: resume failed\n{t.trace or t.stderr}"
    assert_same_as_reference(run, ref, what)


# ----------------------------------------------------------------------------------------------- kills
@pytest.fixture(scope="module")
def hook_kills(ref, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Runs killed by the fault hook at each commit point of epochs 1 and 2, two processes at a time."""
    root = tmp_path_factory.mktemp("hook")
    faults = [f"{point}:{n}" for point in POINTS for n in (1, 2)]
    runs = {fault: root / fault.replace(":", "-") for fault in faults}
    results = run_batch([(train_argv(runs[f]), root / f"{runs[f].name}.log", f) for f in faults])
    return {fault: (rc, err, runs[fault]) for fault, (rc, err) in zip(faults, results, strict=True)}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_commit_step_leaves_a_run_that_evaluates_and_resumes_exactly(hook_kills, ref, point, n):
    rc, err, run = hook_kills[f"{point}:{n}"]
    assert rc == -signal.SIGKILL, f"{FAULT_ENV}={point}:{n}: exit {rc}, not a SIGKILL\n{err[-2000:]}"
    check_recovery(run, ref, f"killed at {point}:{n}")


@pytest.fixture(scope="module")
def random_kills(ref, tmp_path_factory) -> list[tuple[float, int, Path]]:
    """Runs SIGKILLed after a seeded random time in [0, T], T the reference's run time from its start."""
    root = tmp_path_factory.mktemp("random")
    rng = random.Random(20240611)
    warms = [Warm(train_argv(root / f"run{i}"), root / f"run{i}.log") for i in range(RANDOM_KILLS)]
    out = []
    try:
        for warm in warms:  # all imported before the first is timed: no start competes for the CPUs
            warm.ready()
        for i, warm in enumerate(warms):
            delay = rng.uniform(0, ref.seconds)
            start = warm.go()
            time.sleep(max(0.0, start + delay - time.perf_counter()))
            os.kill(warm.pid, signal.SIGKILL)
            out.append((delay, warm.wait(), root / f"run{i}"))
    finally:
        for warm in warms:
            warm.cleanup()
    return out


@pytest.mark.parametrize("i", range(RANDOM_KILLS))
def test_a_kill_at_a_random_moment_leaves_a_run_that_evaluates_and_resumes_exactly(random_kills, ref, i):
    delay, rc, run = random_kills[i]
    assert rc in (-signal.SIGKILL, 0), f"exit {rc}"  # 0: it had finished before the kill
    check_recovery(run, ref, f"killed {delay:.3f}s after its start (of {ref.seconds:.3f}s)")


# ----------------------------------------------------------------------------------------------- two writers
def test_a_second_writer_fails_at_once_naming_the_first_which_finishes(ref, tmp_path):
    run, epochs = tmp_path / "run", 40  # long enough to be caught between two epochs
    first = Warm(["train", *TINY, "--epochs", str(epochs), "--out", str(run)], tmp_path / "first.log")
    seconds = []
    try:
        first.ready().go()
        deadline = time.perf_counter() + TIMEOUT
        while not (run / "checkpoint.pt").exists():
            assert first.proc.poll() is None, f"first writer ended early: {first.stderr()[-2000:]}"
            assert time.perf_counter() < deadline, "first writer wrote no checkpoint"
            time.sleep(0.001)
        os.kill(first.pid, signal.SIGSTOP)  # holds its lock, mid-run, for as long as the test needs
        assert first.proc.poll() is None, "first writer ended before it could be stopped"
        for argv in (["train", "--out", str(run), "--resume", "--epochs", str(epochs + 5)],
                     ["rebuild-index", "--run", str(run), "--device", "cpu"]):
            seconds.append((argv[0], subprocess.Popen(cli_cmd(argv), stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, env=child_env())))
        for name, proc in seconds:
            try:
                _, err = proc.communicate(timeout=60)  # the first is stopped: a writer that waits never ends
            except subprocess.TimeoutExpired:
                pytest.fail(f"second writer `{name}` waited for the first instead of failing at once")
            text = err.decode(errors="replace")
            line = assert_clear_error(Result(proc.returncode, "", text, None, ""), f"second writer `{name}`")
            assert str(first.pid) in line, f"second writer `{name}`: error does not name PID {first.pid}: {line}"
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait() == 0, f"first writer failed after the second tried: {first.stderr()[-2000:]}"
    finally:
        first.cleanup()
        for _, proc in seconds:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    history = metrics_history(run)
    assert [step for step, _ in history] == [10 * e for e in range(1, epochs + 1)]
    assert load_step(run / "checkpoint.pt") == 10 * epochs
    r = evaluate(run)
    assert r.code == 0, r.trace or r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] == history[-1][1]


# ----------------------------------------------------------------------------------------------- damaged files
def damage(path: Path, how: str, other: Path, seed: int = 0) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(bytes(len(data)))
    elif how == "random":
        path.write_bytes(random.Random(seed).randbytes(len(data)))
    elif how == "swap":
        shutil.copyfile(other / path.name, path)
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_gives_the_committed_accuracy_or_one_clear_error(refs, tmp_path, name, how):
    ref, other = refs
    run = tmp_path / "run"
    shutil.copytree(ref.path, run)
    damage(run / name, how, other.path)
    r = evaluate(run)
    accuracy = assert_right_number_or_clear_error(r, run, ref, f"{name} {how}")
    if accuracy is not None and "previous" not in r.stderr:
        assert accuracy == ref.final, f"{name} {how}: {accuracy} is not the final commit's {ref.final}"


# ----------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_during_a_save_keeps_the_last_commit(ref, tmp_path, monkeypatch):
    """torch.save writes half of epoch 2's checkpoint, then raises ENOSPC, as a full disk would."""
    run, real_save, saves = tmp_path / "run", torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if Path(str(f)).name.startswith("checkpoint"):
            saves.append(f)
            if len(saves) == 2:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    t = cli(*train_argv(run))
    monkeypatch.undo()
    assert len(saves) == 2, f"training went on after its save failed ({len(saves)} checkpoint saves)"
    if t.exception is not None:
        assert isinstance(t.exception, OSError) and t.exception.errno == errno.ENOSPC, t.trace
    else:
        assert "No space left" in assert_clear_error(t, "train on a full disk")
    first_step = ref.history[0][0]
    r = evaluate(run)
    assert r.code == 0, f"evaluate after a failed save\n{r.trace or r.stderr}"
    assert load_step(run / "checkpoint.pt") == first_step
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] == ref.acc[first_step]
    t = cli("train", "--out", run, "--resume", "--epochs", EPOCHS)
    assert t.code == 0, t.trace or t.stderr
    assert_same_as_reference(run, ref, "resumed after a full disk")


def pages(n_bytes: int) -> int:
    return -(-n_bytes // 4096)


@pytest.fixture
def small_disk(ref, tmp_path):
    """A tmpfs with room for epoch 1's commit but not epoch 2's (root only; skipped elsewhere)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    ck, ix = (pages((ref.path / name).stat().st_size) for name in ("checkpoint.pt", "index.faiss"))
    size = 4096 * (ck + ix + 4 + (ck + ix) // 2)  # + config, metrics, lock; half of a second generation
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             check=False, capture_output=True, timeout=10)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True, timeout=10)


def test_a_disk_that_fills_up_during_training_keeps_the_last_commit(ref, small_disk):
    run = small_disk / "run"
    [(rc, err)] = run_batch([(train_argv(run), small_disk.parent / "full.log", None)])
    assert rc != 0, "training fitted on a disk sized to fill up at epoch 2"
    r = evaluate(run)
    assert_right_number_or_clear_error(r, run, ref, "evaluate on a full disk")
    assert r.code == 0, f"the run's first commit is on disk but evaluate failed\n{r.stderr[-2000:]}"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, timeout=10)
    t = cli("train", "--out", run, "--resume", "--epochs", EPOCHS)
    assert t.code == 0, t.trace or t.stderr
    assert_same_as_reference(run, ref, "resumed once the disk had room")
    # Last, as the run recovered either way: how the full disk was reported.
    assert "Traceback" not in err, f"a full disk ended in a traceback\n{err[-3000:]}"
    assert rc == 2 and len(error_lines(err)) == 1, f"exit {rc}\n{err[-2000:]}"
    assert "No space left" in error_lines(err)[0]
