"""Fault campaign: crash, damage and contend for run directories, and count what sam-cls makes of it.

    python benchmarks/faults.py            # >= 400 SIGKILLs, >= 250 damaged files, writers, full disks (~30 min)
    python benchmarks/faults.py --quick    # a few of each (~3 min)

Each case ends in one of three outcomes:
  correct         `evaluate` printed the accuracy the uninterrupted run measured at the step of the checkpoint
                  it used (the latest, or the previous one where it said so), or refused where there is no run
                  yet; and training resumed (or, with no checkpoint, started again) to the uninterrupted run's
                  very weights and metrics; a second writer failed naming the first's PID; a full disk ended
                  training with one error line.
  clear_error     a command failed with exit status 2 and one `error:` line, where it could have gone on.
  silently_wrong  exit 0 with another number, a traceback, a resume that ends at other weights or metrics, a
                  second writer that went ahead (or waited).

Kinds: SIGKILL through the fault hook (SAM_CLS_FAULT_AT=<point>:<epoch>) at each commit step of each epoch;
SIGKILL after a random time in [0, T], T the run's uninterrupted time; each file of a finished run truncated
to half, zero-filled, overwritten with random bytes, swapped with another run's, or with one byte flipped; a
second writer (train, resume, rebuild-index, forget, add) while the first is stopped holding its lock; a tmpfs
too small for the run (root only), at sizes that fail each of the run's writes in turn; and the integrity cases
of faults_integrity.py (the API's writer after a CLI writer, a full disk after the commit point, symlinked and
FIFO files, crafted sizes, torchrun's agent killed).

Training is real and really SIGKILLed: each run is a process forked from a server that has imported sam-cls
(multiprocessing's forkserver), which spares the ~3 s interpreter start; evaluate runs in this process
through click's CliRunner, the same command as `sam-cls evaluate`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from click.testing import CliRunner
from common import write_report

from sam_cls.cli import main as cli_main

# ----------------------------------------------------------------------------- hyper-parameters, all here
FAULT_ENV = "SAM_CLS_FAULT_AT"
EPOCHS = 3
TINY = ["--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100", "--synthetic-classes",
        "5", "--synthetic-shape", "1,6,6", "--encoder", "linear", "--dim", "16", "--topk", "16", "--batch-size",
        "32", "--device", "cpu"]
# Runs that differ in seed (weights, data, batch order) and in the index their commits write.
VARIANTS = {
    "s0-flat": ["--seed", "0", "--index", "flat"],
    "s1-ivf": ["--seed", "1", "--index", "ivf", "--nlist", "8"],
    "s2-hnsw": ["--seed", "2", "--index", "hnsw"],
    "s3-torch": ["--seed", "3", "--index", "torch"],
    "s4-auto": ["--seed", "4"],
    "s5-rebuild3": ["--seed", "5", "--rebuild-every", "3"],
    "s6-ivfpq": ["--seed", "6", "--index", "ivfpq", "--nlist", "8"],
}
POINTS = ["metrics", "index", "checkpoint", "config"]  # the fault hook's points, in a commit's order
FILES = ["checkpoint.pt", "index.faiss", "config.yaml", "metrics.jsonl"]
# flip: one byte XOR 0xff, at a random offset; checkpoint.pt only: tensor-flip, one byte inside the memory's
# embeddings or labels, which torch.load reads without checking; the edits, one byte of the metadata around
# the tensors (a class name's last letter, the stored config's topk or temperature) set to another value.
DAMAGES = ["truncate", "zero", "random", "swap", "flip"]
CHECKPOINT_DAMAGES = ["tensor-flip", "class-edit", "topk-edit", "temperature-edit"]
EDITS = {"class-edit": (rb"class3", ord("1")), "topk-edit": (rb"topkq.K\x10", 3),
         "temperature-edit": (rb"temperatureq.G.{8}", 0x55)}  # (pattern, value of its last byte) in data.pkl
WRITERS = ["train-resume", "train", "rebuild-index", "forget", "add"]
# Per variant: random kills of a training, random kills of a resume, seeds of each random damage; full-disk
# sizes every `disk_step` pages, on the first `disk_variants` variants.
FULL = {"variants": list(VARIANTS), "epochs": list(range(1, EPOCHS + 1)), "random_kills": 40, "resume_kills": 10,
        "damage_seeds": 3, "disk_variants": len(VARIANTS), "disk_step": 1}
QUICK = {"variants": ["s0-flat", "s1-ivf"], "epochs": [2], "random_kills": 2, "resume_kills": 1, "damage_seeds": 1,
         "disk_variants": 1, "disk_step": 4}
CHILD_TIMEOUT = 120  # seconds a training process may take before it counts as hung
WRITER_TIMEOUT = 30  # seconds a second writer may take to fail (the first is stopped: waiting never ends)
OUTCOMES = ("correct", "clear_error", "silently_wrong")


# ----------------------------------------------------------------------------- processes
def _child(argv: list[str], log: str, fault: str | None) -> None:
    """A `sam-cls` command in a forked process: output to `log`, the fault hook armed as asked."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop(FAULT_ENV, None)
    if fault:
        os.environ[FAULT_ENV] = fault
    cli_main(argv, prog_name="sam-cls")


class Runner:
    """Starts `sam-cls` commands as processes forked from a server that has imported sam-cls."""

    def __init__(self, work: Path):
        self.ctx = mp.get_context("forkserver")
        # By module name: a child re-runs this script's top level, which then finds them imported (a preloaded
        # "__main__" is not honoured before Python 3.12: each child would pay the ~3 s of imports again).
        self.ctx.set_forkserver_preload(["common", "sam_cls.train", "sam_cls.cli", "sam_cls.classifier",
                                         "sam_cls.run", "click.testing"])
        self.work, self.n = work, 0

    def start(self, argv: list[str], fault: str | None = None) -> tuple[mp.Process, Path]:
        self.n += 1
        log = self.work / "logs" / f"{self.n:05d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = self.ctx.Process(target=_child, args=([str(a) for a in argv], str(log), fault), daemon=True)
        proc.start()
        return proc, log

    def run(self, argv: list[str], fault: str | None = None, timeout: float = CHILD_TIMEOUT) -> tuple[int, str]:
        proc, log = self.start(argv, fault)
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return -999, log.read_text(errors="replace") + "\n[hung: killed by the campaign]"
        return proc.exitcode, log.read_text(errors="replace")


def train_argv(variant: str, out: Path) -> list[str]:
    return ["train", *TINY, *VARIANTS[variant], "--epochs", str(EPOCHS), "--out", str(out)]


# ----------------------------------------------------------------------------- judging
@dataclass
class Verdict:
    outcome: str
    detail: str = ""


def worst(*verdicts: Verdict) -> Verdict:
    return max(verdicts, key=lambda v: OUTCOMES.index(v.outcome))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def judge_failure(code: int, stderr: str, what: str) -> Verdict:
    """A command that did not succeed: one clear line and status 2, or not."""
    if "Traceback" in stderr:
        return Verdict("silently_wrong", f"{what}: traceback: {last_line(stderr)}")
    errors = error_lines(stderr)
    if code == 2 and len(errors) == 1:
        return Verdict("clear_error", f"{what}: {errors[0][:300]}")
    return Verdict("silently_wrong", f"{what}: exit {code}, {len(errors)} error lines: {last_line(stderr)}")


@dataclass
class Reference:
    variant: str
    path: Path
    acc: dict[int, float]
    history: list[tuple[int, float]]
    encoder: dict[str, torch.Tensor]
    seconds: float


def history_of(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["test_acc"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluate(run: Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `sam-cls evaluate --run run --json`, in this process."""
    r = CliRunner().invoke(cli_main, ["evaluate", "--run", str(run), "--device", "cpu", "--json"])
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*r.exc_info))
    return r.exit_code, r.stdout, stderr


def judge_evaluate(run: Path, ref: Reference, final_only: bool = False) -> Verdict:
    """The accuracy the reference measured at the step of the checkpoint evaluate used, or one clear error."""
    code, out, err = evaluate(run)
    if code != 0:
        return judge_failure(code, err, "evaluate")
    if "Traceback" in err:
        return Verdict("silently_wrong", f"evaluate: exit 0 after a traceback: {last_line(err)}")
    accuracy = json.loads(out.strip().splitlines()[-1])["accuracy"]
    previous = "previous" in err
    used = run / ("checkpoint.prev.pt" if previous else "checkpoint.pt")
    try:
        step = int(load_state(used)["step"])
    except Exception as e:  # noqa: BLE001 -- a number from an unreadable checkpoint came from nowhere
        return Verdict("silently_wrong", f"evaluate printed {accuracy} from unreadable {used.name} ({e!r:.100})")
    want = ref.acc.get(step)
    if final_only and not previous and step != ref.history[-1][0]:
        return Verdict("silently_wrong", f"evaluate printed {accuracy} (step {step}), not the final commit's")
    if accuracy != want:
        return Verdict("silently_wrong", f"evaluate printed {accuracy} from {used.name} at step {step}; the run "
                                         f"measured {want} there")
    return Verdict("correct", "fell back to the previous checkpoint" if previous else "")


def judge_same_as_reference(run: Path, ref: Reference) -> Verdict:
    try:
        state = load_state(run / "checkpoint.pt")
    except Exception as e:  # noqa: BLE001
        return Verdict("silently_wrong", f"recovered run's checkpoint unreadable ({e!r:.100})")
    differ = [k for k in ref.encoder if k not in state["encoder"] or not torch.equal(state["encoder"][k],
                                                                                      ref.encoder[k])]
    if state["step"] != ref.history[-1][0] or differ:
        return Verdict("silently_wrong", f"recovered run ends at step {state['step']} with encoder tensors {differ} "
                                         f"unlike the uninterrupted run's")
    history = history_of(run)
    if history != ref.history:
        return Verdict("silently_wrong", f"recovered run's metrics.jsonl {history} != {ref.history}")
    final = judge_evaluate(run, ref, final_only=True)
    if final.outcome != "correct":
        return Verdict("silently_wrong" if final.outcome == "silently_wrong" else "clear_error",
                       f"after recovery: {final.detail}")
    return Verdict("correct")


def state_of(run: Path) -> str:
    """What a kill left: the committed epoch (or none) and any file a commit had not finished with."""
    if not run.is_dir():
        return "no directory"
    try:
        epoch = f"epoch {load_state(run / 'checkpoint.pt')['epoch']}"
    except Exception:  # noqa: BLE001
        epoch = "no checkpoint" if not (run / "checkpoint.pt").exists() else "unreadable checkpoint"
    loose = sorted({p.name.split("-")[0] if p.name.startswith(".index-") else p.suffix
                    for p in run.iterdir() if p.name.startswith(".index") or p.suffix == ".tmp"})
    return epoch + (f" + {', '.join(loose)}" if loose else "")


def recover(runner: Runner, run: Path, ref: Reference, make_room=None) -> Verdict:
    """Evaluate the crashed run, then finish it (resume, or train anew where nothing was committed)."""
    first = judge_evaluate(run, ref)
    if make_room is not None:
        make_room()
    if not (run / "checkpoint.pt").exists():
        if first.outcome == "clear_error":  # no run yet: refusing is the right answer
            first = Verdict("correct")
        code, log = runner.run(train_argv(ref.variant, run))
        if code != 0:
            return worst(first, judge_failure(code, log, "train in a directory with no checkpoint"))
    else:
        try:
            done = load_state(run / "checkpoint.pt")["epoch"] >= EPOCHS
        except Exception:  # noqa: BLE001 -- resume decides what to do with an unreadable checkpoint
            done = False
        if not done:
            code, log = runner.run(["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS)])
            if code != 0:
                return worst(first, judge_failure(code, log, "resume"))
    return worst(first, judge_same_as_reference(run, ref))


# ----------------------------------------------------------------------------- the campaign
@dataclass
class Campaign:
    runner: Runner
    work: Path
    keep: Path
    refs: dict[str, Reference] = field(default_factory=dict)
    cases: list[dict] = field(default_factory=list)
    not_injected: Counter = field(default_factory=Counter)

    def record(self, kind: str, verdict: Verdict, repro: str, run: Path | None = None, **facts) -> None:
        case = {"kind": kind, "outcome": verdict.outcome, "detail": verdict.detail, **facts, "reproduce": repro}
        if verdict.outcome != "correct" and run is not None and run.exists():
            kept = self.keep / f"{len(self.cases):04d}-{kind.replace(':', '-')}"
            shutil.copytree(run, kept, dirs_exist_ok=True, symlinks=True, ignore=special_files)
            case["kept"] = str(kept)
        self.cases.append(case)
        mark = {"correct": ".", "clear_error": "e", "silently_wrong": "X"}[verdict.outcome]
        print(mark, end="" if verdict.outcome == "correct" else f" [{kind}: {verdict.detail[:160]}]\n", flush=True)

    def fresh(self, name: str) -> Path:
        path = self.work / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def reference(self, variant: str) -> Reference:
        run = self.fresh(f"ref-{variant}")
        start = time.perf_counter()
        code, log = self.runner.run(train_argv(variant, run))
        seconds = time.perf_counter() - start
        if code != 0:
            sys.exit(f"error: reference run {variant} failed:\n{log[-3000:]}")
        history = history_of(run)
        ref = Reference(variant, run, dict(history), history, load_state(run / "checkpoint.pt")["encoder"], seconds)
        self.refs[variant] = ref
        print(f"reference {variant}: test_acc by step {history}, {seconds:.2f} s", flush=True)
        return ref

    def cmd(self, variant: str) -> str:
        return shlex.join(["sam-cls", *train_argv(variant, Path("R"))])

    # -- kills
    def hook_kill(self, variant: str, point: str, epoch: int, in_resume: bool = False) -> None:
        """Killed by the fault hook at `point` of `epoch`; in_resume: of a resume from epoch 1's commit (its
        first commit is epoch 2's)."""
        ref, fault = self.refs[variant], f"{point}:{epoch - 1 if in_resume else epoch}"
        run = self.fresh(f"hook-{variant}-{point}-{epoch}")
        resume = ["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS)]
        repro = (f"{FAULT_ENV}={fault} {self.cmd(variant)}; sam-cls evaluate --run R --json; "
                 f"sam-cls train --out R --resume --epochs {EPOCHS}")
        if in_resume:
            repro = f"{FAULT_ENV}=metrics:2 {self.cmd(variant)}; {FAULT_ENV}={fault} {shlex.join(resume)}; " + \
                repro.split("; ", 1)[1]
            code, log = self.runner.run(train_argv(variant, run), fault="metrics:2")
            if code == -signal.SIGKILL:
                code, log = self.runner.run(resume, fault=fault)
        else:
            code, log = self.runner.run(train_argv(variant, run), fault=fault)
        facts = {"variant": variant, "fault": fault, "phase": "resume" if in_resume else "train"}
        if code != -signal.SIGKILL:
            self.record(f"kill:{point}", Verdict("silently_wrong", f"{FAULT_ENV}={fault}: exit {code}, no SIGKILL: "
                                                                   f"{last_line(log)}"), repro, run, **facts)
            return
        self.record(f"kill:{point}", recover(self.runner, run, ref), repro, run, **facts)

    def random_kill(self, variant: str, rng: random.Random) -> bool:
        run = self.fresh(f"random-{variant}")
        return self._kill_at_random("kill:random", variant, run, train_argv(variant, run), rng,
                                    f"{self.cmd(variant)} & ")

    def random_resume_kill(self, variant: str, rng: random.Random) -> bool:
        """A resume from epoch 1's commit, SIGKILLed after a random time in [0, T]."""
        run = self.fresh(f"random-resume-{variant}")
        code, log = self.runner.run(train_argv(variant, run), fault="metrics:2")
        if code != -signal.SIGKILL:
            sys.exit(f"error: {FAULT_ENV}=metrics:2 did not kill the run ({code}):\n{log[-2000:]}")
        return self._kill_at_random("kill:random-resume", variant, run,
                                    ["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS)], rng,
                                    f"{FAULT_ENV}=metrics:2 {self.cmd(variant)}; "
                                    f"sam-cls train --out R --resume --epochs {EPOCHS} & ")

    def _kill_at_random(self, kind: str, variant: str, run: Path, argv: list[str], rng: random.Random,
                        started: str) -> bool:
        """Start argv, SIGKILL it after a random time in [0, T] and judge what it left; False if it ended first."""
        ref = self.refs[variant]
        delay = rng.uniform(0, ref.seconds)
        proc, _ = self.runner.start(argv)
        time.sleep(delay)
        try:
            if proc.exitcode is not None or not proc.is_alive():
                raise ProcessLookupError
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished before (or between the check and) the kill
            proc.join()
            self.not_injected[f"{kind} (finished first)"] += 1
            return False
        proc.join()
        left = state_of(run)
        repro = f"{started}sleep {delay:.3f}; kill -9 $!; sam-cls evaluate --run R --json"
        self.record(kind, recover(self.runner, run, ref), repro, run, variant=variant,
                    delay_s=round(delay, 4), of_s=round(ref.seconds, 4), left=left)
        return True

    # -- damage
    def damage(self, variant: str, other: str, name: str, how: str, seed: int) -> None:
        ref = self.refs[variant]
        run = self.fresh(f"damage-{variant}")
        shutil.copytree(ref.path, run, dirs_exist_ok=True)
        path, rng = run / name, random.Random(seed)
        data = path.read_bytes()
        where = ""
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif how == "zero":
            path.write_bytes(bytes(len(data)))
        elif how == "random":
            path.write_bytes(rng.randbytes(len(data)))
        elif how == "swap":
            shutil.copyfile(self.refs[other].path / name, path)
        elif how == "tensor-flip":
            key = rng.choice(["embeddings", "labels"])
            tensor = torch.load(path, weights_only=True)["memory"][key]
            at = data.find(tensor.numpy().tobytes()) + rng.randrange(tensor.nbytes)
            path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
            where = f" (byte {at} of {len(data)}, inside memory {key}, XOR 0xff)"
        elif how == "flip":
            at = rng.randrange(len(data))
            path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
            where = f" (byte {at} of {len(data)} XOR 0xff)"
        elif how in EDITS:
            pattern, value = EDITS[how]
            at = next(re.finditer(pattern, data, re.DOTALL)).end() - 1
            path.write_bytes(data[:at] + bytes([value]) + data[at + 1 :])
            where = f" (byte {at} of {len(data)} := {value:#x})"
        repro = (f"{self.cmd(variant)}; {how} R/{name}{where}"
                 f"{f' with the file of: {self.cmd(other)}' if how == 'swap' else ''}; sam-cls evaluate --run R --json")
        self.record(f"damage:{name}:{how}", judge_evaluate(run, ref, final_only=True), repro, run, variant=variant,
                    seed=seed, **({"offset": where.strip()} if where else {}))

    # -- two writers
    def writer(self, variant: str, writer: str, folder: Path, unlink_lock: bool = False) -> None:
        """A second writer while the first is stopped holding the lock; unlink_lock: with .lock deleted first
        (the lock is the directory's: it must hold, though no file names the holder any more)."""
        ref = self.refs[variant]
        run = self.fresh(f"writer-{variant}")
        first, first_log = self.runner.start(train_argv(variant, run))
        deadline = time.perf_counter() + CHILD_TIMEOUT
        while not (run / "checkpoint.pt").exists() and first.is_alive() and time.perf_counter() < deadline:
            time.sleep(0.0005)
        if not first.is_alive() or not (run / "checkpoint.pt").exists():
            first.join()
            self.not_injected[f"writer:{writer} (first not caught)"] += 1
            return
        os.kill(first.pid, signal.SIGSTOP)
        if unlink_lock:
            (run / ".lock").unlink(missing_ok=True)
        argv = {"train-resume": ["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS + 2)],
                "train": train_argv(variant, run),
                "rebuild-index": ["rebuild-index", "--run", str(run), "--device", "cpu"],
                "forget": ["forget", "--run", str(run), "--cells", "0", "--device", "cpu"],
                "add": ["add", "--run", str(run), "--data", str(folder), "--device", "cpu"]}[writer]
        try:
            code, log = self.runner.run(argv, timeout=WRITER_TIMEOUT)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        named = "process unknown" if unlink_lock else str(first.pid)  # who holds it, as .lock says
        if code == 2 and named in "".join(error_lines(log)):
            second = judge_failure(code, log, f"second writer {writer}")
            second = Verdict("correct") if second.outcome == "clear_error" else second
        elif code == 2:
            second = judge_failure(code, log, f"second writer {writer} (no PID {first.pid} named)")
        elif code == -999:
            second = Verdict("silently_wrong", f"second writer {writer} waited for the first")
        elif code == 0:
            second = Verdict("silently_wrong", f"second writer {writer} went ahead beside the first")
        else:
            second = judge_failure(code, log, f"second writer {writer}")
        first.join(CHILD_TIMEOUT)
        if first.is_alive():
            first.kill()
            first.join()
        text = first_log.read_text(errors="replace")
        done = (judge_same_as_reference(run, ref) if first.exitcode == 0
                else judge_failure(first.exitcode, text, "first writer"))
        repro = (f"{self.cmd(variant)} & (wait for R/checkpoint.pt; kill -STOP $!); "
                 f"{'rm R/.lock; ' if unlink_lock else ''}sam-cls {shlex.join(argv)}; kill -CONT $!")
        self.record(f"writer:{writer}{':lock-deleted' if unlink_lock else ''}", worst(second, done), repro, run,
                    variant=variant)

    # -- a full disk
    def disk_full(self, variant: str, mount: Path, pages: int) -> None:
        ref = self.refs[variant]
        for child in mount.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        subprocess.run(["mount", "-o", f"remount,size={pages * 4096}", str(mount)], check=True, timeout=10)
        run = mount / "run"
        code, log = self.runner.run(train_argv(variant, run))
        if code == 0:
            self.not_injected["disk-full (room enough)"] += 1
            return
        trained = judge_failure(code, log, "train on a full disk")
        said = trained.detail
        trained = Verdict("correct") if trained.outcome == "clear_error" else trained

        def make_room() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, timeout=10)

        repro = f"mount -t tmpfs -o size={pages * 4096} tmpfs D; {self.cmd(variant).replace(' R', ' D/R')}"
        self.record("disk-full", worst(trained, recover(self.runner, run, ref, make_room)), repro, run,
                    variant=variant, tmpfs_bytes=pages * 4096, train_said=said)


def special_files(folder: str, names: list[str]) -> list[str]:
    """What copytree cannot copy (a FIFO planted by a case): left out of a kept run directory."""
    return [n for n in names if not (os.path.islink(p := os.path.join(folder, n)) or os.path.isfile(p)
                                     or os.path.isdir(p))]


def write_folder(root: Path) -> Path:
    """Two classes of three 6x6 grey PNGs each, for `sam-cls add`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("new0", "class1"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (6, 6), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / cls / f"{i}.png")
    return root


def mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=False,
                          capture_output=True, timeout=10).returncode == 0


def table(cases: list[dict]) -> list[dict]:
    rows: dict[str, Counter] = {}
    for case in cases:
        rows.setdefault(case["kind"], Counter())[case["outcome"]] += 1
    return [{"kind": kind, "injected": sum(c.values()), **{o: c[o] for o in OUTCOMES}} for kind, c in rows.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few cases of each kind (a smoke run)")
    ap.add_argument("--out", default="results/faults.json")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random kill times and the damage")
    ap.add_argument("--work", help="folder for the runs (default: a new temporary folder, removed at the end)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    work = Path(args.work or tempfile.mkdtemp(prefix="sam-cls-faults-"))
    keep = work / "kept"  # the run directories of every case not judged correct
    keep.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(Runner(work), work, keep)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"\n{name}: {seconds[name]} s", flush=True)

    t0 = time.perf_counter()
    campaign.runner.run(["--version"])  # starts the fork server: a reference's time is its run's alone
    variants = plan["variants"]
    for variant in variants:
        campaign.reference(variant)
    phase("references", t0)

    t0 = time.perf_counter()
    for variant in variants:
        for point in POINTS:
            for epoch in plan["epochs"]:
                campaign.hook_kill(variant, point, epoch)
            campaign.hook_kill(variant, point, 2, in_resume=True)
    phase("hook kills", t0)

    t0 = time.perf_counter()
    for variant in variants:
        done = tries = 0
        while done < plan["random_kills"] and tries < 3 * plan["random_kills"]:
            tries += 1
            done += campaign.random_kill(variant, rng)
        done = tries = 0
        while done < plan["resume_kills"] and tries < 3 * plan["resume_kills"]:
            tries += 1
            done += campaign.random_resume_kill(variant, rng)
    phase("random kills", t0)

    t0 = time.perf_counter()
    others = {v: variants[(i + 1) % len(variants)] for i, v in enumerate(variants)}  # whose files a swap uses
    for variant in variants:
        for name in FILES:
            for how in DAMAGES + CHECKPOINT_DAMAGES if name == "checkpoint.pt" else DAMAGES:
                for _ in range(plan["damage_seeds"] if how in ("random", "flip", "tensor-flip") else 1):
                    campaign.damage(variant, others[variant], name, how, rng.randrange(1 << 30))
    phase("damaged files", t0)

    t0 = time.perf_counter()
    folder = write_folder(work / "add-folder")
    for variant in variants:
        for writer in WRITERS:
            campaign.writer(variant, writer, folder)
            campaign.writer(variant, writer, folder, unlink_lock=True)
    phase("second writers", t0)

    from faults_integrity import integrity_cases  # after this module's names exist: it uses them

    t0 = time.perf_counter()
    integrity_cases(campaign, variants, folder, plan)
    phase("integrity", t0)

    t0 = time.perf_counter()
    mount = work / "disk"
    disk = "skipped: mounting a tmpfs needs root"
    if mount_tmpfs(mount):
        try:
            for variant in variants[: plan["disk_variants"]]:
                ref = campaign.refs[variant]
                sizes = {name: -(-(ref.path / name).stat().st_size // 4096) for name in ("checkpoint.pt", "index.faiss")}
                most = 2 * (sizes["checkpoint.pt"] + sizes["index.faiss"]) + 6  # two generations, config, metrics
                for pages in range(1, most + sizes["checkpoint.pt"] + sizes["index.faiss"] + 1, plan["disk_step"]):
                    campaign.disk_full(variant, mount, pages)
            disk = "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=10)
    phase("full disk", t0)

    rows = table(campaign.cases)
    print(f"\n{'kind':<32} {'injected':>8} {'correct':>8} {'clear_error':>11} {'silently_wrong':>14}")
    for row in rows:
        print(f"{row['kind']:<32} {row['injected']:>8} {row['correct']:>8} {row['clear_error']:>11} "
              f"{row['silently_wrong']:>14}")
    total = Counter(case["outcome"] for case in campaign.cases)
    kills = sum(r["injected"] for r in rows if r["kind"].startswith("kill:"))
    damaged = sum(r["injected"] for r in rows if r["kind"].startswith("damage:"))
    print(f"{'total':<32} {len(campaign.cases):>8} {total['correct']:>8} {total['clear_error']:>11} "
          f"{total['silently_wrong']:>14}")
    print(f"kills {kills}, damaged files {damaged}; not injected: {dict(campaign.not_injected)}; "
          f"{time.perf_counter() - started:.0f} s")
    # Where the random kills landed: what each left in its run directory.
    left = {kind: dict(Counter(c["left"] for c in campaign.cases if c["kind"] == kind).most_common())
            for kind in ("kill:random", "kill:random-resume")}
    for kind, states in left.items():
        print(f"{kind} left: {states}")
    problems = [c for c in campaign.cases if c["outcome"] != "correct"]
    for case in problems:
        print(f"- {case['outcome']} {case['kind']}: {case['detail']}\n    {case['reproduce']}")
    write_report({"quick": args.quick, "epochs": EPOCHS, "train_args": TINY, "variants": {v: VARIANTS[v] for v in variants},
                  "faults": rows, "silently_wrong": total["silently_wrong"], "clear_error": total["clear_error"],
                  "correct": total["correct"], "kills": kills, "damaged_files": damaged, "disk_full": disk,
                  "not_injected": dict(campaign.not_injected), "random_kills_left": left, "seconds": seconds,
                  "total_seconds": round(time.perf_counter() - started, 1), "problems": problems}, args.out)
    if not args.work and not problems:
        shutil.rmtree(work, ignore_errors=True)
    elif problems:
        print(f"run directories of the cases above: {keep}")


if __name__ == "__main__":
    main()
