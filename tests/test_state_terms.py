"""The state-term contract of the training methods (npflow/methods.py, docs/training.md section
11.1): every StateTerm's rate_backward is the adjoint of its rate (central differences and the
dot-product test against a complex-step tangent), and a method registered in one place with a
state term of its own is integrated by the CNF models (eq. 11.1), weighted in the loss (11.2)
and differentiated exactly (11.3-11.4), with no other code edited."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npflow import methods as M
from npflow.cnf import CNF, CNFDynamics
from npflow.multiscale import MultiscaleCNF
from npflow.training import history_keys, train
from npflow.optim import Adam

from test_cnf import check_gradient


class SineTerm(M.StateTerm):
    """A demo term depending on f and Jε nonlinearly: r = w Σ_k Σ_d sin(f_d) (Jε_k)_d²."""

    name = "sine"
    setting = "sine_weight"

    def rate(self, f, Jeps, w):
        return w * M.sum_features((np.sin(f)[None] * Jeps * Jeps).sum(axis=0))

    def rate_backward(self, rbar, f, Jeps, w):
        r = rbar.reshape((-1,) + (1,) * (f.ndim - 1))
        fbar = w * r * np.cos(f) * (Jeps * Jeps).sum(axis=0)
        return fbar, 2.0 * w * r[None] * np.sin(f)[None] * Jeps


class SineMethod(M.Method):
    name = "sine"
    help = "a demo regularizer with a state term of its own"
    settings = {"sine_weight": 0.0}
    terms = (SineTerm(),)

    def check_settings(self, config):
        if not config["sine_weight"] >= 0:
            raise ValueError("sine_weight must be >= 0")


@pytest.fixture
def sine_method():
    M.register(SineMethod())
    try:
        yield
    finally:
        del M.METHODS["sine"]


TERMS = {"kinetic": M.KineticEnergy(), "jacobian": M.JacobianFrobenius(), "sine": SineTerm()}


def _arrays(seed, shape, K):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal(shape)
    Jeps = rng.standard_normal((K,) + shape)
    return rng, f, Jeps


def _vjp_pieces(term, rng, f, Jeps, w):
    """Directions (df, dJ), a cotangent rbar, and rate_backward's (fbar, Jbar) (None -> 0)."""
    df, dJ = rng.standard_normal(f.shape), rng.standard_normal(Jeps.shape)
    rbar = rng.standard_normal(f.shape[0])
    fbar, Jbar = term.rate_backward(rbar, f, Jeps, w)
    fbar = np.zeros_like(f) if fbar is None else fbar
    Jbar = np.zeros_like(Jeps) if Jbar is None else Jbar
    return df, dJ, rbar, fbar, Jbar


SHAPES = st.sampled_from([(3, 2), (2, 5), (2, 1, 3, 3), (1, 2, 2, 2)])


@settings(max_examples=12)
@given(name=st.sampled_from(sorted(TERMS)), shape=SHAPES, K=st.integers(1, 3),
       seed=st.integers(0, 10**6), w=st.sampled_from([1.0, 0.5, 1.0 / 3]))
def test_state_term_rate_backward_matches_central_differences(name, shape, K, seed, w):
    term = TERMS[name]
    rng, f, Jeps = _arrays(seed, shape, K)
    df, dJ, rbar, fbar, Jbar = _vjp_pieces(term, rng, f, Jeps, w)
    h = 1e-6
    fd = (term.rate(f + h * df, Jeps + h * dJ, w)
          - term.rate(f - h * df, Jeps - h * dJ, w)) / (2 * h)
    assert term.rate(f, Jeps, w).shape == (shape[0],)
    an = np.sum(fbar * df) + np.sum(Jbar * dJ)
    assert abs(an - np.dot(rbar, fd)) <= 1e-7 * max(1.0, abs(an))


@settings(max_examples=12)
@given(name=st.sampled_from(sorted(TERMS)), shape=SHAPES, K=st.integers(1, 3),
       seed=st.integers(0, 10**6), w=st.sampled_from([1.0, 0.25]))
def test_state_term_rate_backward_is_adjoint_of_its_tangent(name, shape, K, seed, w):
    """<J v, rbar> = <v, Jᵀ rbar> with J v the complex-step tangent of the (analytic) rate,
    exact to rounding: Im r(f + i h df, Jε + i h dJ) / h."""
    term = TERMS[name]
    rng, f, Jeps = _arrays(seed, shape, K)
    df, dJ, rbar, fbar, Jbar = _vjp_pieces(term, rng, f, Jeps, w)
    h = 1e-30
    Jv = term.rate(f + 1j * h * df, Jeps + 1j * h * dJ, w).imag / h
    lhs, rhs = np.dot(Jv, rbar), np.sum(df * fbar) + np.sum(dJ * Jbar)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_rnode_is_one_unit_that_owns_its_settings_and_terms():
    rnode = M.METHODS["rnode"]
    assert rnode.settings == {"kinetic": 0.0, "jacobian": 0.0}
    assert [t.name for t in rnode.terms] == ["kinetic", "jacobian"]
    assert M.state_terms({"kinetic": 0.0, "jacobian": 0.0}) == ()
    assert [t.name for t in M.state_terms({"kinetic": 0.1, "jacobian": 0.0})] == [
        "kinetic", "jacobian"]
    assert {"kinetic", "jacobian"} <= set(history_keys())


def test_unknown_model_setting_is_refused_with_the_known_ones():
    with pytest.raises(TypeError, match="unknown argument.*lambda_k.*kinetic"):
        CNF(2, lambda_k=0.1)


def test_a_term_name_already_taken_is_refused():
    class Clash(M.Method):
        name = "clash"
        terms = (M.KineticEnergy(),)
    with pytest.raises(ValueError, match="taken"):
        M.register(Clash())
    assert "clash" not in M.METHODS


def _model(**kw):
    base = dict(dim=2, hidden=(5, 4), T=0.4, solver="rk4", steps=3, trace="exact",
                dtype="float64", seed=1)
    base.update(kw)
    return CNF(**base)


def test_a_state_term_added_in_one_place_is_weighted_in_the_loss(sine_method):
    x = np.random.default_rng(5).standard_normal((4, 2))
    on = _model(sine_weight=0.3, kinetic=0.1, jacobian=0.1)
    off = _model(kinetic=0.1, jacobian=0.1)
    assert on.config["sine_weight"] == 0.3 and "sine" in history_keys()
    loss_on, _, st_on = on.loss_and_grad(x, np.random.default_rng(0))
    loss_off, _, st_off = off.loss_and_grad(x, np.random.default_rng(0))
    assert st_on["nll"] == st_off["nll"]                 # the term does not change the flow
    assert st_on["sine"] != 0.0 and "sine" not in st_off
    np.testing.assert_allclose(loss_on, loss_off + 0.3 * st_on["sine"], rtol=1e-13)
    with pytest.raises(ValueError, match="sine_weight must be >= 0"):
        _model(sine_weight=-1.0)


def test_a_state_term_is_the_integral_of_its_rate(sine_method):
    """q(T) of a tight dopri5 solve against Simpson's rule of r(f, Jε) along the trajectory
    (exact trace: the probes are the basis, w = 1)."""
    model = _model(sine_weight=0.5, solver="dopri5", rtol=1e-10, atol=1e-10)
    x = np.random.default_rng(3).standard_normal((3, 2))
    _, _, stats = model.loss_and_grad(x, np.random.default_rng(0))
    T, n = model.config["T"], 64
    ts = np.linspace(0.0, T, n + 1)
    eps = np.broadcast_to(np.eye(2)[:, None, :], (2, 3, 2)).copy()
    net, params = model.nets[0], model.block_params(0)
    rates = []
    for t in ts:
        z = x if t == 0 else _transform_to(model, x, t)
        f, Jeps, _ = net.forward(params, z, eps, t)
        rates.append(SineTerm().rate(f, Jeps, 1.0))
    rates = np.array(rates)                                            # (n + 1, B)
    simpson = (T / n / 3) * (rates[0] + rates[-1] + 4 * rates[1:-1:2].sum(0)
                             + 2 * rates[2:-1:2].sum(0))
    np.testing.assert_allclose(stats["sine"], simpson.mean(), rtol=1e-7)


def _transform_to(model, x, t):
    """z(t) of the one-block model: the flow from 0 to t (tight dopri5)."""
    from npflow.solvers import odeint
    dyn = CNFDynamics(model.nets[0], model.block_params(0))
    return odeint(dyn, x, 0.0, t, method="dopri5", rtol=1e-11, atol=1e-11).y1


@pytest.mark.parametrize("kw", [dict(train_T=True), dict(train_T=True, blocks=2, kinetic=0.05,
                                                            trace="hutchinson", probes=2)])
def test_gradient_with_a_new_state_term_matches_central_differences(sine_method, kw):
    model = _model(sine_weight=0.4, **kw)
    x = np.random.default_rng(7).standard_normal((3, 2))
    check_gradient(model, x)


def test_multiscale_model_and_training_loop_carry_a_new_state_term(sine_method):
    model = MultiscaleCNF((1, 4, 4), hidden=(3,), scales=2, blocks=1, steps=1,
                          sine_weight=0.2, dtype="float64", seed=3)
    x = np.random.default_rng(1).integers(0, 256, (2, 1, 4, 4))
    loss, _, stats = model.loss_and_grad(x, np.random.default_rng(0))
    assert stats["T"] == [1.0] * len(model.nets)
    np.testing.assert_allclose(loss, stats["bpd"] + 0.2 * stats["sine"], rtol=1e-13)

    cnf = _model(sine_weight=0.2)
    res = train(cnf, Adam(cnf.params, lr=1e-3), lambda rng, it: rng.standard_normal((4, 2)),
                2, np.random.default_rng(0), log_every=1, print_fn=lambda *a, **k: None)
    assert res.status == "done" and np.isfinite(res.history["sine"]).all()
    assert res.records[-1]["sine"] == res.history["sine"][-1]
