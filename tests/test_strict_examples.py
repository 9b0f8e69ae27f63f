"""The example scripts with --device gpu, on the strict CPU stand-in for CuPy.

``python examples/train_mnist.py --device gpu`` is npflow's headline use; here it (and
train_toy.py) run end to end (training, checkpoint, samples, final evaluation) with device
arrays that refuse numpy, so an edge that forgets to_host, or a numpy call on model data in the
script, fails at its line. Tiny settings; on real CuPy (--device-backend cupy) the same runs.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from test_train_mnist import SMALL, _write_idx

HERE = os.path.dirname(os.path.abspath(__file__))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "examples",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--labels"], ["--method", "toflow+rnode"]],
                         ids=["ffjord", "labels", "toflow+rnode"])
def test_train_mnist_runs_on_the_device(device, tmp_path, extra):
    _write_idx(str(tmp_path / "data" / "mnist"))
    save = str(tmp_path / "run")
    with device.track() as t:
        rc = _script("train_mnist").main(SMALL + extra + [
            "--device", "gpu", "--data-dir", str(tmp_path / "data"), "--max-iters", "2",
            "--save", save])
    assert rc == 0
    assert os.path.isfile(os.path.join(save, "checkpoint.h5"))
    if t is not None:
        print(f"train_mnist {extra}: {len(t.syncs)} host syncs in the whole run")


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_train_toy_runs_on_the_device(device, tmp_path, solver):
    rc = _script("train_toy").main([
        "--dims", "8-8", "--batch-size", "16", "--log-every", "2", "--test-n", "50",
        "--solver", solver, "--niters", "2", "--device", "gpu", "--viz-n", "100",
        "--save", str(tmp_path / "run")])
    assert rc == 0
    with open(tmp_path / "run" / "result.json") as fh:
        assert np.isfinite(json.load(fh)["test_nll"])


def test_train_tabular_otflow_runs_on_the_device(device, tmp_path):
    from test_train_tabular import TINY
    rc = _script("train_tabular").main(["--data", "8gaussians", "--device", "gpu",
                                        "--save", str(tmp_path / "run")] + TINY)
    assert rc == 0
