"""Distributed training, end to end: real torchrun jobs of 2 gloo processes on the CPU, started by the tests.

A 2-rank job must follow the single-process run (same global batch and seed) to float rounding, every rank
must merge the same global top-K as a single process finds, a rank killed mid-run must leave the last complete
checkpoint readable and resumable to the uninterrupted result, and a single process must read a sharded run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sam_cls.checkpoint import RunDir, load_tensors
from sam_cls.cli import main
from sam_cls.config import make_config
from sam_cls.train import train

FAULT_ENV = "SAM_CLS_FAULT_AT"
EPOCHS = 3
# 300 cells over 2 ranks; batches of 45 split 22 + 23, and the last batch of an epoch holds 30 (15 + 15).
TINY = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "synthetic_classes": 8,
        "synthetic_shape": [1, 6, 6], "encoder": "linear", "dim": 16, "topk": 16, "batch_size": 45, "lr": 0.5,
        "temperature": 0.1, "device": "cpu", "epochs": EPOCHS}
TIMEOUT = 180  # seconds a job may take before the test gives up on it


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def torchrun(*args: str, fault: str | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """A torchrun job of `ranks` processes on this machine (--standalone: a free port of its own)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), *args], env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


def train_job(out: Path, *extra: str, fault: str | None = None, **options) -> subprocess.CompletedProcess:
    return torchrun("-m", "sam_cls", "train", *flags({**TINY, **options}), "--out", str(out), *extra, fault=fault)


def weights(run: Path) -> dict:
    return load_tensors(RunDir(run).checkpoint)["encoder"]


def losses(run: Path) -> list[float]:
    return [record["train_loss"] for record in RunDir(run).load_metrics()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run, with an exact (torch) index on each shard."""
    out = tmp_path_factory.mktemp("dist") / "two"
    job = train_job(out, index="torch")
    assert job.returncode == 0, job.stderr[-3000:]
    return out


def test_two_ranks_follow_the_single_process_run(two_ranks, tmp_path):
    one = train(make_config(None, **TINY, index="torch", out=str(tmp_path / "one")), log=lambda _: None)
    assert len(losses(two_ranks)) == EPOCHS
    torch.testing.assert_close(losses(two_ranks), losses(Path(one["run_dir"])), rtol=1e-4, atol=1e-6)
    a, b = weights(two_ranks), weights(Path(one["run_dir"]))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    assert losses(two_ranks)[-1] < 0.5 * losses(two_ranks)[0]  # it learned: the comparison is not of constants
    # The run holds one shard per rank and no index of its own; a single process gathers them to evaluate.
    files = sorted(p.name for p in two_ranks.glob("shard-*"))
    assert files[-2:] == [f"shard-{EPOCHS * 7:09d}-0-of-2.pt", f"shard-{EPOCHS * 7:09d}-1-of-2.pt"]
    result = CliRunner().invoke(main, ["evaluate", "--run", str(two_ranks), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["accuracy"] == RunDir(two_ranks).load_metrics()[-1]["test_acc"]


def test_another_number_of_ranks_is_one_clear_error(two_ranks):
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(two_ranks), "--epochs", str(EPOCHS + 1)])
    assert result.exit_code == 2
    assert "trained on 2 rank(s) and this job has 1" in result.output and "Traceback" not in result.output


WORKER = """
import json, sys, torch
from sam_cls.config import make_config
from sam_cls.distributed import init, shard_range
from sam_cls.index import IndexParams
from sam_cls.memory import MemoryBank
from sam_cls.shards import Shard, ShardedMemory, ShardRefresher

comm = init("cpu")
n, d, k, q = 500, 16, 17, 40
gen = torch.Generator().manual_seed(0)
cells = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
cells[n // 2 :] = cells[: n // 2]  # every cell has a twin on the other shard: equal scores, ties to break
labels = torch.randint(0, 5, (n,), generator=gen)
queries = torch.nn.functional.normalize(torch.randn(q, d, generator=gen), dim=1)
ranges = [shard_range(n, r, comm.world) for r in range(comm.world)]
start, stop = ranges[comm.rank]
shard = Shard(MemoryBank(cells[start:stop].clone(), labels[start:stop]), ranges, comm.rank)
shard.refresher = ShardRefresher(comm, shard.memory.embeddings, IndexParams(kind=sys.argv[2]), k=k, rebuild_every=None)
mode = ShardedMemory(make_config(None, topk=k - 1), None, None, shard, comm, 5)
# Every rank asks for the same queries: all must get the same k cells in the same order.
scores, ids = mode.search(torch.cat([queries] * comm.world), [q] * comm.world, k)
fetched, fetched_labels, rows = mode.fetch(ids)
out = {"ids": ids.tolist(), "scores": scores.tolist(), "fetched_ok": torch.equal(fetched[rows], cells[ids]),
       "labels_ok": torch.equal(fetched_labels[rows], labels[ids]), "sent": dict(comm.traffic.sent)}
if comm.rank == 0:  # one process's exact top-k over the whole memory, equal scores by smaller id
    exact = queries @ cells.T
    by_id = torch.arange(n).expand(q, n)
    order = exact.argsort(dim=1, descending=True, stable=True)[:, :k]
    out["exact_ids"] = by_id.gather(1, order).tolist()
open(f"{sys.argv[1]}/rank{comm.rank}.json", "w").write(json.dumps(out))
comm.barrier()
torch.distributed.destroy_process_group()  # as training does: no rank tears gloo down while another talks
"""


@pytest.mark.parametrize("kind", ["torch", "flat"])
def test_every_rank_merges_the_single_process_topk(tmp_path, kind):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    job = torchrun(str(script), str(tmp_path), kind)
    assert job.returncode == 0, job.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["ids"] == r1["ids"] and r0["scores"] == r1["scores"]  # the same cells, in the same order
    assert r0["ids"] == r0["exact_ids"]  # ...and the ones a single process finds, ties by smaller id
    assert all(r[key] for r in (r0, r1) for key in ("fetched_ok", "labels_ok"))
    # The candidates and cells crossed ranks: each rank sent its shard's share.
    assert r0["sent"]["candidates"] > 0 and r1["sent"]["cells"] > 0


@pytest.mark.parametrize("fault", ["shard-1:2", "step-0:16"])
def test_a_lost_rank_stops_the_job_and_resume_reaches_the_uninterrupted_result(two_ranks, tmp_path, fault):
    # shard-1:2: rank 1 dies after writing its shard of epoch 2, before the commit that would name it;
    # step-0:16: rank 0 dies in epoch 3. Either way the job stops, and epoch 2's... or 1's checkpoint stands.
    out = tmp_path / "run"
    job = train_job(out, fault=fault, index="torch")
    assert job.returncode != 0
    assert "exitcode  : -9" in job.stderr  # torchrun names the rank that was killed
    committed = load_tensors(RunDir(out).checkpoint)
    assert committed["epoch"] == (1 if fault.startswith("shard") else 2)
    # The last complete generation reads whole, in a single process too.
    result = CliRunner().invoke(main, ["evaluate", "--run", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["accuracy"] == \
        RunDir(two_ranks).load_metrics()[committed["epoch"] - 1]["test_acc"]
    job = train_job(out, "--resume", index="torch")
    assert job.returncode == 0, job.stderr[-3000:]
    a, b = weights(out), weights(two_ranks)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert losses(out) == losses(two_ranks)
