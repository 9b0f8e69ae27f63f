"""Image data sets: MNIST, Fashion-MNIST (gzipped IDX files) and CIFAR-10 (python batches).

docs/data.md, section 3. The loaders read ``DATA_DIR/mnist/``, ``DATA_DIR/fashion-mnist/`` and
``DATA_DIR/cifar10/cifar-10-batches-py/`` (DESIGN.md section 7) and return raw uint8 pixels;
dequantization, the logit transform and bits/dim belong to the image model, not here.

Files that are present are read without a checksum (copies made by
other means, e.g. re-encoded by an offline mirror, and differ byte-wise from the official files); their
format is checked instead (IDX magic numbers, sizes, label range). Missing files are downloaded
with the published SHA-256 (npflow.data.download); offline, DataError names the files and the
folder to put them in.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from .download import DataError, ensure_files, extract_tar, safe_unpickle
from .download import download as _download_file

__all__ = ["load_mnist", "load_cifar10", "read_idx", "MNIST_FILES", "IMAGE_KINDS"]

IMAGE_KINDS = ("mnist", "fashion-mnist")

# file names per split: (images, labels)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Download locations and SHA-256 of the official files, as listed by tensorflow-datasets
# (tensorflow_datasets/url_checksums/mnist.txt and fashion_mnist.txt). The MNIST mirror
# ossci-datasets (used by torchvision) serves LeCun's original files, which have the same sizes
# and MD5s; it is tried second and is held to the same SHA-256.
_MNIST_URLS = ("https://storage.googleapis.com/cvdf-datasets/mnist/",
               "https://ossci-datasets.s3.amazonaws.com/mnist/")
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# CIFAR-10, python version: the official archive and its SHA-256 (the value Keras pins for
# cifar-10-python.tar.gz; its MD5 c58f30108f718f92721af3b95e74349a is the one on the CIFAR page).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                  "test": ("test_batch",)}

# IDX element types (docs/data.md, eq. 3.1): type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _read_maybe_gzip(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path} is a corrupt or truncated gzip file ({exc}); delete it and download it "
            "again (or copy it again from where it came)") from exc


def read_idx(path: str, expected_magic=None) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into a numpy array (docs/data.md, eq. 3.1).

    Header: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32
    sizes; the data follow in C order. Raises DataError for a wrong magic number, an unknown
    type code, or a size that does not match the header (truncated or padded file).

    Args:
        path: the file.
        expected_magic: the 32-bit magic number required (e.g. 2051 for images), or None.

    Returns:
        array of the header's shape, native byte order.
    """
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(raw)} bytes")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file (magic number 0x{magic:08x}); expected e.g. "
            f"0x{IDX_IMAGES_MAGIC:08x} for images or 0x{IDX_LABELS_MAGIC:08x} for labels")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path} has IDX magic number {magic} (0x{magic:08x}) but {expected_magic} "
            f"(0x{expected_magic:08x}) was expected: images and labels swapped, or a foreign file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        raise DataError(
            f"{path} is {'truncated' if have < need else 'longer than its header says'}: the "
            f"header promises shape {shape} ({need} data bytes) but the file holds {have}; "
            "delete it and download it again (or copy it again from where it came)")
    arr = np.frombuffer(raw, dtype=dtype, count=need // dtype.itemsize, offset=header)
    # a writable array in native byte order (frombuffer over bytes is read-only)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, choices))}")


def _mnist_files(kind: str, split: str):
    base = _MNIST_URLS if kind == "mnist" else _FASHION_URLS
    return [(name, [u + name for u in base], _SHA256[kind][name])
            for name in MNIST_FILES[split]]


def load_mnist(data_dir: str = "data", split: str = "train", kind: str = "mnist",
               download: bool = True, timeout: float = 60.0):
    """MNIST or Fashion-MNIST from ``data_dir/<kind>/`` (docs/data.md, section 3.1).

    Args:
        data_dir: the DATA_DIR folder ("data" by default).
        split: "train" (60,000 images) or "test" (10,000).
        kind: "mnist" or "fashion-mnist".
        download: download missing files from the official locations (SHA-256 checked).
        timeout: seconds per network operation.

    Returns:
        (images, labels): uint8 array (N, 1, 28, 28) with values 0..255, int64 array (N,) in 0..9.
    """
    _check_choice(split, "split", tuple(MNIST_FILES))
    _check_choice(kind, "kind", IMAGE_KINDS)
    folder = os.path.join(data_dir, kind)
    hint = (f". Without web access, copy the gzipped IDX files into {folder}/ by other "
            "means (docs/data.md lists them)")
    img_path, lab_path = ensure_files(folder, _mnist_files(kind, split), download=download,
                                      timeout=timeout, hint=hint)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path} holds images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
                        f"{labels.shape[0]} labels; the two files do not belong together")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{lab_path} holds label {int(labels.max())}, expected 0..9")
    return images.reshape(-1, 1, 28, 28), labels.astype(np.int64)


def _read_cifar_batch(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        batch = safe_unpickle(raw, encoding="bytes")
    except Exception as exc:  # any unpickling failure means a bad file
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({exc}); delete the "
                        "cifar-10-batches-py folder and download again") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch: keys {sorted(batch)}, expected "
                        "'data' and 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' has dtype {data.dtype} and shape {data.shape}, expected "
                        "uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or (labels.size and not
                                             (0 <= labels.min() and labels.max() <= 9)):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images, or labels "
                        "outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str = "data", split: str = "train", download: bool = True,
                 timeout: float = 60.0):
    """CIFAR-10 from ``data_dir/cifar10/cifar-10-batches-py/`` (docs/data.md, section 3.2).

    Missing batches are obtained by downloading the official cifar-10-python.tar.gz (SHA-256
    checked) into ``data_dir/cifar10/``, extracting the six batches, and deleting the archive.

    Args:
        data_dir: the DATA_DIR folder.
        split: "train" (data_batch_1..5, 50,000 images) or "test" (test_batch, 10,000).
        download: allow the download when batches are missing.
        timeout: seconds per network operation.

    Returns:
        (images, labels): uint8 array (N, 3, 32, 32) (channels R, G, B), int64 array (N,).
    """
    _check_choice(split, "split", tuple(_CIFAR_BATCHES))
    folder = os.path.join(data_dir, "cifar10")
    batch_dir = os.path.join(folder, _CIFAR_DIR)
    names = _CIFAR_BATCHES[split]
    missing = [n for n in names if not os.path.isfile(os.path.join(batch_dir, n))]
    if missing:
        all_names = _CIFAR_BATCHES["train"] + _CIFAR_BATCHES["test"]
        if not download:
            raise DataError(
                f"missing CIFAR-10 batch file(s) in {os.path.abspath(batch_dir)}/: "
                f"{', '.join(missing)}; downloading is switched off. Put the python batches "
                f"there by hand ({', '.join(all_names)}, from cifar-10-python.tar.gz at "
                f"{CIFAR10_URL}), or put cifar-10-python.tar.gz into {os.path.abspath(folder)}/")
        archive = os.path.join(folder, "cifar-10-python.tar.gz")
        if not os.path.isfile(archive):
            try:
                _download_file(CIFAR10_URL, archive, CIFAR10_SHA256, timeout=timeout)
            except DataError as exc:
                raise DataError(
                    f"{exc}. Alternatively put the extracted batches ({', '.join(all_names)}) "
                    f"into {os.path.abspath(batch_dir)}/") from exc
        extract_tar(archive, folder, {f"{_CIFAR_DIR}/{n}": os.path.join(_CIFAR_DIR, n)
                                      for n in all_names})
        os.remove(archive)
    parts = [_read_cifar_batch(os.path.join(batch_dir, n)) for n in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return np.ascontiguousarray(images), labels
