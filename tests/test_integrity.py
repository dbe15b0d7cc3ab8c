"""What a run directory guarantees when other processes, damaged bytes, full disks and planted files meet it.

One writer (every writer holds a lock that deleting a file cannot lose, and commits only over the generation it
loaded), every byte checked, nothing after the commit point failing the command, and no symlink followed or
special file opened: each test sets up the situation with real files and real processes' calls.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datafiles import write_cifar10, write_imagefolder
from PIL import Image
from procs import alive, children

import sam_cls
from sam_cls import checkpoint
from sam_cls.checkpoint import CheckpointError, RunDir, RunLockedError, StaleRunError, load_tensors
from sam_cls.cli import main
from sam_cls.config import make_config
from sam_cls.data import DatasetError
from sam_cls.train import train


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of two epochs (two generations: checkpoint.pt and checkpoint.prev.pt)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = make_config(None, dataset="synthetic", synthetic_train=300, synthetic_test=100, synthetic_classes=5,
                      synthetic_shape=[1, 6, 6], encoder="linear", dim=16, topk=16, epochs=2, batch_size=32,
                      lr=0.1, device="cpu", out=str(out))
    train(cfg, log=quiet)
    return out


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit), (
        f"exit {result.exit_code}\n{result.output}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def image_folder(root, name="newclass", n=3, size=6, seed=3):
    """root/<name>/*.png: a few flat grey images."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size, size), rng.integers(0, 256), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------- one writer
def test_the_api_save_refuses_after_another_writer_committed(run, tmp_path):
    clf = sam_cls.load(run, device="cpu")
    added = cli("add", "--run", run, "--device", "cpu", "--data", image_folder(tmp_path / "new"), "--json")
    assert added.exit_code == 0, added.output
    cells = sam_cls.load(run, device="cpu").memory.size
    clf.add(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), ["class0", "class0"])
    with pytest.raises(StaleRunError, match="another writer"):
        clf.save()
    assert sam_cls.load(run, device="cpu").memory.size == cells  # the CLI's cells are still there


def test_the_api_save_holds_the_runs_lock(run):
    clf = sam_cls.load(run, device="cpu")
    clf.forget(cells=[0])
    with RunDir(run).lock(), pytest.raises(RunLockedError):
        clf.save()
    clf.save()  # and once the other writer is gone, the save goes through
    assert sam_cls.load(run, device="cpu").memory.size == 299


def test_deleting_the_lock_file_lets_no_second_writer_in(run):
    with RunDir(run).lock():
        (run / ".lock").unlink()
        with pytest.raises(RunLockedError), RunDir(run).lock():
            pass
        assert cli("forget", "--run", run, "--device", "cpu", "--cells", "0").exit_code == 2


# ----------------------------------------------------------------------------------------------- every byte
def edit(path, pattern: bytes, value: int) -> None:
    """Set the last byte of the one match of `pattern` in a file to `value` (a byte edit, torch's zip unaware)."""
    raw = bytearray(path.read_bytes())
    found = list(re.finditer(pattern, bytes(raw), re.DOTALL))
    assert len(found) == 1, f"{pattern!r} found {len(found)} times"
    raw[found[0].end() - 1] = value
    path.write_bytes(raw)


# Where each edit lands, in torch's uncompressed data.pkl: a class name's last letter, the stored config's
# topk (a pickled one-byte int: K 0x10) and temperature (a pickled double: G and 8 bytes, the last of them).
EDITS = {"class-name": (rb"class3", ord("1")), "config-topk": (rb"topkq.K\x10", 3),
         "config-temperature": (rb"temperatureq.G.{8}", 0x55)}


@pytest.mark.parametrize("where", EDITS)
def test_a_byte_edit_anywhere_in_the_checkpoint_falls_back_to_the_previous_generation(run, where):
    edit(run / "checkpoint.pt", *EDITS[where])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_tensors(run / "checkpoint.pt")
    said = []
    clf = sam_cls.load(run, device="cpu", log=said.append)
    assert clf.state["epoch"] == 1 and (clf.cfg.topk, clf.cfg.temperature) == (16, 0.05) and "class3" in clf.classes
    # The message names both generations and the run they belong to.
    run_id = clf.state["generation"]["run"]
    assert re.search(rf"generation 1 of run {run_id}.*generation 2 of run {run_id}", said[0]), said


def test_a_changed_tensor_stride_falls_back_to_the_previous_generation(run):
    raw = bytearray((run / "checkpoint.pt").read_bytes())
    # The memory's (300, 16) embeddings, stride (16, 1) -> (1, 16): a view that stays inside its storage.
    found = re.search(rb"M,\x01K\x10\x86q.K\x10K\x01\x86", bytes(raw), re.DOTALL)
    raw[found.end() - 4], raw[found.end() - 2] = 1, 16
    (run / "checkpoint.pt").write_bytes(raw)
    said = []
    clf = sam_cls.load(run, device="cpu", log=said.append)
    assert clf.state["epoch"] == 1 and "previous checkpoint" in said[0]


def test_the_previous_generation_of_another_run_is_refused(run, tmp_path):
    other = tmp_path / "other"
    train(make_config(None, **{**sam_cls.load(run, device="cpu").cfg.to_dict(), "seed": 1, "out": str(other)}),
          log=quiet)
    for name in ("checkpoint.prev.pt", "index.prev.faiss"):
        shutil.copyfile(other / name, run / name)
    (run / "checkpoint.pt").write_bytes(bytes((run / "checkpoint.pt").stat().st_size))  # zeroed
    with pytest.raises(CheckpointError, match="another run"):
        sam_cls.load(run, device="cpu")


def test_a_checkpoint_that_cannot_be_read_names_no_rebuild_it_cannot_do(run):
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(b"\0" * 64)
    line = one_line_error(cli("evaluate", "--run", run, "--device", "cpu"))
    assert "rebuild-index" not in line and "checkpoint.pt" in line


# ----------------------------------------------------------------------------------------------- after the commit
def test_a_full_disk_after_the_commit_point_is_a_warning_and_a_retry_adds_nothing_twice(run, tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "new")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "config.tmp"))

    monkeypatch.setattr(checkpoint, "save_config", full)  # config.yaml is written after the commit point
    first = cli("add", "--run", run, "--device", "cpu", "--data", folder, "--json")
    monkeypatch.undo()
    assert first.exit_code == 0, first.output
    assert "warning: committed" in first.stderr and "config.yaml" in first.stderr
    assert json.loads(first.stdout)["cells"] == 303
    retry = cli("add", "--run", run, "--device", "cpu", "--data", folder, "--json")
    assert retry.exit_code == 0 and json.loads(retry.stdout)["added"] == 0, retry.output
    assert sam_cls.load(run, device="cpu").memory.size == 303
    # The retry, the next writer, wrote what the first could not.
    assert not (run / ".commit-unfinished").exists() and (run / "config.yaml").is_file()
    assert load_tensors(run / "checkpoint.pt")["generation"]["number"] == 3


# ----------------------------------------------------------------------------------------------- no symlink, no FIFO
@pytest.mark.parametrize("name,command", [(".lock", "forget"), ("metrics.jsonl", "resume")])
def test_a_symlink_in_the_run_is_never_written_through(run, tmp_path, name, command):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(precious)
    if command == "forget":
        r = cli("forget", "--run", run, "--device", "cpu", "--cells", "0")
    else:
        r = cli("train", "--out", run, "--resume", "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert precious.read_text() == "keep me\n"


def run_cli_with_timeout(*args, timeout=60):
    """A `sam-cls` process that must end by itself (a FIFO opened for reading would block it forever)."""
    try:
        return subprocess.run([sys.executable, "-m", "sam_cls.cli", *map(str, args)], check=False,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sam-cls {' '.join(map(str, args))} hung")


def test_a_fifo_in_place_of_the_index_is_one_clear_error(run):
    (run / "index.faiss").unlink()
    os.mkfifo(run / "index.faiss")
    r = run_cli_with_timeout("evaluate", "--run", run, "--device", "cpu")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "FIFO" in errors[0], r.stderr[-2000:]


def test_a_fifo_among_the_images_is_one_clear_error(tmp_path):
    write_imagefolder(tmp_path / "folder", n_per_class=2, size=8)
    os.mkfifo(tmp_path / "folder" / "train" / "cat" / "fifo.png")
    r = run_cli_with_timeout("train", "--dataset", "imagefolder", "--data-dir", tmp_path / "folder", "--epochs", 1,
                             "--encoder", "linear", "--topk", 1, "--batch-size", 4, "--device", "cpu",
                             "--out", tmp_path / "run")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "fifo.png" in errors[0], r.stderr[-2000:]


def test_a_fifo_given_to_predict_is_one_clear_error(run, tmp_path):
    os.mkfifo(tmp_path / "x.png")
    line = one_line_error(cli("predict", "--run", run, "--device", "cpu", tmp_path / "x.png"))
    assert "x.png" in line and "FIFO" in line


# ----------------------------------------------------------------------------------------------- declared sizes
def png_declaring(path, width: int, height: int) -> None:
    """A valid PNG header declaring width x height grey pixels, and almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_one_clear_error_and_the_limit_can_be_raised(run, tmp_path):
    png_declaring(tmp_path / "bomb.png", 30000, 30000)
    line = one_line_error(cli("predict", "--run", run, "--device", "cpu", tmp_path / "bomb.png"))
    assert "900000000 pixels" in line and "--max-image-pixels" in line
    with pytest.raises(DatasetError, match="900000000 pixels"):
        sam_cls.load(run, device="cpu").predict(tmp_path / "bomb.png")
    Image.new("L", (40, 40), 7).save(tmp_path / "small.png")
    line = one_line_error(cli("predict", "--run", run, "--device", "cpu", "--max-image-pixels", 1000,
                              tmp_path / "small.png"))
    assert "1600 pixels" in line
    ok = cli("predict", "--run", run, "--device", "cpu", "--max-image-pixels", 2000, tmp_path / "small.png")
    assert ok.exit_code == 0, ok.output
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the option held for its command only


def test_a_cifar_file_declaring_more_images_than_it_holds_is_refused(tmp_path):
    from sam_cls.data import load_dataset

    write_cifar10(tmp_path)
    n = 20000  # 61 MB of images declared in a file of 60 kB: numpy.ndarray called with a shape allocates them
    crafted = (b"\x80\x02}q\x00(X\x04\x00\x00\x00dataq\x01cnumpy\nndarray\nq\x02M" + struct.pack("<H", n)
               + b"M\x00\x0c\x86q\x03X\x02\x00\x00\x00u1q\x04\x86q\x05Rq\x06X\x06\x00\x00\x00labelsq\x07]q\x08("
               + b"K\x00" * n + b"eu.")
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(crafted)
    with pytest.raises(DatasetError, match="more than the file"):
        load_dataset("cifar10", tmp_path, download=False)


def test_an_index_declaring_more_memory_than_its_file_is_one_clear_error(tmp_path):
    from sam_cls.index import IndexParams, build_index
    from sam_cls.index.store import read_index_file, write_index_file

    vectors = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    header = build_index(vectors, IndexParams(kind="flat"), k=4).save(tmp_path / "index.faiss")
    _, payload = read_index_file(tmp_path / "index.faiss")
    # faiss's flat payload: IxFI, d (4 bytes), ntotal and two more 8-byte fields, is_trained (1), metric (4),
    # then the length of the vectors' bytes, which faiss allocates before it reads them: 3 GiB.
    struct.pack_into("<Q", payload, 4 + 4 + 8 + 8 + 8 + 1 + 4, 3 << 30)
    write_index_file(tmp_path / "index.faiss", {k: v for k, v in header.items() if not k.startswith("payload")},
                     payload)
    # As on a machine with 2 GiB to spare: the allocation itself fails.
    script = ("import resource, sys\n"
              "from sam_cls.index import IndexMismatchError, load_index\n"
              "import faiss\n"
              "used = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
              "resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), resource.RLIM_INFINITY))\n"
              "try:\n    load_index(sys.argv[1])\n"
              "except IndexMismatchError as e:\n    print(e)\n    sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "index.faiss")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 3 and "declares more memory" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- records
def train_killed_at(fault: str, out) -> None:
    """A two-epoch `sam-cls train` process SIGKILLed by the fault hook at `fault` ("<point>:<n>")."""
    argv = ["train", "--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100",
            "--synthetic-classes", "5", "--synthetic-shape", "1,6,6", "--encoder", "linear", "--dim", "16",
            "--topk", "16", "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "sam_cls.cli", *argv], env={**os.environ, checkpoint.FAULT_ENV: fault},
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_no_metrics_line_lands_before_its_commit(tmp_path):
    train_killed_at("metrics:2", tmp_path / "run")  # epoch 2's record made, not committed
    assert [r["step"] for r in RunDir(tmp_path / "run").load_metrics()] == [10]
    assert load_tensors(tmp_path / "run" / "checkpoint.pt")["step"] == 10


def test_a_kill_after_the_last_commit_point_is_finished_by_the_next_reader(tmp_path):
    run = tmp_path / "run"
    train_killed_at("checkpoint:2", run)  # epoch 2 committed, its metrics line not yet written
    assert [r["step"] for r in RunDir(run).load_metrics()] == [10] and (run / ".commit-unfinished").exists()
    assert cli("evaluate", "--run", run, "--device", "cpu").exit_code == 0  # no writer needs to come
    assert [r["step"] for r in RunDir(run).load_metrics()] == [10, 20]
    assert not (run / ".commit-unfinished").exists() and (run / "index.faiss").is_file()


def test_every_temporary_file_a_writer_makes_is_removed_by_the_next(run):
    names = ["checkpoint.pt.tmp", "checkpoint.prev.pt.tmp", "config.tmp", "metrics.jsonl.tmp", ".lock.4242.tmp",
             ".index.next.tmp", "..index.next.tmp.tmp4242", "shard-000000010-0-of-2.pt.tmp"]
    for name in names:
        (run / name).write_bytes(b"half")
    with RunDir(run).lock():
        pass
    assert not [name for name in names if (run / name).exists()]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_checkpoint_that_may_not_be_read_is_a_permission_error_not_damage(run):
    (run / "checkpoint.pt").chmod(0)
    try:
        line = one_line_error(cli("evaluate", "--run", run, "--device", "cpu"))
    finally:
        (run / "checkpoint.pt").chmod(0o644)
    assert "Permission denied" in line and "corrupt" not in line


def test_a_newline_in_a_class_name_keeps_predict_to_one_line_an_image(run, tmp_path):
    image_folder(tmp_path / "new", name="two\nlines")
    assert cli("add", "--run", run, "--device", "cpu", "--data", tmp_path / "new").exit_code == 0
    r = cli("predict", "--run", run, "--device", "cpu", "--top", 6, tmp_path / "new" / "two\nlines" / "0.png")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1 and "two\\nlines" in r.stdout, r.output


def test_the_ranks_of_a_job_whose_agent_died_stop(tmp_path):
    """torchrun's agent SIGKILLed mid-run: its ranks must not train on, rank 0 holding the run's lock."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sam_cls",
            "train", "--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100",
            "--synthetic-classes", "5", "--synthetic-shape", "1,6,6", "--encoder", "linear", "--dim", "16",
            "--topk", "16", "--batch-size", "32", "--epochs", "500", "--index", "torch", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint.pt").exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the job never committed"
            time.sleep(0.2)
        ranks = children(agent.pid)
        assert len(ranks) == 2
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 20
        while [r for r in ranks if alive(r)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [r for r in ranks if alive(r)], "ranks trained on after their agent died"
    finally:
        agent.kill()
        for r in ranks:
            if alive(r):
                os.kill(r, signal.SIGKILL)

