"""Regenerate mnist-mini/ from the real MNIST: the first 500 images of each digit in MNIST's train split and
the first 100 of each digit in its test split (5,000 + 1,000, balanced, in MNIST's own order), written as
gzipped idx files. The output is byte-identical on every run (gzip with mtime 0).

    python sam_cls/assets/make_mnist_mini.py [MNIST_RAW_DIR]    # default: ../shared/data/MNIST/raw

MNIST_RAW_DIR holds the uncompressed {train,t10k}-{images-idx3,labels-idx1}-ubyte files.
"""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

PER_CLASS = {"train": 500, "t10k": 100}
OUT = Path(__file__).with_name("mnist-mini")


def read_idx(data: bytes) -> np.ndarray:
    """An idx file of uint8 (magic 0x0000 0x08 <ndim>, big-endian uint32 dims, then the bytes) as an array."""
    zero, kind, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or kind != 0x08:
        raise ValueError("not an idx file of uint8")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_gz(array: np.ndarray) -> bytes:
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array).tobytes(), compresslevel=9, mtime=0)


def build(raw: Path) -> dict[str, bytes]:
    """File name -> gzipped idx bytes of mnist-mini."""
    files = {}
    for split, per_class in PER_CLASS.items():
        x = read_idx((raw / f"{split}-images-idx3-ubyte").read_bytes())
        y = read_idx((raw / f"{split}-labels-idx1-ubyte").read_bytes())
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
        files[f"{split}-images-idx3-ubyte.gz"] = idx_gz(x[keep])
        files[f"{split}-labels-idx1-ubyte.gz"] = idx_gz(y[keep])
    return files


if __name__ == "__main__":
    raw = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/MNIST/raw")
    for name, blob in build(raw).items():
        (OUT / name).write_bytes(blob)
        print(f"{OUT / name}: {len(blob):,} bytes")
