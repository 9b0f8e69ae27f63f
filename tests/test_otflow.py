"""Tests of OT-Flow (docs/otflow.md): the potential's gradient, its exact Laplacian by the
OT-Flow recursion, the hand-written reverse of both, the augmented dynamics, and the model's
loss gradient through npflow.odeint's discrete adjoint. All gradient checks in float64."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npflow.otflow_net import (basis_tangent_trace, init_potential, param_names,
                               potential_backward, potential_forward, potential_hvp,
                               potential_value)

F64 = np.float64


def _random_potential(d, m, depth, seed, scale=0.7):
    """A potential with every parameter random (the OT-Flow init has w = 1, c = 0, equal
    residual layers: too special for a derivative test)."""
    rng = np.random.default_rng(seed)
    p = init_potential(d, m, depth, min(10, d + 1), rng, F64, np)
    return {k: scale * rng.standard_normal(v.shape) for k, v in p.items()}, rng


dims = st.integers(1, 6)
widths = st.integers(1, 7)
depths = st.integers(2, 4)
batches = st.integers(1, 4)
seeds = st.integers(0, 2 ** 31 - 1)


# ------------------------------------------------------------------ the forward: Φ, ∇Φ, tr


@given(d=dims, m=widths, depth=depths, B=batches, seed=seeds)
def test_potential_gradient_equals_central_differences(d, m, depth, B, seed):
    p, rng = _random_potential(d, m, depth, seed)
    s = rng.standard_normal((B, d + 1))
    phi, grad, _, _ = potential_forward(p, s, d, need_trace=False)
    np.testing.assert_allclose(phi, potential_value(p, s), rtol=1e-12, atol=1e-12)
    eps = 1e-6
    fd = np.empty_like(s)
    for j in range(d + 1):
        e = np.zeros(d + 1)
        e[j] = eps
        fd[:, j] = (potential_value(p, s + e) - potential_value(p, s - e)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("d", range(1, 21))
def test_otflow_trace_equals_hessian_trace(d):
    """tr ∇ₓ²Φ by the recursion (eq. 5.7-5.10) = trace of the x-block of a Hessian built by
    central differences of Φ (second differences, no use of our gradient)."""
    p, rng = _random_potential(d, 8, 3, 1000 + d, scale=0.5)
    s = rng.standard_normal((3, d + 1))
    _, _, tr, _ = potential_forward(p, s, d)
    eps = 1e-4
    f0 = potential_value(p, s)
    H = np.zeros((3, d + 1, d + 1))
    for j in range(d + 1):
        ej = np.zeros(d + 1)
        ej[j] = eps
        for k in range(j + 1):
            ek = np.zeros(d + 1)
            ek[k] = eps
            if j == k:
                H[:, j, j] = (potential_value(p, s + ej) - 2 * f0
                              + potential_value(p, s - ej)) / eps ** 2
            else:
                H[:, j, k] = H[:, k, j] = (
                    potential_value(p, s + ej + ek) - potential_value(p, s + ej - ek)
                    - potential_value(p, s - ej + ek) + potential_value(p, s - ej - ek)
                ) / (4 * eps ** 2)
    fd_trace = np.trace(H[:, :d, :d], axis1=1, axis2=2)
    np.testing.assert_allclose(tr, fd_trace, rtol=1e-5, atol=1e-4 * d)
    # and the time row/column is excluded: the full trace differs by H_tt
    assert not np.allclose(tr, np.trace(H, axis1=1, axis2=2), rtol=1e-8, atol=1e-8)


@given(d=dims, m=widths, depth=depths, B=batches, seed=seeds)
def test_otflow_trace_equals_basis_tangent_trace(d, m, depth, B, seed):
    """The O(d) recursion and d forward-mode Hessian-vector products agree to rounding."""
    p, rng = _random_potential(d, m, depth, seed)
    s = rng.standard_normal((B, d + 1))
    _, _, tr, _ = potential_forward(p, s, d)
    np.testing.assert_allclose(tr, basis_tangent_trace(p, s, d), rtol=1e-11, atol=1e-11)


def test_potential_at_init_matches_reference_structure():
    """OT-Flow's initialisation: w = 1, c = 0, identical residual layers, A Xavier-bounded."""
    d, m = 3, 6
    p = init_potential(d, m, 4, 4, np.random.default_rng(0), F64, np)
    assert sorted(p) == sorted(param_names(4))
    np.testing.assert_array_equal(p["w"], np.ones(m))
    np.testing.assert_array_equal(p["c"], np.zeros(d + 1))
    np.testing.assert_array_equal(p["K1"], p["K3"])
    assert np.abs(p["A"]).max() <= math.sqrt(6 / (4 + d + 1))
    assert np.abs(p["K0"]).max() <= 1 / math.sqrt(d + 1)
    assert p["K0"].shape == (m, d + 1) and p["A"].shape == (4, d + 1)


# ------------------------------------------------------------------ the reverse


def _cotangents(rng, B, D, which):
    return (rng.standard_normal(B) if "phi" in which else None,
            rng.standard_normal((B, D)) if "grad" in which else None,
            rng.standard_normal(B) if "trace" in which else None)


def _pairing(p, s, d, cots):
    phi, grad, tr, _ = potential_forward(p, s, d)
    return sum(float((a * b).sum()) for a, b in zip((phi, grad, tr), cots) if b is not None)


which_sets = st.sampled_from([("phi",), ("grad",), ("trace",), ("phi", "grad", "trace")])


@given(d=dims, m=widths, depth=depths, B=batches, seed=seeds, which=which_sets)
def test_potential_backward_matches_central_differences(d, m, depth, B, seed, which):
    """<Φ̄,Φ> + <ḡ,∇Φ> + <τ̄,tr>: its derivative along a random direction of s and of every
    parameter array equals the pairing with potential_backward's output."""
    p, rng = _random_potential(d, m, depth, seed)
    s = rng.standard_normal((B, d + 1))
    cots = _cotangents(rng, B, d + 1, which)
    _, _, _, cache = potential_forward(p, s, d)
    s_bar, p_bar = potential_backward(cache, *cots)
    assert sorted(p_bar) == sorted(p)
    eps = 1e-6
    ds = rng.standard_normal(s.shape)
    fd = (_pairing(p, s + eps * ds, d, cots) - _pairing(p, s - eps * ds, d, cots)) / (2 * eps)
    assert fd == pytest.approx(float((s_bar * ds).sum()), rel=1e-5, abs=1e-6)
    for k in p:
        dp = rng.standard_normal(p[k].shape)
        plus, minus = dict(p), dict(p)
        plus[k], minus[k] = p[k] + eps * dp, p[k] - eps * dp
        fd = (_pairing(plus, s, d, cots) - _pairing(minus, s, d, cots)) / (2 * eps)
        assert fd == pytest.approx(float((p_bar[k] * dp).sum()), rel=1e-5, abs=1e-6), k


@given(d=dims, m=widths, depth=depths, B=batches, seed=seeds)
def test_potential_backward_taylor_remainder_is_second_order(d, m, depth, B, seed):
    """F(θ + hδ) − F(θ) − h<∇F, δ> = O(h²) over (s, every parameter) at once: halving h
    divides the remainder by ≈ 4 (observed order 2), while dropping the gradient leaves O(h)."""
    p, rng = _random_potential(d, m, depth, seed, scale=0.5)
    s = rng.standard_normal((B, d + 1))
    cots = _cotangents(rng, B, d + 1, ("phi", "grad", "trace"))
    _, _, _, cache = potential_forward(p, s, d)
    s_bar, p_bar = potential_backward(cache, *cots)
    ds = rng.standard_normal(s.shape)
    dp = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    lin = float((s_bar * ds).sum()) + sum(float((p_bar[k] * dp[k]).sum()) for k in p)
    F0 = _pairing(p, s, d, cots)

    def remainder(h):
        ph = {k: p[k] + h * dp[k] for k in p}
        return abs(_pairing(ph, s + h * ds, d, cots) - F0 - h * lin)

    hs = [0.02 / 2 ** i for i in range(4)]
    r = [remainder(h) for h in hs]
    if max(r) < 1e-9:          # locally (almost) linear along δ: nothing to measure
        return
    slope = np.polyfit(np.log(hs), np.log(r), 1)[0]
    assert slope > 1.8, (r, slope)          # ≥ 2 (> 2 when the quadratic term is tiny)
    if abs(lin) > 1e-3:                      # a wrong gradient would leave an O(h) remainder
        r1 = [abs(_pairing({k: p[k] + h * dp[k] for k in p}, s + h * ds, d, cots) - F0)
              for h in hs]
        assert np.polyfit(np.log(hs), np.log(r1), 1)[0] < 1.3


@given(d=dims, m=widths, depth=depths, B=batches, K=st.integers(1, 3), seed=seeds)
def test_vjp_is_adjoint_of_jvp(d, m, depth, B, K, seed):
    """Dot-product test for s -> ∇_sΦ: <(∇²Φ) v, w> (tangent rule, potential_hvp) equals
    <v, (∇²Φ)ᵀ w> (reverse rule, potential_backward with ḡ = w)."""
    p, rng = _random_potential(d, m, depth, seed)
    s = rng.standard_normal((B, d + 1))
    V = rng.standard_normal((K, B, d + 1))
    W = rng.standard_normal((B, d + 1))
    grad, HV = potential_hvp(p, s, V)
    _, grad2, _, cache = potential_forward(p, s, d, need_trace=False)
    np.testing.assert_allclose(grad, grad2, rtol=1e-13, atol=1e-13)
    s_bar, _ = potential_backward(cache, None, W, None)
    for k in range(K):
        lhs = float((HV[k] * W).sum())
        rhs = float((V[k] * s_bar).sum())
        assert lhs == pytest.approx(rhs, rel=1e-11, abs=1e-11)


def test_potential_bad_input_errors():
    p, rng = _random_potential(3, 4, 2, 0)
    with pytest.raises(ValueError, match=r"shape \(B, d\+1\)"):
        potential_forward(p, rng.standard_normal((5, 3)), 3)
    with pytest.raises(ValueError, match="depth >= 2"):
        init_potential(3, 4, 1, 2, rng, F64, np)
    with pytest.raises(ValueError, match="rank"):
        init_potential(3, 4, 2, 5, rng, F64, np)
    _, _, _, cache = potential_forward(p, rng.standard_normal((2, 4)), 3, need_trace=False)
    with pytest.raises(ValueError, match="need_trace=False"):
        potential_backward(cache, None, None, np.ones(2))
