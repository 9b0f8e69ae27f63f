"""npflow.autoencoder (docs/latent.md, sections 1-2): the reconstruction loss's gradient against
central differences (eq. 1.3), the standardization and its log-determinant (eq. 2.1-2.3), and
that μ, s travel with a saved model.

ReLU networks are piecewise smooth: examples whose ReLU inputs come within MARGIN of the kink
are rejected, so the finite differences compare derivatives where they exist.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import npflow
from npflow.autoencoder import Autoencoder

H, MARGIN = 1e-5, 1e-3


def central_difference(fn, h=H):
    return (-fn(2 * h) + 8 * fn(h) - 8 * fn(-h) + fn(-2 * h)) / (12 * h)


def relu_inputs_off_the_kink(ae, x):
    """True unless an encoder/decoder ReLU input lies within MARGIN of 0."""
    p = ae.params
    h = x
    for net, pre in ((ae.encoder, "encoder."), (ae.decoder, "decoder.")):
        for i in range(net.n_layers):
            a = h @ p[f"{pre}{i}.weight"].T + p[f"{pre}{i}.bias"]
            last = i == net.n_layers - 1
            relu = not (last and pre == "decoder.")
            if relu and np.min(np.abs(a)) < MARGIN:
                return False
            h = np.maximum(a, 0) if relu else 1 / (1 + np.exp(-a))
    return True


@given(x_dim=st.integers(1, 6), z_dim=st.integers(1, 4),
       hidden=st.lists(st.integers(1, 5), max_size=1), B=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_mse_gradient_equals_central_differences(x_dim, z_dim, hidden, B, seed):
    """eq. 1.3: <θ̄, v> = d/ds loss(θ + s v) for every parameter array; the code statistics do
    not enter the loss (zero gradient, not trained)."""
    rng = np.random.default_rng(seed)
    ae = Autoencoder(x_dim, z_dim, hidden=hidden, dtype="float64", seed=seed % 1000)
    x = rng.uniform(0, 1, (B, x_dim))
    assume(relu_inputs_off_the_kink(ae, x))
    loss, grads, stats = ae.loss_and_grad(x)
    assert sorted(grads) == sorted(ae.params)
    assert not np.any(grads["code_mean"]) and not np.any(grads["code_std"])
    r = ae.decode(ae.encode(x)) - x
    np.testing.assert_allclose(loss, (r ** 2).mean(), rtol=1e-13)
    for name in ae.network_names():
        v = rng.standard_normal(ae.params[name].shape)
        fd = central_difference(lambda s: ae.loss_and_grad(
            x, params={**ae.params, name: ae.params[name] + s * v})[0])
        got = np.vdot(grads[name], v)
        assert abs(got - fd) <= 1e-6 * max(abs(got), abs(fd)) + 1e-10, (name, got, fd)


def test_reference_shape_is_784_128_relu_and_128_784_sigmoid():
    ae = Autoencoder(seed=0)
    assert ae.encoder.sizes == (784, 128) and ae.decoder.sizes == (128, 784)
    assert ae.encoder.out_activation_name == "relu"
    assert ae.decoder.out_activation_name == "sigmoid"
    x = np.random.default_rng(0).uniform(0, 1, (3, 784))
    b = ae.encode(x)
    assert b.shape == (3, 128) and b.min() >= 0
    y = ae.decode(b)
    assert y.shape == (3, 784) and 0 < y.min() and y.max() < 1
    deep = Autoencoder(hidden=(256,), seed=0)
    assert deep.encoder.sizes == (784, 256, 128) and deep.decoder.sizes == (128, 256, 784)


def test_standardization_has_zero_mean_unit_std_and_its_log_det():
    """eq. 2.1-2.3: the fitted codes c have mean 0 and std s/(s+ε) ≈ 1 per dimension; the
    inverse map returns b; log|det ∂c/∂b| = −Σ log(s + ε) equals the log-det of the dense
    finite-difference Jacobian of b -> c."""
    rng = np.random.default_rng(1)
    ae = Autoencoder(6, 3, dtype="float64", seed=2)
    x = rng.uniform(0, 1, (200, 6))
    mu, s = ae.fit_standardization(x)
    b = ae.encode(x)
    np.testing.assert_allclose(mu, b.mean(axis=0), rtol=1e-12)
    c = ae.standardize(b)
    np.testing.assert_allclose(c.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(c.std(axis=0), s / (s + ae.eps), rtol=1e-12)
    np.testing.assert_allclose(ae.unstandardize(c), b, rtol=1e-12, atol=1e-14)
    b0 = b[:1]
    J = np.stack([(ae.standardize(b0 + 1e-6 * e) - ae.standardize(b0 - 1e-6 * e))[0] / 2e-6
                  for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(ae.standardize_log_det(), np.linalg.slogdet(J)[1], rtol=1e-7)


def test_code_statistics_are_saved_and_loaded_with_the_model(tmp_path):
    ae = Autoencoder(5, 2, hidden=(4,), dtype="float64", seed=3)
    ae.fit_standardization(np.random.default_rng(0).uniform(0, 1, (50, 5)))
    path = tmp_path / "ae.h5"
    ae.save(path)
    back = npflow.load(path)
    assert isinstance(back, Autoencoder) and back.config == ae.config
    for k, v in ae.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    x = np.random.default_rng(1).uniform(0, 1, (4, 5))
    np.testing.assert_array_equal(back.standardize(back.encode(x)), ae.standardize(ae.encode(x)))


def test_same_seed_same_loss_and_float32_stays_float32():
    x = np.random.default_rng(4).uniform(0, 1, (8, 10))
    a, b = Autoencoder(10, 3, seed=7), Autoencoder(10, 3, seed=7)
    assert a.loss_and_grad(x)[0] == b.loss_and_grad(x)[0]
    f = Autoencoder(10, 3, dtype="float32", seed=7)
    loss, grads, _ = f.loss_and_grad(x)
    assert all(g.dtype == np.float32 for g in grads.values())
    assert f.encode(x).dtype == np.float32


def test_bad_input_gives_one_line_errors():
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        Autoencoder(784, 0)
    ae = Autoencoder(6, 2)
    with pytest.raises(ValueError, match=r"data must have shape \(B, 6\)"):
        ae.loss_and_grad(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"code must have shape \(N, 2\)"):
        ae.decode(np.zeros((3, 3)))
