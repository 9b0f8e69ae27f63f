"""examples/train_vae.py end to end on tiny IDX files of its own (no real data, no network): a
short run writes checkpoint, best parameters, figures and the test −ELBO / NLL; an existing run
folder is refused; bad flags and labels are one-line errors before any training; a resumed run
continues from its checkpoint."""
import gzip
import importlib.util
import json
import os
import struct

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_script():
    path = os.path.join(HERE, "..", "examples", "train_vae.py")
    spec = importlib.util.spec_from_file_location("train_vae", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_idx(folder, n_train=40, n_test=6):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + y.tobytes())


SMALL = ["--hidden", "16", "--z-dim", "4", "--val-n", "10", "--batch-size", "10",
         "--epochs", "2", "--warmup-epochs", "1", "--iwae-k", "5", "--log-every", "1",
         "--no-download"]


@pytest.fixture
def data_dir(tmp_path):
    _write_idx(str(tmp_path / "data" / "mnist"))
    return str(tmp_path / "data")


@pytest.mark.parametrize("flow,extra", [("householder", ["--labels"]),
                                        ("cnf", ["--cnf-hidden", "4", "--cnf-steps", "1"]),
                                        ("none", ["--likelihood", "logistic256"])])
def test_short_run_reports_test_elbo_and_nll(tmp_path, data_dir, flow, extra, capsys):
    mod = _load_script()
    save, log = str(tmp_path / "run"), str(tmp_path / "log.jsonl")
    figs = [] if flow == "householder" else ["--no-figures"]
    rc = mod.main(SMALL + ["--data-dir", data_dir, "--flow", flow, "--save", save,
                           "--log-json", log] + extra + figs)
    assert rc == 0
    out = capsys.readouterr().out
    assert "test −ELBO" in out and "IWAE NLL" in out and "epoch 2/2" in out
    res = json.load(open(os.path.join(save, "result.json")))
    assert np.isfinite(res["test_nelbo"]) and np.isfinite(res["test_nll"])
    assert res["test_nll"] <= res["test_nelbo"] + 5 * res["test_nll_stderr"] + 1.0
    last = [json.loads(line) for line in open(log)][-1]
    assert "test_nll" in last
    if "--likelihood" in extra:
        assert "test_bpd" in res
    for name in ("checkpoint.h5", "best.h5", "state.json"):
        assert os.path.isfile(os.path.join(save, name))
    if not figs:
        for name in ("reconstructions.png", "samples.png", "curves.png"):
            assert os.path.isfile(os.path.join(save, name))


def test_existing_run_is_refused_and_resume_continues(tmp_path, data_dir, capsys):
    mod = _load_script()
    save = str(tmp_path / "run")
    args = SMALL + ["--data-dir", data_dir, "--flow", "planar", "--save", save,
                    "--no-figures"]
    assert mod.main(args) == 0
    with pytest.raises(SystemExit):
        mod.main(args)
    assert "already holds a run" in capsys.readouterr().err
    args3 = [a if a != "2" else "3" for a in args]             # --epochs 3
    assert mod.main(args3 + ["--resume"]) == 0
    state = json.load(open(os.path.join(save, "state.json")))
    assert state["epoch"] == 3 and len(state["val_curve"]) == 3


@pytest.mark.parametrize("flags,message", [
    (["--flow", "radial"], "does not exist"),
    (["--flow", "planar", "--num-flows", "0"], "--num-flows must be >= 1"),
    (["--flow", "none", "--num-flows", "2"], "takes --num-flows 0"),
    (["--likelihood", "gaussian"], "--likelihood"),
    (["--data", "cifar10"], "--data"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, message, capsys):
    mod = _load_script()
    with pytest.raises(SystemExit):
        mod.main(["--save", str(tmp_path / "r")] + flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
    assert not os.path.exists(tmp_path / "r")


def test_labels_outside_the_class_range_and_wrong_image_size_are_refused():
    mod = _load_script()
    args = mod.build_parser().parse_args(["--labels"])
    mod.check_args(args)
    imgs = np.zeros((2, 1, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="0..9"):
        mod.to_rows(imgs, np.array([3, 12]), args)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        mod.to_rows(np.zeros((2, 1, 32, 32), np.uint8), np.array([3, 1]), args)
    rows = mod.to_rows(imgs, np.array([3, 1]), args)
    assert rows.shape == (2, 785)


def test_label_channel_run(tmp_path, data_dir):
    mod = _load_script()
    save = str(tmp_path / "run")
    rc = mod.main(SMALL + ["--data-dir", data_dir, "--flow", "planar", "--labels",
                           "--label-channel", "--save", save, "--no-figures"])
    assert rc == 0
    res = json.load(open(os.path.join(save, "result.json")))
    assert 0.0 <= res["test_label_accuracy"] <= 1.0
