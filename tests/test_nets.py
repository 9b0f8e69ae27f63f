"""npflow.nets.MLP (docs/layers.md, eq. 1.20-1.21): the dense network's backward (eq. 1.21)
against central differences and against its own tangents, in float64 over random sizes,
activations, batches and seeds; plus the ReLU activation (eq. 1.19a).

ReLU networks are piecewise linear: a finite difference that crosses a kink is not a
derivative. Examples whose pre-activations come within MARGIN of a kink are rejected
(hypothesis.assume), so the checks compare derivatives where they exist.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npflow import layers as L
from npflow.nets import MLP
from test_layers import assert_rel_close, central_difference

H = 1e-5            # central-difference step (directions have unit-order entries)
MARGIN = 1e-3       # keep |pre-activation| >= MARGIN for ReLU (H·|direction| stays far below)


def reference_forward(net, params, x):
    """eq. 1.20 written out with numpy: (y, list of pre-activations)."""
    acts = {"relu": lambda a: np.maximum(a, 0), "tanh": np.tanh,
            "sigmoid": lambda a: 1 / (1 + np.exp(-a)), "softplus": lambda a: np.logaddexp(0, a),
            "swish": lambda a: a / (1 + np.exp(-a)), "logcosh": lambda a: np.logaddexp(a, -a),
            "gelu": lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))}
    h, pre = x, []
    for i in range(net.n_layers):
        a = h @ params[f"{i}.weight"].T + params[f"{i}.bias"]
        pre.append(a)
        name = net.activation_name if i < net.n_layers - 1 else net.out_activation_name
        h = a if name is None else acts[name](a)
    return h, pre


def off_the_kinks(net, params, x):
    """True unless a ReLU's input lies within MARGIN of 0."""
    _, pre = reference_forward(net, params, x)
    names = [net.activation_name] * (net.n_layers - 1) + [net.out_activation_name]
    return all(n != "relu" or np.min(np.abs(a)) >= MARGIN for n, a in zip(names, pre))


nets = dict(
    n_in=st.integers(1, 5), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    n_out=st.integers(1, 5), activation=st.sampled_from(sorted(L.ACTIVATIONS)),
    out_activation=st.sampled_from([None, "sigmoid", "relu", "tanh"]),
    B=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))


def _make(n_in, hidden, n_out, activation, out_activation, B, seed):
    rng = np.random.default_rng(seed)
    net = MLP((n_in, *hidden, n_out), activation=activation, out_activation=out_activation)
    params = net.init_params(rng, np.float64, np)
    x = rng.standard_normal((B, n_in))
    return rng, net, params, x


@given(**nets)
def test_forward_is_the_composition_of_affine_maps_and_activations(**kw):
    """eq. 1.20 against a direct numpy transcription; parameter names "<layer>.<param>"."""
    rng, net, params, x = _make(**kw)
    y, _ = net.forward(params, x)
    np.testing.assert_allclose(y, reference_forward(net, params, x)[0], rtol=1e-12, atol=1e-14)
    sizes = net.sizes
    assert sorted(params) == sorted(f"{i}.{n}" for i in range(len(sizes) - 1)
                                    for n in ("weight", "bias"))
    for i in range(len(sizes) - 1):
        assert params[f"{i}.weight"].shape == (sizes[i + 1], sizes[i])
        assert params[f"{i}.bias"].shape == (sizes[i + 1],)


@given(**nets)
def test_backward_equals_central_differences_for_x_and_every_parameter(**kw):
    """eq. 1.21: <xbar, v> = d/ds <ybar, y(x + s v)> and <θbar, v> = d/ds <ybar, y(θ + s v)>."""
    rng, net, params, x = _make(**kw)
    assume(off_the_kinks(net, params, x))
    y, cache = net.forward(params, x)
    ybar = rng.standard_normal(y.shape)
    x0, p0, yb0 = x.copy(), {k: v.copy() for k, v in params.items()}, ybar.copy()
    xbar, pbar = net.backward(params, ybar, cache)
    assert xbar.shape == x.shape and sorted(pbar) == sorted(params)

    def F(p=params, x_=x):
        return np.vdot(ybar, net.forward(p, x_)[0])

    v = rng.standard_normal(x.shape)
    assert_rel_close(np.vdot(xbar, v), central_difference(lambda s: F(x_=x + s * v), H), what="x")
    for name in params:
        assert pbar[name].shape == params[name].shape, name
        v = rng.standard_normal(params[name].shape)
        fd = central_difference(lambda s: F(p={**params, name: params[name] + s * v}), H)
        assert_rel_close(np.vdot(pbar[name], v), fd, what=name)
    # inputs and cotangents are never mutated
    assert np.array_equal(x, x0) and np.array_equal(ybar, yb0)
    assert all(np.array_equal(params[k], p0[k]) for k in params)


@given(**nets, K=st.integers(1, 3))
def test_dot_product_jv_w_equals_v_jtw(K, **kw):
    """<J v, w> = <v, Jᵀ w>: the tangents of the layers (eq. 1.1) against the backward (eq. 1.21);
    and J v itself against central differences of the forward."""
    rng, net, params, x = _make(**kw)
    assume(off_the_kinks(net, params, x))
    v = rng.standard_normal((K,) + x.shape)
    y, Jv = net.jvp(params, x, v)
    np.testing.assert_allclose(y, net.forward(params, x)[0], rtol=1e-14, atol=0)
    w = rng.standard_normal(y.shape)
    JTw, _ = net.backward(params, w, net.forward(params, x)[1])
    for k in range(K):
        lhs, rhs = np.vdot(Jv[k], w), np.vdot(v[k], JTw)
        assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs)) + 1e-14
        fd = central_difference(lambda s: net.forward(params, x + s * v[k])[0], H)
        assert_rel_close(Jv[k], fd, what=f"J v_{k}")


def test_cache_is_a_value_so_two_forwards_can_precede_their_backwards():
    rng = np.random.default_rng(0)
    net = MLP((4, 6, 3), activation="relu", out_activation="sigmoid")
    p = net.init_params(rng, np.float64, np)
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    w1, w2 = rng.standard_normal((5, 3)), rng.standard_normal((2, 3))
    y1, c1 = net.forward(p, x1)
    y2, c2 = net.forward(p, x2)
    g2 = net.backward(p, w2, c2)
    g1 = net.backward(p, w1, c1)
    g1b = net.backward(p, w1, net.forward(p, x1)[1])
    np.testing.assert_array_equal(g1[0], g1b[0])
    for k in p:
        np.testing.assert_array_equal(g1[1][k], g1b[1][k])
    assert g2[0].shape == (2, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    rng = np.random.default_rng(1)
    net = MLP((3, 5, 5, 2), activation="relu", out_activation="sigmoid")
    p = net.init_params(rng, dtype, np)
    x = rng.standard_normal((4, 3)).astype(dtype)
    y, c = net.forward(p, x)
    xbar, g = net.backward(p, np.ones_like(y), c)
    assert y.dtype == xbar.dtype == dtype and all(v.dtype == dtype for v in g.values())


def test_bad_input_gives_one_line_errors():
    with pytest.raises(ValueError, match="at least two entries"):
        MLP((3,))
    with pytest.raises(ValueError, match="at least two entries"):
        MLP((3, 0, 2))
    with pytest.raises(ValueError, match="unknown activation 'cube'"):
        MLP((3, 2), activation="cube")
    net = MLP((3, 2))
    p = net.init_params(np.random.default_rng(0), np.float64, np)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got \(4, 2\)"):
        net.forward(p, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"missing"):
        net.forward({}, np.zeros((4, 3)))
    _, c = net.forward(p, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"ybar must have shape"):
        net.backward(p, np.zeros((4, 3)), c)


# ----------------------------------------------------------------------------- ReLU (eq. 1.19a)

def test_relu_values_and_derivatives_are_max_step_and_zero():
    x = np.array([-3.0, -1e-300, 0.0, 1e-300, 2.5])
    y, d1, d2, d3 = L.ReLU().derivatives(x, np, order=3)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(d1, [0, 0, 0, 1, 1])     # σ'(0) = 0
    assert not np.any(d2) and not np.any(d3)
    assert isinstance(L.get_activation("ReLU"), L.ReLU) and not L.ReLU.smooth


@given(B=st.integers(1, 5), n=st.integers(1, 6), K=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_relu_layer_tangent_is_step_times_xdot_and_backward_is_its_transpose(B, n, K, seed):
    """eq. 1.6 and 1.7 with σ' = step, σ'' = 0: ẏ_k = step(x) ⊙ ẋ_k; x̄ = step ⊙ ȳ (no
    second-order term), ẋ̄_k = step ⊙ ẏ̄_k; checked against central differences off the kink."""
    rng = np.random.default_rng(seed)
    x, xdot = rng.standard_normal((B, n)), rng.standard_normal((K, B, n))
    assume(np.min(np.abs(x)) >= MARGIN)
    act = L.ReLU()
    y, ydot, cache = act.forward({}, x, xdot, 0.0)
    for k in range(K):
        fd = central_difference(lambda s: act.forward({}, x + s * xdot[k], None, 0.0)[0], H)
        assert_rel_close(ydot[k], fd, what="tangent")
    a, b = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    xbar, xdotbar, pbar, tbar = act.backward(a, b, cache)
    v = rng.standard_normal(x.shape)
    F = lambda s: (np.vdot(a, act.forward({}, x + s * v, xdot, 0.0)[0])     # noqa: E731
                   + np.vdot(b, act.forward({}, x + s * v, xdot, 0.0)[1]))
    assert_rel_close(np.vdot(xbar, v), central_difference(F, H), what="xbar")
    lhs, rhs = np.vdot(ydot, b), np.vdot(xdot, xdotbar)
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs)) + 1e-14
    assert pbar == {} and tbar == 0.0
