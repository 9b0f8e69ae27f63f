"""Every model and training method on device arrays (tests/strict_cases.py, docs/backend.md).

Under the strict stand-in for CuPy (tests/strict_xp.py; with --device-backend cupy on a real
GPU) each case runs one training step through npflow.training.train with device="gpu":
any numpy call on model data fails at its line. On the stand-in the tests also check the
float32 discipline (no float64 array in a float32 step), bound the host syncs per step, and
compare a float64 step with the NumPy one.
"""
import numpy as np
import pytest

import npflow
from npflow.backend import to_host
from npflow.optim import Adam
from npflow.training import train

from strict_cases import CASES, MODEL_CASES

NAMES = sorted(CASES)


def _step(case, device_name, dtype, seed=0):
    """One training iteration of ``case``; returns (model, TrainResult)."""
    model = case.build(device_name, dtype)
    opt = Adam(model.params, lr=1e-3)
    hooks = case.hooks(model)
    batch = case.batch(np.random.default_rng(seed + 1))
    res = train(model, opt, lambda rng, it: batch, 1, np.random.default_rng(seed),
                hooks=hooks, print_fn=lambda *a: None)
    assert res.status == "done", res.message
    return model, res


@pytest.mark.parametrize("name", NAMES)
def test_training_step_keeps_params_on_the_device(device, name):
    """One train() iteration with device="gpu": parameters stay device arrays of the model's
    dtype, and the loss is finite."""
    model, res = _step(CASES[name], "gpu", "float32")
    assert np.isfinite(res.history["loss"]).all()
    for k, a in model.params.items():
        assert device.is_device(a), f"parameter {k} left the device: {type(a).__name__}"
        assert a.dtype == np.float32, f"parameter {k} became {a.dtype}"


@pytest.mark.parametrize("name", NAMES)
def test_float32_training_step_makes_no_float64_array(device, name):
    if not device.strict:
        pytest.skip("float64 creations are observable on the strict backend only")
    case = CASES[name]
    with device.track(float64=True) as t:
        _step(case, "gpu", "float32")
    assert not t.float64, f"float64 arrays in a float32 step of {name}:\n{t.summary()}"


def _syncs_in_loss_and_grad(case, steps=None):
    """(tracker, stats, model) of one loss_and_grad under the strict backend (``steps``
    overrides the solver's fixed-grid steps)."""
    import strict_xp
    model = case.build("gpu", "float32")
    if steps is not None:
        holder, key = case.steps(model)
        holder[key] = steps
    x, kw = case.loss_inputs(model)
    with strict_xp.track() as t:
        _, _, stats = model.loss_and_grad(x, np.random.default_rng(3), **kw)
    return t, stats, model


#: The most host syncs one loss_and_grad may take, beyond those of adaptive step control:
#: the data check, the end-of-solve finiteness checks, the reported loss and statistics.
MAX_SYNCS_PER_STEP = 16


@pytest.mark.parametrize("name", NAMES)
def test_host_syncs_per_training_step_are_bounded(device, name):
    """Fixed grid: no sync inside the solve (the count does not grow with the number of
    solver steps). dopri5: one sync per step attempt (the controller's accept/reject), plus
    the initial-step selection. Reported per case with -rA / -s."""
    if not device.strict:
        pytest.skip("host syncs are observable on the strict backend only")
    case = CASES[name]
    t, stats, model = _syncs_in_loss_and_grad(case)
    in_solve = [e for e in t.syncs if e.inside("solvers.py", "rk_step")]
    assert not in_solve, f"host sync inside a solver step:\n{t.summary()}"
    if case.solver == "fixed":
        holder, key = case.steps(model)
        t2, _, _ = _syncs_in_loss_and_grad(case, steps=2 * holder[key])
        assert len(t2.syncs) == len(t.syncs), (
            f"host syncs grow with the number of solver steps:\n{t.summary()}\n--- with "
            f"twice the steps:\n{t2.summary()}")
        other = len(t.syncs)
    elif case.solver is None:                        # no ODE solve in a training step
        other = len(t.syncs)
    else:
        # per block: one evaluation at t0, one in the initial step, six per attempt (FSAL)
        blocks = len(model.nets)
        attempts = (stats["nfe_forward"] - 2 * blocks) // 6
        ratios = [e for e in t.syncs if e.inside("solvers.py", "_error_ratio")]
        assert len(ratios) == attempts > 0, t.summary()           # eq. (1.4)
        control = [e for e in t.syncs if e.inside("solvers.py", "_solve_adaptive")
                   and not e.inside("solvers.py", "initial_step")]
        assert len(control) <= attempts + blocks, t.summary()     # + a finiteness check each
        other = len(t.syncs) - len(control)
    import strict_xp
    strict_xp.SYNC_REPORT[name] = len(t.syncs)
    print(f"{name}: {len(t.syncs)} host syncs per loss_and_grad\n{t.summary()}")
    assert other <= MAX_SYNCS_PER_STEP, t.summary()


@pytest.mark.parametrize("name", NAMES)
def test_float64_step_on_the_device_equals_the_numpy_step(device, name):
    """Loss and every gradient of one float64 loss_and_grad agree with NumPy's to 1e-10."""
    case = CASES[name]
    out = []
    for dev in ("cpu", "gpu"):
        model = case.build(dev, "float64")
        x, kw = case.loss_inputs(model)
        loss, grads, _ = model.loss_and_grad(x, np.random.default_rng(3), **kw)
        out.append((loss, {k: to_host(g) for k, g in grads.items()}))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) <= 1e-10 * max(1.0, abs(l0))
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-10, err_msg=k)


def _eval_args(name, model, rng):
    x = CASES[name].batch(rng)
    if name == "multiscale":
        return x, (lambda m, x: m.log_prob(x, np.random.default_rng(4)))
    return x, (lambda m, x: m.log_prob(x))


@pytest.mark.parametrize("name", MODEL_CASES)
def test_log_prob_sample_save_load_on_the_device(device, name, tmp_path):
    """log_prob and sample return float32 device arrays (log_prob of MultiscaleCNF a host
    array: its bits_per_dim gathers the batches on the host); save writes host arrays and
    load onto the device gives the same log_prob."""
    case = CASES[name]
    model = case.build("gpu", "float32")
    x, log_prob = _eval_args(name, model, np.random.default_rng(1))
    with device.track(float64=True) as t:
        lp = log_prob(model, x)
        s = model.sample(3, np.random.default_rng(5))
    if name == "multiscale":                             # bits/dim are collected on the host
        assert isinstance(lp, np.ndarray)
    else:
        assert device.is_device(lp) and lp.dtype == np.float32
    assert device.is_device(s) and s.dtype == np.float32 and s.shape[0] == 3
    if t is not None:
        assert not t.float64, t.summary()
    if hasattr(model, "evaluate"):                        # OT-Flow's evaluation sums
        assert all(np.isfinite(v) for v in model.evaluate(x).values())
    path = tmp_path / "m.h5"
    model.save(str(path))
    back = npflow.load(str(path), device="gpu")
    for k, a in back.params.items():
        assert device.is_device(a) and a.dtype == np.float32, k
        np.testing.assert_array_equal(to_host(a), to_host(model.params[k]))
    np.testing.assert_allclose(to_host(log_prob(back, x)), to_host(lp), rtol=1e-6)


class _NetDynamics:
    """dz/dt = f(z, t) for an ODENet, in the solver interface (forward/backward)."""

    def __init__(self, net, params):
        self.net, self.params = net, params

    def forward(self, t, y):
        f, _, cache = self.net.forward(self.params, y, None, t)
        return f, cache

    def backward(self, cache, dydt_bar):
        zbar, _, pbar, tbar = self.net.backward(dydt_bar, None, cache)
        return zbar, pbar, tbar


def _solve_syncs(method, **kw):
    import strict_xp
    from npflow.backend import to_device
    from npflow.odenet import ODENet
    from npflow.solvers import odeint
    xp = strict_xp.xp
    rng = np.random.default_rng(0)
    net = ODENet(2, (8,), 2, activation="softplus")
    dyn = _NetDynamics(net, net.init_params(rng, np.float32, xp))
    y0 = to_device(rng.standard_normal((5, 2)), xp, np.float32)
    with strict_xp.track() as fwd:
        sol = odeint(dyn, y0, 0.0, 1.0, method=method, **kw)
    with strict_xp.track() as bwd:
        sol.backward(xp.ones_like(sol.y1))
    return sol, fwd.syncs, bwd.syncs


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "rk38"])
def test_fixed_grid_solve_takes_one_host_sync_whatever_the_steps(device, method):
    """eq. (1.3) of docs/backend.md: the only sync of a fixed-grid solve is its one
    finiteness check after the loop; the discrete adjoint takes one (the time cotangents)."""
    if not device.strict:
        pytest.skip("host syncs are observable on the strict backend only")
    for steps in (1, 3, 7):
        _, fwd, bwd = _solve_syncs(method, steps=steps)
        assert [e.kind for e in fwd] == ["bool()"], [e.where for e in fwd]
        assert len(bwd) <= 1, [e.where for e in bwd]


def test_dopri5_takes_one_host_sync_per_step_attempt(device):
    """eq. (1.4): one sync per attempted step (its error ratio), plus the initial-step
    selection and one finiteness check per solve."""
    if not device.strict:
        pytest.skip("host syncs are observable on the strict backend only")
    for rtol in (1e-3, 1e-6):
        sol, fwd, bwd = _solve_syncs("dopri5", rtol=rtol, atol=rtol)
        attempts = len(sol.ts) - 1 + sol.n_rejected
        in_control = [e for e in fwd if e.inside("solvers.py", "_error_ratio")]
        initial = [e for e in fwd if e.inside("solvers.py", "initial_step")]
        assert len(in_control) == attempts and attempts > 1
        assert len(fwd) == attempts + len(initial) + 1 and len(initial) <= 3
        assert len(bwd) <= 1
