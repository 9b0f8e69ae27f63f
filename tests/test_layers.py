"""Layer rules (docs/layers.md, section 1) against finite differences and against each other.

For every layer, in float64 over random batch (1-5), features (1-6), tangents K (1-4), widths
(1-8), seeds and times t:
- eq. 1.1: the tangent ydot_k equals a central difference of the forward along xdot_k;
- dot-product test: <J v, w> = <v, Jᵀ w> between the forward tangent and the backward;
- eq. 1.2: x̄, ẋ̄, θ̄ and t̄ equal central differences of F = <a, y> + <b, ydot>, rel. error ≤ 1e-6.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npflow import layers as L

RTOL = 1e-6      # the bound on the relative error of every gradient check
ATOL = 1e-9      # absolute floor, for derivatives that are zero (or nearly) by construction


# ----------------------------------------------------------------------------- checking tools

def central_difference(fn, h=1e-4):
    """d/ds fn(s) at s = 0 by the fourth-order central difference (error O(h⁴) + O(ε/h))."""
    return (-fn(2 * h) + 8 * fn(h) - 8 * fn(-h) + fn(-2 * h)) / (12 * h)


def assert_rel_close(got, want, rtol=RTOL, atol=ATOL, what=""):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    err = np.linalg.norm(got - want)
    scale = max(np.linalg.norm(got), np.linalg.norm(want))
    assert err <= rtol * scale + atol, f"{what}: |got - want| = {err:.3e}, scale {scale:.3e}"


def check_tangent_matches_forward_difference(layer, params, x, xdot, t):
    """eq. 1.1: ydot_k = d/ds g(x + s xdot_k)."""
    _, ydot, _ = layer.forward(params, x, xdot, t)
    for k in range(xdot.shape[0]):
        fd = central_difference(lambda s: layer.forward(params, x + s * xdot[k], None, t)[0])
        assert_rel_close(ydot[k], fd, what=f"tangent {k}")


def check_vjp_is_adjoint_of_jvp(layer, params, x, xdot, t, rng):
    """<ydot, w> = <xdot, xdotbar(w)> (tangent cotangents) and <ydot_k, u> = <xdot_k, xbar(u)>."""
    y, ydot, cache = layer.forward(params, x, xdot, t)
    w = rng.standard_normal(ydot.shape)
    _, xdotbar, _, _ = layer.backward(None, w, cache)
    lhs, rhs = np.vdot(ydot, w), np.vdot(xdot, xdotbar)
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + abs(rhs) + 1e-300) + 1e-13
    u = rng.standard_normal(y.shape)
    xbar, xdotbar0, _, _ = layer.backward(u, None, cache)
    for k in range(xdot.shape[0]):
        lhs, rhs = np.vdot(ydot[k], u), np.vdot(xdot[k], xbar)
        assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + abs(rhs) + 1e-300) + 1e-13
    assert xdotbar0 is None or not np.any(xdotbar0)


def check_backward_matches_finite_differences(layer, params, x, xdot, t, rng):
    """eq. 1.2: the cotangents of F = <a, y> + <b, ydot> against directional differences.
    t a scalar, or (B, 1) one time per row (eq. 1.22-1.25): then t̄ (B, 1) is checked along a
    random direction of the B times."""
    y, ydot, cache = layer.forward(params, x, xdot, t)
    a, b = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    x0, xd0, p0, t0 = (x.copy(), xdot.copy(), {k: v.copy() for k, v in params.items()},
                       np.copy(t))
    xbar, xdotbar, pbar, tbar = layer.backward(a.copy(), b.copy(), cache)

    def F(p=params, x_=x, xd=xdot, t_=t):
        y_, yd_, _ = layer.forward(p, x_, xd, t_)
        return np.vdot(a, y_) + np.vdot(b, yd_)

    v = rng.standard_normal(x.shape)
    assert_rel_close(np.vdot(xbar, v), central_difference(lambda s: F(x_=x + s * v)), what="xbar")
    v = rng.standard_normal(xdot.shape)
    assert_rel_close(np.vdot(xdotbar, v), central_difference(lambda s: F(xd=xdot + s * v)),
                     what="xdotbar")
    if np.ndim(t) == 0:
        assert_rel_close(float(tbar), central_difference(lambda s: F(t_=t + s)), what="tbar")
    else:
        assert np.ndim(tbar) == 0 or np.shape(tbar) == np.shape(t), np.shape(tbar)
        vt = rng.standard_normal(np.shape(t))
        assert_rel_close(np.sum(np.asarray(tbar) * vt),
                         central_difference(lambda s: F(t_=t + s * vt)), what="tbar (per row)")
    assert sorted(pbar) == sorted(params)
    for name in params:
        assert pbar[name].shape == params[name].shape, name
        v = rng.standard_normal(params[name].shape)
        fd = central_difference(lambda s: F(p={**params, name: params[name] + s * v}))
        assert_rel_close(np.vdot(pbar[name], v), fd, what=f"params_bar[{name!r}]")
    # inputs and cotangents are never mutated
    assert np.array_equal(x, x0) and np.array_equal(xdot, xd0) and np.array_equal(t, t0)
    assert all(np.array_equal(params[k], p0[k]) for k in params)


def check_all(layer, params, x, xdot, t, rng):
    check_tangent_matches_forward_difference(layer, params, x, xdot, t)
    check_vjp_is_adjoint_of_jvp(layer, params, x, xdot, t, rng)
    check_backward_matches_finite_differences(layer, params, x, xdot, t, rng)


# ----------------------------------------------------------------------------- strategies

sizes = dict(B=st.integers(1, 5), n_in=st.integers(1, 6), n_out=st.integers(1, 8),
             K=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
             t=st.floats(-2.0, 2.0, allow_nan=False))

AFFINE = [L.Linear, L.ConcatLinear, L.ConcatSquashLinear]
ACTS = sorted(L.ACTIVATIONS)


def _inputs(rng, B, n, K):
    return rng.standard_normal((B, n)), rng.standard_normal((K, B, n))


# ----------------------------------------------------------------------------- affine layers

@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
@given(**sizes)
def test_affine_layer_tangent_adjoint_and_gradients(cls, B, n_in, n_out, K, seed, t):
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = _inputs(rng, B, n_in, K)
    check_all(layer, params, x, xdot, t, rng)


@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
@given(**sizes)
def test_first_order_backward_without_tangents_is_vjp(cls, B, n_in, n_out, K, seed, t):
    """xdot = None: ydot is None and xbar = Jᵀ ybar (eq. 1.5 without tangent terms)."""
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = _inputs(rng, B, n_in, K)
    y, ydot, cache = layer.forward(params, x, None, t)
    assert ydot is None
    u = rng.standard_normal(y.shape)
    xbar, xdotbar, pbar, tbar = layer.backward(u, None, cache)
    assert xdotbar is None
    _, ydot, _ = layer.forward(params, x, xdot, t)
    for k in range(K):
        assert_rel_close(np.vdot(xbar, xdot[k]), np.vdot(u, ydot[k]), rtol=1e-12, atol=1e-14)
    # and the parameter cotangent matches the one computed with zero tangent cotangents
    _, _, c2 = layer.forward(params, x, xdot, t)
    _, _, pbar2, tbar2 = layer.backward(u, None, c2)
    for k in pbar:
        assert_rel_close(pbar[k], pbar2[k], rtol=1e-12, atol=1e-14)
    assert_rel_close(float(tbar), float(tbar2), rtol=1e-12, atol=1e-14)


def test_concat_linear_puts_t_in_the_last_column():
    """eq. 1.9: y = W [x, t] + b with t appended as the last input column."""
    rng = np.random.default_rng(0)
    layer = L.ConcatLinear(3, 2)
    p = layer.init_params(rng, np.float64, np)
    x = rng.standard_normal((4, 3))
    y, _, _ = layer.forward(p, x, None, 0.7)
    xt = np.concatenate([x, np.full((4, 1), 0.7)], axis=1)
    np.testing.assert_allclose(y, xt @ p["weight"].T + p["bias"], rtol=1e-14)


def test_concat_squash_linear_matches_ffjord_formula():
    """eq. 1.12: y = (W x + b) ⊙ sigmoid(W_g t + b_g) + W_b t."""
    rng = np.random.default_rng(1)
    layer = L.ConcatSquashLinear(3, 5)
    p = layer.init_params(rng, np.float64, np)
    x, t = rng.standard_normal((4, 3)), -0.3
    y, _, _ = layer.forward(p, x, None, t)
    gate = 1 / (1 + np.exp(-(p["gate.weight"] * t + p["gate.bias"])))
    want = (x @ p["weight"].T + p["bias"]) * gate + p["hyper_bias.weight"] * t
    np.testing.assert_allclose(y, want, rtol=1e-13)


def test_time_enters_only_where_the_equations_say():
    """Linear ignores t (tbar = 0); ConcatLinear and ConcatSquashLinear depend on it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2))
    for cls, depends in [(L.Linear, False), (L.ConcatLinear, True), (L.ConcatSquashLinear, True)]:
        layer = cls(2, 4)
        p = layer.init_params(rng, np.float64, np)
        y0 = layer.forward(p, x, None, 0.0)[0]
        y1, _, cache = layer.forward(p, x, None, 1.0)
        assert (not np.allclose(y0, y1)) == depends, cls.__name__
        tbar = layer.backward(np.ones_like(y1), None, cache)[3]
        assert (float(tbar) != 0.0) == depends, cls.__name__


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("name", ACTS)
@given(B=st.integers(1, 5), n=st.integers(1, 6), K=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 4.0))
def test_activation_tangent_adjoint_and_second_order_term(name, B, n, K, seed, scale):
    rng = np.random.default_rng(seed)
    act = L.get_activation(name)
    x, xdot = _inputs(rng, B, n, K)
    # ReLU: a central difference across the kink at 0 is not a derivative (eq. 1.19)
    assume(act.smooth or np.min(np.abs(scale * x)) > 1e-3)
    check_all(act, {}, scale * x, xdot, 0.0, rng)


@pytest.mark.parametrize("name", ACTS)
def test_activation_on_image_shaped_input(name):
    """Elementwise layers take any (B, ...) shape (here (B, C, H, W))."""
    rng = np.random.default_rng(3)
    act = L.get_activation(name)
    x, xdot = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 2, 3, 4, 4))
    check_all(act, {}, x, xdot, 0.0, rng)


@pytest.mark.parametrize("name", ACTS)
def test_activation_derivatives_are_derivatives_of_each_other(name):
    """σ^(j+1) = d/dx σ^(j) for j = 0, 1, 2 (eq. 1.8, 1.15-1.18), by central differences."""
    act = L.get_activation(name)
    # ReLU (eq. 1.19) is not differentiable at 0: its grid keeps 0.0123 away from the kink.
    x = np.linspace(-6, 6, 241) + (0.0 if act.smooth else 0.0123)
    d = act.derivatives(x, np, order=3)
    assert len(d) == 4
    for j in range(3):
        fd = central_difference(lambda s: act.derivatives(x + s, np, order=3)[j], h=1e-3)
        np.testing.assert_allclose(d[j + 1], fd, rtol=1e-6, atol=1e-9, err_msg=f"σ^({j + 1})")
    assert len(act.derivatives(x, np)) == 3       # default: σ, σ', σ''
    with pytest.raises(ValueError, match="order"):
        act.derivatives(x, np, order=4)


@pytest.mark.parametrize("name,ref", [
    ("tanh", np.tanh),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
    ("swish", lambda x: x / (1 + np.exp(-x))),
    ("logcosh", lambda x: np.log(np.exp(x) + np.exp(-x))),
    ("gelu", lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))),
    ("relu", lambda x: np.maximum(x, 0.0)),
])
def test_activation_values_match_their_definitions(name, ref):
    x = np.linspace(-8, 8, 161)
    np.testing.assert_allclose(L.get_activation(name).derivatives(x, np)[0], ref(x),
                               rtol=1e-12, atol=1e-14)


def test_logcosh_and_softplus_are_stable_for_large_inputs():
    """log(eˣ + e⁻ˣ) = |x| + O(e^{-2|x|}) and softplus(x) = x for large x, no overflow."""
    x = np.array([-1e4, -800.0, -50.0, 50.0, 800.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        lc = L.LogCosh().derivatives(x, np, order=3)
        sp = L.Softplus().derivatives(x, np, order=3)
        sg = L.Sigmoid().derivatives(x, np, order=3)
        sw = L.Swish().derivatives(x, np, order=3)
    np.testing.assert_allclose(lc[0], np.abs(x), rtol=1e-15)
    np.testing.assert_allclose(lc[1], np.sign(x), rtol=1e-15)
    np.testing.assert_allclose(sp[0], np.maximum(x, 0), rtol=1e-15, atol=1e-20)
    for d in (lc, sp, sg, sw):
        assert all(np.all(np.isfinite(v)) for v in d)
    for dtype in (np.float32, np.float64):
        v = L.LogCosh().derivatives(x.astype(dtype), np)[0]
        assert v.dtype == dtype and np.all(np.isfinite(v))


def test_gelu_is_close_to_the_exact_erf_gelu_and_finite_for_large_inputs():
    """The tanh form stays within 5e-4 of x·Φ(x) (Φ the normal CDF), and its derivatives are
    finite (no overflow of x³) and tend to those of relu far from 0."""
    from scipy.special import erf
    x = np.linspace(-6, 6, 241)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    assert np.abs(L.GELU().derivatives(x, np)[0] - exact).max() < 5e-4
    big = np.array([-1e4, -50.0, 50.0, 1e4])
    with np.errstate(over="raise", invalid="raise"):
        d = L.GELU().derivatives(big, np, order=3)
    np.testing.assert_allclose(d[0], np.maximum(big, 0), atol=1e-12)
    np.testing.assert_allclose(d[1], (big > 0).astype(float), atol=1e-12)
    np.testing.assert_allclose(d[2], 0.0, atol=1e-12)
    np.testing.assert_allclose(d[3], 0.0, atol=1e-12)


def test_get_activation_names_and_errors():
    assert isinstance(L.get_activation("tanh"), L.Tanh)
    assert isinstance(L.get_activation("SiLU"), L.Swish)
    assert isinstance(L.get_activation("log_cosh"), L.LogCosh)
    act = L.Softplus()
    assert L.get_activation(act) is act
    assert isinstance(L.get_activation("relu"), L.ReLU)
    with pytest.raises(ValueError, match="unknown activation 'cube'"):
        L.get_activation("cube")


# ----------------------------------------------------------------------------- dtype and errors

@pytest.mark.parametrize("cls", AFFINE + [L.Tanh, L.LogCosh], ids=lambda c: c.__name__)
def test_float32_stays_float32(cls):
    """float32 in, float32 out: t as a Python float or a 0-d float64 array must not upcast."""
    rng = np.random.default_rng(4)
    layer = cls(3, 4) if cls in AFFINE else cls()
    p = layer.init_params(rng, np.float32, np)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    xdot = rng.standard_normal((2, 5, 3)).astype(np.float32)
    for t in (0.5, np.asarray(0.5)):
        y, ydot, cache = layer.forward(p, x, xdot, t)
        assert y.dtype == ydot.dtype == np.float32
        xbar, xdotbar, pbar, tbar = layer.backward(y, ydot, cache)
        assert xbar.dtype == xdotbar.dtype == np.float32
        assert all(v.dtype == np.float32 for v in pbar.values())
        assert np.asarray(tbar).dtype in (np.float32, np.float64) and np.ndim(tbar) == 0
        if cls in (L.ConcatLinear, L.ConcatSquashLinear):
            assert np.asarray(tbar).dtype == np.float32


@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
def test_shape_errors_name_the_shapes(cls):
    rng = np.random.default_rng(5)
    layer = cls(3, 4)
    p = layer.init_params(rng, np.float64, np)
    with pytest.raises(ValueError, match=r"\(B, 3\), got \(5, 2\)"):
        layer.forward(p, np.zeros((5, 2)), None, 0.0)
    with pytest.raises(ValueError, match=r"got xdot \(2, 4, 3\) for x \(5, 3\)"):
        layer.forward(p, np.zeros((5, 3)), np.zeros((2, 4, 3)), 0.0)
    _, _, cache = layer.forward(p, np.zeros((5, 3)), np.zeros((2, 5, 3)), 0.0)
    with pytest.raises(ValueError, match=r"ydotbar must have shape \(2, 5, 4\)"):
        layer.backward(np.zeros((5, 4)), np.zeros((3, 5, 4)), cache)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        cls(0, 4)


def test_backward_accepts_missing_cotangents():
    """None cotangents mean zero: backward(None, None) gives zero gradients of the right shapes."""
    rng = np.random.default_rng(6)
    for layer in (L.ConcatSquashLinear(3, 2), L.Swish()):
        p = layer.init_params(rng, np.float64, np)
        x, xdot = _inputs(rng, 4, 3, 2)
        y, ydot, cache = layer.forward(p, x, xdot, 0.2)
        xbar, xdotbar, pbar, tbar = layer.backward(None, None, cache)
        assert xbar.shape == x.shape and xdotbar.shape == xdot.shape
        assert not np.any(xbar) and not np.any(xdotbar) and float(tbar) == 0.0
        assert all(not np.any(v) for v in pbar.values())


# ----------------------------------------------------------------------------- per-row time

TIME_LAYERS = [L.ConcatLinear, L.ConcatSquashLinear]


@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
@given(**sizes)
def test_per_row_time_tangent_adjoint_and_gradients(cls, B, n_in, n_out, K, seed, t):
    """eq. 1.22-1.25, t (B, 1) one time per row: tangent = central difference, dot-product
    test, and x̄, ẋ̄, every θ̄ and t̄ (B, 1) against central differences."""
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = _inputs(rng, B, n_in, K)
    tr = t + rng.standard_normal((B, 1))
    check_all(layer, params, x, xdot, tr, rng)


@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
@given(**sizes)
def test_per_row_time_backward_without_tangents_equals_the_tangent_path(cls, B, n_in, n_out,
                                                                       K, seed, t):
    """K = 0 with t (B, 1): x̄, θ̄ and t̄ of <u, y> equal those of the tangent path (checked
    against differences above) with zero tangent cotangents, and x̄ = Jᵀu (dot-product)."""
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = _inputs(rng, B, n_in, K)
    tr = t + rng.standard_normal((B, 1))
    y, ydot, cache = layer.forward(params, x, None, tr)
    assert ydot is None
    u = rng.standard_normal(y.shape)
    xbar, xdotbar, pbar, tbar = layer.backward(u, None, cache)
    assert xdotbar is None
    y2, ydot, c2 = layer.forward(params, x, xdot, tr)
    assert_rel_close(y, y2, rtol=1e-13, atol=1e-14, what="y")
    xbar2, _, pbar2, tbar2 = layer.backward(u, None, c2)
    assert_rel_close(xbar, xbar2, rtol=1e-12, atol=1e-14, what="xbar")
    for k in range(K):
        assert_rel_close(np.vdot(xbar, xdot[k]), np.vdot(u, ydot[k]), rtol=1e-12, atol=1e-14)
    for k in pbar:
        assert_rel_close(pbar[k], pbar2[k], rtol=1e-12, atol=1e-14, what=k)
    assert_rel_close(tbar, tbar2, rtol=1e-12, atol=1e-14, what="tbar")


@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
@given(**sizes)
def test_per_row_time_with_equal_rows_reproduces_scalar_time(cls, B, n_in, n_out, K, seed, t):
    """t_b = t for every row: y, ydot, x̄, ẋ̄ and θ̄ equal the scalar-t results (to rounding:
    the per-row path multiplies in another order), and Σ_b t̄_b = the scalar t̄."""
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = _inputs(rng, B, n_in, K)
    a, b = rng.standard_normal((B, n_out)), rng.standard_normal((K, B, n_out))
    outs = []
    for tt in (t, np.full((B, 1), t)):
        y, ydot, cache = layer.forward(params, x, xdot, tt)
        outs.append((y, ydot) + layer.backward(a, b, cache))
    (y1, yd1, xb1, xdb1, p1, tb1), (y2, yd2, xb2, xdb2, p2, tb2) = outs
    for got, want, what in ((y2, y1, "y"), (yd2, yd1, "ydot"), (xb2, xb1, "xbar"),
                            (xdb2, xdb1, "xdotbar")):
        assert_rel_close(got, want, rtol=1e-13, atol=1e-14, what=what)
    for k in p1:
        assert_rel_close(p2[k], p1[k], rtol=1e-13, atol=1e-14, what=k)
    assert_rel_close(np.sum(tb2), float(tb1), rtol=1e-13, atol=1e-14, what="tbar")
    if cls in TIME_LAYERS:
        assert np.shape(tb2) == (B, 1)


@pytest.mark.parametrize("cls", TIME_LAYERS, ids=lambda c: c.__name__)
def test_per_row_time_rows_are_the_scalar_layer_row_by_row(cls):
    """Row b of g(x, t (B, 1)) is g(x_b, t_b) with a scalar time, and its t̄_b is the scalar
    call's t̄ on that row alone (eq. 1.22-1.23)."""
    rng = np.random.default_rng(3)
    layer = cls(3, 4)
    params = layer.init_params(rng, np.float64, np)
    x, tr, a = rng.standard_normal((5, 3)), rng.uniform(-1, 1, (5, 1)), rng.standard_normal((5, 4))
    y, _, cache = layer.forward(params, x, None, tr)
    _, _, pbar, tbar = layer.backward(a, None, cache)
    psum = {k: 0.0 for k in pbar}
    for i in range(5):
        yi, _, ci = layer.forward(params, x[i:i + 1], None, float(tr[i, 0]))
        _, _, pi, ti = layer.backward(a[i:i + 1], None, ci)
        assert_rel_close(y[i], yi[0], rtol=1e-13, what="row")
        assert_rel_close(tbar[i, 0], float(ti), rtol=1e-12, what="tbar row")
        psum = {k: psum[k] + pi[k] for k in pi}
    for k in pbar:
        assert_rel_close(pbar[k], psum[k], rtol=1e-12, what=k)


@pytest.mark.parametrize("cls", TIME_LAYERS, ids=lambda c: c.__name__)
def test_time_of_wrong_shape_is_refused_naming_the_shape(cls):
    layer = cls(2, 3)
    params = layer.init_params(np.random.default_rng(0), np.float64, np)
    x = np.zeros((4, 2))
    for bad in (np.zeros(4), np.zeros((4, 2)), np.zeros((3, 1))):
        with pytest.raises(ValueError, match=r"\(B, 1\) = \(4, 1\)"):
            layer.forward(params, x, None, bad)


@pytest.mark.parametrize("cls", TIME_LAYERS, ids=lambda c: c.__name__)
def test_float32_per_row_time_stays_float32(cls):
    layer = cls(3, 4)
    params = layer.init_params(np.random.default_rng(0), np.float32, np)
    x = np.ones((5, 3), np.float32)
    y, _, cache = layer.forward(params, x, None, np.full((5, 1), 0.3))   # float64 times
    xbar, _, pbar, tbar = layer.backward(np.ones_like(y), None, cache)
    assert y.dtype == xbar.dtype == tbar.dtype == np.float32
    assert all(v.dtype == np.float32 for v in pbar.values())
