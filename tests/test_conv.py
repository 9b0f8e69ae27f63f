"""Convolutions (docs/images.md section 1): the forward against a direct correlation, the
tangent against central differences, the backward as the adjoint of the full forward map
(x, xdot, θ, t) -> (y, ydot) (dot-product test, second-order terms included)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.signal import correlate2d

from npflow.conv import Conv2d, ConcatConv2d, ConcatSquashConv2d, ConvNet, Softplus


def _direct_conv(x, W, b, stride, pad):
    """Reference: y[b, o] = Σ_c correlate2d(pad(x[b, c]), W[o, c], 'valid')[::s, ::s] + b[o]."""
    B, C, H, Wd = x.shape
    O = W.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = []
    for n in range(B):
        rows = []
        for o in range(O):
            acc = sum(correlate2d(xp[n, c], W[o, c], mode="valid") for c in range(C))
            rows.append(acc[::stride, ::stride] + b[o])
        out.append(rows)
    return np.array(out)


def _forward_flat(layer, params, x, xdot, t):
    y, ydot, _ = layer.forward(params, x, xdot, t)
    return y, ydot


def _inner(a, b):
    if a is None or b is None:
        return 0.0
    return float(np.sum(np.asarray(a) * np.asarray(b)))


def _check_adjoint_and_tangent(layer, params, x, xdot, t, rng, eps=1e-6, rtol=1e-6):
    """Dot-product test of the backward against central differences of the forward map,
    in a random direction of (x, xdot, θ, t)."""
    y, ydot, cache = layer.forward(params, x, xdot, t)
    ybar = rng.standard_normal(y.shape)
    ydotbar = None if ydot is None else rng.standard_normal(ydot.shape)
    xbar, xdotbar, pbar, tbar = layer.backward(ybar, ydotbar, cache)
    assert set(pbar) == set(params)
    dx = rng.standard_normal(x.shape)
    dxdot = None if xdot is None else rng.standard_normal(xdot.shape)
    dp = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    dt = float(rng.standard_normal())

    def at(s):
        p = {k: params[k] + s * dp[k] for k in params}
        xd = None if xdot is None else xdot + s * dxdot
        return _forward_flat(layer, p, x + s * dx, xd, t + s * dt)

    yp, ydp = at(eps)
    ym, ydm = at(-eps)
    lhs = _inner(ybar, (yp - ym) / (2 * eps))
    if ydot is not None:
        lhs += _inner(ydotbar, (ydp - ydm) / (2 * eps))
    rhs = _inner(xbar, dx) + _inner(xdotbar, dxdot) + float(tbar) * dt
    rhs += sum(_inner(pbar[k], dp[k]) for k in params)
    assert abs(lhs - rhs) <= rtol * (1 + abs(lhs)), (lhs, rhs)
    # tangent = directional derivative in x (eq. 1.4)
    if xdot is not None:
        yp, _ = _forward_flat(layer, params, x + eps * xdot[0], None, t)
        ym, _ = _forward_flat(layer, params, x - eps * xdot[0], None, t)
        np.testing.assert_allclose(ydot[0], (yp - ym) / (2 * eps), rtol=1e-6, atol=1e-8)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(3, 6), st.integers(3, 6),
                   st.integers(0, 2), st.integers(0, 2**31 - 1))


@given(shapes, st.sampled_from([(3, 1, 1), (4, 2, 1), (3, 2, 0), (1, 1, 0)]))
def test_conv2d_forward_equals_direct_correlation(shape, ksp):
    B, C, H, W, K, seed = shape
    k, s, p = ksp
    rng = np.random.default_rng(seed)
    layer = Conv2d(C, 2, kernel=k, stride=s, padding=p)
    params = layer.init_params(rng, np.float64, np)
    x = rng.standard_normal((B, C, H, W))
    y, _, _ = layer.forward(params, x, None, 0.3)
    np.testing.assert_allclose(y, _direct_conv(x, params["weight"], params["bias"], s, p),
                               rtol=1e-12, atol=1e-12)


def test_concat_conv2d_equals_conv_over_time_channel():
    rng = np.random.default_rng(0)
    layer = ConcatConv2d(2, 3)
    params = layer.init_params(rng, np.float64, np)
    x = rng.standard_normal((2, 2, 5, 4))
    t = 0.7
    y, _, _ = layer.forward(params, x, None, t)
    tx = np.concatenate([np.full((2, 1, 5, 4), t), x], axis=1)
    np.testing.assert_allclose(y, _direct_conv(tx, params["weight"], params["bias"], 1, 1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [Conv2d, ConcatConv2d, ConcatSquashConv2d])
@given(shapes, st.sampled_from([(3, 1, 1), (3, 1, 0), (1, 1, 0), (4, 2, 1), (3, 2, 0)]))
def test_vjp_is_adjoint_of_forward_map(cls, shape, ksp):
    B, C, H, W, K, seed = shape
    k, s, p = ksp
    rng = np.random.default_rng(seed)
    layer = cls(C, 2, kernel=k, stride=s, padding=p)
    params = layer.init_params(rng, np.float64, np)
    x = rng.standard_normal((B, C, H, W))
    xdot = rng.standard_normal((K, B, C, H, W)) if K else None
    _check_adjoint_and_tangent(layer, params, x, xdot, float(rng.uniform(0, 1)), rng)


@given(shapes)
def test_convnet_vjp_is_adjoint_of_forward_map(shape):
    B, C, H, W, K, seed = shape
    rng = np.random.default_rng(seed)
    net = ConvNet((C, H, W), hidden_dims=(4, 3), layer_type="concat")
    params = net.init_params(rng, np.float64, np)
    x = rng.standard_normal((B, C, H, W))
    xdot = rng.standard_normal((max(K, 1), B, C, H, W))
    _check_adjoint_and_tangent(net, params, x, xdot, float(rng.uniform(0, 1)), rng, rtol=1e-5)


def test_softplus_vjp_is_adjoint_of_forward_map():
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((2, 3, 4, 4))
    xdot = rng.standard_normal((2, 2, 3, 4, 4))
    _check_adjoint_and_tangent(Softplus(), {}, x, xdot, 0.0, rng)


def test_backward_with_missing_cotangents():
    rng = np.random.default_rng(2)
    layer = ConcatConv2d(2, 3)
    params = layer.init_params(rng, np.float64, np)
    x = rng.standard_normal((2, 2, 4, 4))
    xdot = rng.standard_normal((2, 2, 2, 4, 4))
    y, ydot, cache = layer.forward(params, x, xdot, 0.5)
    ybar, ydotbar = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    full = layer.backward(ybar, ydotbar, cache)
    only_y = layer.backward(ybar, None, cache)
    only_ydot = layer.backward(None, ydotbar, cache)
    np.testing.assert_allclose(only_y[0], full[0])
    np.testing.assert_allclose(only_ydot[1], full[1])
    np.testing.assert_allclose(only_y[2]["weight"] + only_ydot[2]["weight"], full[2]["weight"])
    assert only_ydot[0] is None and only_y[1] is None
    assert float(only_ydot[3]) == 0.0


def test_convnet_zero_last_is_zero_map_and_keeps_shape():
    rng = np.random.default_rng(3)
    net = ConvNet((2, 6, 6), hidden_dims=(4, 4), zero_last=True)
    params = net.init_params(rng, np.float32, np)
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    f, _, _ = net.forward(params, x, None, 0.1)
    assert f.shape == x.shape and f.dtype == np.float32 and not f.any()


def test_convnet_rejects_wrong_shapes():
    net = ConvNet((1, 6, 6), hidden_dims=(4,))
    params = net.init_params(np.random.default_rng(0), np.float64, np)
    with pytest.raises(ValueError, match="shape"):
        net.forward(params, np.zeros((2, 2, 6, 6)), None, 0.0)
    with pytest.raises(ValueError, match="xdot"):
        net.forward(params, np.zeros((2, 1, 6, 6)), np.zeros((1, 2, 1, 6, 5)), 0.0)
    with pytest.raises(ValueError, match="strides"):
        ConvNet((1, 6, 6), hidden_dims=(4,), strides=(2, 1))


def _case(cls, ksp, seed, x_shape, K):
    """A float64 layer with its params, an input x of x_shape and K tangents."""
    k, s, p = ksp
    rng = np.random.default_rng(seed)
    layer = cls(x_shape[1], x_shape[1] + 1, kernel=k, stride=s, padding=p)
    params = layer.init_params(rng, np.float64, np)
    return layer, params, rng.standard_normal(x_shape), rng.standard_normal((K,) + x_shape), rng


@pytest.mark.parametrize("cls", [Conv2d, ConcatConv2d, ConcatSquashConv2d])
@pytest.mark.parametrize("ksp", [(3, 1, 1), (3, 1, 0), (1, 1, 0), (4, 2, 1), (3, 2, 0)])
def test_image_blocks_give_the_same_forward_and_backward_as_one_block(cls, ksp, monkeypatch):
    """eq. 1.2a: unfolding and multiplying block by block of images (one image per block here)
    changes nothing but the order of the weight gradient's sum."""
    import npflow.conv as conv
    layer, params, x, xdot, _ = _case(cls, ksp, 7, (3, 3, 7, 6), 2)
    results = []
    for chunk in (1 << 40, 1):
        monkeypatch.setattr(conv, "CHUNK_BYTES", chunk)
        y, ydot, cache = layer.forward(params, x, xdot, 0.4)
        ybar = np.random.default_rng(1).standard_normal(y.shape)
        ydotbar = np.random.default_rng(2).standard_normal(ydot.shape)
        results.append((y, ydot) + layer.backward(ybar, ydotbar, cache))
    (y0, yd0, xb0, xdb0, g0, t0), (y1, yd1, xb1, xdb1, g1, t1) = results
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(yd1, yd0)
    np.testing.assert_allclose(xb1, xb0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(xdb1, xdb0, rtol=1e-13, atol=1e-13)
    for key in g0:
        np.testing.assert_allclose(g1[key], g0[key], rtol=1e-12, atol=1e-12, err_msg=key)
    assert float(t1) == pytest.approx(float(t0), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("ksp", [(3, 1, 1), (4, 2, 1)])
def test_backward_without_tangent_cotangent_keeps_xbar_and_weight_gradient(ksp):
    layer, params, x, xdot, rng = _case(ConcatConv2d, ksp, 5, (2, 2, 6, 6), 1)
    y, ydot, cache = layer.forward(params, x, xdot, 0.2)
    ybar, ydotbar = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    full = layer.backward(ybar, ydotbar, cache)
    part = layer.backward(ybar, ydotbar, cache, need_xdotbar=False)
    assert part[1] is None and full[1] is not None
    np.testing.assert_array_equal(part[0], full[0])
    for key in full[2]:
        np.testing.assert_array_equal(part[2][key], full[2][key])
    assert float(part[3]) == float(full[3])


@pytest.mark.parametrize("cls", [Conv2d, ConcatConv2d, ConcatSquashConv2d])
def test_stacked_input_cotangent_is_the_array_xbar_and_xdotbar_are_views_of(cls):
    rng = np.random.default_rng(3)
    layer = cls(2, 3)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((2, 2, 2, 5, 5))
    y, ydot, cache = layer.forward(params, x, xdot, 0.4)
    ybar, ydotbar = rng.standard_normal(y.shape), rng.standard_normal(ydot.shape)
    xbar, xdotbar, grads, tbar, stacked = layer.backward_parts(ybar, ydotbar, cache)
    assert stacked.shape == (3,) + x.shape
    assert np.shares_memory(stacked, xbar) and np.shares_memory(stacked, xdotbar)
    np.testing.assert_array_equal(stacked[0], xbar)
    np.testing.assert_array_equal(stacked[1:], xdotbar)
    assert layer.backward_parts(ybar, ydotbar, cache, need_xdotbar=False)[4] is None


# ----------------------------------------------------------------------------- the layer contract

def test_conv_layers_follow_the_stacked_protocol_of_the_dense_layers():
    """forward_stacked(params, h, t) / backward_stacked(hbar, cache) give the same arrays as
    forward / backward (docs/layers.md, the layer contract), and out_shape has the batch axis."""
    rng = np.random.default_rng(7)
    for cls in (Conv2d, ConcatConv2d, ConcatSquashConv2d):
        layer = cls(2, 3)
        p = layer.init_params(rng, np.float64, np)
        x, xdot = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 2, 5, 5))
        y, ydot, cache = layer.forward(p, x, xdot, 0.4)
        H, cache_s = layer.forward_stacked(p, np.concatenate((x[None], xdot)), 0.4)
        np.testing.assert_array_equal(H[0], y)
        np.testing.assert_array_equal(H[1:], ydot)
        assert layer.out_shape(x.shape) == y.shape
        hbar = rng.standard_normal(H.shape)
        xbar, xdotbar, grads, tbar = layer.backward(hbar[0], hbar[1:], cache)
        hin, grads_s, tbar_s = layer.backward_stacked(hbar, cache_s)
        np.testing.assert_array_equal(hin[0], xbar)
        np.testing.assert_array_equal(hin[1:], xdotbar)
        assert float(tbar_s) == float(tbar) and sorted(grads_s) == sorted(p)
        for k in grads:
            np.testing.assert_array_equal(grads_s[k], grads[k])
        assert sorted(p) == sorted(layer.param_names())


def test_concat_squash_conv_has_the_dense_layers_parameter_names_and_formula():
    rng = np.random.default_rng(8)
    layer = ConcatSquashConv2d(2, 3, kernel=1, padding=0)
    p = layer.init_params(rng, np.float64, np)
    assert sorted(p) == ["bias", "gate.bias", "gate.weight", "hyper_bias.weight", "weight"]
    x, t = rng.standard_normal((4, 2, 3, 3)), 0.7
    y = layer.forward(p, x, None, t)[0]
    gate = 1 / (1 + np.exp(-(p["gate.weight"] * t + p["gate.bias"])))
    lin = np.einsum("oc,bchw->bohw", p["weight"][:, :, 0, 0], x) + p["bias"][:, None, None]
    want = lin * gate[:, None, None] + (p["hyper_bias.weight"] * t)[:, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)


def test_checkpoint_with_the_former_conv_parameter_names_still_loads_and_resumes(tmp_path):
    """Checkpoints written before the conv layers took the dense names (gate_weight, gate_bias,
    hyper_bias) load with today's names, parameters and optimizer moments alike."""
    import json

    import h5py
    from npflow import Adam, load
    from npflow.checkpoint import load_training_state
    from npflow.multiscale import MultiscaleCNF
    m = MultiscaleCNF((1, 4, 4), hidden=(2,), scales=1, blocks=1, layer="concatsquash",
                      dtype="float64", seed=3)
    opt = Adam(m.params, lr=1e-3)
    path = tmp_path / "old.h5"
    m.save(path, optimizer=opt, iteration=5)
    old = {"gate.weight": "gate_weight", "gate.bias": "gate_bias",
           "hyper_bias.weight": "hyper_bias"}

    def to_old(name):
        for new, former in old.items():
            if name.endswith("." + new):
                return name[:-len(new)] + former
        return name

    renamed = 0
    with h5py.File(path, "r+") as f:            # rewrite the file as an older npflow wrote it
        g = f["params"]
        g.attrs["names"] = json.dumps([to_old(n) for n in json.loads(g.attrs["names"])])
        for ds in g.values():
            renamed += ds.attrs["name"] != to_old(ds.attrs["name"])
            ds.attrs["name"] = to_old(ds.attrs["name"])
        for grp in f["optimizer"].values():
            if isinstance(grp, h5py.Group):       # the moments m and v, keyed by name
                for ds in grp.values():
                    ds.attrs["key"] = to_old(ds.attrs["key"])
                grp.attrs["order"] = json.dumps([to_old(k) for k in
                                                 json.loads(grp.attrs["order"])])
        plain = json.loads(f["optimizer"].attrs["json"])
        plain["keys"] = [to_old(k) for k in plain["keys"]]
        f["optimizer"].attrs["json"] = json.dumps(plain)
    assert renamed == sum(to_old(k) != k for k in m.params) > 0
    loaded = load(path)
    assert sorted(loaded.params) == sorted(m.params)
    for k in m.params:
        np.testing.assert_array_equal(loaded.params[k], m.params[k])
    state = load_training_state(path)
    opt2 = Adam(loaded.params, lr=1e-3)
    opt2.load_state_dict(state["optimizer"])          # raises if a key were still old
    assert sorted(state["optimizer"]["m"]) == sorted(m.params)


@pytest.mark.parametrize("cls", [ConcatConv2d, ConcatSquashConv2d])
def test_conv_layers_refuse_per_row_time(cls):
    """The convolutions take one time per call: an array t of shape (B, 1) is refused."""
    layer = cls(1, 2, kernel=3, padding=1)
    params = layer.init_params(np.random.default_rng(0), np.float64, np)
    with pytest.raises(ValueError, match="time t must be a scalar"):
        layer.forward(params, np.zeros((2, 1, 5, 5)), None, np.zeros((2, 1)))
    net = ConvNet((1, 6, 6), hidden_dims=(4,))
    with pytest.raises(ValueError, match="time t must be a scalar"):
        net.forward(net.init_params(np.random.default_rng(0), np.float64, np),
                    np.zeros((2, 1, 6, 6)), None, np.zeros((2, 1)))
