"""Tests of npflow.vae, npflow.likelihoods and npflow.amortized_cnf (docs/vae.md), float64.

Every hand-written derivative is checked against central differences and by the dot-product
test; the importance-sampled p(x) of a VAE on 4 binary pixels sums to 1 over all 16 images.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npflow.amortized_cnf import AmortizedCNF, LowRankODENet
from npflow.likelihoods import Bernoulli, DiscretizedLogistic, Joint
from npflow.vae import FLOW_KINDS, VAE, beta_schedule, label_to_unit, unit_to_label

FLOWS = [f for f in FLOW_KINDS]


def _small_vae(flow, labels=False, likelihood="bernoulli", x_dim=6, z_dim=3, seed=0, **kw):
    num = 0 if flow == "none" else 2
    extra = dict(cnf_hidden=(5,), cnf_rank=2, cnf_steps=2) if flow == "cnf" else {}
    extra.update(kw)
    extra.setdefault("activation", "tanh")
    return VAE(x_dim, z_dim, hidden=(7,), flow=flow, num_flows=num, likelihood=likelihood,
               n_classes=10 if labels else 0, dtype="float64", seed=seed, **extra)


def _data(rng, B, x_dim, likelihood="bernoulli", labels=False):
    if likelihood == "bernoulli":
        x = (rng.uniform(size=(B, x_dim)) < 0.5).astype(float)
    else:
        x = (rng.integers(0, 256, (B, x_dim)) + 0.5) / 256
    if labels:
        x = np.concatenate([x, label_to_unit(rng.integers(0, 10, (B, 1)), 10)], axis=1)
    return x


# ---------------------------------------------------------------------------- likelihoods

def _lik_fd(lik, x, o, rng, h=1e-6):
    """(directional FD of Σ_b w_b lp_b along v, <v, backward(w)>) for random v, w."""
    w = rng.standard_normal(x.shape[0])
    v = rng.standard_normal(o.shape)
    lp, cache = lik.log_prob(x, o)
    obar = lik.backward(cache, w)
    fd = (lik.log_prob(x, o + h * v)[0] @ w - lik.log_prob(x, o - h * v)[0] @ w) / (2 * h)
    return fd, float((obar * v).sum())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10 ** 6), bins=st.sampled_from([2, 3, 10, 256]),
       D=st.integers(1, 4))
def test_likelihood_backward_matches_central_differences(seed, bins, D):
    rng = np.random.default_rng(seed)
    B = 5
    for lik, x, o in (
            (Bernoulli(D), (rng.uniform(size=(B, D)) < 0.5).astype(float),
             3 * rng.standard_normal((B, D))),
            (DiscretizedLogistic(D, bins), (rng.integers(0, bins, (B, D)) + 0.5) / bins,
             np.concatenate([rng.uniform(-0.2, 1.2, (B, D)),
                             rng.uniform(-4, 1, (B, D))], axis=1))):
        fd, an = _lik_fd(lik, x, o, rng)
        assert fd == pytest.approx(an, rel=1e-6, abs=1e-7)


def test_likelihood_vjp_is_adjoint_of_jvp():
    """<J v, w> = <v, Jᵀ w>: J v by forward differences of lp along v (eq. 2.2, 2.4-2.5)."""
    rng = np.random.default_rng(3)
    lik = Joint([Bernoulli(3), DiscretizedLogistic(1, 10)])
    x = np.concatenate([(rng.uniform(size=(4, 3)) < 0.5).astype(float),
                        label_to_unit(rng.integers(0, 10, (4, 1)), 10)], axis=1)
    o = rng.standard_normal((4, lik.n_out))
    fd, an = _lik_fd(lik, x, o, rng)
    assert fd == pytest.approx(an, rel=1e-6)


@pytest.mark.parametrize("bins", [2, 10, 256])
def test_discretized_logistic_bin_probabilities_sum_to_one(bins):
    rng = np.random.default_rng(bins)
    lik = DiscretizedLogistic(2, bins)
    o = np.concatenate([rng.uniform(-0.5, 1.5, (6, 2)), rng.uniform(-7, 2, (6, 2))], axis=1)
    P = np.exp(lik.bin_log_probs(o)).sum(axis=-1)
    assert np.allclose(P, 1.0, atol=1e-10)


def test_discretized_logistic_equals_logistic_cdf_differences():
    """eq. 2.3's stable form equals σ(b) − σ(a) computed directly (moderate values)."""
    lik = DiscretizedLogistic(1, 10)
    mu, ell = 0.43, -1.3
    o = np.array([[mu, ell]])
    s = math.exp(ell)
    sig = lambda v: 1 / (1 + math.exp(-v))
    for k in range(10):
        lo = -math.inf if k == 0 else (k / 10 - mu) / s
        hi = math.inf if k == 9 else ((k + 1) / 10 - mu) / s
        p = (1.0 if hi == math.inf else sig(hi)) - (0.0 if lo == -math.inf else sig(lo))
        lp = lik.log_prob(np.array([[(k + 0.5) / 10]]), o)[0][0]
        assert lp == pytest.approx(math.log(p), rel=1e-12)


# ---------------------------------------------------------------------------- the ELBO

def _loss_fd_check(m, x, seed=1, beta=0.7, h=1e-6, tol=2e-6):
    loss, g, _ = m.loss_and_grad(x, np.random.default_rng(seed), beta=beta)
    r = np.random.default_rng(7)
    assert set(g) == set(m.params)
    for k, p in m.params.items():
        v = r.standard_normal(p.shape)
        lp = m.loss_and_grad(x, np.random.default_rng(seed), params={**m.params, k: p + h * v},
                             beta=beta)[0]
        lm = m.loss_and_grad(x, np.random.default_rng(seed), params={**m.params, k: p - h * v},
                             beta=beta)[0]
        fd, an = (lp - lm) / (2 * h), float((g[k] * v).sum())
        assert fd == pytest.approx(an, rel=tol, abs=1e-8), k


@pytest.mark.parametrize("flow", FLOWS)
def test_loss_and_grad_matches_central_differences(flow):
    rng = np.random.default_rng(0)
    m = _small_vae(flow)
    _loss_fd_check(m, _data(rng, 5, 6))


@pytest.mark.parametrize("flow", ["none", "householder", "cnf"])
def test_loss_and_grad_with_labels_and_logistic_matches_central_differences(flow):
    rng = np.random.default_rng(1)
    m = _small_vae(flow, labels=True, likelihood="logistic256")
    _loss_fd_check(m, _data(rng, 4, 6, "logistic256", labels=True))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10 ** 6), beta=st.floats(0.01, 1.0),
       flow=st.sampled_from(["planar", "orthogonal", "triangular"]))
def test_loss_and_grad_matches_central_differences_hypothesis(seed, beta, flow):
    rng = np.random.default_rng(seed)
    m = _small_vae(flow, labels=bool(seed % 2), seed=seed, activation="softplus")
    _loss_fd_check(m, _data(rng, 3, 6, labels=bool(seed % 2)), seed=seed, beta=beta)


def test_same_rng_same_loss_and_beta_one_is_the_elbo():
    rng = np.random.default_rng(2)
    m = _small_vae("planar")
    x = _data(rng, 8, 6)
    l1, _, s1 = m.loss_and_grad(x, np.random.default_rng(5), beta=1.0)
    l2, _, _ = m.loss_and_grad(x, np.random.default_rng(5), beta=1.0)
    assert l1 == l2 == pytest.approx(s1["nelbo"])
    assert l1 == pytest.approx(m.nelbo(x, np.random.default_rng(5)).mean())
    l3, _, s3 = m.loss_and_grad(x, np.random.default_rng(5), beta=0.1)
    assert l3 == pytest.approx(s3["recon"] + 0.1 * s3["kl"])


def test_beta_schedule_goes_from_start_to_one():
    assert beta_schedule(0, 100) == pytest.approx(0.01)
    assert beta_schedule(50, 100) == pytest.approx(0.505)
    assert beta_schedule(100, 100) == beta_schedule(10 ** 6, 100) == 1.0
    assert beta_schedule(0, 0) == 1.0


# ---------------------------------------------------------------------------- the amortized CNF

def test_lowrank_net_vjp_is_adjoint_of_jvp_with_tangents():
    """Dot-product test of LowRankODENet (eq. 5.3) on (x, ẋ, θ) -> (y, ẏ), second order incl."""
    rng = np.random.default_rng(4)
    net = LowRankODENet((3, 5, 3), rank=2)
    B, K = 4, 3
    p = net.init_shared(rng, "float64", np)
    for k, s in net.sample_shapes().items():
        p[k] = rng.standard_normal((B,) + s)
    x, xd = rng.standard_normal((B, 3)), rng.standard_normal((K, B, 3))
    vx, vxd = rng.standard_normal(x.shape), rng.standard_normal(xd.shape)
    vp = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    wy, wyd = rng.standard_normal((B, 3)), rng.standard_normal((K, B, 3))
    t = 0.3
    y, yd, cache = net.forward(p, x, xd, t)
    xb, xdb, pb, tb = net.backward(wy, wyd, cache)
    h = 1e-6

    def f(s, dt=0.0):
        yy, yyd, _ = net.forward({k: p[k] + s * vp[k] for k in p}, x + s * vx, xd + s * vxd,
                                 t + dt)
        return (yy * wy).sum() + (yyd * wyd).sum()

    lhs = (f(h) - f(-h)) / (2 * h)
    rhs = (xb * vx).sum() + (xdb * vxd).sum() + sum((pb[k] * vp[k]).sum() for k in p)
    assert lhs == pytest.approx(rhs, rel=1e-7)
    assert (f(0, h) - f(0, -h)) / (2 * h) == pytest.approx(float(tb), rel=1e-6, abs=1e-9)


def test_amortized_cnf_logdet_equals_dense_jacobian_logdet():
    """ℓ(T) (eq. 5.1, exact trace) = log|det ∂z(T)/∂z(0)| of a finite-difference Jacobian, up to
    the RK4 error (64 steps)."""
    rng = np.random.default_rng(6)
    D, B = 3, 2
    flow = AmortizedCNF(D, 2, hidden=(6,), rank=2, T=0.7, steps=64)
    shared = flow.init_shared(rng, "float64", np)
    p = {k: 0.7 * rng.standard_normal((B,) + s) for k, s in flow.param_shapes().items()}
    z = rng.standard_normal((B, D))
    _, logdet, _ = flow.forward(z, p, shared)
    h = 1e-6
    for b in range(B):
        pb = {k: v[b:b + 1] for k, v in p.items()}
        J = np.empty((D, D))
        for i in range(D):
            e = np.zeros((1, D))
            e[0, i] = h
            J[:, i] = (flow.forward(z[b:b + 1] + e, pb, shared)[0]
                       - flow.forward(z[b:b + 1] - e, pb, shared)[0])[0] / (2 * h)
        assert logdet[b] == pytest.approx(np.linalg.slogdet(J)[1], abs=1e-6)


# ---------------------------------------------------------------------------- IWAE

def test_iwae_with_one_sample_is_the_elbo():
    rng = np.random.default_rng(8)
    m = _small_vae("householder")
    x = _data(rng, 6, 6)
    ll = m.log_likelihood(x, np.random.default_rng(3), k=1)
    assert np.allclose(ll, -m.nelbo(x, np.random.default_rng(3)))


def test_iwae_chunks_agree_with_one_pass():
    """Chunking the k samples (running max logsumexp, eq. 4.2) changes nothing but the draws:
    with one data row and chunk = k the two calls use the same noise."""
    rng = np.random.default_rng(9)
    m = _small_vae("planar")
    x = _data(rng, 1, 6)
    a = m.log_likelihood(x, np.random.default_rng(1), k=40, batch_rows=40)
    lw = m.log_weights(x, np.random.default_rng(1), 40)
    mx = lw.max()
    assert a[0] == pytest.approx(mx + math.log(np.exp(lw - mx).mean()))
    b = m.log_likelihood(x, np.random.default_rng(1), k=40, batch_rows=7)
    assert abs(a[0] - b[0]) < 0.5        # same estimand, different draws


@pytest.mark.parametrize("flow,labels", [(f, False) for f in FLOWS] + [("householder", True)])
def test_importance_sampled_px_sums_to_one_over_all_binary_images(flow, labels):
    """Σ_x p̂(x) over the 16 images of 4 binary pixels (× 2 labels of n_classes=2 when
    labels) is 1 within its Monte Carlo error: p̂(x) = mean_i w_i is unbiased (eq. 4.1).

    The encoder's σ starts near softplus(2) ≈ 2.1, wider than the prior, so the weights are
    bounded (the flows shift z by a bounded amount) and the Monte Carlo error is honest."""
    grid = np.array([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=float)
    if labels:
        grid = np.concatenate([np.concatenate([grid, np.full((16, 1), (c + 0.5) / 2)], 1)
                               for c in range(2)])
    num = 0 if flow == "none" else 2
    extra = dict(cnf_hidden=(4,), cnf_steps=2) if flow == "cnf" else {}
    d = 2
    m = VAE(4, d, hidden=(6,), flow=flow, num_flows=num, n_classes=2 if labels else 0,
            activation="tanh", dtype="float64", seed=11, **extra)
    bias = m.params["head.0.bias"].copy()
    bias[d:2 * d] = 2.0
    m.params["head.0.bias"] = bias
    R, k = 8, 1000
    est = np.array([np.exp(m.log_likelihood(grid, np.random.default_rng(r), k=k)).sum()
                    for r in range(R)])
    mean, se = est.mean(), est.std(ddof=1) / math.sqrt(R)
    assert abs(mean - 1.0) < 4 * se + 2e-3, (mean, se)


def test_importance_sampled_px_of_a_wrong_logdet_does_not_sum_to_one():
    """The check above can fail: dropping the flows' log-determinant (a wrong q) moves Σ p̂."""
    grid = np.array([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=float)
    m = VAE(4, 2, hidden=(6,), flow="planar", num_flows=2, activation="tanh",
            dtype="float64", seed=11)
    bias = m.params["head.0.bias"].copy()
    bias[2:4] = 2.0
    bias[4:] *= 6.0                                  # strong flows: a large log-det
    m.params["head.0.bias"] = bias
    fwd = m.flow_forward
    m.flow_forward = lambda z0, p, params=None: (lambda r: (r[0], 0 * r[1], r[2]))(
        fwd(z0, p, params))
    est = np.array([np.exp(m.log_likelihood(grid, np.random.default_rng(r), k=1000)).sum()
                    for r in range(8)])
    assert abs(est.mean() - 1.0) > 4 * est.std(ddof=1) / math.sqrt(8) + 2e-3


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_a_one_line_error():
    m = _small_vae("none")
    with pytest.raises(ValueError, match="binary"):
        m.loss_and_grad(np.full((2, 6), 0.5), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        m.loss_and_grad(np.zeros((2, 7)), np.random.default_rng(0))
    ml = _small_vae("none", labels=True)
    bad = np.zeros((2, 7))
    bad[:, -1] = 0.99
    with pytest.raises(ValueError, match="bin centres"):
        ml.loss_and_grad(bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="0..9"):
        label_to_unit([3, 10], 10)
    with pytest.raises(ValueError, match="unknown flow"):
        VAE(6, 3, flow="radial", num_flows=2)
    with pytest.raises(ValueError, match="num_flows"):
        VAE(6, 3, flow="planar", num_flows=0)
    with pytest.raises(ValueError, match="num_flows 0"):
        VAE(6, 3, flow="none", num_flows=3)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(6, 3, likelihood="gaussian")


def test_labels_round_trip_and_samples_carry_a_label():
    y = np.arange(10)
    assert np.array_equal(unit_to_label(label_to_unit(y, 10), 10), y)
    m = _small_vae("householder", labels=True)
    s = m.sample(5, np.random.default_rng(0))
    assert s.shape == (5, 7)
    assert set(unit_to_label(s[:, -1], 10)) <= set(range(10))
    r = m.reconstruct(_data(np.random.default_rng(1), 3, 6, labels=True),
                      np.random.default_rng(2))
    assert r.shape == (3, 7)


def test_label_channel_is_decoded_as_one_label_and_its_gradient_is_exact():
    """label_dims copies of the label column (the study's label channel): one decoded label
    (eq. 2.9), and loss_and_grad still matches central differences."""
    rng = np.random.default_rng(12)
    m = _small_vae("planar", labels=True, label_dims=3)
    y = rng.integers(0, 10, (4, 1))
    x = np.concatenate([_data(rng, 4, 6), np.repeat(label_to_unit(y, 10), 3, axis=1)], 1)
    _loss_fd_check(m, x)
    s = m.sample(5, np.random.default_rng(0))
    assert s.shape == (5, 9) and np.all(s[:, -3:] == s[:, -1:])
