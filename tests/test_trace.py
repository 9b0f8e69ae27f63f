"""Trace and Frobenius estimators (docs/layers.md, section 3) and their gradients.

- the exact trace (basis probes, w = 1) equals the trace of a dense finite-difference Jacobian,
  the exact Frobenius estimate its squared Frobenius norm;
- the Hutchinson means (Gaussian, Rademacher, w = 1/K) approach them within a statistical bound
  (k standard errors, from the known variance of each estimator);
- the gradients of the estimates with respect to z, t and θ, through the network's backward,
  match central differences; the adjoints are the transposes of the estimators.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npflow import trace as T
from npflow.layers import ACTIVATIONS
from npflow.odenet import LAYER_TYPES, ODENet
from test_layers import assert_rel_close, central_difference

# finite differences of second-order terms need smooth activations (ReLU has a kink at 0;
# its checks are in tests/test_nets.py)
SMOOTH = sorted(a for a, cls in ACTIVATIONS.items() if cls.smooth)

cases = dict(
    B=st.integers(1, 5), D=st.integers(1, 6), K=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 8), min_size=1, max_size=2),
    layer=st.sampled_from(sorted(LAYER_TYPES)), activation=st.sampled_from(SMOOTH),
    seed=st.integers(0, 2**32 - 1), t=st.floats(-2.0, 2.0, allow_nan=False))


def dense_jacobian(net, params, z, t, h=1e-4):
    """J (B, D, D) with J[b, i, j] = ∂f_i/∂z_j by fourth-order central differences."""
    B, D = z.shape
    J = np.empty((B, D, D))
    for j in range(D):
        e = np.zeros(D)
        e[j] = 1.0
        J[:, :, j] = central_difference(lambda s: net(params, z + s * e, t), h)
    return J


def _net(D, hidden, layer, activation, seed):
    rng = np.random.default_rng(seed)
    net = ODENet(D, hidden, D, layer=layer, activation=activation)
    return net, net.init_params(rng, "float64", np), rng


# ----------------------------------------------------------------------------- probes

def test_exact_probes_are_the_basis_broadcast_over_the_batch():
    eps = T.probes("exact", None, (3, 4), None, "float64", np)
    assert eps.shape == (4, 3, 4) and eps.flags.c_contiguous
    for k in range(4):
        np.testing.assert_array_equal(eps[k], np.tile(np.eye(4)[k], (3, 1)))
    img = T.probes("exact", 12, (2, 3, 2, 2), None, "float32", np)
    assert img.shape == (12, 2, 3, 2, 2) and img.dtype == np.float32
    np.testing.assert_array_equal(img.reshape(12, 2, 12)[:, 1], np.eye(12))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_probes_are_reproducible_from_the_generator(kind):
    a = T.probes(kind, 3, (5, 2), np.random.default_rng(11), "float32", np)
    b = T.probes(kind, 3, (5, 2), np.random.default_rng(11), "float32", np)
    c = T.probes(kind, 3, (5, 2), np.random.default_rng(12), "float32", np)
    assert a.shape == (3, 5, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    if kind == "rademacher":
        assert set(np.unique(a)) <= {-1.0, 1.0}


def test_probe_errors_and_weights():
    assert T.probe_weight("exact", 7) == 1.0
    assert T.probe_weight("gaussian", 4) == T.probe_weight("rademacher", 4) == 0.25
    with pytest.raises(ValueError, match=r"K = D = 4 basis probes for x_shape \(3, 4\), got K=2"):
        T.probes("exact", 2, (3, 4), None, "float64", np)
    with pytest.raises(ValueError, match="unknown kind 'uniform'"):
        T.probes("uniform", 2, (3, 4), np.random.default_rng(0), "float64", np)
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        T.probes("gaussian", 2, (3, 4), 0, "float64", np)
    with pytest.raises(ValueError, match="K >= 1"):
        T.probes("rademacher", 0, (3, 4), np.random.default_rng(0), "float64", np)
    with pytest.raises(ValueError, match="unknown kind"):
        T.probe_weight("hutch", 3)
    with pytest.raises(ValueError, match=r"eps \(2, 3, 4\) and ydot \(2, 3, 5\)"):
        T.trace_estimate(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), 0.5)


# ----------------------------------------------------------------------------- exact values

@given(**cases)
def test_exact_trace_equals_dense_jacobian_trace(B, D, K, hidden, layer, activation, seed, t):
    net, params, rng = _net(D, hidden, layer, activation, seed)
    z = rng.standard_normal((B, D))
    eps = T.probes("exact", D, z.shape, rng, "float64", np)
    _, ydot, _ = net.forward(params, z, eps, t)
    J = dense_jacobian(net, params, z, t)
    w = T.probe_weight("exact", D)
    assert_rel_close(T.trace_estimate(eps, ydot, w), np.trace(J, axis1=1, axis2=2))
    assert_rel_close(T.frobenius_estimate(ydot, w), (J ** 2).sum(axis=(1, 2)))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_mean_approaches_the_trace(kind):
    """Statistical check (it fails for a wrong weight or a biased estimator): with K = 20000
    probes, |estimate − tr J| ≤ 5 standard errors, using Var(εᵀAε) = 2‖A_s‖²_F (Gaussian),
    2(‖A_s‖²_F − Σ A_ii²) (Rademacher), A_s = (A + Aᵀ)/2; and likewise for ‖Jε‖²,
    Var = 2‖JᵀJ‖²_F (Gaussian) / 2(‖JᵀJ‖²_F − Σ (JᵀJ)_ii²) (Rademacher)."""
    net, params, rng = _net(4, (8, 8), "concatsquash", "tanh", 5)
    z, t, K = rng.standard_normal((3, 4)), 0.3, 20000
    eps = T.probes(kind, K, z.shape, rng, "float64", np)
    _, ydot, _ = net.forward(params, z, eps, t)
    w = T.probe_weight(kind, K)
    tr, fro = T.trace_estimate(eps, ydot, w), T.frobenius_estimate(ydot, w)
    J = dense_jacobian(net, params, z, t)
    for b in range(3):
        for est, A in ((tr[b], J[b]), (fro[b], J[b].T @ J[b])):
            As = 0.5 * (A + A.T)
            var = 2 * (As ** 2).sum() - (2 * (np.diag(A) ** 2).sum() if kind == "rademacher" else 0)
            se = math.sqrt(max(var, 1e-30) / K)
            assert abs(est - np.trace(A)) <= 5 * se + 1e-12, (b, est, np.trace(A), se)
        assert abs(tr[b] - np.trace(J[b])) < 0.2 * (abs(np.trace(J[b])) + 0.1)


def test_rademacher_with_diagonal_jacobian_is_exact():
    """For a diagonal J every Rademacher probe gives εᵀJε = tr J exactly (zero variance)."""
    J = np.diag([0.5, -2.0, 3.0])
    eps = T.probes("rademacher", 5, (2, 3), np.random.default_rng(0), "float64", np)
    ydot = eps @ J.T
    np.testing.assert_allclose(T.trace_estimate(eps, ydot, T.probe_weight("rademacher", 5)),
                               [1.5, 1.5], rtol=1e-15)


# ----------------------------------------------------------------------------- adjoints

@given(K=st.integers(1, 4), B=st.integers(1, 5), D=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1), w=st.sampled_from([1.0, 0.5, 0.25]))
def test_estimator_adjoints_are_transposes(K, B, D, seed, w):
    """<c, tr(eps, v)> = <tr_adjoint(eps, c), v> (linear in ydot), and the Frobenius adjoint is
    the derivative of the quadratic form (central difference along a random direction)."""
    rng = np.random.default_rng(seed)
    eps, v, ydot = (rng.standard_normal((K, B, D)) for _ in range(3))
    c = rng.standard_normal(B)
    lhs = np.vdot(c, T.trace_estimate(eps, v, w))
    rhs = np.vdot(T.trace_estimate_adjoint(eps, c, w), v)
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs)) + 1e-14
    fd = central_difference(lambda s: np.vdot(c, T.frobenius_estimate(ydot + s * v, w)))
    assert_rel_close(np.vdot(T.frobenius_estimate_adjoint(ydot, c, w), v), fd)


def test_estimators_on_image_shaped_tangents():
    rng = np.random.default_rng(1)
    eps, ydot = rng.standard_normal((2, 3, 2, 4, 4)), rng.standard_normal((2, 3, 2, 4, 4))
    tr = T.trace_estimate(eps, ydot, 0.5)
    np.testing.assert_allclose(tr, 0.5 * (eps * ydot).sum(axis=(0, 2, 3, 4)), rtol=1e-14)
    ad = T.trace_estimate_adjoint(eps, np.arange(3.0), 0.5)
    np.testing.assert_allclose(ad, 0.5 * np.arange(3.0)[None, :, None, None, None] * eps)


@pytest.mark.parametrize("estimator", ["trace", "frobenius"])
@pytest.mark.parametrize("kind", ["exact", "gaussian", "rademacher"])
@given(**cases)
def test_estimate_gradients_match_finite_differences(estimator, kind, B, D, K, hidden, layer,
                                                    activation, seed, t):
    """Loss = <c, estimate(z, t; θ)> with probes fixed: ∂/∂z, ∂/∂t, ∂/∂θ from the adjoint (eq.
    3.4-3.5) and the network's backward (eq. 2.3) equal central differences."""
    net, params, rng = _net(D, hidden, layer, activation, seed)
    z = rng.standard_normal((B, D))
    eps = T.probes(kind, None if kind == "exact" else K, z.shape, rng, "float64", np)
    w = T.probe_weight(kind, eps.shape[0])
    c = rng.standard_normal(B)

    def loss(p=params, z_=z, t_=t):
        _, yd, _ = net.forward(p, z_, eps, t_)
        est = T.trace_estimate(eps, yd, w) if estimator == "trace" else T.frobenius_estimate(yd, w)
        return np.vdot(c, est)

    _, ydot, cache = net.forward(params, z, eps, t)
    ydotbar = (T.trace_estimate_adjoint(eps, c, w) if estimator == "trace"
               else T.frobenius_estimate_adjoint(ydot, c, w))
    zbar, _, pbar, tbar = net.backward(None, ydotbar, cache)
    v = rng.standard_normal(z.shape)
    assert_rel_close(np.vdot(zbar, v), central_difference(lambda s: loss(z_=z + s * v)),
                     what="zbar")
    assert_rel_close(float(tbar), central_difference(lambda s: loss(t_=t + s)), what="tbar")
    for name in params:
        v = rng.standard_normal(params[name].shape)
        fd = central_difference(lambda s: loss(p={**params, name: params[name] + s * v}))
        assert_rel_close(np.vdot(pbar[name], v), fd, what=name)
