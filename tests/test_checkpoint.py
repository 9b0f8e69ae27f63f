"""HDF5 checkpoints: round trip, atomic writes and refusal of bad files (docs/training.md §4)."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import npflow
from npflow import checkpoint
from npflow.checkpoint import CheckpointError, load, load_training_state
from npflow.model import FlowModel, model_class, register_model
from npflow.optim import Adam, Chain, StepDecay, Warmup


class CkptGauss(FlowModel):
    """Diagonal Gaussian N(mu, exp(log_s)²) with exact loss gradient (a stand-in for a flow)."""

    def __init__(self, dim=2, seed=0, dtype="float64", device="cpu"):
        super().__init__(dict(dim=dim, seed=seed, dtype=dtype, device=device), device, dtype)
        rng = np.random.default_rng(seed)
        self.params = {"mu": self.xp.asarray(rng.normal(size=dim), dtype=self.dtype),
                       "log_s": self.xp.zeros(dim, dtype=self.dtype)}

    def loss_and_grad(self, x, rng):
        mu, ls = self.params["mu"], self.params["log_s"]
        u = (x - mu) * np.exp(-ls)
        nll = 0.5 * (u * u).sum(1) + ls.sum() + 0.5 * x.shape[1] * math.log(2 * math.pi)
        grads = {"mu": -(u * np.exp(-ls)).mean(0), "log_s": (1 - u * u).mean(0)}
        loss = float(nll.mean())
        return loss, grads, {"nll": loss}


def _trained(tmp_path, iters=3):
    model = CkptGauss(dim=3, seed=1)
    opt = Adam({k: v for k, v in model.params.items()}, lr=0.1, weight_decay=1e-4,
               schedule=Chain(Warmup(2), StepDecay(5)))
    rng = np.random.default_rng(7)
    for _ in range(iters):
        x = rng.normal(size=(16, 3)) + 2.0
        _, g, _ = model.loss_and_grad(x, rng)
        model.params = opt.step(model.params, g)
    return model, opt, rng


def test_round_trip_restores_params_optimizer_rng_iteration_extra(tmp_path):
    model, opt, rng = _trained(tmp_path)
    path = tmp_path / "ck.h5"
    hist = {"loss": np.arange(5.0), "note": "hello", "nested": {"a": [1, 2], "b": np.ones(2)}}
    model.save(path, optimizer=opt, rng=rng, iteration=3, extra=hist)
    assert checkpoint.leftover_temporaries(path) == []

    back = npflow.load(path)
    assert type(back) is CkptGauss and back.config == model.config
    for k in model.params:
        np.testing.assert_array_equal(back.params[k], model.params[k])
        assert back.params[k].dtype == model.params[k].dtype

    st = load_training_state(path)
    assert st["iteration"] == 3
    opt2 = Adam({k: np.zeros_like(v) for k, v in model.params.items()}, lr=5.0,
                schedule=Chain(Warmup(2), StepDecay(5)))
    opt2.load_state_dict(st["optimizer"])
    g = {k: np.full_like(v, 0.3) for k, v in model.params.items()}
    a, b = opt.step(model.params, g), opt2.step(back.params, g)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # the restored generator continues the saved stream exactly
    np.testing.assert_array_equal(st["rng"].normal(size=5), rng.normal(size=5))
    np.testing.assert_array_equal(st["extra"]["loss"], hist["loss"])
    assert st["extra"]["note"] == "hello"
    assert st["extra"]["nested"]["a"] == [1, 2]
    np.testing.assert_array_equal(st["extra"]["nested"]["b"], np.ones(2))


def test_keys_with_slashes_and_scalar_params_survive(tmp_path):
    model = CkptGauss()
    model.params = {"block0/mu": model.params["mu"], "T": np.array(0.5)}

    class Odd(CkptGauss):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.params = {"block0/mu": self.params["mu"], "T": np.array(0.0)}

    odd = Odd(dim=2)
    odd.params = model.params
    odd.save(tmp_path / "o.h5")
    back = load(tmp_path / "o.h5")
    assert list(back.params) == ["block0/mu", "T"]
    assert back.params["T"].shape == () and float(back.params["T"]) == 0.5


def test_without_training_state_fields_are_none(tmp_path):
    CkptGauss().save(tmp_path / "m.h5")
    st = load_training_state(tmp_path / "m.h5")
    assert st == {"optimizer": None, "rng": None, "rng_state": None, "iteration": None,
                  "extra": None}


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope.h5")
    (tmp_path / "half.h5.tmp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="interrupted"):
        load(tmp_path / "half.h5")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_file_is_refused(tmp_path, keep):
    model, opt, rng = _trained(tmp_path)
    path = tmp_path / "ck.h5"
    model.save(path, optimizer=opt, rng=rng, iteration=3, extra={"loss": np.zeros(5000)})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt|damaged"):
        load(path)
        load_training_state(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "g.h5"
    path.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(CheckpointError, match="cannot be opened as HDF5"):
        load(path)


def test_foreign_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["weights"] = np.ones(3)
        f.attrs["framework"] = "keras"
    with pytest.raises(CheckpointError, match="not an npflow checkpoint"):
        load(path)
    with pytest.raises(CheckpointError, match="not an npflow checkpoint"):
        load_training_state(path)


def test_version_from_the_future_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    CkptGauss().save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = checkpoint.VERSION + 1
    with pytest.raises(CheckpointError, match="newer npflow"):
        load(path)


def test_params_that_do_not_match_the_config_are_refused(tmp_path):
    path = tmp_path / "p.h5"
    CkptGauss(dim=3).save(path)
    with h5py.File(path, "r+") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["dim"] = 4
        f.attrs["config"] = json.dumps(cfg)
    with pytest.raises(CheckpointError, match=r"mu: expected \(4,\), got \(3,\)"):
        load(path)
    with h5py.File(path, "r+") as f:
        del f["params/0001"]
    with pytest.raises(CheckpointError, match="listed but not stored"):
        load(path)


def test_unknown_model_class_is_refused(tmp_path):
    path = tmp_path / "u.h5"
    CkptGauss().save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["model_class"] = "NoSuchFlow"
    with pytest.raises(CheckpointError, match="unknown model class 'NoSuchFlow'"):
        load(path)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.h5"
    model = CkptGauss(dim=2, seed=3)
    model.save(path, iteration=1)
    good = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing")

    model.params = {k: v + 1 for k, v in model.params.items()}
    monkeypatch.setattr(checkpoint, "_write_tree", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, optimizer={"x": 1}, iteration=2)
    assert path.read_bytes() == good
    assert checkpoint.leftover_temporaries(path) == []
    assert load_training_state(path)["iteration"] == 1


def test_registry_knows_subclasses_and_extra_names():
    assert model_class("CkptGauss") is CkptGauss

    @register_model(name="MyAlias")
    class Aliased(CkptGauss):
        pass

    assert model_class("MyAlias") is Aliased and model_class("Aliased") is Aliased
    with pytest.raises(ValueError, match="registered"):
        model_class("Nope")


def test_load_can_override_the_device(tmp_path):
    CkptGauss().save(tmp_path / "d.h5")
    assert load(tmp_path / "d.h5", device="cpu").device == "cpu"
    with pytest.raises((npflow.DeviceError, ValueError)):
        load(tmp_path / "d.h5", device="tpu")


# --------------------------------------------------------------------------------------------
# temporaries: one per process and call (two writers of one path never share one)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_temporary_name_is_in_the_folder_carries_the_pid_and_is_new_each_call(tmp_path,
                                                                              monkeypatch):
    path = tmp_path / "ck.h5"
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda src, dst: (renamed.append(src), real_replace(src, dst)))
    CkptGauss().save(path, iteration=1)
    CkptGauss().save(path, iteration=2)
    assert len(renamed) == 2 and renamed[0] != renamed[1]
    for src in renamed:
        assert os.path.dirname(src) == str(tmp_path)
        assert src.startswith(str(path) + ".") and src.endswith(".tmp")
        assert f".{os.getpid()}." in os.path.basename(src)
    assert load_training_state(path)["iteration"] == 2
    assert checkpoint.leftover_temporaries(path) == []


WRITER = """import sys
import numpy as np
import npflow
path, who = sys.argv[1], int(sys.argv[2])
m = npflow.OTFlow(2, width=4, steps=2, dtype="float64")
for i in range(30):
    m.save(path, iteration=1000 * who + i, extra={"pad": np.full(100000, float(who))})
print("done", who)
"""


def test_two_processes_saving_one_path_at_once_never_clobber_each_others_temporary(tmp_path):
    """Two processes save 30 times each to one path, at the same time: with a shared
    temporary (npflow before this test) one of them died of h5py's file lock or of a
    FileNotFoundError at the rename; now both finish, and the checkpoint is one writer's
    complete file."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "ck.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OPENBLAS_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(who)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for who in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    st = load_training_state(path)
    who = st["iteration"] // 1000
    assert who in (1, 2) and st["iteration"] % 1000 == 29
    np.testing.assert_array_equal(st["extra"]["pad"], np.full(100000, float(who)))
    assert checkpoint.leftover_temporaries(path) == []


def test_stale_temporaries_of_dead_processes_here_are_removed_others_kept(tmp_path):
    path = tmp_path / "ck.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    host = checkpoint._host()
    stale = tmp_path / f"ck.h5.{host}.{dead_pid}.0badc0de.tmp"
    live = tmp_path / f"ck.h5.{host}.{os.getpid()}.12345678.tmp"      # a save under way here
    other = tmp_path / f"ck.h5.{host}x.{dead_pid}.0badc0de.tmp"       # another machine's
    for f in (stale, live, other):
        f.write_bytes(b"half")
    with pytest.raises(CheckpointError, match="interrupted"):        # named, never read
        load(path)
    CkptGauss().save(path, iteration=5)
    assert not stale.exists() and live.exists() and other.exists()
    assert load_training_state(path)["iteration"] == 5              # leftovers ignored
    assert checkpoint.leftover_temporaries(path) == sorted([str(live), str(other)])


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout")
def test_gitignore_covers_checkpoint_temporaries():
    names = [checkpoint.temporary_name("runs_elsewhere/checkpoint.h5"),
             "x/best.h5.tmp", os.path.basename(checkpoint.temporary_name("ck.h5"))]
    for name in names:
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT)
        assert r.returncode == 0, f"{name} is not git-ignored"
