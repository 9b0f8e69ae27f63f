"""The finite-difference and dot-product tests of every layer, with the layer on device arrays.

The checks are the project's own (tests/test_layers.py ``check_all``, tests/test_conv.py
``_check_adjoint_and_tangent``); ``OnDevice`` runs the layer's forward and backward on the
device backend (tests/strict_xp.py, or CuPy with --device-backend cupy) and hands the checks
host arrays, so any numpy call on model data inside a layer fails here at its line. Also:
float32 in gives float32 everywhere with no float64 intermediate.
"""
import numpy as np
import pytest

from npflow import layers as L
from npflow.backend import to_device, to_host
from npflow.conv import ConcatConv2d, ConcatSquashConv2d, Conv2d, ConvNet, Softplus
from npflow.odenet import LAYER_TYPES, ODENet
from npflow.otflow_net import init_potential, potential_backward, potential_forward, \
    potential_hvp, potential_value

from test_conv import _check_adjoint_and_tangent
from test_layers import check_all

ACTS = sorted(L.ACTIVATIONS)
AFFINE = [L.Linear, L.ConcatLinear, L.ConcatSquashLinear]
CONV = [Conv2d, ConcatConv2d, ConcatSquashConv2d]


def dev(o, xp):
    """Host arrays (in dicts, lists, tuples) -> device arrays."""
    if isinstance(o, np.ndarray):
        return to_device(o, xp)
    if isinstance(o, dict):
        return {k: dev(v, xp) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(dev(v, xp) for v in o)
    return o


def host(o, device):
    """Device arrays (in dicts, lists, tuples) -> host arrays; asserts nothing is on the host
    that should not be (a layer returning NumPy arrays for device inputs is a bug)."""
    if isinstance(o, np.ndarray):
        raise AssertionError("a layer returned a NumPy array for device inputs")
    if device.is_device(o):
        return to_host(o)
    if isinstance(o, dict):
        return {k: host(v, device) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(host(v, device) for v in o)
    return o


class OnDevice:
    """A layer whose forward/backward run on the device; host arrays in and out."""

    def __init__(self, layer, device):
        self.layer, self.device, self.xp = layer, device, device.xp

    def forward(self, params, x, xdot, t):
        y, ydot, cache = self.layer.forward(dev(params, self.xp), dev(x, self.xp),
                                            dev(xdot, self.xp), t)
        return host(y, self.device), host(ydot, self.device), cache

    def backward(self, ybar, ydotbar, cache):
        return host(self.layer.backward(dev(ybar, self.xp), dev(ydotbar, self.xp), cache),
                    self.device)


SEEDS = [0, 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cls", AFFINE, ids=lambda c: c.__name__)
def test_affine_layer_on_device_matches_finite_differences(device, cls, seed):
    rng = np.random.default_rng(seed)
    layer = cls(3, 4)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((5, 3)), rng.standard_normal((2, 5, 3))
    check_all(OnDevice(layer, device), params, x, xdot, 0.3 + seed, rng)


@pytest.mark.parametrize("name", ACTS)
def test_activation_on_device_matches_finite_differences(device, name):
    rng = np.random.default_rng(3)
    act = L.get_activation(name)
    for shape in ((4, 3), (2, 3, 4, 4)):
        x, xdot = 2 * rng.standard_normal(shape), rng.standard_normal((2,) + shape)
        check_all(OnDevice(act, device), {}, x, xdot, 0.0, rng)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layer", sorted(LAYER_TYPES))
def test_odenet_on_device_matches_finite_differences(device, layer, activation):
    rng = np.random.default_rng(4)
    net = ODENet(3, (4, 5), 3, layer=layer, activation=activation)
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((4, 3)), rng.standard_normal((3, 4, 3))
    check_all(OnDevice(net, device), params, x, xdot, 0.7, rng)


@pytest.mark.parametrize("ksp", [(3, 1, 1), (4, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize("cls", CONV, ids=lambda c: c.__name__)
def test_conv_layer_on_device_matches_finite_differences(device, cls, ksp):
    rng = np.random.default_rng(5)
    k, s, p = ksp
    layer = cls(2, 3, kernel=k, stride=s, padding=p)
    params = layer.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((2, 2, 2, 5, 5))
    _check_adjoint_and_tangent(OnDevice(layer, device), params, x, xdot, 0.4, rng)
    _check_adjoint_and_tangent(OnDevice(layer, device), params, x, None, 0.4, rng)


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
def test_convnet_and_softplus_on_device_match_finite_differences(device, layer_type):
    rng = np.random.default_rng(6)
    net = ConvNet((2, 4, 4), hidden_dims=(3, 3), layer_type=layer_type)
    params = net.init_params(rng, np.float64, np)
    x, xdot = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 2, 2, 4, 4))
    _check_adjoint_and_tangent(OnDevice(net, device), params, x, xdot, 0.5, rng, rtol=1e-5)
    _check_adjoint_and_tangent(OnDevice(Softplus(), device), {}, 3 * x, xdot, 0.0, rng)


def test_otflow_potential_on_device_matches_finite_differences_and_its_adjoint(device):
    """∇Φ against central differences of Φ, and the dot-product test <(∇²Φ)v, w> =
    <v, (∇²Φ)ᵀw> (potential_hvp against potential_backward), on device arrays."""
    rng = np.random.default_rng(7)
    d = 3
    p = init_potential(d, 5, 3, min(10, d + 1), rng, np.float64, np)
    p = {k: 0.7 * rng.standard_normal(v.shape) for k, v in p.items()}
    s = rng.standard_normal((4, d + 1))
    xp = device.xp
    pd, sd = dev(p, xp), dev(s, xp)
    phi, grad, tr, cache = potential_forward(pd, sd, d, need_trace=True)
    grad = host(grad, device)
    eps = 1e-6
    for j in range(d + 1):
        e = np.zeros(d + 1)
        e[j] = eps
        fd = (host(potential_value(pd, dev(s + e, xp)), device)
              - host(potential_value(pd, dev(s - e, xp)), device)) / (2 * eps)
        np.testing.assert_allclose(grad[:, j], fd, rtol=1e-6, atol=1e-7)
    V, W = rng.standard_normal((2, 4, d + 1)), rng.standard_normal((4, d + 1))
    _, HV = potential_hvp(pd, sd, dev(V, xp))
    _, grad2, _, cache = potential_forward(pd, sd, d, need_trace=False)
    s_bar, p_bar = potential_backward(cache, None, dev(W, xp), None)
    HV, s_bar = host(HV, device), host(s_bar, device)
    for k in range(2):
        assert float((HV[k] * W).sum()) == pytest.approx(float((V[k] * s_bar).sum()),
                                                         rel=1e-11, abs=1e-11)


# ----------------------------------------------------------------------------- float32

def _float32_cases():
    out = [(f"{c.__name__}", lambda c=c: (c(3, 4), (5, 3))) for c in AFFINE]
    out += [(f"act-{n}", lambda n=n: (L.get_activation(n), (5, 3))) for n in ACTS]
    out += [(f"odenet-{lt}", lambda lt=lt: (ODENet(3, (4,), 3, layer=lt), (5, 3)))
            for lt in sorted(LAYER_TYPES)]
    out += [(f"{c.__name__}", lambda c=c: (c(2, 2, kernel=3, stride=1, padding=1),
                                          (2, 2, 4, 4))) for c in CONV]
    out += [("convnet", lambda: (ConvNet((2, 4, 4), hidden_dims=(3,)), (2, 2, 4, 4)))]
    return out


@pytest.mark.parametrize("case", _float32_cases(), ids=lambda c: c[0])
def test_float32_layer_on_device_makes_no_float64_array(device, case):
    """float32 params and inputs, t a Python float or a 0-d float32 device array: every output
    is float32 and (strict backend) no float64 array is made on the way."""
    layer, shape = case[1]()
    rng = np.random.default_rng(8)
    xp = device.xp
    p = layer.init_params(rng, np.float32, xp)
    x = to_device(rng.standard_normal(shape), xp, np.float32)
    xdot = to_device(rng.standard_normal((2,) + shape), xp, np.float32)
    for t in (0.5, xp.asarray(0.5, dtype=np.float32)):
        with device.track(float64=True) as tr:
            y, ydot, cache = layer.forward(p, x, xdot, t)
            xbar, xdotbar, pbar, tbar = layer.backward(y, ydot, cache)
        assert y.dtype == ydot.dtype == xbar.dtype == xdotbar.dtype == np.float32
        assert all(v.dtype == np.float32 for v in pbar.values())
        if tr is not None:
            assert not tr.float64, tr.summary()


# ----------------------------------------------------------------------------- discrete flows

FLOW_KINDS = ["planar", "orthogonal", "householder", "triangular", "sequence"]


class FlowOnDevice:
    """A discrete flow (npflow.flows) run on the device; host arrays in and out."""

    def __init__(self, flow, device):
        self.flow, self.device, self.xp = flow, device, device.xp

    def param_shapes(self):
        return self.flow.param_shapes()

    def forward(self, z, p):
        zn, ld, cache = self.flow.forward(dev(z, self.xp), dev(p, self.xp))
        return host(zn, self.device), host(ld, self.device), cache

    def backward(self, cache, zb, lb):
        return host(self.flow.backward(cache, dev(zb, self.xp), dev(lb, self.xp)), self.device)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_on_device_matches_finite_differences_and_its_adjoint(device, kind):
    """z̄ and every p̄ against central differences of <a, z'> + <c, log|det|>, on device
    arrays (the checks of tests/test_flows.py)."""
    from test_flows import build, raw_params
    from test_layers import assert_rel_close, central_difference
    rng = np.random.default_rng(9)
    flow = FlowOnDevice(build(kind, 3, rng), device)
    z = rng.standard_normal((4, 3))
    p = raw_params(flow, 4, rng)
    zn, ld, cache = flow.forward(z, p)
    a, c = rng.standard_normal(zn.shape), rng.standard_normal(ld.shape)
    z_bar, p_bar = flow.backward(cache, a, c)

    def loss(z_=z, p_=p):
        zn_, ld_, _ = flow.forward(z_, p_)
        return np.vdot(a, zn_) + np.vdot(c, ld_)

    v = rng.standard_normal(z.shape)
    assert_rel_close(np.vdot(z_bar, v), central_difference(lambda s: loss(z_=z + s * v)),
                     what="z_bar")
    for name in p:
        v = rng.standard_normal(p[name].shape)
        fd = central_difference(lambda s: loss(p_={**p, name: p[name] + s * v}))
        assert_rel_close(np.vdot(p_bar[name], v), fd, what=f"p_bar[{name!r}]")


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_float32_flow_on_device_makes_no_float64_array(device, kind):
    from npflow import flows as F
    rng = np.random.default_rng(10)
    D = 3
    flow = {"planar": lambda: F.Planar(D), "orthogonal": lambda: F.Orthogonal(D, 2),
            "householder": lambda: F.Householder(D, 2), "triangular": lambda: F.Triangular(D),
            "sequence": lambda: F.FlowSequence([F.Planar(D), F.Triangular(D, reverse=True)])
            }[kind]()
    xp = device.xp
    p = {k: to_device(rng.standard_normal((4,) + s), xp, np.float32)
         for k, s in flow.param_shapes().items()}
    z = to_device(rng.standard_normal((4, D)), xp, np.float32)
    with device.track(float64=True) as tr:
        zn, ld, cache = flow.forward(z, p)
        z_bar, p_bar = flow.backward(cache, zn, ld)
    assert zn.dtype == ld.dtype == z_bar.dtype == np.float32
    assert all(device.is_device(v) and v.dtype == np.float32 for v in p_bar.values())
    if tr is not None:
        assert not tr.float64, tr.summary()
