"""Training-step cost against memory size N: sparse reads per index back-end, dense read, support sampling.

    python benchmarks/scaling.py                          # N = 1e4..1e7, then 3 CIFAR-10 (JPEG) epochs each
    python benchmarks/scaling.py --sizes 1e4,1e5,1e6      # without N = 1e7 (its ivfpq build dominates)
    python benchmarks/scaling.py --quick                  # smoke run: N = 1e4, 1e5, synthetic throughput
    python benchmarks/scaling.py --device cuda --kinds torch,ivf,ivfpq --out results/scaling-<gpu>.json

Sparse access should make a step cost about the same at N = 1e4 and 1e7. On synthetic clustered, unit-norm
cells (d=128, batch B=256, K=256) each row times, encoder excluded (median after warm-ups):
  sparse          the training search of K+1 (IndexRefresher.search: IVF at its training depth, ivfpq with
                  its lighter re-rank) + sparse_read forward/backward w.r.t. u (own cell masked) + write
  dense           dense_read forward/backward over all N cells (chunked); skipped where a step passes ~10 s
  support-sample  the seed's read: dense softmax over M=1e4 support embeddings (random cells stand in)
step_ms_with_encoder adds the measured conv1 forward/backward of B images (and of M more for support-sample).
Rows also give build_s, bytes_per_cell, peak_rss_mb and inference queries_per_s; log-log slopes of step_ms
against N are printed (sparse should be near 0, dense near 1). --throughput (on by default) then times whole
training epochs, sam-cls (index rebuild included) against the same encoder as a plain softmax classifier
(medians over epochs; the ratio is the median of each epoch's side-by-side ratio).
Writes results/scaling.json (rows, machine, command line) and results/scaling.png.
With --device cuda the memory, queries, reads, encoder and both trainers live on the GPU; "torch" searches
there exactly, and faiss indices search there with faiss-gpu, else on the host CPU (queries copied over).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    CIFAR10_DIR,
    CLUSTERS,
    ETA,
    INDEX_BYTES,
    NUM_CLASSES,
    REPEATS,
    TEMPERATURE,
    WARMUP,
    B,
    D,
    K,
    available_ram,
    conv1_run,
    make_bank,
    make_batches,
    median_ms,
    now,
    peak_gpu_mb,
    peak_rss_mb,
    reset_peaks,
    sparse_step,
    trainer,
    training_refresher,
    write_report,
)

from sam_cls.index import IndexParams
from sam_cls.memory import MemoryBank
from sam_cls.model import build_encoder
from sam_cls.read import class_log_probs, dense_read, sparse_read

# ----------------------------------------------------------------------------- hyper-parameters, all here
# (D, B, K, classes, temperature, eta and the synthetic cells' clusters and query noise: common.py)
SUPPORT_M = 10_000  # the seed method's support sample, re-encoded every batch
QUICK_REPEATS = 3  # --quick: timed repeats a row (else common.REPEATS), after common.WARMUP warm-ups
DENSE_MAX_STEP_S = 10.0  # skip dense where a step would take longer (linear estimate from a smaller N)
DENSE_CHUNK = {"cpu": 8192, "cuda": 1 << 18}  # cells per dense chunk: cache-sized on a CPU, 256 MB of scores on a GPU
KINDS = ("flat", "ivf", "ivfpq", "hnsw", "torch")
DEFAULT_SIZES = "1e4,1e5,1e6,1e7"
# From BIG_N cells on only the IVF kinds, whose lists hold 8-bit or 4-bit PQ codes: exact search would take
# seconds a step, and an HNSW graph hours to build on a few cores. HNSW stops at HNSW_MAX_N for that reason.
BIG_N, BIG_KINDS, HNSW_MAX_N = 10**7, ("ivf", "ivfpq"), 10**6
BIG_KINDS_CUDA = ("ivfpq", "torch")  # on a GPU an exact scan of 1e7 cells takes tens of ms, not seconds
QUICK_SYNTHETIC_TRAIN = 768  # --quick throughput: a few hundred 3x32x32 synthetic images (K=256 fits)


# ----------------------------------------------------------------------------- measuring
def encoder_ms(repeats: int, device: str) -> float:
    """Forward + backward of the conv1 encoder on B uint8 32x32x3 images: the cost every method adds."""
    enc = build_encoder("conv1", (3, 32, 32), D, torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
    x = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8).to(device)
    grad = torch.randn(B, D).to(device)

    def step(_: int) -> None:
        enc.zero_grad(set_to_none=True)
        (enc(x) * grad).sum().backward()

    return median_ms(step, repeats)


# ----------------------------------------------------------------------------- one row per method
def sparse_row(bank: MemoryBank, kind: str, batches: tuple, repeats: int, seed: int,
               nlist: int | None) -> dict:
    """Search K+1, sparse read forward/backward, write: the step whose cost should not grow with N."""
    idx, queries = batches
    reset_peaks()
    start = now()
    params = IndexParams(kind=kind, nlist=nlist, device=bank.embeddings.device.type)
    refresher = training_refresher(bank, params, seed)
    index = refresher.index
    build_s = now() - start

    @torch.no_grad()
    def infer(i: int) -> None:
        _, ids = index.search(queries[i], K)
        sparse_read(queries[i], ids, bank.embeddings, bank.labels, NUM_CLASSES, TEMPERATURE)

    step_ms = median_ms(lambda i: sparse_step(bank, refresher, idx[i], queries[i], i), repeats)["total"]
    infer_ms = median_ms(infer, repeats)
    peak = peak_rss_mb()  # read before saving: serialising makes a transient copy of the index
    with tempfile.TemporaryDirectory() as tmp:  # saved file / N: what the index holds resident
        index.save(Path(tmp) / "index.bin")
        per_cell = (Path(tmp) / "index.bin").stat().st_size / bank.size
    return {"method": "sparse", "index": kind, "step_ms": step_ms, "build_s": round(build_s, 3),
            # sparse_read and the writes use the float32 MemoryBank whatever the index compresses
            "bytes_per_cell": round(per_cell + 4 * D, 1), "index_bytes_per_cell": round(per_cell, 1),
            "storage": f"float32 memory ({4 * D} B) + {kind} index",
            "queries_per_s": round(B / infer_ms * 1e3, 1), "peak_rss_mb": peak, "peak_gpu_mb": peak_gpu_mb(),
            "description": index.description, "train_nprobe": getattr(index, "train_nprobe", None)}


def dense_row(bank: MemoryBank, batches: tuple, repeats: int) -> dict:
    """dense_read over every cell, forward and backward: the exact read the sparse one approximates."""
    idx, queries = batches
    chunk = DENSE_CHUNK[bank.embeddings.device.type]
    reset_peaks()

    def step(i: int) -> None:
        u, own = queries[i].clone().requires_grad_(), bank.rows[idx[i]]
        log_probs = dense_read(u, bank.embeddings, bank.labels, NUM_CLASSES, TEMPERATURE, exclude_ids=own,
                               chunk=chunk)
        F.nll_loss(log_probs, bank.labels[own]).backward()
        bank.write(idx[i], u.detach(), ETA, step=i)  # training writes the batch's cells in every read mode

    @torch.no_grad()
    def infer(i: int) -> None:
        dense_read(queries[i], bank.embeddings, bank.labels, NUM_CLASSES, TEMPERATURE, chunk=chunk)

    step_ms, infer_ms = median_ms(step, repeats), median_ms(infer, repeats)
    return {"method": "dense", "index": None, "step_ms": step_ms, "build_s": None, "bytes_per_cell": 4 * D,
            "storage": "float32 memory", "queries_per_s": round(B / infer_ms * 1e3, 1),
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "chunk": chunk}


def support_row(bank: MemoryBank, batches: tuple, repeats: int) -> dict:
    """The seed's read: softmax over M random support embeddings, gradients to the queries and the support."""
    idx, queries = batches
    m = min(SUPPORT_M, bank.size)
    gen = torch.Generator().manual_seed(0)
    reset_peaks()

    def step(i: int) -> None:
        # randint, not the trainer's randperm(N)[:M]: an O(N) draw a step is not the method's cost
        support = torch.randint(bank.size, (m,), generator=gen).to(bank.embeddings.device)
        s = bank.embeddings[support].clone().requires_grad_()  # stands in for the M re-encoded images
        u, own = queries[i].clone().requires_grad_(), bank.rows[idx[i]]
        scores = (u @ s.T / TEMPERATURE).masked_fill(support[None, :] == own[:, None], float("-inf"))
        log_probs = class_log_probs(scores, bank.labels[support][None, :], NUM_CLASSES)
        F.nll_loss(log_probs, bank.labels[own]).backward()

    return {"method": "support-sample", "index": None, "step_ms": median_ms(step, repeats), "build_s": None,
            "bytes_per_cell": None, "storage": f"no memory: re-encodes {m} support images a step",
            "queries_per_s": None, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "support_m": m}


# ----------------------------------------------------------------------------- whole-epoch throughput
def throughput(args: argparse.Namespace) -> dict | None:
    """Images/s of whole training epochs, sam-cls (with its per-epoch index rebuild) against plain softmax."""
    run = conv1_run(args.data_dir, args.quick, QUICK_SYNTHETIC_TRAIN, required=False,
                    epochs=args.epochs_throughput, seed=args.seed, device=args.device)
    if run is None:
        print(f"throughput: not run: data absent ({args.data_dir}/train)")
        return None
    options, name = run
    sam, soft = trainer(options), trainer(options, head="softmax")
    images = len(sam.memory.labels)
    epochs: list[dict] = []
    for _ in range(args.epochs_throughput):  # interleaved, so drifting machine load hits both alike
        t0 = now()
        sam.train_epoch()
        t1 = now()
        sam.refresher.rebuild("epoch")  # the rebuild each sam-cls epoch needs (fit does it before evaluation)
        t2 = now()
        soft.train_epoch()
        epochs.append({"sam_cls_images_per_s": round(images / (t2 - t0), 1), "rebuild_s": round(t2 - t1, 2),
                       "softmax_images_per_s": round(images / (now() - t2), 1)})
        epochs[-1]["ratio"] = round(epochs[-1]["sam_cls_images_per_s"] / epochs[-1]["softmax_images_per_s"], 3)

    def median(key: str) -> float:
        return round(float(np.median([e[key] for e in epochs])), 3)

    # Medians over epochs; the ratio is the median of each epoch's side-by-side ratio.
    return {"sam_cls_images_per_s": median("sam_cls_images_per_s"), "softmax_images_per_s": median("softmax_images_per_s"),
            "ratio": median("ratio"), "dataset": name, "encoder": "conv1", "epochs": args.epochs_throughput,
            "train_images": images, "device": args.device,
            "index": sam.refresher.description, "rebuild_s_per_epoch": median("rebuild_s"),
            "per_epoch": epochs}


# ----------------------------------------------------------------------------- reporting
def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped per method/index, each sorted by N."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"] + (f"/{r['index']}" if r["index"] else ""), []).append(r)
    return {k: sorted(v, key=lambda r: r["n_cells"]) for k, v in out.items()}


def slopes(rows: list[dict]) -> list[dict]:
    """Least-squares slope of log(step_ms) on log(N) per series: ~0 is flat, ~1 is linear in N."""
    out = []
    for name, group in series(rows).items():
        if len(group) < 2:
            continue
        log_n = np.log([r["n_cells"] for r in group])
        fit = {key: float(np.polyfit(log_n, np.log([r[key] for r in group]), 1)[0])
               for key in ("step_ms", "step_ms_with_encoder")}
        out.append({"series": name, "slope": round(fit["step_ms"], 3),
                    "slope_with_encoder": round(fit["step_ms_with_encoder"], 3),
                    "n_min": group[0]["n_cells"], "n_max": group[-1]["n_cells"],
                    "ratio_max_over_min": round(group[-1]["step_ms"] / group[0]["step_ms"], 3)})
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Log-log step time against N, encoder excluded and included, one line per method/index."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, title in zip(axes, ("step_ms", "step_ms_with_encoder"),
                              ("training step, encoder excluded", "training step, conv1 encoder included")):
        for name, group in series(rows).items():
            ax.loglog([r["n_cells"] for r in group], [r[key] for r in group], "o-", label=name)
        ax.set(xlabel="memory cells N", ylabel="ms per step (B=256)", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="comma-separated N (default 1e4,1e5,1e6,1e7; --quick 1e4,1e5)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="index back-ends for the sparse rows")
    ap.add_argument("--big-n", type=float, default=BIG_N, help="from this N on, only --big-kinds")
    ap.add_argument("--big-nlist", type=int, help="IVF lists from --big-n on (default 4 sqrt(N): slow k-means)")
    ap.add_argument("--repeats", type=int, help=f"timed repeats after {WARMUP} warm-ups (default {REPEATS})")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--data-dir", default=CIFAR10_DIR, help="imagefolder for --throughput")
    ap.add_argument("--epochs-throughput", type=int, default=3, help="epochs (medians quoted) for --throughput")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ram-gib", type=float, help="RAM to plan sizes for (default: what the kernel says is free)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where memory, reads and encoder run")
    ap.add_argument("--out", default="results/scaling.json", help="JSON; the plot goes beside it as .png")
    ap.add_argument("--quick", action="store_true", help="N = 1e4, 1e5, fewer repeats, synthetic throughput")
    args = ap.parse_args()
    sizes = [int(float(x)) for x in (args.sizes or ("1e4,1e5" if args.quick else DEFAULT_SIZES)).split(",")]
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    kinds = [s for s in args.kinds.split(",") if s]
    if bad := sorted(set(kinds) - set(KINDS)):
        ap.error(f"unknown index kind(s) {', '.join(bad)}: choose from {', '.join(KINDS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device: use --device cpu")
    ram = partial(available_ram, args.ram_gib)  # bytes free for the next size, so one that would swap is skipped
    torch.manual_seed(args.seed)
    out = Path(args.out)
    enc_ms = encoder_ms(repeats, args.device)
    settings = {"dim": D, "batch": B, "k": K, "classes": NUM_CLASSES, "clusters": CLUSTERS, "eta": ETA,
                "temperature": TEMPERATURE, "support_m": SUPPORT_M, "warmup": WARMUP, "repeats": repeats,
                "device": args.device, "big_nlist": args.big_nlist}
    report: dict = {"settings": settings,
                    "encoder_ms": {"conv1_fwd_bwd_batch": round(enc_ms, 2),
                                   "added": "to every row; support-sample adds (B + M) / B times it"},
                    "steps": [], "skipped": [], "slopes": [], "throughput": None}
    rows = report["steps"]

    def skip(n: int, what: str, why: str) -> None:
        print(f"{n:>9} {what:<22} skipped: {why}", flush=True)
        report["skipped"].append({"n_cells": n, "what": what, "why": why})

    def save() -> None:  # after every row, so a run that is stopped keeps what it measured
        write_report(report, out, quiet=True)

    print(f"conv1 encoder forward+backward, B={B}: {enc_ms:.1f} ms (added to every row)")
    print(f"{'n_cells':>9} {'method/index':<22} {'step_ms':>9} {'+enc_ms':>9} {'build_s':>8} {'B/cell':>7} "
          f"{'q/s':>8} {'peak_MB':>8}" + (f" {'gpu_MB':>8}" if args.device == "cuda" else ""))
    for n in sizes:
        free_gib = ram() / 2**30
        if (need := n * (4 * D + 16) + (3 << 30)) > ram():  # cells, labels, generation temporaries
            skip(n, "all", f"memory needs ~{need / 2**30:.1f} GiB, {free_gib:.1f} GiB available")
            continue
        # cells and labels, and 1 GiB for a step's temporaries (a torch index's copy is checked per kind)
        if args.device == "cuda" and (need := n * (4 * D + 16) + (1 << 30)) > torch.cuda.mem_get_info()[0]:
            skip(n, "all", f"GPU memory needs ~{need / 2**30:.1f} GiB")
            continue
        bank = make_bank(n, args.seed, args.device)
        batches = make_batches(bank, WARMUP + repeats, args.seed)
        jobs: list[tuple[str, str | None]] = []
        big_kinds = BIG_KINDS_CUDA if args.device == "cuda" else BIG_KINDS
        for kind in kinds:
            if n >= args.big_n and kind not in big_kinds:
                skip(n, f"sparse/{kind}", f"N >= --big-n {args.big_n:.0f}: only {','.join(big_kinds)}")
            elif kind == "hnsw" and n > HNSW_MAX_N:
                skip(n, "sparse/hnsw", f"N above {HNSW_MAX_N:.0e} (graph build too slow)")
            # the index, doubled while it is serialised for its size, and 1 GiB of slack
            elif (need := 2 * INDEX_BYTES[kind] * n + (1 << 30)) > ram():
                skip(n, f"sparse/{kind}", f"index needs ~{need / 2**30:.1f} GiB, "
                     f"{ram() / 2**30:.1f} GiB available")
            elif kind == "torch" and args.device == "cuda" and INDEX_BYTES[kind] * n > torch.cuda.mem_get_info()[0]:
                skip(n, "sparse/torch", f"its copy of the cells needs ~{INDEX_BYTES[kind] * n / 2**30:.1f} GiB of GPU")
            else:
                jobs.append(("sparse", kind))
        dense = [r for r in rows if r["method"] == "dense"]
        if dense and (estimate := dense[-1]["step_ms"] / 1e3 * n / dense[-1]["n_cells"]) > DENSE_MAX_STEP_S:
            skip(n, "dense", f"~{estimate:.0f} s a step (linear from {dense[-1]['step_ms'] / 1e3:.1f} s at "
                 f"N={dense[-1]['n_cells']}) > {DENSE_MAX_STEP_S:.0f} s")
        else:
            jobs.append(("dense", None))
        for method, kind in [*jobs, ("support-sample", None)]:
            if method == "sparse":
                nlist = args.big_nlist if n >= args.big_n and kind in ("ivf", "ivfpq") else None
                row = sparse_row(bank, kind, batches, repeats, args.seed, nlist)
            else:
                row = (dense_row if method == "dense" else support_row)(bank, batches, repeats)
            extra = enc_ms * ((B + row["support_m"]) / B if method == "support-sample" else 1)
            row = {"n_cells": n, **row, "step_ms": round(row["step_ms"], 2),
                   "step_ms_with_encoder": round(row["step_ms"] + extra, 2)}
            rows.append(row)
            print(f"{n:>9} {method + (f'/{kind}' if kind else ''):<22} {row['step_ms']:>9.2f} "
                  f"{row['step_ms_with_encoder']:>9.2f} {fmt(row['build_s'], '8.2f'):>8} "
                  f"{fmt(row['bytes_per_cell'], '7.1f'):>7} {fmt(row['queries_per_s'], '8.0f'):>8} "
                  f"{row['peak_rss_mb']:>8.0f}" + (f" {row['peak_gpu_mb']:>8.0f}" if args.device == "cuda" else ""),
                  flush=True)
            save()
            gc.collect()  # drop the row's index before the next is built
        del bank, batches
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()  # so the next size's GPU check sees the freed memory

    report["slopes"] = slopes(rows)
    print("\nslope of log(step_ms) on log(N) (sparse should be ~0, dense ~1):")
    for s in report["slopes"]:
        print(f"  {s['series']:<22} slope {s['slope']:+.3f} (with encoder {s['slope_with_encoder']:+.3f})   "
              f"step_ms(N={s['n_max']}) / step_ms(N={s['n_min']}) = {s['ratio_max_over_min']:.2f}")
    if rows:
        plot(rows, out.with_suffix(".png"))
    save()
    if args.throughput:
        report["throughput"] = t = throughput(args)
        if t:
            print(f"\nthroughput, {t['dataset']}, conv1, median of {t['epochs']} epoch(s) on {t['device']}: sam-cls "
                  f"{t['sam_cls_images_per_s']:.0f} img/s (index rebuild {t['rebuild_s_per_epoch']:.1f} s an "
                  f"epoch included), softmax {t['softmax_images_per_s']:.0f} img/s, ratio {t['ratio']:.2f}")
        save()
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
