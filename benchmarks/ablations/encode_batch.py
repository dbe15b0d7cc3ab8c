"""Encoding a whole training split on a CPU in batches of 128 against batches of 1,024 (the old default).

    python benchmarks/ablations/encode_batch.py            # MNIST conv1, CIFAR-10 (JPEG copy) conv1 and cnn
    python benchmarks/ablations/encode_batch.py --quick    # synthetic images, a few seconds

Each case builds a trainer's untrained encoder over its data (as a run's first encoding sees it) and times
`sam_cls.evaluate.encode_all` over the training images at each batch size, alternating, ROUNDS times; medians.
The encoder's batch is forced through `encode_batch`'s cap, so both sizes really run. Writes
results/encode_batch.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

from common import CIFAR10_DIR, write_report

from sam_cls import evaluate
from sam_cls.config import make_config
from sam_cls.train import Trainer

# ----------------------------------------------------------------------------- hyper-parameters, all here
BATCHES = (128, 1024)
ROUNDS = 3
CNN_IMAGES = 10_000  # the cnn encodes slowly: a fifth of CIFAR-10's training split is enough to time it


def cases(args: argparse.Namespace) -> list[tuple[str, dict, int | None]]:
    if args.quick:
        synthetic = {"dataset": "synthetic", "synthetic_train": 2048, "synthetic_test": 64}
        return [("synthetic 1x28x28 conv1", {**synthetic, "synthetic_shape": [1, 28, 28], "encoder": "conv1"}, None)]
    cifar = {"dataset": "imagefolder", "data_dir": args.cifar10_dir}
    return [("MNIST conv1", {"dataset": "mnist", "data_dir": args.mnist_dir, "encoder": "conv1"}, None),
            ("CIFAR-10 conv1", {**cifar, "encoder": "conv1"}, None),
            ("CIFAR-10 cnn", {**cifar, "encoder": "cnn"}, CNN_IMAGES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist-dir", default="../shared/data", help="folder holding MNIST/raw")
    ap.add_argument("--cifar10-dir", default=CIFAR10_DIR)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/encode_batch.json")
    args = ap.parse_args()
    evaluate.CPU_ENCODE_BATCH = max(BATCHES)  # the cap would turn 1,024 into 128: lift it for the comparison
    rows = []
    for name, options, limit in cases(args):
        t = Trainer(make_config(None, **options, device="cpu"), log=lambda line: None)
        images = t.train_x[:limit]
        seconds: dict[int, list[float]] = {b: [] for b in BATCHES}
        for _ in range(ROUNDS):
            for b in BATCHES:  # alternating, so drifting load hits both alike
                start = time.perf_counter()
                evaluate.encode_all(t.encoder, images, b)
                seconds[b].append(time.perf_counter() - start)
        per_s = {b: round(len(images) / statistics.median(s), 1) for b, s in seconds.items()}
        rows.append({"case": name, "images": len(images), "images_per_s": per_s,
                     "ratio_128_to_1024": round(per_s[128] / per_s[1024], 3)})
        print(f"{name:24s} {len(images):6d} images  " + "  ".join(f"batch {b}: {v:8.0f}/s" for b, v in per_s.items())
              + f"  ratio {rows[-1]['ratio_128_to_1024']:.2f}", flush=True)
    write_report({"rounds": ROUNDS, "batches": list(BATCHES), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
