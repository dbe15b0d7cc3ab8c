"""The fault campaign's integrity cases (benchmarks/faults.py runs them after its kills, damage and writers).

  writer:api-after-cli   `clf = sam_cls.load(R)`, `sam-cls add --run R` in another process, then `clf.save()`:
                         correct when the save is refused and the add's cells are still there.
  disk-full:post-commit  `sam-cls add` on a tmpfs at up to 30 free sizes from "nothing fits" to "all fits"
                         (root only; the first two variants), then the same add retried with room: correct when a command that committed exited 0,
                         one that did not left the run as it was in one error line, and the retried add left
                         exactly one copy of the new cells.
  symlink:<file>         a run file replaced by a symlink to a file outside the run, then `forget` (and a
                         resume for metrics.jsonl): correct when the file it points to is untouched.
  fifo:<file>            a FIFO in place of a run file or an input image: correct when the command ends by
                         itself with the right answer or one error line (a hang is silently wrong).
  crafted:<input>        an index file declaring a vector far beyond its bytes (in a process capped at 2 GiB
                         more than it holds), a CIFAR file declaring more images than it holds, a PNG declaring
                         30000 x 30000 pixels: one error line each.
  kill:torchrun-agent    a 2-rank torchrun job whose agent is SIGKILLed mid-run: correct when both ranks end
                         within 20 s and the run evaluates.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from click.testing import CliRunner
from faults import EPOCHS, TINY, Campaign, Verdict, judge_failure, last_line, load_state, mount_tmpfs

import sam_cls
from sam_cls.checkpoint import StaleRunError
from sam_cls.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' data writers and /proc helpers
from datafiles import write_cifar10
from procs import alive, children

FIFO_TIMEOUT = 30  # seconds a command facing a FIFO may take before it counts as hung
POST_COMMIT_SIZES = 30  # free sizes an add's commit is tried at, per variant (every page where it has fewer)
POST_COMMIT_VARIANTS = 2  # variants the post-commit disk runs on (the first of the campaign's)


def quiet(_line: str) -> None:
    pass


def copy_of(c: Campaign, variant: str, name: str) -> Path:
    run = c.fresh(f"{name}-{variant}")
    shutil.copytree(c.refs[variant].path, run, dirs_exist_ok=True)
    return run


def cells(run: Path) -> int:
    return sam_cls.load(run, device="cpu", log=quiet).memory.size


def judge_command(code: int, log: str, what: str) -> Verdict:
    """A command that must succeed or fail in one clear line; a hang (-999) or traceback is silently wrong."""
    if code == -999:
        return Verdict("silently_wrong", f"{what}: hung")
    if code == 0 and "Traceback" not in log:
        return Verdict("correct")
    return judge_failure(code, log, what)


# ----------------------------------------------------------------------------------------------- writers
def api_after_cli(c: Campaign, variant: str, folder: Path) -> None:
    run = copy_of(c, variant, "api")
    clf = sam_cls.load(run, device="cpu", log=quiet)
    code, log = c.runner.run(["add", "--run", str(run), "--data", str(folder), "--device", "cpu"])
    verdict = judge_command(code, log, "the CLI's add")
    if verdict.outcome == "correct":
        added = cells(run)
        clf.forget(cells=[0])
        try:
            clf.save()
            verdict = Verdict("silently_wrong", "the API's save() committed over the CLI's add")
        except StaleRunError:
            if cells(run) != added:
                verdict = Verdict("silently_wrong", f"the run holds {cells(run)} cells, not the add's {added}")
    c.record("writer:api-after-cli", verdict, "clf = sam_cls.load(R); sam-cls add --run R --data D; "
             "clf.forget(cells=[0]); clf.save()", run, variant=variant)


# ----------------------------------------------------------------------------------------------- a full disk
def post_commit_disk(c: Campaign, variant: str, folder: Path, mount: Path, step: int) -> None:
    """`add` on a tmpfs at each free size across its commit, then retried with room."""
    ref = c.refs[variant]
    pages = {p.name: -(-p.stat().st_size // 4096) for p in ref.path.iterdir() if p.is_file()}
    used, commit = sum(pages.values()) + 2, pages["checkpoint.pt"] + pages["index.faiss"] + 4
    before = cells(ref.path)
    for free in range(0, commit + 1, max(step, commit // POST_COMMIT_SIZES)):
        for child in mount.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, timeout=10)
        run = mount / "run"
        shutil.copytree(ref.path, run)
        subprocess.run(["mount", "-o", f"remount,size={(used + free) * 4096}", str(mount)], check=True, timeout=10)
        argv = ["add", "--run", str(run), "--data", str(folder), "--device", "cpu"]
        code, log = c.runner.run(argv)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, timeout=10)
        committed = cells(run) != before
        if code == 0 and not committed:
            verdict = Verdict("silently_wrong", f"add exited 0 but committed nothing: {last_line(log)}")
        elif code != 0 and committed:
            verdict = Verdict("silently_wrong", f"add committed its cells but exited {code}: {last_line(log)}")
        else:
            verdict = judge_command(code, log, "add on a full disk")
            verdict = Verdict("correct") if verdict.outcome == "clear_error" else verdict
        retry_code, retry_log = c.runner.run(argv)
        added = cells(run) - before
        if retry_code != 0:
            verdict = judge_failure(retry_code, retry_log, "the retried add")
        elif added != 6:  # write_folder's six images
            verdict = Verdict("silently_wrong", f"after the retry the run holds {added} new cells, not 6")
        c.record("disk-full:post-commit", verdict, f"tmpfs of {used + free} pages holding R; sam-cls "
                 f"{' '.join(argv[:1])} --run R --data D; (room) the same again", run, variant=variant,
                 free_pages=free, first_exit=code)


# ----------------------------------------------------------------------------------------------- planted files
def symlinked(c: Campaign, variant: str, name: str, command: str) -> None:
    run = copy_of(c, variant, f"symlink-{name.strip('.')}")
    outside = c.work / "precious.txt"
    outside.write_text("a file outside the run\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(outside)
    argv = (["forget", "--run", str(run), "--cells", "0", "--device", "cpu"] if command == "forget"
            else ["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS + 1)])
    code, log = c.runner.run(argv)
    verdict = judge_command(code, log, f"{command} with {name} a symlink")
    if outside.read_text() != "a file outside the run\n":
        verdict = Verdict("silently_wrong", f"{command} wrote through the symlink {name}")
    c.record(f"symlink:{name}", verdict, f"ln -sf F R/{name}; sam-cls {' '.join(argv[:1])} ...", run,
             variant=variant, command=command)


def fifo(c: Campaign, variant: str, name: str) -> None:
    """A FIFO in place of a run file (evaluate, or resume for metrics.jsonl) or of an image (predict)."""
    run = copy_of(c, variant, f"fifo-{name.replace('.', '-')}")
    if name == "image.png":
        if not (c.work / "image.png").exists():
            os.mkfifo(c.work / "image.png")
        argv = ["predict", "--run", str(run), "--device", "cpu", str(c.work / "image.png")]
    else:
        (run / name).unlink()
        os.mkfifo(run / name)
        argv = (["train", "--out", str(run), "--resume", "--epochs", str(EPOCHS + 1)] if name == "metrics.jsonl"
                else ["evaluate", "--run", str(run), "--device", "cpu", "--json"])
    code, log = c.runner.run(argv, timeout=FIFO_TIMEOUT)
    verdict = judge_command(code, log, f"{argv[0]} with {name} a FIFO")
    if argv[0] == "evaluate" and code == 0:  # it fell back: the number must be the previous generation's
        ref = c.refs[variant]
        want = ref.acc[load_state(run / "checkpoint.prev.pt")["step"]] if "previous" in log else ref.history[-1][1]
        got = [float(m) for m in re.findall(r'"accuracy": ([0-9.]+)', log)]
        if got[-1:] != [want]:
            verdict = Verdict("silently_wrong", f"evaluate printed {got} with {name} a FIFO, not {want}")
    c.record(f"fifo:{name}", verdict, f"mkfifo R/{name}; sam-cls {argv[0]} ...", run, variant=variant)


# ----------------------------------------------------------------------------------------------- crafted sizes
def png_declaring(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def crafted(c: Campaign, variant: str) -> None:
    run = copy_of(c, variant, "crafted")
    png_declaring(c.work / "bomb.png", 30000, 30000)
    r = CliRunner().invoke(cli_main, ["predict", "--run", str(run), "--device", "cpu", str(c.work / "bomb.png")])
    code = r.exit_code if r.exception is None or isinstance(r.exception, SystemExit) else 1
    c.record("crafted:image", judge_command(code, r.stderr, "predict a 30000x30000 PNG"), "sam-cls predict bomb.png",
             variant=variant)

    from sam_cls.data import DatasetError, load_dataset  # the data sets' own readers

    root = c.work / "crafted-cifar"
    shutil.rmtree(root, ignore_errors=True)
    write_cifar10(root)
    n = 20000  # images declared by a 60 kB file: numpy.ndarray called with a shape allocates them
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        b"\x80\x02}q\x00(X\x04\x00\x00\x00dataq\x01cnumpy\nndarray\nq\x02M" + struct.pack("<H", n)
        + b"M\x00\x0c\x86q\x03X\x02\x00\x00\x00u1q\x04\x86q\x05Rq\x06X\x06\x00\x00\x00labelsq\x07]q\x08("
        + b"K\x00" * n + b"eu.")
    try:
        load_dataset("cifar10", root, download=False)
        verdict = Verdict("silently_wrong", f"a CIFAR file of 60 kB loaded {n} images")
    except DatasetError as e:
        verdict = Verdict("clear_error", str(e)[:300])
    c.record("crafted:cifar", verdict, "data_batch_1 calling numpy.ndarray((20000, 3072), 'u1')", variant=variant)

    script = ("import resource, sys, struct\n"
              "from sam_cls.index import IndexMismatchError, IndexParams, build_index, load_index\n"
              "from sam_cls.index.store import read_index_file, write_index_file\n"
              "import faiss, torch\n"
              "x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1)\n"
              "h = build_index(x, IndexParams(kind='flat'), k=4).save(sys.argv[1])\n"
              "_, p = read_index_file(sys.argv[1])\n"
              "struct.pack_into('<Q', p, 37, 3 << 30)\n"  # the flat codes' length: 3 GiB
              "write_index_file(sys.argv[1], {k: v for k, v in h.items() if not k.startswith('payload')}, p)\n"
              "used = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
              "resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), resource.RLIM_INFINITY))\n"
              "try:\n    load_index(sys.argv[1])\n"
              "except IndexMismatchError as e:\n    print('error:', e, file=sys.stderr)\n    sys.exit(2)\n")
    p = subprocess.run([sys.executable, "-c", script, str(c.work / "crafted.faiss")], capture_output=True, text=True,
                       timeout=120, check=False)
    verdict = judge_command(p.returncode, p.stderr, "load an index declaring 3 GiB")
    if p.returncode == 0:
        verdict = Verdict("silently_wrong", "an index declaring 3 GiB in 19 kB loaded")
    c.record("crafted:index", verdict, "a flat index file whose codes' length says 3 GiB", variant=variant)


# ----------------------------------------------------------------------------------------------- torchrun's agent
def agent_kill(c: Campaign) -> None:
    run = c.fresh("agent")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sam_cls",
            "train", *TINY, "--index", "torch", "--epochs", "500", "--out", str(run)]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = children(agent.pid)
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 20
        while any(alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(ranks) != 2:
            verdict = Verdict("clear_error", f"found {len(ranks)} ranks under the agent: nothing injected")
        elif any(alive(r) for r in ranks):
            verdict = Verdict("silently_wrong", "ranks trained on after their agent died")
        else:
            r = CliRunner().invoke(cli_main, ["evaluate", "--run", str(run), "--device", "cpu", "--json"])
            verdict = judge_command(r.exit_code, r.stderr, "evaluate after the agent's death")
    finally:
        for r in ranks:
            if alive(r):
                os.kill(r, signal.SIGKILL)
    c.record("kill:torchrun-agent", verdict, "torchrun --nproc_per_node 2 -m sam_cls train ... & kill -9 $!", run)


# ----------------------------------------------------------------------------------------------- all of them
def integrity_cases(c: Campaign, variants: list[str], folder: Path, plan: dict) -> None:
    """Every case above on each variant (crafted inputs, the post-commit disk and the agent on fewer)."""
    for variant in variants:
        api_after_cli(c, variant, folder)
        for name, command in ((".lock", "forget"), ("config.yaml", "forget"), ("metrics.jsonl", "forget"),
                              ("metrics.jsonl", "resume"), (".commit-unfinished", "forget")):
            symlinked(c, variant, name, command)
        for name in ("index.faiss", "checkpoint.pt", "metrics.jsonl", "image.png"):
            fifo(c, variant, name)
    crafted(c, variants[0])
    mount = c.work / "disk-post-commit"
    if mount_tmpfs(mount):
        try:
            for variant in variants[: min(POST_COMMIT_VARIANTS, plan["disk_variants"])]:
                post_commit_disk(c, variant, folder, mount, plan["disk_step"])
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=10)
    else:
        c.not_injected["disk-full:post-commit (mounting a tmpfs needs root)"] += 1
    agent_kill(c)
