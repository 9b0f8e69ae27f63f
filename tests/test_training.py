"""The generic training loop (docs/training.md, sections 5-7) on a fake flow with exact gradients.

FakeFlow is a Gaussian N(mu, exp(log_s)²) plus a trainable "end time" T entering the loss as
(T − c)²; its loss_and_grad draws from the rng (a random subsample), so the RNG state matters
for exact resume the way Hutchinson probes do for a CNF.
"""
import json
import math

import numpy as np
import pytest

from npflow.checkpoint import load_training_state
from npflow.model import FlowModel
from npflow.optim import Adam
from npflow.training import SteerHook, TimeOptimizer, TrainHook, format_seconds, train
from npflow.solvers import SolverError


class FakeFlow(FlowModel):
    def __init__(self, dim=2, T=0.5, train_T=False, target_T=0.3, nan_at=None, seed=0,
                 dtype="float64", device="cpu"):
        super().__init__(dict(dim=dim, T=T, train_T=train_T, target_T=target_T, nan_at=nan_at,
                              seed=seed, dtype=dtype, device=device), device, dtype)
        rng = np.random.default_rng(seed)
        self.params = {"mu": rng.normal(size=dim), "log_s": np.zeros(dim)}
        if train_T:
            self.params["T"] = np.asarray(float(T))
        self.calls = 0

    time_names = ["T"]

    def _T(self, T):
        if T is not None:
            return float(T)
        return float(self.params["T"]) if self.config["train_T"] else self.config["T"]

    def loss_and_grad(self, x, rng, T=None):
        self.calls += 1
        if self.config["nan_at"] is not None and self.calls == self.config["nan_at"]:
            x = x * np.nan
        keep = rng.permutation(x.shape[0])[: max(1, x.shape[0] // 2)]
        x = x[keep]
        mu, ls = self.params["mu"], self.params["log_s"]
        u = (x - mu) * np.exp(-ls)
        nll = float((0.5 * (u * u).sum(1) + ls.sum()).mean() + math.log(2 * math.pi))
        Tv = self._T(T)
        c = self.config["target_T"]
        loss = nll + (Tv - c) ** 2
        grads = {"mu": -(u * np.exp(-ls)).mean(0), "log_s": (1 - u * u).mean(0)}
        stats = {"nll": nll, "nfe_forward": 8, "nfe_backward": 16, "T": Tv}
        if self.config["train_T"]:
            grads["T"] = np.asarray(2 * (Tv - c))
            stats["dL_dT_analytic"] = stats["dL_dT_discrete"] = 2 * (Tv - c)
        return loss, grads, stats

    def time_gradient(self, x, rng, kind="analytic"):
        return [2 * (float(self.params["T"]) - self.config["target_T"])]


def batches(rng, it):
    return rng.normal(size=(32, 2)) * 0.5 + np.array([1.0, -1.0])


def _setup(seed=0, method="plain", **model_kw):
    model = FakeFlow(train_T=method in ("toflow", "both"), seed=seed, **model_kw)
    opt = Adam({k: v for k, v in model.params.items() if k != "T"}, lr=0.05, weight_decay=1e-4)
    hooks = []
    if method in ("toflow", "both"):
        hooks.append(TimeOptimizer(model, lr=0.01, alpha=0.1, eps=0.1))
    if method in ("steer", "both"):
        hooks.append(SteerHook(0.2))
    return model, opt, hooks


def test_loop_decreases_the_loss_and_records_history(tmp_path):
    model, opt, hooks = _setup()
    lines = []
    res = train(model, opt, batches, 200, np.random.default_rng(1), log_every=50,
                save_dir=tmp_path, log_json=tmp_path / "log.jsonl", print_fn=lines.append)
    assert res.status == "done" and res.iteration == 200
    h = res.history
    assert len(h["loss"]) == 200 and h["iteration"][-1] == 200
    assert h["loss"][-20:].mean() < h["loss"][:20].mean() - 0.5
    np.testing.assert_allclose(model.params["mu"], [1.0, -1.0], atol=0.15)
    assert len(lines) == 4 and "iter    200/200" in lines[-1] and "s/it" in lines[-1]
    assert "nfe fwd 8 bwd 16" in lines[-1] and "left" in lines[-1]
    recs = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [50, 100, 150, 200]
    for key in ("loss", "nfe_forward", "nfe_backward", "T", "grad_norm", "sec_per_iter",
                "time_left_s"):
        assert key in recs[-1]
    assert load_training_state(tmp_path / "checkpoint.h5")["iteration"] == 200


@pytest.mark.parametrize("method", ["plain", "toflow", "steer", "both"])
def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, method):
    n = 30
    model, opt, hooks = _setup(method=method)
    full = train(model, opt, batches, n, np.random.default_rng(5), log_every=5,
                 save_dir=tmp_path / "a", hooks=hooks, print_fn=lambda s: None)

    class Crash(Exception):
        pass

    def crashing(rng, it):
        if it == 17:
            raise Crash()
        return batches(rng, it)

    model, opt, hooks = _setup(method=method)
    with pytest.raises(Crash):
        train(model, opt, crashing, n, np.random.default_rng(5), log_every=5,
              save_dir=tmp_path / "b", hooks=hooks, print_fn=lambda s: None)
    assert load_training_state(tmp_path / "b" / "checkpoint.h5")["iteration"] == 15
    # a fresh process: other initial weights, another generator seed; all come from the file
    model2, opt2, hooks2 = _setup(seed=99, method=method)
    msgs = []
    rest = train(model2, opt2, batches, n, np.random.default_rng(12345), log_every=5,
                 save_dir=tmp_path / "b", resume=True, hooks=hooks2, print_fn=msgs.append)
    assert any("resumed" in m and "iteration 15" in m for m in msgs)
    for k in ("loss", "nll", "T", "grad_norm"):
        np.testing.assert_array_equal(rest.history[k], full.history[k])
    for k in model.params:
        np.testing.assert_array_equal(model2.params[k], full_params(tmp_path / "a")[k])


def full_params(folder):
    from npflow.checkpoint import read_params
    return read_params(folder / "checkpoint.h5")


def test_resume_after_completion_is_a_no_op(tmp_path):
    model, opt, _ = _setup()
    train(model, opt, batches, 10, np.random.default_rng(0), log_every=5, save_dir=tmp_path,
          print_fn=lambda s: None)
    model, opt, _ = _setup()
    res = train(model, opt, batches, 10, np.random.default_rng(0), log_every=5,
                save_dir=tmp_path, resume=True, print_fn=lambda s: None)
    assert res.status == "already-done" and len(res.history["loss"]) == 10


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    model, opt, _ = _setup()
    msgs = []
    res = train(model, opt, batches, 3, np.random.default_rng(0), save_dir=tmp_path,
                resume=True, print_fn=msgs.append)
    assert res.status == "done" and "starting from scratch" in msgs[0]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, opt, _ = _setup(nan_at=13)
    msgs = []
    res = train(model, opt, batches, 30, np.random.default_rng(0), log_every=5,
                save_dir=tmp_path, log_json=tmp_path / "log.jsonl", print_fn=msgs.append)
    assert res.status == "nonfinite" and res.iteration == 12
    assert "stopped at iteration 13" in res.message and "nan" in res.message
    assert "iteration 10) is kept" in res.message
    st = load_training_state(tmp_path / "checkpoint.h5")
    assert st["iteration"] == 10
    assert all(np.isfinite(v).all() for v in model.params.values())
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert "stopped at iteration 13" in last["error"]


class NaNGradFlow(FakeFlow):
    def loss_and_grad(self, x, rng, T=None):
        loss, g, s = super().loss_and_grad(x, rng, T)
        if self.calls == 4:
            g = dict(g, mu=g["mu"] * np.inf)
        return loss, g, s


def test_nonfinite_gradient_stops_before_the_step(tmp_path):
    model = NaNGradFlow()
    opt = Adam(dict(model.params), lr=0.05)
    res = train(model, opt, batches, 10, np.random.default_rng(0), log_every=100,
                save_dir=tmp_path, print_fn=lambda s: None)
    assert res.status == "nonfinite" and "gradient norm" in res.message
    assert "no checkpoint had been written yet" in res.message
    assert all(np.isfinite(v).all() for v in model.params.values())
    assert not (tmp_path / "checkpoint.h5").exists()


def test_time_optimizer_reaches_the_regularized_optimum_and_clips():
    # loss (T − c)² + α|T| with c = 0.3, α = 0.1: optimum T* = c − α/2 = 0.25 (eq. 6.2)
    model, opt, hooks = _setup(method="toflow")
    res = train(model, opt, batches, 800, np.random.default_rng(0), log_every=1000,
                hooks=hooks, print_fn=lambda s: None)
    assert float(model.params["T"]) == pytest.approx(0.25, abs=0.01)
    assert res.history["T"][-1] == pytest.approx(float(model.params["T"]))
    # a target beyond the clip interval [t0 + ε, 2T0 − t0 − ε] = [0.1, 0.9] stops at 0.9
    model, opt, hooks = _setup(method="toflow", target_T=5.0)
    train(model, opt, batches, 300, np.random.default_rng(0), log_every=1000, hooks=hooks,
          print_fn=lambda s: None)
    assert float(model.params["T"]) == pytest.approx(0.9, abs=1e-12)


def test_time_optimizer_refuses_bad_settings():
    with pytest.raises(ValueError, match="train_T=True"):
        TimeOptimizer(FakeFlow(train_T=False))
    with pytest.raises(ValueError, match="is empty"):
        TimeOptimizer(FakeFlow(train_T=True, T=0.1), eps=0.1)
    with pytest.raises(ValueError, match="kind"):
        TimeOptimizer(FakeFlow(train_T=True), kind="bogus")


def test_steer_draws_end_times_uniformly_around_T():
    hook = SteerHook(0.2)
    model = FakeFlow(T=0.5)
    rng = np.random.default_rng(0)
    Ts = np.array([hook.loss_kwargs(model, rng, i)["T"] for i in range(4000)])
    assert Ts.min() >= 0.3 and Ts.max() <= 0.7
    assert Ts.mean() == pytest.approx(0.5, abs=0.01)
    assert Ts.var() == pytest.approx(0.4 ** 2 / 12, rel=0.1)      # variance of U[T−b, T+b]
    with pytest.raises(ValueError, match="b < T"):
        SteerHook(0.6).loss_kwargs(model, rng, 0)


def test_grad_clip_is_applied_and_logged_unclipped():
    model, opt, _ = _setup()
    seen = []

    class Spy(TrainHook):
        name = "spy"

        def after_step(self, model, x, rng, it, stats):
            seen.append({k: v.copy() for k, v in model.params.items()})
            return {}

    before = {k: v.copy() for k, v in model.params.items()}
    res = train(model, opt, batches, 1, np.random.default_rng(0), grad_clip=1e-3,
                hooks=[Spy()], print_fn=lambda s: None)
    assert res.history["grad_norm"][0] > 1e-3      # the norm before clipping is logged
    # Adam's first step is ≈ lr·sign(g) whatever the scale, so check the moment instead
    g_clipped = opt.m["mu"] / (1 - 0.9)
    assert np.sqrt((g_clipped ** 2).sum() + ((opt.m["log_s"] / 0.1) ** 2).sum()) <= 1e-3 * 1.01
    assert not np.array_equal(seen[0]["mu"], before["mu"])


def test_on_log_callbacks_receive_records():
    model, opt, _ = _setup()
    got = []
    train(model, opt, batches, 6, np.random.default_rng(0), log_every=3, on_log=[got.append],
          print_fn=lambda s: None)
    assert [r["iteration"] for r in got] == [3, 6]


def test_bad_arguments_are_refused():
    model, opt, _ = _setup()
    with pytest.raises(TypeError, match="Generator"):
        train(model, opt, batches, 3, 0)
    with pytest.raises(ValueError, match="save_dir"):
        train(model, opt, batches, 3, np.random.default_rng(0), resume=True)
    with pytest.raises(ValueError, match="log_every"):
        train(model, opt, batches, 3, np.random.default_rng(0), log_every=0)


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 65, 3725, math.inf)] == ["5s", "1m05s", "1h02m", "?"]


# -- figures (npflow.plotting) ----------------------------------------------------------------

def test_figures_are_written_as_png(tmp_path):
    from npflow.plotting import image_grid, toy_figure, training_curves
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 2))

    def log_prob(p):
        return -0.5 * (p ** 2).sum(1) - math.log(2 * math.pi)

    paths = [toy_figure(data, log_prob, rng.normal(size=(300, 2)), tmp_path / "toy.png",
                        title="t", grid=30)]
    model, opt, hooks = _setup(method="toflow")
    res = train(model, opt, batches, 20, rng, hooks=hooks, print_fn=lambda s: None)
    paths.append(training_curves(res.history, tmp_path / "curves.png"))
    paths.append(image_grid(rng.uniform(size=(6, 1, 5, 5)), tmp_path / "grid.png",
                            labels=list("abcdef")))
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2-D points"):
        toy_figure(np.zeros((5, 3)), log_prob, data, tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        image_grid(np.zeros((3, 4, 4)), tmp_path / "y.png", labels=["a"])


class SolverFailureFlow(FakeFlow):
    def loss_and_grad(self, x, rng, T=None):
        out = super().loss_and_grad(x, rng, T)
        if self.calls == 7:
            raise SolverError("step size underflow at t=0.25, h=1e-17, error ratio 3.2")
        return out


def test_solver_failure_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = SolverFailureFlow()
    opt = Adam({k: v for k, v in model.params.items()}, lr=0.05)
    res = train(model, opt, batches, 20, np.random.default_rng(0), log_every=5,
                save_dir=tmp_path, print_fn=lambda s: None)
    assert res.status == "nonfinite" and res.iteration == 6
    assert "the ODE solver failed" in res.message and "underflow" in res.message
    assert "iteration 5) is kept" in res.message
    assert load_training_state(tmp_path / "checkpoint.h5")["iteration"] == 5


# --------------------------------------------------------------------------------------------
# signals, timed checkpoints, divergence, nothing to train, time left (docs/training.md §7)

class _SignalAt(TrainHook):
    """Sends ``signum`` to this process during iteration ``at`` (as a user would mid-step)."""
    name = "signal"

    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def after_step(self, model, x, rng, it, stats):
        if it + 1 == self.at:
            import os
            os.kill(os.getpid(), self.signum)
        return {}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_finishes_the_iteration_checkpoints_and_resume_equals_uninterrupted(tmp_path,
                                                                                   signame):
    import signal
    signum = getattr(signal, signame)
    before = signal.getsignal(signum)
    model, opt, hooks = _setup(method="both")
    full = train(model, opt, batches, 40, np.random.default_rng(1), log_every=100,
                 save_dir=tmp_path / "a", hooks=hooks, print_fn=lambda m: None)
    model, opt, hooks = _setup(method="both")
    lines = []
    res = train(model, opt, batches, 40, np.random.default_rng(1), log_every=100,
                save_dir=tmp_path / "b", hooks=hooks + [_SignalAt(17, signum)],
                print_fn=lines.append)
    assert res.status == "interrupted" and res.signal == signum and res.iteration == 17
    assert signal.getsignal(signum) is before             # the handlers are given back
    assert load_training_state(tmp_path / "b" / "checkpoint.h5")["iteration"] == 17
    assert any(signame in line for line in lines)
    model, opt, hooks = _setup(method="both")
    res2 = train(model, opt, batches, 40, np.random.default_rng(1), log_every=100,
                 save_dir=tmp_path / "b", resume=True, hooks=hooks, print_fn=lambda m: None)
    assert res2.status == "done"
    np.testing.assert_array_equal(res2.history["loss"], full.history["loss"])


def test_checkpoint_seconds_writes_between_iteration_checkpoints(tmp_path):
    import time as _time

    def slow(rng, it):
        _time.sleep(0.03)
        return batches(rng, it)
    model, opt, _ = _setup()
    res = train(model, opt, slow, 2, np.random.default_rng(0), log_every=100,
                checkpoint_every=1000, checkpoint_seconds=0.05, save_dir=tmp_path,
                print_fn=lambda m: None)
    assert res.status == "done"
    model, opt, _ = _setup()
    seen = []
    orig = model.save

    def spy(path, **kw):
        seen.append(kw["iteration"])
        return orig(path, **kw)
    model.save = spy
    train(model, opt, slow, 6, np.random.default_rng(0), log_every=100, checkpoint_every=1000,
          checkpoint_seconds=0.05, save_dir=tmp_path / "c", print_fn=lambda m: None)
    assert len(seen) >= 3 and seen[-1] == 6
    model, opt, _ = _setup()
    seen.clear()
    model.save = spy
    train(model, opt, slow, 6, np.random.default_rng(0), log_every=100, checkpoint_every=1000,
          save_dir=tmp_path / "d", print_fn=lambda m: None)
    assert seen == [6]


def test_exploding_loss_is_reported_as_diverged_and_keeps_the_last_checkpoint(tmp_path):
    model, _, _ = _setup()
    opt = Adam(dict(model.params), lr=50.0)        # absurd step: the loss explodes, finitely
    res = train(model, opt, batches, 200, np.random.default_rng(0), log_every=1,
                save_dir=tmp_path, log_json=tmp_path / "l.jsonl", print_fn=lambda m: None)
    assert res.status == "diverged", res.message
    assert "exploded" in res.message and "learning rate" in res.message
    assert res.iteration < 200
    recs = [json.loads(s) for s in open(tmp_path / "l.jsonl")]
    assert "error" in recs[-1]


def test_a_normal_run_is_not_called_diverged():
    model, opt, _ = _setup()
    res = train(model, opt, batches, 300, np.random.default_rng(0), log_every=100,
                print_fn=lambda m: None)
    assert res.status == "done"


def test_zero_iterations_say_nothing_to_train_without_claiming_a_checkpoint(tmp_path):
    model, opt, _ = _setup()
    lines = []
    res = train(model, opt, batches, 0, np.random.default_rng(0), save_dir=tmp_path,
                print_fn=lines.append)
    assert res.status == "already-done" and res.checkpoint is None
    assert "0 iterations" in res.message and "checkpoint" not in res.message


def test_time_left_follows_the_nfe_growth():
    from npflow.training import time_left
    flat = time_left([1.0] * 100, [10] * 100, 100)
    assert flat == pytest.approx(100.0)
    # NFE grows by 0.1 per iteration from 10 to 20: eq. 7.1 predicts more than the flat rate
    nfe = list(np.linspace(10, 20, 101)[1:])
    grown = time_left([1.0] * 100, nfe, 100)
    g, n_bar = 0.1, float(np.mean(nfe[-50:]))
    assert grown == pytest.approx(100 * (1 + g * 101 / (2 * n_bar)), rel=1e-6)
    assert grown > flat
    assert time_left([], [], 10) == 0.0 and time_left([1.0], [5], 0) == 0.0


def test_resume_into_another_method_is_one_clear_checkpoint_error(tmp_path):
    from npflow.checkpoint import CheckpointError
    model, opt, hooks = _setup(method="plain")
    train(model, opt, batches, 5, np.random.default_rng(0), save_dir=tmp_path,
          print_fn=lambda m: None)
    model, opt, hooks = _setup(method="toflow")        # gains a T parameter
    with pytest.raises(CheckpointError) as info:
        train(model, opt, batches, 10, np.random.default_rng(0), save_dir=tmp_path,
              resume=True, hooks=hooks, print_fn=lambda m: None)
    msg = str(info.value)
    assert "\n" not in msg and "do not fit" in msg and "train_T" in msg


def test_loss_panel_keeps_the_early_loss_in_view():
    """The toy curves cut off the early loss when the limits were the 1st-99th percentiles."""
    from npflow.plotting import loss_limits
    rng = np.random.default_rng(0)
    it = np.arange(10000)
    loss = 3.0 + 5.0 * np.exp(-it / 30.0) + 0.05 * rng.normal(size=it.size)   # 8 -> 3 quickly
    lo, hi = loss_limits(loss, 200)
    assert hi >= loss[:5].mean() and lo <= np.percentile(loss, 1)
    old_hi = np.percentile(loss, 99)
    assert old_hi < loss[:5].mean()                      # what the old limits cut off
    spiky = np.full(1000, 3.0)
    spiky[500] = 1e6              # a single spike counts only by its share of the running mean
    assert loss_limits(spiky, 20)[1] < 1e5
    assert loss_limits(np.full(5, np.nan), 1) is None


def test_clamp_hook_puts_every_weight_in_the_box_and_leaves_trained_end_times():
    from npflow.cnf import CNF
    from npflow.training import ClampHook
    model = CNF(2, hidden=(8,), train_T=True, T=3.0)
    model.params = {k: 5.0 * np.ones_like(v) for k, v in model.params.items()}
    hook = ClampHook(1.5)
    assert hook.after_step(model, None, None, 0, {}) == {}
    T_names = set(model.time_names)
    assert T_names and all(np.all(model.params[k] == 5.0) for k in T_names)
    assert all(np.all(v == 1.5) for k, v in model.params.items() if k not in T_names)
    with pytest.raises(ValueError, match="clamp bound"):
        ClampHook(0.0)
