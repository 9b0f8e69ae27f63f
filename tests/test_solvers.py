"""Solvers and their discrete adjoints (docs/solvers.md). float64 throughout.

Test dynamics written here, each with its own hand backward:
- Linear:   y' = y Aᵀ + b t            (exact solution by the matrix exponential of an
                                         augmented system; linear in (y0, b): dot-product test)
- CosGrowth: y' = a cos(t) y           (exact y0 exp(a (sin t − sin t0)))
- TanhMLP:  y' = tanh(y W1ᵀ + t u + c1) W2ᵀ + c2
- Augmented: State(z, e): z' = MLP(z, t), e' = ½‖z'‖² per row (a NamedTuple state whose e
             part does not feed back, as the CNF's log-density and kinetic parts)
"""
import math
from typing import NamedTuple

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from npflow.solvers import (MAX_FACTOR, MIN_FACTOR, SAFETY, SolverError, initial_time_gradient,
                            odeint, propose_step, terminal_time_gradient)

FIXED = ["euler", "midpoint", "rk4", "rk38", "bosh3", "dopri5"]
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4, "rk38": 4, "bosh3": 3, "dopri5": 5}


# ----------------------------------------------------------------------------- test dynamics

class Linear:
    """y' = y Aᵀ + b t; y (B, D)."""

    def __init__(self, A, b):
        self.params = {"A": A, "b": b}

    def forward(self, t, y):
        return y @ self.params["A"].T + self.params["b"] * t, (t, y)

    def backward(self, cache, g):
        t, y = cache
        A, b = self.params["A"], self.params["b"]
        gs = g.sum(axis=0)
        return g @ A, {"A": g.T @ y, "b": t * gs}, gs @ b


def linear_exact(A, b, y0, t0, t1):
    """exp of the augmented generator on (y, t, 1): d/dt (y, t, 1) = M (y, t, 1)."""
    D = A.shape[0]
    M = np.zeros((D + 2, D + 2))
    M[:D, :D] = A
    M[:D, D] = b
    M[D, D + 1] = 1.0
    Y = np.concatenate([y0, np.full((len(y0), 1), t0), np.ones((len(y0), 1))], axis=1)
    return (Y @ scipy.linalg.expm(M * (t1 - t0)).T)[:, :D]


class CosGrowth:
    """y' = a cos(t) y (elementwise), a scalar parameter."""

    def __init__(self, a):
        self.params = {"a": np.asarray(a, dtype=float)}

    def forward(self, t, y):
        return self.params["a"] * math.cos(t) * y, (t, y)

    def backward(self, cache, g):
        t, y = cache
        a = self.params["a"]
        gy = np.vdot(g, y)
        return a * math.cos(t) * g, {"a": math.cos(t) * gy}, -a * math.sin(t) * gy


class TanhMLP:
    """y' = tanh(y W1ᵀ + t u + c1) W2ᵀ + c2; y (B, D), hidden H."""

    def __init__(self, rng, D, H, scale=1.0):
        self.params = {
            "W1": scale * rng.normal(size=(H, D)) / math.sqrt(D), "u": rng.normal(size=H),
            "c1": 0.5 * rng.normal(size=H), "W2": scale * rng.normal(size=(D, H)) / math.sqrt(H),
            "c2": 0.5 * rng.normal(size=D)}

    def forward(self, t, y):
        p = self.params
        h = np.tanh(y @ p["W1"].T + t * p["u"] + p["c1"])
        return h @ p["W2"].T + p["c2"], (t, y, h)

    def backward(self, cache, g):
        t, y, h = cache
        p = self.params
        abar = (g @ p["W2"]) * (1.0 - h * h)
        asum = abar.sum(axis=0)
        grads = {"W1": abar.T @ y, "u": t * asum, "c1": asum, "W2": g.T @ h, "c2": g.sum(axis=0)}
        return abar @ p["W1"], grads, asum @ p["u"]


class State(NamedTuple):
    z: np.ndarray
    e: np.ndarray


class Augmented:
    """State(z, e): z' = f(z, t) (TanhMLP), e' = ½ Σ_d f_d² per row; e never feeds back."""

    def __init__(self, net):
        self.net = net
        self.params = net.params

    def forward(self, t, y):
        f, cache = self.net.forward(t, y.z)
        return State(f, 0.5 * (f * f).sum(axis=1)), (cache, f)

    def backward(self, cache, g):
        net_cache, f = cache
        fbar = g.z + g.e[:, None] * f
        zbar, grads, tbar = self.net.backward(net_cache, fbar)
        return State(zbar, None), grads, tbar


class Blowup:
    """y' = y² (blows up at t = 1/y0)."""
    params = {}

    def forward(self, t, y):
        return y * y, y

    def backward(self, cache, g):
        return 2 * cache * g, {}, 0.0


class GoesNaN:
    """y' = −y, but NaN once t > t_bad."""
    params = {}

    def __init__(self, t_bad):
        self.t_bad = t_bad

    def forward(self, t, y):
        return (-y if t <= self.t_bad else y * np.nan), None

    def backward(self, cache, g):
        return -g, {}, 0.0


def make_linear(rng, B, D, scale=0.6):
    return Linear(scale * rng.normal(size=(D, D)), rng.normal(size=D)), rng.normal(size=(B, D))


# ----------------------------------------------------------------------------- helpers

def fd(fun, eps=1e-4):
    """Fourth-order central difference of a scalar function of a scalar at 0 (error O(ε⁴))."""
    return (-fun(2 * eps) + 8 * fun(eps) - 8 * fun(-eps) + fun(-2 * eps)) / (12 * eps)


def assert_close(analytic, numeric, rel=1e-7, floor=1e-3):
    scale = max(abs(analytic), abs(numeric), floor)
    assert abs(analytic - numeric) <= rel * scale, (analytic, numeric)


def check_all_gradients(dyn_factory, y0, t0, t1, kw, rng, rel=1e-7):
    """Adjoint vs finite differences in y0, every parameter, t0 and t1 (random directions).

    dyn_factory(params) -> dynamics; kw: the odeint options of the (replayed) solve.
    """
    dyn = dyn_factory(dyn_factory.params0)
    sol = odeint(dyn, y0, t0, t1, **kw)
    w = rng.normal(size=np.shape(sol.y1))
    g = sol.backward(w)

    def loss(y0_=y0, t0_=t0, t1_=t1, params=None):
        d = dyn_factory(params if params is not None else dyn_factory.params0)
        return np.vdot(w, odeint(d, y0_, t0_, t1_, **kw).y1)

    v = rng.normal(size=np.shape(y0))
    assert_close(np.vdot(g.y0, v), fd(lambda e: loss(y0_=y0 + e * v)), rel)
    for name, p in dyn_factory.params0.items():
        V = rng.normal(size=np.shape(p))
        shifted = lambda e: loss(params={**dyn_factory.params0, name: p + e * V})  # noqa: E731
        assert_close(np.vdot(g.params[name], V), fd(shifted), rel)
    assert_close(g.t0, fd(lambda e: loss(t0_=t0 + e)), rel)
    assert_close(g.t1, fd(lambda e: loss(t1_=t1 + e)), rel)
    return sol, g


def factory(cls, params0, *args):
    def make(params):
        d = cls.__new__(cls)
        d.params = dict(params)
        return d
    make.params0 = params0
    return make


def mlp_factory(net):
    return factory(TanhMLP, net.params)


def linear_factory(dyn):
    return factory(Linear, dyn.params)


# ----------------------------------------------------------------------------- exact solutions

@pytest.mark.parametrize("method,steps", [("euler", 4000), ("midpoint", 400), ("rk4", 40),
                                          ("rk38", 40), ("dopri5", 20)])
def test_linear_system_matches_matrix_exponential(method, steps):
    rng = np.random.default_rng(1)
    dyn, y0 = make_linear(rng, 3, 4)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.2, 1.3)
    sol = odeint(dyn, y0, 0.2, 1.3, method=method, steps=steps)
    tol = {"euler": 2e-3, "midpoint": 1e-5, "rk4": 1e-7, "rk38": 1e-7, "dopri5": 1e-9}[method]
    assert np.abs(sol.y1 - exact).max() < tol
    assert sol.nfe == steps * {"euler": 1, "midpoint": 2, "rk4": 4, "rk38": 4, "dopri5": 6}[method]
    assert len(sol.ts) == steps + 1 and sol.ts[0] == 0.2 and sol.ts[-1] == 1.3


def test_time_dependent_problem_matches_exact_solution():
    y0 = np.array([[0.5, -1.0, 2.0]])
    t0, t1, a = 0.3, 2.9, 1.7
    exact = y0 * math.exp(a * (math.sin(t1) - math.sin(t0)))
    assert np.abs(odeint(CosGrowth(a), y0, t0, t1, method="rk4", steps=200).y1 - exact).max() < 1e-8
    sol = odeint(CosGrowth(a), y0, t0, t1, method="dopri5", rtol=1e-9, atol=1e-9)
    assert np.abs(sol.y1 - exact).max() < 1e-8


def test_exponential_growth_matches_e_to_the_t():
    dyn = Linear(np.eye(1), np.zeros(1))
    y1 = odeint(dyn, np.ones((1, 1)), 0.0, 1.0, method="rk4", steps=100).y1
    assert abs(y1[0, 0] - math.e) < 1e-9
    y1 = odeint(dyn, np.ones((1, 1)), 0.0, 1.0, method="dopri5", rtol=1e-10, atol=1e-10).y1
    assert abs(y1[0, 0] - math.e) < 1e-9


@pytest.mark.parametrize("method", FIXED)
def test_observed_order_matches_tableau_order(method):
    """Slope of log(error) against log(h) on a fixed mesh (dopri5: its 5th-order solution)."""
    rng = np.random.default_rng(2)
    dyn, y0 = make_linear(rng, 2, 3, scale=0.4)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 1.0)
    Ns = np.array([16, 24, 32, 48, 64]) * (4 if method == "euler" else 1)
    errs = [np.abs(odeint(dyn, y0, 0.0, 1.0, method=method, steps=int(N)).y1 - exact).max()
            for N in Ns]
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope - ORDER[method]) < 0.1, (method, slope, errs)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8, 1e-10])
def test_dopri5_error_is_within_tolerance(tol):
    rng = np.random.default_rng(3)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 2.0)
    sol = odeint(dyn, y0, 0.0, 2.0, method="dopri5", rtol=tol, atol=tol)
    # the global error in the controller's norm (eq. 3.1) is the tolerance up to the small
    # growth factor of this problem (|y| grows to ~20), and not far below it (no wasted work)
    ratio = np.sqrt(np.mean(((sol.y1 - exact) / (tol + tol * np.abs(exact))) ** 2))
    assert 0.01 < ratio < 2.0, ratio
    # torchdiffeq's count: one evaluation at t0, one for the initial step, six per attempt
    assert sol.nfe == 2 + 6 * (sol.n_steps + sol.n_rejected)


def test_dopri5_convergence_against_tolerance_is_fifth_order_in_steps():
    """Error against number of accepted steps when tightening the tolerance: slope ≈ 5."""
    rng = np.random.default_rng(4)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 2.0)
    errs, ns = [], []
    for tol in [1e-6, 1e-8, 1e-10, 1e-12]:
        sol = odeint(dyn, y0, 0.0, 2.0, method="dopri5", rtol=tol, atol=tol)
        errs.append(np.abs(sol.y1 - exact).max())
        ns.append(sol.n_steps)
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert 4.0 < slope < 6.0, (slope, ns, errs)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_bosh3_adaptive_error_is_within_tolerance_at_three_evaluations_per_step(tol):
    """bosh3 through odeint's adaptive path (derived from its tableau alone: error weights,
    FSAL): the global error is of the order of the tolerance, and each attempted step costs
    3 evaluations (4 stages, the first reused from the last), plus 2 at the start."""
    rng = np.random.default_rng(3)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 2.0)
    sol = odeint(dyn, y0, 0.0, 2.0, method="bosh3", rtol=tol, atol=tol)
    ratio = np.sqrt(np.mean(((sol.y1 - exact) / (tol + tol * np.abs(exact))) ** 2))
    assert 0.01 < ratio < 5.0, ratio
    assert sol.nfe == 2 + 3 * (sol.n_steps + sol.n_rejected)
    assert sol.n_steps > 1


def test_bosh3_convergence_against_tolerance_is_third_order_in_steps():
    """Error against number of accepted steps when tightening the tolerance: slope ≈ 3."""
    rng = np.random.default_rng(4)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 2.0)
    errs, ns = [], []
    for tol in [1e-5, 1e-7, 1e-9, 1e-11]:
        sol = odeint(dyn, y0, 0.0, 2.0, method="bosh3", rtol=tol, atol=tol)
        errs.append(np.abs(sol.y1 - exact).max())
        ns.append(sol.n_steps)
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert 2.5 < slope < 3.5, (slope, ns, errs)


def test_dopri5_needs_far_fewer_evaluations_than_rk4_at_equal_accuracy():
    rng = np.random.default_rng(5)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 0.0, 4.0)
    sol = odeint(dyn, y0, 0.0, 4.0, method="dopri5", rtol=1e-10, atol=1e-10)
    target = np.abs(sol.y1 - exact).max()
    N = 8
    while np.abs(odeint(dyn, y0, 0.0, 4.0, method="rk4", steps=N).y1 - exact).max() > target:
        N = int(N * 1.25) + 1
    assert sol.nfe * 3 < 4 * N, (sol.nfe, 4 * N)


def test_dopri5_adapts_to_the_solution():
    """Small steps in the fast transient, larger ones later (y' = −50 (y − cos t))."""

    class Relax:
        params = {}

        def forward(self, t, y):
            return -50.0 * (y - math.cos(t)), None

    sol = odeint(Relax(), np.array([3.0]), 0.0, 3.0, method="dopri5", rtol=1e-6, atol=1e-6)
    h = np.diff(sol.ts)
    assert h[0] < 0.01 and h[len(h) // 2] > 2 * h[0]


# ----------------------------------------------------------------------------- controller

def test_controller_constants_and_limits():
    assert (SAFETY, MIN_FACTOR, MAX_FACTOR) == (0.9, 0.2, 10.0)
    assert propose_step(0.1, 0.0, 5) == pytest.approx(1.0)
    assert propose_step(0.1, 1e-12, 5) == pytest.approx(1.0)           # growth capped at 10×
    assert propose_step(0.1, 1e6, 5) == pytest.approx(0.02)            # shrink capped at 0.2×
    assert propose_step(0.1, 2.0, 5) == pytest.approx(0.1 * 0.9 * 2.0 ** -0.2)
    assert propose_step(0.1, 0.99, 5) == pytest.approx(0.1)            # accepted: no shrink
    assert propose_step(0.1, 0.01, 5) == pytest.approx(0.1 * 0.9 * 0.01 ** -0.2)
    assert propose_step(-0.1, 0.01, 5) == pytest.approx(-0.1 * 0.9 * 0.01 ** -0.2)


def test_initial_step_is_hairer_wanner_for_exponential_decay():
    """y' = −λ y, y0 = 1, rtol=atol=τ: d0 = 1/(2τ), d1 = λ d0, h0 = 0.01/λ,
    d2 = λ² d0, h1 = (0.01/(λ² d0))^(1/5) (embedded order 4); first step min(100 h0, h1)."""
    lam, tau = 3.0, 1e-6
    dyn = Linear(np.array([[-lam]]), np.zeros(1))
    sol = odeint(dyn, np.ones((1, 1)), 0.0, 1e-9, method="dopri5", rtol=tau, atol=tau)
    d0 = 1 / (2 * tau)
    h0 = 0.01 / lam
    h1 = (0.01 / (lam * lam * d0)) ** (1 / 5)
    expect = min(100 * h0, h1)
    sol = odeint(dyn, np.ones((1, 1)), 0.0, 1.0, method="dopri5", rtol=tau, atol=tau)
    sol_given = odeint(dyn, np.ones((1, 1)), 0.0, 1.0, method="dopri5", rtol=tau, atol=tau,
                       first_step=expect)
    assert sol.ts[1] == pytest.approx(expect, rel=1e-12)
    assert sol.nfe == sol_given.nfe + 1            # the heuristic costs one evaluation


# ----------------------------------------------------------------------------- adjoints

@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), D=st.integers(1, 4),
       method=st.sampled_from(FIXED), steps=st.integers(1, 6),
       backwards=st.booleans())
def test_discrete_adjoint_matches_finite_differences_linear(seed, B, D, method, steps, backwards):
    rng = np.random.default_rng(seed)
    dyn, y0 = make_linear(rng, B, D)
    t0, t1 = rng.uniform(-1, 0.5), rng.uniform(0.6, 1.5)
    if backwards:
        t0, t1 = t1, t0
    check_all_gradients(linear_factory(dyn), y0, t0, t1, dict(method=method, steps=steps), rng)


@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), D=st.integers(1, 3),
       H=st.integers(1, 6), method=st.sampled_from(FIXED), steps=st.integers(1, 5),
       backwards=st.booleans())
def test_discrete_adjoint_matches_finite_differences_mlp(seed, B, D, H, method, steps, backwards):
    rng = np.random.default_rng(seed)
    net = TanhMLP(rng, D, H)
    y0 = rng.normal(size=(B, D))
    t0, t1 = rng.uniform(-0.5, 0.2), rng.uniform(0.4, 1.2)
    if backwards:
        t0, t1 = t1, t0
    check_all_gradients(mlp_factory(net), y0, t0, t1, dict(method=method, steps=steps), rng)


@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), D=st.integers(1, 3),
       H=st.integers(2, 6), tol=st.sampled_from([1e-3, 1e-5, 1e-7]), backwards=st.booleans())
def test_dopri5_adjoint_matches_finite_differences_of_replayed_mesh(seed, B, D, H, tol,
                                                                     backwards):
    rng = np.random.default_rng(seed)
    net = TanhMLP(rng, D, H, scale=2.0)
    y0 = rng.normal(size=(B, D))
    t0, t1 = (0.0, 1.5) if not backwards else (1.5, 0.0)
    sol = odeint(net, y0, t0, t1, method="dopri5", rtol=tol, atol=tol)
    replay = odeint(net, y0, t0, t1, method="dopri5", grid=sol.grid)
    np.testing.assert_allclose(replay.y1, sol.y1, rtol=1e-13, atol=1e-13)
    assert replay.nfe == 6 * sol.n_steps
    w = rng.normal(size=sol.y1.shape)
    g_adaptive = sol.backward(w)
    _, g_replay = check_all_gradients(mlp_factory(net), y0, t0, t1,
                                      dict(method="dopri5", grid=sol.grid), rng)
    # the adaptive solve's gradient is the replayed fixed-mesh solve's gradient
    w2 = rng.normal(size=sol.y1.shape)
    ga, gr = sol.backward(w2), replay.backward(w2)
    np.testing.assert_allclose(ga.y0, gr.y0, rtol=1e-12, atol=1e-12)
    assert ga.t1 == pytest.approx(gr.t1, rel=1e-10, abs=1e-12)
    assert ga.t0 == pytest.approx(gr.t0, rel=1e-10, abs=1e-12)
    assert g_adaptive.nfe == 6 * sol.n_steps


def test_vjp_is_adjoint_of_linear_solve():
    """y1 is linear in y0 (with b = 0) and in b (with y0 = 0): <J v, w> = <v, Jᵀ w>."""
    rng = np.random.default_rng(6)
    for method, kw in [("rk4", dict(steps=7)), ("midpoint", dict(steps=3)),
                       ("dopri5", dict(rtol=1e-6, atol=1e-6))]:
        A = 0.7 * rng.normal(size=(4, 4))
        v, w = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
        sol = odeint(Linear(A, np.zeros(4)), v, 0.1, 1.4, method=method, **kw)
        grid = dict(grid=sol.grid)
        Jv = odeint(Linear(A, np.zeros(4)), v, 0.1, 1.4, method=method, **grid).y1
        JTw = odeint(Linear(A, np.zeros(4)), np.zeros((3, 4)), 0.1, 1.4, method=method,
                     **grid).backward(w).y0
        assert np.vdot(Jv, w) == pytest.approx(np.vdot(v, JTw), rel=1e-12)
        u = rng.normal(size=4)
        Ju = odeint(Linear(A, u), np.zeros((3, 4)), 0.1, 1.4, method=method, **grid).y1
        JTw_b = odeint(Linear(A, np.zeros(4)), np.zeros((3, 4)), 0.1, 1.4, method=method,
                       **grid).backward(w).params["b"]
        assert np.vdot(Ju, w) == pytest.approx(np.vdot(u, JTw_b), rel=1e-12)


@pytest.mark.parametrize("method,kw", [("rk4", dict(steps=7)), ("euler", dict(steps=5)),
                                       ("dopri5", dict(rtol=1e-6, atol=1e-6))])
def test_caches_and_checkpoint_give_the_same_gradients(method, kw):
    rng = np.random.default_rng(7)
    net = TanhMLP(rng, 3, 5, scale=1.5)
    y0 = rng.normal(size=(4, 3))
    w = rng.normal(size=(4, 3))
    base = odeint(net, y0, 0.2, 1.1, method=method, **kw)
    g = base.backward(w)
    nsol = {"rk4": 4, "euler": 1, "dopri5": 6}[method]
    N = base.n_steps
    assert g.nfe_recompute == nsol * N and g.nfe == nsol * N
    others = {"caches": odeint(net, y0, 0.2, 1.1, method=method, store="caches", **kw)}
    for k in (1, 2, 3, N + 2):
        others[k] = odeint(net, y0, 0.2, 1.1, method=method, checkpoint=k, **kw)
    for key, sol in others.items():
        np.testing.assert_array_equal(sol.y1, base.y1)
        gk = sol.backward(w)
        np.testing.assert_allclose(gk.y0, g.y0, rtol=1e-13, atol=1e-14)
        for name in g.params:
            np.testing.assert_allclose(gk.params[name], g.params[name], rtol=1e-13, atol=1e-14)
        assert gk.t0 == pytest.approx(g.t0, rel=1e-12) and gk.t1 == pytest.approx(g.t1, rel=1e-12)
        if key == "caches":
            assert gk.nfe_recompute == 0
        else:
            # stages of every step, plus the states of each segment after its first
            n_segments = -(-N // key)
            assert gk.nfe_recompute == nsol * (N + (N - n_segments))


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_analytic_time_gradients_approach_discrete_ones_at_method_order(method):
    """|∂L/∂T discrete − λ(T)·F(y(T), T)| = O(h^p) (eq. 5.3); at t0 with −λ(t0)·F."""
    rng = np.random.default_rng(8)
    net = TanhMLP(rng, 2, 6, scale=1.5)
    y0 = rng.normal(size=(3, 2))
    w = rng.normal(size=(3, 2))
    Ns = np.array([16, 24, 32, 48, 64]) * (2 if method == "euler" else 1)
    gapT, gap0 = [], []
    for N in Ns:
        sol = odeint(net, y0, 0.0, 1.0, method=method, steps=int(N))
        g = sol.backward(w)
        gapT.append(abs(g.t1 - terminal_time_gradient(net, sol.y1, 1.0, w)))
        gap0.append(abs(g.t0 - initial_time_gradient(net, y0, 0.0, g.y0)))
    for gaps in (gapT, gap0):
        slope = -np.polyfit(np.log(Ns), np.log(gaps), 1)[0]
        assert abs(slope - ORDER[method]) < 0.25, (method, slope, gaps)


def test_time_gradients_of_a_zero_length_solve():
    rng = np.random.default_rng(9)
    net = TanhMLP(rng, 2, 4)
    y0 = rng.normal(size=(2, 2))
    w = rng.normal(size=(2, 2))
    f, _ = net.forward(0.5, y0)
    for kw in (dict(method="dopri5"), dict(method="rk4", steps=3)):
        g = odeint(net, y0, 0.5, 0.5, **kw).backward(w)
        assert g.t1 == pytest.approx(np.vdot(w, f), rel=1e-12)
        assert g.t0 == pytest.approx(-np.vdot(w, f), rel=1e-12)
        np.testing.assert_allclose(g.y0, w, rtol=1e-12)


# ----------------------------------------------------------------------------- state types

def test_namedtuple_state_keeps_its_type_and_its_gradients_are_exact():
    rng = np.random.default_rng(10)
    net = TanhMLP(rng, 2, 5)
    dyn = Augmented(net)
    y0 = State(rng.normal(size=(3, 2)), np.zeros(3))
    for kw in (dict(method="rk4", steps=4), dict(method="dopri5", rtol=1e-6, atol=1e-6)):
        sol = odeint(dyn, y0, 0.0, 0.8, **kw)
        assert isinstance(sol.y1, State)
        wz, we = rng.normal(size=(3, 2)), rng.normal(size=3)
        g = sol.backward(State(wz, we))
        assert isinstance(g.y0, State)
        replay = dict(method=kw["method"], grid=sol.grid)

        def loss(z0=y0.z, e0=y0.e, t1=0.8, params=net.params):
            inner = TanhMLP.__new__(TanhMLP)
            inner.params = params
            d = Augmented(inner)
            y1 = odeint(d, State(z0, e0), 0.0, t1, **replay).y1
            return np.vdot(wz, y1.z) + np.vdot(we, y1.e)

        v = rng.normal(size=(3, 2))
        assert_close(np.vdot(g.y0.z, v), fd(lambda e: loss(z0=y0.z + e * v)))
        u = rng.normal(size=3)
        assert_close(np.vdot(g.y0.e, u), fd(lambda e: loss(e0=y0.e + e * u)))
        assert_close(g.t1, fd(lambda e: loss(t1=0.8 + e)))
        V = rng.normal(size=net.params["W1"].shape)
        assert_close(np.vdot(g.params["W1"], V),
                     fd(lambda e: loss(params={**net.params, "W1": net.params["W1"] + e * V})))
        # a None cotangent entry is a zero one
        g_none = sol.backward(State(wz, None))
        g_zero = sol.backward(State(wz, np.zeros(3)))
        np.testing.assert_allclose(g_none.y0.z, g_zero.y0.z, rtol=1e-14)
        np.testing.assert_array_equal(g_none.y0.e, np.zeros(3))
        assert g_none.t1 == pytest.approx(g_zero.t1, rel=1e-13)
        # the analytic terminal gradient (eq. 5.1) accepts the same structure, None = 0
        f_end, _ = dyn.forward(0.8, sol.y1)
        assert terminal_time_gradient(dyn, sol.y1, 0.8, State(wz, None)) == pytest.approx(
            np.vdot(wz, f_end.z), rel=1e-13)
        assert terminal_time_gradient(dyn, sol.y1, 0.8, State(wz, we)) == pytest.approx(
            np.vdot(wz, f_end.z) + np.vdot(we, f_end.e), rel=1e-13)


def test_plain_tuple_state_stays_a_tuple():
    dyn = Augmented(TanhMLP(np.random.default_rng(11), 2, 3))

    class AsTuple:
        params = dyn.params

        def forward(self, t, y):
            f, c = dyn.forward(t, State(*y))
            return tuple(f), c

        def backward(self, cache, g):
            yb, pb, tb = dyn.backward(cache, State(*g))
            return tuple(yb), pb, tb

    y0 = (np.ones((2, 2)), np.zeros(2))
    sol = odeint(AsTuple(), y0, 0.0, 1.0, method="rk4", steps=3)
    assert type(sol.y1) is tuple and len(sol.y1) == 2
    g = sol.backward((np.ones((2, 2)), None))
    assert type(g.y0) is tuple


def test_backward_integration_matches_exact_solution_and_inverts_forward():
    rng = np.random.default_rng(12)
    dyn, y0 = make_linear(rng, 2, 3)
    exact = linear_exact(dyn.params["A"], dyn.params["b"], y0, 1.5, -0.5)
    for kw in (dict(method="rk4", steps=60), dict(method="dopri5", rtol=1e-9, atol=1e-9)):
        sol = odeint(dyn, y0, 1.5, -0.5, **kw)
        assert np.abs(sol.y1 - exact).max() < 1e-7
        assert sol.ts[0] == 1.5 and sol.ts[-1] == -0.5 and np.all(np.diff(sol.ts) < 0)
        there_and_back = odeint(dyn, sol.y1, -0.5, 1.5, **kw).y1
        assert np.abs(there_and_back - y0).max() < 1e-7


def test_float32_state_stays_float32():
    rng = np.random.default_rng(13)
    dyn = Linear(rng.normal(size=(2, 2)).astype(np.float32), np.ones(2, np.float32))
    y0 = np.ones((3, 2), np.float32)
    for kw in (dict(method="rk4", steps=3), dict(method="dopri5")):
        sol = odeint(dyn, y0, 0.0, 1.0, **kw)
        assert sol.y1.dtype == np.float32
        g = sol.backward(np.ones((3, 2), np.float32))
        assert g.y0.dtype == np.float32 and g.params["A"].dtype == np.float32


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("min_step", [1e-4, 1e-12])
def test_blow_up_with_a_step_floor_raises_solver_error_naming_t_h_and_ratio(min_step):
    """y' = y², y(0) = 1 blows up at t = 1."""
    with pytest.raises(SolverError, match=r"underflow at t=(0\.99|1\.0).*h=.*error ratio=") as e:
        odeint(Blowup(), np.ones(1), 0.0, 2.0, method="dopri5", min_step=min_step)
    assert isinstance(e.value, RuntimeError)


def test_blow_up_without_a_floor_stops_at_round_off():
    with pytest.raises(SolverError, match=r"underflow at t=1\.0.*ulp"):
        odeint(Blowup(), np.ones(1), 0.0, 2.0, method="dopri5", max_num_steps=10**6)


def test_exhausted_step_budget_raises_solver_error():
    class Stiff:
        params = {}

        def forward(self, t, y):
            return -1e6 * (y - math.cos(t)), None

    with pytest.raises(SolverError, match=r"max_num_steps=50 exhausted at t=.*h=.*ratio="):
        odeint(Stiff(), np.zeros(2), 0.0, 1.0, method="dopri5", max_num_steps=50)


def test_nan_state_raises_solver_error():
    with pytest.raises(SolverError, match=r"non-finite.*t=0\.6"):
        odeint(GoesNaN(0.5), np.ones((2, 2)), 0.0, 1.0, method="rk4", steps=5)
    with pytest.raises(SolverError, match="non-finite"):
        odeint(GoesNaN(0.5), np.ones((2, 2)), 0.0, 1.0, method="dopri5")


def test_bad_arguments_are_named():
    dyn = Linear(np.eye(2), np.zeros(2))
    y0 = np.ones((1, 2))
    with pytest.raises(ValueError, match="fixed mesh: give steps"):
        odeint(dyn, y0, 0.0, 1.0, method="rk4")
    with pytest.raises(ValueError, match="unknown method"):
        odeint(dyn, y0, 0.0, 1.0, method="rk45")
    with pytest.raises(ValueError, match="steps="):
        odeint(dyn, y0, 0.0, 1.0, method="rk4", steps=0)
    with pytest.raises(ValueError, match="grid"):
        odeint(dyn, y0, 0.0, 1.0, method="rk4", grid=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError, match="store"):
        odeint(dyn, y0, 0.0, 1.0, method="rk4", steps=2, store="everything")
    with pytest.raises(ValueError, match="checkpoint"):
        odeint(dyn, y0, 0.0, 1.0, method="rk4", steps=2, store="caches", checkpoint=2)
    with pytest.raises(ValueError, match="dtype"):
        odeint(dyn, np.ones((1, 2), int), 0.0, 1.0, method="rk4", steps=2)
    with pytest.raises(ValueError, match="shape"):
        odeint(dyn, y0, 0.0, 1.0, method="rk4", steps=2).backward(np.ones((2, 2)))


def test_max_step_caps_every_step():
    dyn = Linear(np.zeros((2, 2)), np.zeros(2))          # y' = 0: the controller grows h by 10×
    sol = odeint(dyn, np.ones((1, 2)), 0.0, 1.0, method="dopri5", max_step=0.1)
    assert sol.n_steps >= 10 and max(np.diff(sol.ts)) <= 0.1 + 1e-15
    h = np.diff(odeint(dyn, np.ones((1, 2)), 0.0, 1.0, method="dopri5").ts)
    np.testing.assert_allclose(h[1:-1] / h[:-2], MAX_FACTOR)   # ρ = 0: grow by MAX_FACTOR
    assert h[0] == pytest.approx(1e-6)                          # eq. 3.3 with d1 = d2 = 0


def test_step_size_picks_the_number_of_steps():
    dyn = Linear(np.eye(2), np.zeros(2))
    sol = odeint(dyn, np.ones((1, 2)), 0.0, 1.0, method="rk4", step_size=0.25)
    assert sol.n_steps == 4 and sol.nfe == 16
    sol = odeint(dyn, np.ones((1, 2)), 1.0, 0.0, method="rk4", step_size=0.3)
    assert sol.n_steps == 4


@pytest.mark.slow
def test_dopri5_nfe_is_comparable_with_torchdiffeq():
    """Same tableau, controller and initial step as torchdiffeq's dopri5 (docs/reference.md, section 5):
    NFE alike: at most two attempts more, and not far fewer (we land on t1 instead of stepping
    past it and interpolating, which changes the last steps)."""
    torch = pytest.importorskip("torch")
    torchdiffeq = pytest.importorskip("torchdiffeq")
    rng = np.random.default_rng(14)
    net = TanhMLP(rng, 2, 16, scale=2.0)
    P = {k: torch.tensor(v) for k, v in net.params.items()}
    count = [0]

    def f(t, y):
        count[0] += 1
        h = torch.tanh(y @ P["W1"].T + t * P["u"] + P["c1"])
        return h @ P["W2"].T + P["c2"]

    y0 = rng.normal(size=(5, 2))
    for tol in (1e-3, 1e-5, 1e-7, 1e-9):
        count[0] = 0
        torchdiffeq.odeint(f, torch.tensor(y0), torch.tensor([0.0, 1.0], dtype=torch.float64),
                           method="dopri5", rtol=tol, atol=tol)
        sol = odeint(net, y0, 0.0, 1.0, method="dopri5", rtol=tol, atol=tol)
        assert 0.75 * count[0] <= sol.nfe <= count[0] + 12, (tol, sol.nfe, count[0])
