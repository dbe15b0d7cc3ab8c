"""What a background index rebuild saves: one training epoch with frequent rebuilds, in the foreground
(training waits for each build) against the background (a worker thread builds, training keeps searching
the current index, then swaps), side by side in one run.

    python benchmarks/ablations/refresh_bench.py                                   # MNIST from ../shared/data
    python benchmarks/ablations/refresh_bench.py --dataset synthetic --quick       # smoke run, no files needed

Writes results/refresh_bench.json.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

from common import now, trainer, write_report

# ----------------------------------------------------------------------------- hyper-parameters, all here
# Frequent rebuilds make the cost visible; IVF has a real build (training the quantizer) to hide.
REBUILD_EVERY = 25
INDEX = "ivf"


def one_epoch(base: dict, background: bool) -> dict:
    """Seconds of one epoch and of the rebuilds in it, for one refresh mode."""
    t = trainer(base, background_rebuild=background)
    start = now()
    t.train_epoch()
    seconds = now() - start
    t.refresher.close()
    history = t.refresher.history
    return {"background": background, "epoch_s": seconds, "rebuilds": len(history),
            "rebuild_s_total": sum(r["seconds"] for r in history)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--repeats", type=int, default=3, help="epochs per mode, interleaved; medians reported")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="results/refresh_bench.json")
    args = p.parse_args()
    base = {"dataset": args.dataset, "data_dir": args.data_dir, "encoder": "conv1", "topk": 256, "epochs": 1,
            "index": INDEX, "rebuild_every": str(REBUILD_EVERY), "device": "cpu", "seed": 0}
    if args.quick:
        base.update(synthetic_train=4000, synthetic_shape=[1, 16, 16], encoder="linear", rebuild_every="5")
        args.repeats = 1
    runs = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both modes alike
        for background in (False, True):
            runs[background].append(one_epoch(base, background))
    rows = []
    for background, group in runs.items():
        rows.append({"mode": "background" if background else "foreground",
                     "epoch_s": round(statistics.median(r["epoch_s"] for r in group), 2),
                     "rebuilds": statistics.median(r["rebuilds"] for r in group),
                     "rebuild_s_total": round(statistics.median(r["rebuild_s_total"] for r in group), 2)})
    fg, bg = rows
    saved = fg["epoch_s"] - bg["epoch_s"]
    print(f"{'mode':<12}{'epoch s':>9}{'rebuilds':>10}{'build s':>9}")
    for r in rows:
        print(f"{r['mode']:<12}{r['epoch_s']:>9.2f}{r['rebuilds']:>10}{r['rebuild_s_total']:>9.2f}")
    print(f"background saves {saved:.2f} s an epoch ({100 * saved / fg['epoch_s']:.1f}%), "
          f"epoch time ratio background/foreground {bg['epoch_s'] / fg['epoch_s']:.3f}")
    write_report({"dataset": args.dataset, "index": INDEX, "rebuild_every": base["rebuild_every"],
                  "repeats": args.repeats, "rows": rows, "saved_s_per_epoch": round(saved, 2),
                  "ratio": round(bg["epoch_s"] / fg["epoch_s"], 3)}, args.out)


if __name__ == "__main__":
    main()
