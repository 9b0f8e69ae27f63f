"""MNIST / Fashion-MNIST IDX files and CIFAR-10 python batches (docs/data.md, section 3),
on tiny files written here; the download path against a loopback HTTP server."""
import gzip
import hashlib
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from npflow.data import DataError, load_cifar10, load_mnist
from npflow.data import images as images_mod
from npflow.data.images import MNIST_FILES, read_idx
from loopback import serve  # tests/loopback.py




def idx_bytes(arr, magic_code=0x08):
    """IDX encoding of a uint8 array: 0, 0, type code, ndim, big-endian sizes, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, magic_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


def write_mnist(folder, split, n, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, size=n, dtype=np.uint8)
    os.makedirs(folder, exist_ok=True)
    img_name, lab_name = MNIST_FILES[split]
    with gzip.open(os.path.join(folder, img_name), "wb") as f:
        f.write(idx_bytes(imgs))
    with gzip.open(os.path.join(folder, lab_name), "wb") as f:
        f.write(idx_bytes(labs))
    return imgs, labs


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, kind, split):
    imgs, labs = write_mnist(tmp_path / kind, split, 6)
    x, y = load_mnist(str(tmp_path), split=split, kind=kind, download=False)
    assert x.dtype == np.uint8 and x.shape == (6, 1, 28, 28)
    assert x.flags.writeable and x.flags.c_contiguous
    assert y.dtype == np.int64 and y.shape == (6,)
    np.testing.assert_array_equal(x[:, 0], imgs)
    np.testing.assert_array_equal(y, labs)


def test_read_idx_parses_other_element_types_and_plain_files(tmp_path):
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    raw = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 3, 4) + a.tobytes()
    (tmp_path / "a.idx").write_bytes(raw)  # not gzipped
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.idx")), a)


def test_truncated_gzip_is_refused_clearly(tmp_path):
    write_mnist(tmp_path / "mnist", "train", 20)
    p = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_mnist(str(tmp_path), download=False)


def test_truncated_idx_payload_is_refused_clearly(tmp_path):
    write_mnist(tmp_path / "mnist", "train", 4)
    p = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"truncated: the header promises shape \(4, 28, 28\)"):
        load_mnist(str(tmp_path), download=False)


def test_wrong_magic_is_refused_clearly(tmp_path):
    write_mnist(tmp_path / "mnist", "train", 4)
    folder = tmp_path / "mnist"
    # labels where the images should be
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        (folder / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="magic number 2049"):
        load_mnist(str(tmp_path), download=False)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"<html>not found"))
    with pytest.raises(DataError, match="not an IDX file"):
        load_mnist(str(tmp_path), download=False)


def test_images_and_labels_must_match_in_count(tmp_path):
    write_mnist(tmp_path / "mnist", "train", 5)
    with gzip.open(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_mnist(str(tmp_path), download=False)


def test_missing_files_offline_name_files_and_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(str(tmp_path), kind="fashion-mnist", split="test", download=False)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in msg
    assert str(tmp_path / "fashion-mnist") in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist("data", split="val")
    with pytest.raises(ValueError, match="unknown kind"):
        load_mnist("data", kind="kmnist")
    with pytest.raises(ValueError, match="unknown split"):
        load_cifar10("data", split="valid")


def test_mnist_download_with_checksums_from_loopback(tmp_path, monkeypatch):
    served = tmp_path / "server"
    imgs, labs = write_mnist(served, "test", 3, seed=1)
    sums = {n: hashlib.sha256((served / n).read_bytes()).hexdigest() for n in MNIST_FILES["test"]}
    with serve(served) as url:
        monkeypatch.setattr(images_mod, "_MNIST_URLS", (url + "nowhere/", url))
        monkeypatch.setitem(images_mod._SHA256, "mnist", sums)
        x, y = load_mnist(str(tmp_path / "data"), split="test", timeout=5)
    np.testing.assert_array_equal(x[:, 0], imgs)
    np.testing.assert_array_equal(y, labs)
    assert sorted(os.listdir(tmp_path / "data" / "mnist")) == sorted(MNIST_FILES["test"])


def test_mnist_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "server"
    write_mnist(served, "test", 3)
    with serve(served) as url:
        monkeypatch.setattr(images_mod, "_MNIST_URLS", (url,))
        with pytest.raises(DataError, match="checksum mismatch"):
            load_mnist(str(tmp_path / "data"), split="test", timeout=5)
    assert os.listdir(tmp_path / "data" / "mnist") == []


# --- CIFAR-10 ---

def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    # the official batches are Python-2 pickles with byte-string keys
    return {b"batch_label": b"batch", b"labels": labels, b"data": data,
            b"filenames": [b"f%d.png" % i for i in range(n)]}


def write_cifar(batch_dir, n=3):
    os.makedirs(batch_dir, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(n, i)
        with open(os.path.join(batch_dir, name), "wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return batches


def test_cifar_batches_round_trip(tmp_path):
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    x, y = load_cifar10(str(tmp_path), "train", download=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    want = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    np.testing.assert_array_equal(x.reshape(15, -1), want)
    # row layout: 1024 red, then green, then blue values, each 32 rows of 32
    np.testing.assert_array_equal(x[0, 1, 2, 3], want[0, 1024 + 2 * 32 + 3])
    np.testing.assert_array_equal(
        y, sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), []))
    xt, yt = load_cifar10(str(tmp_path), "test", download=False)
    np.testing.assert_array_equal(xt.reshape(3, -1), batches["test_batch"][b"data"])


def test_cifar_refuses_foreign_and_malicious_pickles(tmp_path):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(d)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar10(str(tmp_path), "test", download=False)
    (d / "test_batch").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch"):
        load_cifar10(str(tmp_path), "test", download=False)


def test_cifar_missing_offline_names_files_and_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(str(tmp_path), "test", download=False)
    msg = str(err.value)
    assert "test_batch" in msg and str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg


def test_cifar_download_and_extract_from_loopback(tmp_path, monkeypatch):
    src = tmp_path / "src"
    batches = write_cifar(src / "cifar-10-batches-py", n=2)
    served = tmp_path / "server"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sha = hashlib.sha256((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    with serve(served) as url:
        monkeypatch.setattr(images_mod, "CIFAR10_URL", url + "cifar-10-python.tar.gz")
        monkeypatch.setattr(images_mod, "CIFAR10_SHA256", sha)
        x, y = load_cifar10(str(tmp_path / "data"), "test", timeout=5)
    np.testing.assert_array_equal(x.reshape(2, -1), batches["test_batch"][b"data"])
    folder = tmp_path / "data" / "cifar10"
    assert os.listdir(folder) == ["cifar-10-batches-py"]  # the archive was removed
    assert len(os.listdir(folder / "cifar-10-batches-py")) == 6
