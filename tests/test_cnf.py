"""npflow.CNF: the loss and its gradient (every parameter and the end time) against central
differences, the analytic end-time gradient, log-density identities, inversion, bad input."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npflow
from npflow.cnf import CNF


def small_cnf(**kw):
    base = dict(dim=2, hidden=(5, 4), T=0.4, solver="rk4", steps=3, dtype="float64", seed=1)
    base.update(kw)
    return CNF(**base)


def directional_fd(model, x, seed, direction, h=1e-5, **kw):
    """Central difference of the loss along `direction` (dict like params), same probes."""
    def loss_at(s):
        p = {k: v + s * direction[k] for k, v in model.params.items()}
        return model.loss_and_grad(x, np.random.default_rng(seed), params=p, **kw)[0]
    return (loss_at(h) - loss_at(-h)) / (2 * h)


def check_gradient(model, x, seed=0, rtol=1e-6, **kw):
    loss, grads, stats = model.loss_and_grad(x, np.random.default_rng(seed), **kw)
    assert set(grads) == set(model.params)
    rng = np.random.default_rng(123)
    for name in model.params:  # one random direction per parameter array
        d = {k: np.zeros_like(v) for k, v in model.params.items()}
        d[name] = rng.standard_normal(model.params[name].shape)
        fd = directional_fd(model, x, seed, d, **kw)
        an = float(np.sum(grads[name] * d[name]))
        assert abs(an - fd) <= rtol * max(1.0, abs(fd)) + 1e-9, (name, an, fd)
    return loss, grads, stats


METHODS = {
    "ffjord_exact": dict(trace="exact"),
    "ffjord_hutchinson": dict(trace="hutchinson", probes=2),
    "ffjord_rademacher": dict(trace="rademacher", probes=3),
    "rnode": dict(trace="hutchinson", kinetic=0.1, jacobian=0.2, zero_last=False),
    "toflow": dict(train_T=True),
    "toflow_rnode_two_blocks": dict(train_T=True, kinetic=0.05, jacobian=0.05, blocks=2),
    "concat_softplus_midpoint": dict(layer="concat", activation="softplus", solver="midpoint"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_and_grad_matches_central_differences(method):
    model = small_cnf(**METHODS[method])
    x = np.random.default_rng(5).standard_normal((4, 2))
    check_gradient(model, x)


@settings(max_examples=10)
@given(seed=st.integers(0, 10**6), dim=st.integers(1, 4), batch=st.integers(1, 4),
       steps=st.integers(1, 3), T=st.floats(0.1, 1.0))
def test_discrete_adjoint_of_cnf_matches_central_differences(seed, dim, batch, steps, T):
    model = CNF(dim=dim, hidden=(3,), T=T, train_T=True, steps=steps, trace="exact",
                kinetic=0.1, jacobian=0.1, dtype="float64", seed=seed)
    x = np.random.default_rng(seed).standard_normal((batch, dim))
    check_gradient(model, x, seed=seed)


def test_steer_end_time_override_gradient_matches_central_differences():
    model = small_cnf()
    x = np.random.default_rng(2).standard_normal((3, 2))
    check_gradient(model, x, T=0.55)
    l1 = model.loss_and_grad(x, np.random.default_rng(0), T=0.55)[0]
    l2 = model.loss_and_grad(x, np.random.default_rng(0))[0]
    assert l1 != l2


def test_analytic_end_time_gradient_approaches_discrete_at_rk4_order():
    x = np.random.default_rng(3).standard_normal((6, 2))
    errs, steps = [], [2, 4, 8, 16]
    for n in steps:
        model = CNF(dim=2, hidden=(8, 8), T=1.0, train_T=True, steps=n, dtype="float64", seed=4)
        _, grads, stats = model.loss_and_grad(x, np.random.default_rng(0))
        assert math.isclose(stats["dL_dT_discrete"], float(grads["T"]), rel_tol=1e-12)
        errs.append(abs(stats["dL_dT_analytic"] - stats["dL_dT_discrete"]))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope < -3.5, (errs, slope)  # RK4: error O(h^4)


def test_time_gradient_analytic_equals_stats_of_loss_and_grad():
    model = small_cnf(train_T=True, kinetic=0.1, jacobian=0.1)
    x = np.random.default_rng(3).standard_normal((5, 2))
    _, _, stats = model.loss_and_grad(x, np.random.default_rng(0))
    g = model.time_gradient(x, np.random.default_rng(0))
    assert math.isclose(g[0], stats["dL_dT_analytic"], rel_tol=1e-10)
    gd = model.time_gradient(x, np.random.default_rng(0), kind="discrete")
    assert math.isclose(gd[0], stats["dL_dT_discrete"], rel_tol=1e-12)


def test_exact_logdet_equals_log_abs_det_of_flow_jacobian():
    """ℓ(T) from the exact trace equals log|det ∂z(T)/∂x| of the flow map (eq. 1.1b)."""
    model = CNF(dim=3, hidden=(8, 8), T=0.7, dtype="float64", seed=7)
    x = np.random.default_rng(1).standard_normal((2, 3))
    lp = model.log_prob(x, rtol=1e-10, atol=1e-10)
    z = model.transform(x, rtol=1e-10, atol=1e-10)
    h = 1e-5
    for b in range(2):
        J = np.zeros((3, 3))
        for i in range(3):
            e = np.zeros((1, 3)); e[0, i] = h
            J[:, i] = (model.transform(x[b:b + 1] + e, rtol=1e-10, atol=1e-10)
                       - model.transform(x[b:b + 1] - e, rtol=1e-10, atol=1e-10))[0] / (2 * h)
        logdet = np.linalg.slogdet(J)[1]
        expected = -0.5 * np.sum(z[b] ** 2) - 1.5 * math.log(2 * math.pi) + logdet
        assert abs(lp[b] - expected) < 1e-6


def test_density_integrates_to_one():
    model = CNF(dim=2, hidden=(16, 16), T=0.5, dtype="float64", seed=3)
    g = np.linspace(-7, 7, 121)
    X, Y = np.meshgrid(g, g)
    pts = np.stack([X.ravel(), Y.ravel()], 1)
    p = np.exp(model.log_prob(pts, rtol=1e-6, atol=1e-6))
    mass = p.sum() * (g[1] - g[0]) ** 2
    assert abs(mass - 1.0) < 1e-2, mass


def test_sample_inverts_transform():
    model = CNF(dim=2, hidden=(16, 16), T=0.5, dtype="float64", seed=3)
    x = np.random.default_rng(0).standard_normal((7, 2))
    z = model.transform(x, rtol=1e-9, atol=1e-9)
    xr = model.transform(z, inverse=True, rtol=1e-9, atol=1e-9)
    assert np.max(np.abs(xr - x)) < 1e-6
    s = model.sample(5, np.random.default_rng(0))
    assert s.shape == (5, 2) and np.all(np.isfinite(s))


def test_zero_last_starts_at_identity():
    model = small_cnf(zero_last=True)
    x = np.random.default_rng(0).standard_normal((4, 2))
    z = model.transform(x)
    assert np.array_equal(z, x)


def test_float32_default_and_loss_is_float():
    model = CNF(dim=2, hidden=(8,), seed=0)
    assert all(v.dtype == np.float32 for v in model.params.values())
    loss, grads, stats = model.loss_and_grad(np.ones((3, 2)), np.random.default_rng(0))
    assert isinstance(loss, float) and all(g.dtype == np.float32 for g in grads.values())
    assert stats["nfe_forward"] == 32 and stats["nfe_backward"] > 0


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 3)), r"shape \(B, 2\)"),
    (np.ones(3), r"shape \(B, 2\)"),
    (np.array([[0.0, np.nan], [1.0, 1.0]]), "non-finite"),
    (np.array([[0.0, np.inf]]), "non-finite"),
])
def test_bad_data_is_refused_with_a_clear_error(bad, match):
    model = small_cnf()
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(bad, np.random.default_rng(0))


@pytest.mark.parametrize("kw, match", [
    (dict(trace="bogus"), "unknown trace"),
    (dict(T=0.0), "end time"),
    (dict(kinetic=-1.0), "regularizer"),
    (dict(dtype="float16"), "dtype"),
    (dict(device="tpu"), "device"),
])
def test_bad_configuration_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        small_cnf(**kw)


def test_gpu_without_gpu_is_a_clear_error():
    try:
        import cupy
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present")
    with pytest.raises(npflow.DeviceError, match="GPU|CuPy"):
        small_cnf(device="gpu")
