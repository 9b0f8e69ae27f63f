"""Shared by the example tests: load an example script as a module, and write tiny MNIST-format
files (the four standard gzipped IDX files) for the examples to read."""
import gzip
import importlib.util
import os
import struct

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    """examples/<name>.py as a module (its main() can then be called in-process)."""
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_idx(folder, n_train, n_test, labels="random"):
    """train-/t10k- images (random bytes, 28×28) and labels into ``folder``; labels "random"
    (uniform 0-9) or "cycle" (0, 1, ..., 9, 0, ...: every class present)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = (rng.integers(0, 10, n) if labels == "random" else np.arange(n) % 10).astype(np.uint8)
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + y.tobytes())
