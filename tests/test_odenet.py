"""The composed network ODENet (docs/layers.md, section 2) against finite differences.

Same identities as tests/test_layers.py, for the whole MLP with every layer type and activation
(eq. 2.1-2.3), plus its entry-point checks (shapes, non-finite input) and the zero-last option.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npflow.layers import ACTIVATIONS
from npflow.odenet import LAYER_TYPES, ODENet
from test_layers import check_all, assert_rel_close

# finite differences of second-order terms need smooth activations (ReLU has a kink at 0;
# its checks are in tests/test_nets.py)
SMOOTH = sorted(a for a, cls in ACTIVATIONS.items() if cls.smooth)

nets = dict(
    B=st.integers(1, 5), D=st.integers(1, 6), K=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 8), min_size=0, max_size=3),
    layer=st.sampled_from(sorted(LAYER_TYPES)), activation=st.sampled_from(SMOOTH),
    seed=st.integers(0, 2**32 - 1), t=st.floats(-2.0, 2.0, allow_nan=False))


@given(**nets)
def test_odenet_tangent_adjoint_and_gradients(B, D, K, hidden, layer, activation, seed, t):
    """eq. 2.2-2.3: tangent = central difference, dot-product test, x̄ ẋ̄ θ̄ t̄ = differences."""
    rng = np.random.default_rng(seed)
    net = ODENet(D, hidden, D, layer=layer, activation=activation)
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((B, D)), rng.standard_normal((K, B, D))
    check_all(net, params, x, xdot, t, rng)


@pytest.mark.parametrize("layer", sorted(LAYER_TYPES))
def test_odenet_with_different_in_and_out_sizes(layer):
    rng = np.random.default_rng(0)
    net = ODENet(3, (5, 4), 2, layer=layer, activation="swish")
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((4, 3)), rng.standard_normal((2, 4, 3))
    y, ydot, _ = net.forward(params, x, xdot, 0.1)
    assert y.shape == (4, 2) and ydot.shape == (2, 4, 2)
    check_all(net, params, x, xdot, 0.1, rng)


def test_param_names_are_flat_and_per_layer():
    net = ODENet(2, (4, 4), 2)
    p = net.init_params(np.random.default_rng(0), "float64", np)
    assert sorted(p) == sorted(net.param_names())
    assert {"0.weight", "0.bias", "0.gate.weight", "0.gate.bias", "0.hyper_bias.weight",
            "2.weight"} <= set(p)
    assert p["0.weight"].shape == (4, 2) and p["2.weight"].shape == (2, 4)
    assert set(ODENet(2, (4,), 2, layer="concat").init_params(
        np.random.default_rng(0), "float64", np)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert ODENet(2, (4,), 2, layer="concat").init_params(
        np.random.default_rng(0), "float64", np)["0.weight"].shape == (4, 3)


def test_init_is_reproducible_from_the_generator_and_typed():
    net = ODENet(2, (8, 8), 2)
    a = net.init_params(np.random.default_rng(7), "float32", np)
    b = net.init_params(np.random.default_rng(7), "float32", np)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    with pytest.raises(ValueError, match="unsupported dtype"):
        net.init_params(np.random.default_rng(7), "float16", np)


@pytest.mark.parametrize("layer", sorted(LAYER_TYPES))
def test_zero_last_starts_as_the_identity_flow_and_still_learns(layer):
    """zero_last: f ≡ 0 (so J = 0) at initialisation, yet the last layer's gradient is not zero."""
    rng = np.random.default_rng(1)
    net = ODENet(3, (6, 6), 3, layer=layer)
    params = net.init_params(rng, np.float64, np, zero_last=True)
    x, xdot = rng.standard_normal((5, 3)), rng.standard_normal((2, 5, 3))
    y, ydot, cache = net.forward(params, x, xdot, 0.4)
    assert not np.any(y) and not np.any(ydot)
    _, _, pbar, _ = net.backward(rng.standard_normal(y.shape), None, cache)
    assert np.any(pbar["2.weight"])


def test_float32_forward_backward_keep_dtype():
    rng = np.random.default_rng(2)
    net = ODENet(2, (16, 16), 2)
    params = net.init_params(rng, "float32", np)
    x = rng.standard_normal((10, 2)).astype(np.float32)
    eps = rng.standard_normal((2, 10, 2)).astype(np.float32)
    for t in (0.25, np.asarray(0.25), np.float64(0.25)):
        y, ydot, cache = net.forward(params, x, eps, t)
        xbar, xdotbar, pbar, tbar = net.backward(y, ydot, cache)
        assert y.dtype == ydot.dtype == xbar.dtype == xdotbar.dtype == np.float32
        assert np.asarray(tbar).dtype == np.float32 and np.ndim(tbar) == 0
        assert all(v.dtype == np.float32 for v in pbar.values())


def test_forward_without_tangents_and_call():
    rng = np.random.default_rng(3)
    net = ODENet(2, (5,), 2, activation="softplus")
    params = net.init_params(rng, "float64", np)
    x = rng.standard_normal((4, 2))
    y, ydot, cache = net.forward(params, x, None, 0.0)
    assert ydot is None
    np.testing.assert_array_equal(net(params, x, 0.0), y)
    xbar, xdotbar, _, _ = net.backward(np.ones_like(y), None, cache)
    assert xdotbar is None and xbar.shape == x.shape


# ----------------------------------------------------------------------------- bad input

def test_shape_errors_name_the_shapes():
    net = ODENet(3, (4,), 3)
    params = net.init_params(np.random.default_rng(0), "float64", np)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got \(5, 2\)"):
        net.forward(params, np.zeros((5, 2)), None, 0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got \(3,\)"):
        net.validate(np.zeros(3))
    with pytest.raises(ValueError, match=r"\(K, 5, 3\) to match x \(5, 3\), got \(2, 4, 3\)"):
        net.validate(np.zeros((5, 3)), np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"got \(5, 3\)"):
        net.forward(params, np.zeros((5, 3)), np.zeros((5, 3)), 0.0)
    with pytest.raises(ValueError, match=r"ybar must have shape \(5, 3\), got \(5, 2\)"):
        _, _, cache = net.forward(params, np.zeros((5, 3)), None, 0.0)
        net.backward(np.zeros((5, 2)), None, cache)
    with pytest.raises(ValueError, match="no entry '0.gate.bias'"):
        net.forward({k: v for k, v in params.items() if k != "0.gate.bias"},
                    np.zeros((5, 3)), None, 0.0)
    with pytest.raises(ValueError, match="unknown layer type 'conv'"):
        ODENet(3, (4,), 3, layer="conv")
    with pytest.raises(ValueError, match="unknown activation"):
        ODENet(3, (4,), 3, activation="cube")


def test_non_finite_input_is_reported_where_it_enters():
    net = ODENet(2, (4,), 2)
    x = np.zeros((3, 2))
    net.validate(x, np.zeros((2, 3, 2)), 0.5)       # clean input passes
    bad = x.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="ODENet input x contains 1 non-finite"):
        net.validate(bad)
    eps = np.zeros((2, 3, 2))
    eps[0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="ODENet tangents xdot contains 1 non-finite"):
        net.validate(x, eps)
    with pytest.raises(ValueError, match="time t is not finite"):
        net.validate(x, None, float("nan"))
    with pytest.raises(ValueError, match="ODENet time t contains"):
        net.validate(x, None, np.asarray(np.inf))


def test_config_round_trips():
    net = ODENet(2, (8, 4), 2, layer="concat", activation="logcosh")
    again = ODENet(**net.config)
    assert again.config == net.config
    x = np.ones((1, 2))
    p = net.init_params(np.random.default_rng(0), "float64", np)
    np.testing.assert_array_equal(net(p, x, 0.3), again(p, x, 0.3))


def test_stacked_path_equals_layer_by_layer_public_interface():
    """ODENet chains the stacked rules; chaining the public per-layer forward/backward gives the
    same numbers (the two interfaces of docs/layers.md eq. 1.1a agree)."""
    rng = np.random.default_rng(4)
    net = ODENet(3, (5, 4), 3, activation="tanh")
    params = net.init_params(rng, "float64", np)
    x, xdot = rng.standard_normal((4, 3)), rng.standard_normal((2, 4, 3))
    y, ydot, cache = net.forward(params, x, xdot, 0.3)
    a, b = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    xbar, xdotbar, pbar, tbar = net.backward(a, b, cache)
    h, hd, caches = x, xdot, []
    seq = []
    for i, lay in enumerate(net.layers):
        seq.append((i, lay))
        if i < len(net.layers) - 1:
            seq.append((None, net.activation))
    for i, lay in seq:
        p = {} if i is None else {k[len(f"{i}."):]: v for k, v in params.items()
                                  if k.startswith(f"{i}.")}
        h, hd, c = lay.forward(p, h, hd, 0.3)
        caches.append(c)
    assert_rel_close(h, y, rtol=1e-14, atol=0) and assert_rel_close(hd, ydot, rtol=1e-14, atol=0)
    hb, hdb, tb, grads = a, b, 0.0, {}
    for (i, lay), c in zip(reversed(seq), reversed(caches)):
        hb, hdb, g, t_ = lay.backward(hb, hdb, c)
        tb = tb + t_
        grads.update({f"{i}.{k}": v for k, v in g.items()})
    assert_rel_close(hb, xbar, rtol=1e-13, atol=0)
    assert_rel_close(hdb, xdotbar, rtol=1e-13, atol=0)
    assert_rel_close(float(tb), float(tbar), rtol=1e-13, atol=1e-15)
    for k in pbar:
        assert_rel_close(grads[k], pbar[k], rtol=1e-13, atol=0)


@pytest.mark.slow
def test_toy_network_forward_backward_timing():
    """Benchmark (run with --runslow -s): one forward+backward of the toy CNF network,
    ConcatSquash 2-64-64-64-2, tanh, B = 100, K = 2 exact-trace tangents, float32. The toy
    iteration makes 32 such calls (RK4, 8 steps) and must stay ≲ 25 ms, so one call must be well
    under 0.75 ms of CPU time; the bound below is loose for a shared 2-core machine.
    Reports CPU time (process_time, insensitive to other users' load) and wall time, min over
    repeats. BLAS threads matter: run with OPENBLAS_NUM_THREADS=1 for these small products."""
    import time
    from npflow import trace as T
    rng = np.random.default_rng(0)
    net = ODENet(2, (64, 64, 64), 2, layer="concatsquash", activation="tanh")
    p = net.init_params(rng, "float32", np)
    x = rng.standard_normal((100, 2)).astype(np.float32)
    eps = T.probes("exact", 2, x.shape, rng, "float32", np)
    ybar = rng.standard_normal((100, 2)).astype(np.float32)
    ydotbar = rng.standard_normal((2, 100, 2)).astype(np.float32)

    def call():
        _, _, cache = net.forward(p, x, eps, 0.3)
        net.backward(ybar, ydotbar, cache)

    for _ in range(200):
        call()
    cpu, wall = [], []
    for _ in range(10):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(300):
            call()
        cpu.append((time.process_time() - c0) / 300)
        wall.append((time.perf_counter() - w0) / 300)
    print(f"\nODENet toy forward+backward per call: CPU min {min(cpu) * 1e3:.3f} ms "
          f"(median {np.median(cpu) * 1e3:.3f}), wall min {min(wall) * 1e3:.3f} ms "
          f"(median {np.median(wall) * 1e3:.3f})")
    assert min(cpu) < 1.5e-3


@given(**nets)
def test_odenet_per_row_time_tangent_adjoint_and_gradients(B, D, K, hidden, layer, activation,
                                                           seed, t):
    """eq. 2.6 (per-row t (B, 1)): tangent = central difference, dot-product test, x̄ ẋ̄ θ̄ and
    t̄ (B, 1) = differences, for every layer type (ConcatSquash through the gated path)."""
    rng = np.random.default_rng(seed)
    net = ODENet(D, hidden, D, layer=layer, activation=activation)
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((B, D)), rng.standard_normal((K, B, D))
    check_all(net, params, x, xdot, t + rng.standard_normal((B, 1)), rng)


@given(**nets)
def test_odenet_per_row_time_with_equal_rows_reproduces_scalar_time(B, D, K, hidden, layer,
                                                                    activation, seed, t):
    """t_b = t: f, ḟ, x̄, ẋ̄, θ̄ equal the scalar-t results to rounding, Σ_b t̄_b = t̄; with
    K = 0 (the flow-matching path, need_xdotbar=False) too."""
    rng = np.random.default_rng(seed)
    net = ODENet(D, hidden, D, layer=layer, activation=activation)
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((B, D)), rng.standard_normal((K, B, D))
    a, b = rng.standard_normal((B, D)), rng.standard_normal((K, B, D))
    for xd, bb in ((xdot, b), (None, None)):
        outs = []
        for tt in (t, np.full((B, 1), t)):
            y, yd, cache = net.forward(params, x, xd, tt)
            outs.append((y, yd) + net.backward(a, bb, cache, need_xdotbar=xd is not None))
        (y1, yd1, xb1, xdb1, p1, tb1), (y2, yd2, xb2, xdb2, p2, tb2) = outs
        assert np.shape(tb2) == (B, 1)
        for got, want in ((y2, y1), (yd2, yd1), (xb2, xb1), (xdb2, xdb1)):
            if want is None:
                assert got is None
            else:
                assert_rel_close(got, want, rtol=1e-12, atol=1e-13)
        for k in p1:
            assert_rel_close(p2[k], p1[k], rtol=1e-12, atol=1e-13, what=k)
        assert_rel_close(np.sum(tb2), float(tb1), rtol=1e-12, atol=1e-13, what="tbar")


@pytest.mark.parametrize("layer", sorted(LAYER_TYPES))
def test_odenet_per_row_time_rows_are_scalar_calls(layer):
    """Row b of f(x, t (B, 1)) is f(x_b, t_b); θ̄ is the sum of the rows' scalar-t θ̄."""
    rng = np.random.default_rng(1)
    net = ODENet(2, (5, 4), layer=layer)
    params = net.init_params(rng, np.float64, np)
    x, tr, a = rng.standard_normal((4, 2)), rng.uniform(0, 1, (4, 1)), rng.standard_normal((4, 2))
    y, _, cache = net.forward(params, x, None, tr)
    _, _, pbar, tbar = net.backward(a, None, cache, need_xdotbar=False)
    psum = {k: 0.0 for k in pbar}
    for i in range(4):
        yi, _, ci = net.forward(params, x[i:i + 1], None, float(tr[i, 0]))
        _, _, pi, ti = net.backward(a[i:i + 1], None, ci, need_xdotbar=False)
        assert_rel_close(y[i], yi[0], rtol=1e-13)
        assert_rel_close(tbar[i, 0], float(ti), rtol=1e-12)
        psum = {k: psum[k] + pi[k] for k in pi}
    for k in pbar:
        assert_rel_close(pbar[k], psum[k], rtol=1e-12, what=k)
    prepared = net.prepare(params)              # the prepared gate vectors give the same f
    assert_rel_close(net.forward(prepared, x, None, tr)[0], y, rtol=1e-15, atol=0)


def test_odenet_refuses_time_of_wrong_shape():
    net = ODENet(2, (3,))
    params = net.init_params(np.random.default_rng(0), np.float64, np)
    with pytest.raises(ValueError, match=r"ODENet: time t must be a scalar or an array of shape"):
        net.forward(params, np.zeros((4, 2)), None, np.zeros((4,)))
