"""Multiscale CNF (docs/images.md section 3): FFJORD's plan, the exact gradient of the bits/dim
loss (weights and end times) against central differences, the identity flow's known bits/dim,
encode/decode inversion, and the float64 vs float32 training step (issue 6 item 6).
Loader-free: tiny synthetic 8-bit images."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import norm

from npflow.images import dequantize, logit_transform
from npflow.multiscale import MultiscaleCNF, default_scales, multiscale_plan
from npflow.optim import Adam


def _images(rng, B, shape):
    return rng.integers(0, 256, (B,) + tuple(shape)).astype(np.uint8)


def test_plan_is_ffjord_mnist_architecture():
    plan = multiscale_plan((1, 28, 28))
    assert default_scales(28, 28) == 3
    blocks = [s for op, s in plan if op == "block"]
    assert blocks == [(1, 28, 28)] * 2 + [(4, 14, 14)] * 2 + [(2, 14, 14)] * 2 + \
        [(8, 7, 7)] * 2 + [(4, 7, 7)] * 2
    assert [op for op, _ in plan].count("squeeze") == 2
    assert [s for op, s in plan if op == "factor"] == [(2, 14, 14), (4, 7, 7)]
    m = MultiscaleCNF((1, 28, 28), hidden=(2,), seed=0)
    # factored parts plus the final z cover all 784 dimensions
    assert m.part_shapes() == [(2, 14, 14), (4, 7, 7), (4, 7, 7)]
    assert sum(int(np.prod(s)) for s in m.part_shapes()) == 784
    with pytest.raises(ValueError, match="divisible"):
        multiscale_plan((1, 6, 6), scales=3)


@settings(max_examples=4)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["rademacher", "gaussian"]),
       st.booleans())
def test_loss_gradient_matches_central_differences(seed, trace, regularized):
    rng = np.random.default_rng(seed)
    lam = 0.05 if regularized else 0.0
    m = MultiscaleCNF((1, 4, 4), hidden=(3,), scales=2, blocks=1, steps=2, trace=trace,
                      train_T=True, T=0.7, kinetic=lam, jacobian=lam, dtype="float64",
                      seed=seed % 1000)
    x = _images(rng, 2, (1, 4, 4))
    loss, grads, stats = m.loss_and_grad(x, np.random.default_rng(seed + 1))
    assert set(grads) == set(m.params)
    d = {k: rng.standard_normal(v.shape) for k, v in m.params.items()}
    eps = 1e-6

    def L(s):
        p = {k: m.params[k] + s * d[k] for k in m.params}
        return m.loss_and_grad(x, np.random.default_rng(seed + 1), params=p)[0]

    fd = (L(eps) - L(-eps)) / (2 * eps)
    an = sum(float(np.sum(grads[k] * d[k])) for k in grads)
    assert abs(fd - an) <= 1e-6 * (1 + abs(fd)), (fd, an)
    # the analytic terminal ∂L/∂T agrees with the discrete one up to the RK4 error
    np.testing.assert_allclose(stats["dL_dT_analytic"], stats["dL_dT_discrete"], atol=0.05)


def test_identity_flow_bits_per_dim_is_gaussian_density_of_logit_data():
    """zero_last: f ≡ 0, so z = y and ℓ = 0 through squeeze and factor-out; the loss is the
    bits/dim of a standard normal on the logit-transformed dequantized data."""
    m = MultiscaleCNF((1, 8, 8), hidden=(4, 4), blocks=2, zero_last=True, dtype="float64")
    x = _images(np.random.default_rng(0), 3, (1, 8, 8))
    loss, _, stats = m.loss_and_grad(x, np.random.default_rng(7))
    xt = dequantize(x, np.random.default_rng(7), dtype="float64")  # the same first draws
    y, logdet = logit_transform(xt, 1e-6)
    nll = -norm.logpdf(y).reshape(3, -1).sum(1)
    expected = np.mean((nll - logdet) / (64 * math.log(2)) + 8)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert stats["bpd"] == pytest.approx(expected, rel=1e-12)


def test_decode_inverts_encode():
    rng = np.random.default_rng(3)
    m = MultiscaleCNF((2, 8, 8), hidden=(4,), blocks=1, dtype="float64", seed=2)
    y = rng.standard_normal((2, 2, 8, 8))
    parts = m.encode(y, solver="rk4", steps=16)
    assert [p.shape[1:] for p in parts] == m.part_shapes()
    back = m.decode(parts, solver="rk4", steps=16)
    np.testing.assert_allclose(back, y, atol=1e-6)
    s = m.sample(3, np.random.default_rng(0))
    assert s.shape == (3, 2, 8, 8) and np.isfinite(s).all()


def test_bits_per_dim_evaluation_matches_training_loss():
    m = MultiscaleCNF((1, 4, 4), hidden=(3,), scales=2, blocks=1, dtype="float64", seed=4)
    x = _images(np.random.default_rng(1), 3, (1, 4, 4))
    loss, _, _ = m.loss_and_grad(x, np.random.default_rng(2))
    bpd = m.bits_per_dim(x, np.random.default_rng(2))
    assert bpd.shape == (3,) and bpd.mean() == pytest.approx(loss, rel=1e-12)


def test_float64_and_float32_training_steps_agree():
    """Issue 6 item 6: one Adam step of a small configuration in both precisions."""
    x = _images(np.random.default_rng(5), 4, (1, 8, 8))
    out = {}
    for dt in ("float64", "float32"):
        m = MultiscaleCNF((1, 8, 8), hidden=(8, 8), blocks=1, steps=2, train_T=True,
                          kinetic=0.01, jacobian=0.01, dtype=dt, seed=3)
        loss, grads, _ = m.loss_and_grad(x, np.random.default_rng(11))
        assert all(g.dtype == np.dtype(dt) for g in grads.values())
        opt = Adam(m.params, lr=1e-3)
        out[dt] = loss, grads, opt.step(m.params, grads)
    l64, g64, p64 = out["float64"]
    l32, g32, p32 = out["float32"]
    assert l32 == pytest.approx(l64, rel=1e-5)
    for k in g64:
        scale = np.abs(g64[k]).max() + 1e-12
        assert np.abs(g32[k] - g64[k]).max() <= 1e-3 * scale, k
        np.testing.assert_allclose(p32[k], p64[k], rtol=1e-5, atol=1e-6)


def test_stored_caches_give_the_same_gradient_as_recomputed_stages():
    x = _images(np.random.default_rng(6), 2, (1, 8, 8))
    out = []
    for store in ("states", "caches"):
        m = MultiscaleCNF((1, 8, 8), hidden=(4,), blocks=1, steps=2, train_T=True,
                          store=store, dtype="float64", seed=1)
        out.append(m.loss_and_grad(x, np.random.default_rng(3)))
    assert out[0][0] == out[1][0]
    for k in out[0][1]:
        np.testing.assert_allclose(out[1][1][k], out[0][1][k], rtol=1e-12, atol=1e-14)


def test_bad_images_are_rejected():
    m = MultiscaleCNF((1, 4, 4), hidden=(2,), scales=2, blocks=1)
    with pytest.raises(ValueError, match="shape"):
        m.loss_and_grad(np.zeros((2, 1, 4, 5), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="0..255"):
        m.loss_and_grad(np.full((2, 1, 4, 4), 300), np.random.default_rng(0))
    with pytest.raises(ValueError, match="trace"):
        MultiscaleCNF((1, 4, 4), trace="exact")


def test_loss_and_gradient_equal_pytorch_torchdiffeq_reference():
    """Cross-check with the incumbent (bench/torch_mnist.py, autograd through torchdiffeq's
    3/8-rule RK4): same weights, dequantization noise and probes give the same bits/dim and
    the same weight gradients to rounding."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from torch_mnist import TorchMultiscaleCNF
    shape, hidden = (1, 8, 8), (6, 5)
    m = MultiscaleCNF(shape, hidden=hidden, scales=2, blocks=2, solver="rk38", steps=2,
                      dtype="float64", seed=3)
    tm = TorchMultiscaleCNF(shape, hidden=hidden, scales=2, blocks=2, steps=2).double()
    for b in range(len(m.nets)):
        for i, layer in enumerate(tm.funcs[b].net.layers):
            layer.conv.weight.data = torch.tensor(m.params[f"b{b}.{i}.weight"])
            layer.conv.bias.data = torch.tensor(m.params[f"b{b}.{i}.bias"])
    x = _images(np.random.default_rng(0), 3, shape)
    loss, grads, _ = m.loss_and_grad(x, np.random.default_rng(5))
    rng = np.random.default_rng(5)       # replay: dequantization, then one probe per block
    y, ld = logit_transform(dequantize(x, rng, dtype="float64"))
    probes = [torch.tensor(2.0 * rng.integers(0, 2, size=(1, 3) + s)[0] - 1.0)
              for op, s in m.plan if op == "block"]
    tl = tm.bits_per_dim(torch.tensor(y), torch.tensor(ld), None, probes=probes).mean()
    tl.backward()
    assert loss == pytest.approx(float(tl.detach()), rel=1e-12)
    for b in range(len(m.nets)):
        for i, layer in enumerate(tm.funcs[b].net.layers):
            for name, p in (("weight", layer.conv.weight), ("bias", layer.conv.bias)):
                np.testing.assert_allclose(grads[f"b{b}.{i}.{name}"], p.grad.numpy(),
                                           rtol=1e-9, atol=1e-12)
