"""examples/train_mnist.py end to end on tiny IDX files of its own (no real data, no network):
a short run writes a checkpoint, samples and the test bits/dim; an interrupted run resumed from
its checkpoint ends exactly where an uninterrupted one does; --device gpu without a GPU gives
the clear DeviceError message."""
import json
import os

import numpy as np
import pytest

from example_files import load_example, write_idx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_script():
    return load_example("train_mnist")


def _write_idx(folder, n_train=12, n_test=6):
    write_idx(folder, n_train, n_test)


SMALL = ["--dims", "4", "--num-blocks", "1", "--scales", "2", "--steps", "1",
         "--batch-size", "3", "--log-every", "1", "--warmup", "2", "--test-batch", "6",
         "--n-samples", "4"]


@pytest.fixture
def data_dir(tmp_path):
    _write_idx(str(tmp_path / "data" / "mnist"))
    return str(tmp_path / "data")


@pytest.mark.parametrize("method", ["ffjord", "rnode", "toflow", "steer"])
def test_short_run_writes_checkpoint_samples_and_test_bpd(tmp_path, data_dir, method, capsys):
    mod = _load_script()
    save = str(tmp_path / "run")
    log = str(tmp_path / "log.jsonl")
    rc = mod.main(SMALL + ["--data-dir", data_dir, "--niters", "2", "--save", save,
                           "--method", method, "--log-json", log,
                           "--no-figures" if method != "ffjord" else "--sample-every=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "s/it" in out and "left" in out
    assert os.path.isfile(os.path.join(save, "checkpoint.h5"))
    res = json.load(open(os.path.join(save, "result.json")))
    assert np.isfinite(res["test_bpd"]) and res["test_n"] == 6
    last = [json.loads(line) for line in open(log)][-1]
    assert last["test_bpd"] == res["test_bpd"]
    if method == "ffjord":
        assert os.path.isfile(os.path.join(save, "samples.png"))
        assert os.path.isfile(os.path.join(save, "samples_iter000002.png"))
    if method == "toflow":
        assert len(res["T"]) == 3 and res["T"] != [1.0, 1.0, 1.0]


def test_resume_continues_exactly(tmp_path, data_dir):
    mod = _load_script()
    import npflow.checkpoint  # noqa: F401
    from npflow.checkpoint import read_params
    common = SMALL + ["--data-dir", data_dir, "--no-figures", "--method", "toflow",
                      "--test-n", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert mod.main(common + ["--niters", "3", "--save", a]) == 0
    assert mod.main(common + ["--niters", "2", "--save", b]) == 0
    assert mod.main(common + ["--niters", "3", "--save", b, "--resume"]) == 0
    pa = read_params(os.path.join(a, "checkpoint.h5"))
    pb = read_params(os.path.join(b, "checkpoint.h5"))
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


@pytest.mark.parametrize("cupy", ["as installed", "missing"])
def test_gpu_without_cupy_or_gpu_is_a_clear_error(capsys, data_dir, monkeypatch, cupy):
    """The same one-line message whether CuPy is installed (no GPU) or not."""
    if cupy == "missing":
        import sys
        monkeypatch.setitem(sys.modules, "cupy", None)     # import cupy -> ImportError
    mod = _load_script()
    with pytest.raises(SystemExit) as exc:
        mod.main(["--device", "gpu", "--data-dir", data_dir, "--niters", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "device='gpu'" in err and "--device cpu" in err
    assert len(err.strip().splitlines()) == 1          # no usage text before the error


def test_missing_data_names_the_folder(tmp_path, capsys):
    """One line naming the folder, all four missing files (not only the training ones) and
    what exists to get them (the download, docs/data.md), no tools script outside the repo."""
    mod = _load_script()
    with pytest.raises(SystemExit) as exc:
        mod.main(SMALL + ["--data-dir", str(tmp_path / "nowhere"), "--niters", "1",
                          "--no-download", "--save", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "nowhere" in err
    assert len(err.strip().splitlines()) == 1
    for name in mod.MNIST_FILES:
        assert name in err
    assert "without --no-download" in err and "docs/data.md" in err
    assert "shared/tools" not in err
    assert os.path.exists(os.path.join(ROOT, "docs", "data.md"))


def test_labels_as_data_round_trip_and_run(tmp_path, data_dir):
    mod = _load_script()
    x = np.zeros((10, 1, 4, 4), np.uint8)
    xl = mod.label_channel(x, np.arange(10))
    assert xl.shape == (10, 2, 4, 4)
    # dequantized levels (x + ½)/256 of the label channel read back as the label
    np.testing.assert_array_equal(mod.read_labels((xl + 0.5) / 256), np.arange(10))
    save = str(tmp_path / "lab")
    assert mod.main(SMALL + ["--data-dir", data_dir, "--niters", "1", "--labels",
                             "--save", save]) == 0
    assert os.path.isfile(os.path.join(save, "samples.png"))
