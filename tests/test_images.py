"""Image bookkeeping (docs/images.md sections 2-4): squeeze is FFJORD's permutation and
invertible, the logit log-determinant equals the finite-difference log|det| of the elementwise
map, and bits/dim has the right value on cases with a known answer."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.stats import norm

from npflow.images import (bits_per_dim, dequantize, factor_in, factor_out, logit_inverse,
                           logit_transform, quantize, squeeze, unsqueeze)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_squeeze_is_ffjord_permutation_and_unsqueeze_inverts_it(B, C, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, 2 * h, 2 * w))
    y = squeeze(x)
    assert y.shape == (B, 4 * C, h, w)
    c, a, b = rng.integers(C), rng.integers(2), rng.integers(2)
    i, j = rng.integers(h), rng.integers(w)
    assert y[0, 4 * c + 2 * a + b, i, j] == x[0, c, 2 * i + a, 2 * j + b]
    np.testing.assert_array_equal(unsqueeze(y), x)
    # a permutation: same multiset of values, log-det 0
    np.testing.assert_array_equal(np.sort(y.ravel()), np.sort(x.ravel()))
    # leading tangent axis handled alike
    xd = rng.standard_normal((2,) + x.shape)
    np.testing.assert_array_equal(squeeze(xd)[1], squeeze(xd[1]))


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        squeeze(np.zeros((1, 1, 5, 4)))
    with pytest.raises(ValueError, match="divisible"):
        unsqueeze(np.zeros((1, 3, 2, 2)))


def test_factor_in_inverts_factor_out():
    x = np.arange(2 * 6 * 2 * 2, dtype=float).reshape(2, 6, 2, 2)
    kept, out = factor_out(x)
    assert kept.shape == (2, 3, 2, 2) and out.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(factor_in(kept, out), x)


@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([0.0, 1e-6, 1e-5, 0.05]),
       st.integers(0, 2**31 - 1))
def test_logit_logdet_equals_finite_difference_log_abs_det(B, D, alpha, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.99, (B, 1, D, 1))
    y, logdet = logit_transform(x, alpha)
    eps = 1e-6
    # the map is elementwise, so the Jacobian is diagonal: log|det| = Σ log|dy_i/dx_i|
    d = (logit_transform(x + eps, alpha)[0] - logit_transform(x - eps, alpha)[0]) / (2 * eps)
    np.testing.assert_allclose(logdet, np.log(np.abs(d)).reshape(B, -1).sum(1), rtol=1e-7)
    np.testing.assert_allclose(logit_inverse(y, alpha), x, rtol=1e-10, atol=1e-12)


def test_dequantize_is_reproducible_and_quantize_inverts_it():
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 4, 4)).astype(np.uint8)
    a = dequantize(x, np.random.default_rng(5), dtype="float64")
    b = dequantize(x, np.random.default_rng(5), dtype="float64")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64 and (a > 0).all() and (a < 1).all()
    np.testing.assert_array_equal(quantize(a), x)


def _identity_flow_nll(y):
    """−log N(y; 0, I) per sample: the NLL of a CNF whose dynamics are zero (z(T) = y, ℓ = 0)."""
    return -norm.logpdf(y).reshape(y.shape[0], -1).sum(1)


def test_bits_per_dim_of_identity_flow_is_gaussian_density_of_the_logit_data():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 1, 6, 6)).astype(np.uint8)
    xt = dequantize(x, rng, dtype="float64")
    y, logdet = logit_transform(xt)
    bpd = bits_per_dim(_identity_flow_nll(y), logdet, 36)
    # independent route: density of x̃ by change of variables, each pixel separately, then
    # the density of the integer data on [0, 256)^D is p(x̃)/256^D
    a = 1e-6
    s = a + (1 - 2 * a) * xt
    log_px = norm.logpdf(np.log(s / (1 - s))) + np.log((1 - 2 * a) / (s * (1 - s)))
    expected = -(log_px.reshape(4, -1).sum(1) - 36 * np.log(256)) / (36 * np.log(2))
    np.testing.assert_allclose(bpd, expected, rtol=1e-12)


def test_bits_per_dim_is_eight_minus_log2_margin_for_logistic_flow():
    """If the flow's density of y is the standard logistic one, x̃ is uniform on
    [0, 1]^D up to the margin: p(x̃) = (1 − 2α)^D, so bits/dim = 8 − log2(1 − 2α) exactly,
    whatever the data."""
    rng = np.random.default_rng(2)
    for alpha in (1e-6, 0.05):
        xt = dequantize(rng.integers(0, 256, (5, 2, 3, 3)), rng, dtype="float64")
        y, logdet = logit_transform(xt, alpha)
        logistic_nll = -(-np.logaddexp(0, y) - np.logaddexp(0, -y)).reshape(5, -1).sum(1)
        bpd = bits_per_dim(logistic_nll, logdet, 18)
        np.testing.assert_allclose(bpd, 8 - math.log2(1 - 2 * alpha), rtol=1e-10)
