"""CuPy by construction: every function npflow takes from the array module exists in CuPy.

npflow's compute code calls ``xp.<name>`` with ``xp`` from npflow.backend; under
``backend.record_array_functions()`` each name taken ("tanh", "linalg.norm",
"random.default_rng", ...) is recorded. This file (named to run last) runs a representative
workload of the package under recording, adds every name recorded by the whole test session
(tests/conftest.py's autouse fixture), and checks each name against the installed CuPy by a
hasattr chain. CuPy imports without a GPU, so this runs in CI; it is skipped only when CuPy
itself cannot be imported.

Pieces written in parallel (solvers, CNF, OT-Flow, convolutions, multiscale) are exercised when
they import; a piece that does not exist yet is left out with a warning naming it.
"""
import importlib
import os
import sys
import warnings

import numpy as np
import pytest

from npflow import backend


def missing_in(module, names):
    """The names (dotted for submodules, e.g. "linalg.norm") that ``module`` lacks."""
    out = set()
    for name in names:
        obj = module
        for part in name.split("."):
            if not hasattr(obj, part):
                out.add(name)
                break
            obj = getattr(obj, part)
    return out


def _session_names():
    """RECORDED_ARRAY_FUNCTIONS of the conftest module pytest loaded (by file, whatever its
    module name is under the import mode in use)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and os.path.exists(f) and os.path.samefile(f, here):
            return set(mod.RECORDED_ARRAY_FUNCTIONS)
    raise AssertionError(f"tests/conftest.py ({here}) is not loaded: cannot read the names "
                         "recorded by the rest of the session")


# ----------------------------------------------------------------------------- the workload

def _layers_odenet_trace(rng):
    from npflow import layers as L, trace as T
    from npflow.odenet import LAYER_TYPES, ODENet
    for dtype in ("float32", "float64"):
        for layer in sorted(LAYER_TYPES):
            for act in sorted(L.ACTIVATIONS):
                net = ODENet(3, (4, 4), 3, layer=layer, activation=act)
                p = net.init_params(rng, dtype, np, zero_last=(act == "tanh"))
                x = rng.standard_normal((5, 3)).astype(dtype)
                for kind in T.PROBE_KINDS:
                    K = None if kind == "exact" else 2
                    eps = T.probes(kind, K, x.shape, rng, dtype, np)
                    w = T.probe_weight(kind, eps.shape[0])
                    net.validate(x, eps, 0.3)
                    y, ydot, cache = net.forward(p, x, eps, np.asarray(0.3))
                    tr, fro = T.trace_estimate(eps, ydot, w), T.frobenius_estimate(ydot, w)
                    ydb = (T.trace_estimate_adjoint(eps, np.ones_like(tr), w)
                           + T.frobenius_estimate_adjoint(ydot, np.ones_like(fro), w))
                    net.backward(y, ydb, cache)
                    net.backward(None, ydb, cache)
                y, _, cache = net.forward(p, x, None, 0.1)
                net.backward(y, None, cache)
                L.get_activation(act).derivatives(x, np, order=3)
                L.get_activation(act).forward({}, x[:, :, None, None], None, 0.0)
        for lay in (L.Linear(3, 2), L.ConcatLinear(3, 2), L.ConcatSquashLinear(3, 2)):
            p = lay.init_params(rng, dtype, np)
            x = rng.standard_normal((4, 3)).astype(dtype)
            y, ydot, cache = lay.forward(p, x, rng.standard_normal((2, 4, 3)).astype(dtype), 0.2)
            lay.backward(y, ydot, cache)
            lay.backward(None, None, cache)
        img = T.probes("exact", None, (2, 1, 2, 2), rng, dtype, np)
        T.trace_estimate(img, img, 1.0)


class _ODENetDynamics:
    """A plain dynamics object (solver interface) around an ODENet: dz/dt = f(z, t)."""

    def __init__(self, net, params):
        self.net, self.params = net, params

    def forward(self, t, y):
        f, _, cache = self.net.forward(self.params, y, None, t)
        return f, cache

    def backward(self, cache, dydt_bar):
        zbar, _, pbar, tbar = self.net.backward(dydt_bar, None, cache)
        return zbar, pbar, tbar


def _solvers(rng):
    solvers = importlib.import_module("npflow.solvers")
    from npflow.odenet import ODENet
    net = ODENet(2, (4,), 2)
    dyn = _ODENetDynamics(net, net.init_params(rng, "float64", np))
    y0 = rng.standard_normal((3, 2))
    for method, kw in (("rk4", dict(steps=3)), ("euler", dict(steps=2)),
                       ("midpoint", dict(steps=2)), ("dopri5", {})):
        sol = solvers.odeint(dyn, y0, 0.0, 0.5, method=method, **kw)
        sol.backward(np.ones_like(sol.y1))
        solvers.terminal_time_gradient(dyn, sol.y1, 0.5, np.ones_like(sol.y1))


def _cnf(rng):
    CNF = importlib.import_module("npflow.cnf").CNF
    x = rng.standard_normal((6, 2))
    for kw in (dict(trace="exact"), dict(trace="rademacher", probes=2, kinetic=0.01,
                                         jacobian=0.01, train_T=True),
               dict(trace="gaussian", solver="dopri5", layer="concat", activation="softplus")):
        m = CNF(2, hidden=(4,), steps=2, dtype="float64", **kw)
        m.loss_and_grad(x, np.random.default_rng(0))
    m.log_prob(x, solver="rk4", steps=2)
    m.sample(4, np.random.default_rng(1), solver="rk4", steps=2)


def _otflow(rng):
    OTFlow = importlib.import_module("npflow.otflow").OTFlow
    x = rng.standard_normal((6, 2))
    m = OTFlow(2, width=4, depth=2, steps=2, dtype="float64")
    m.loss_and_grad(x, np.random.default_rng(0))
    m.log_prob(x)
    m.sample(4, np.random.default_rng(1))


def _conv(rng):
    conv = importlib.import_module("npflow.conv")
    from npflow import trace as T
    for layer_type in ("concat", "concatsquash"):
        net = conv.ConvNet((1, 4, 4), hidden_dims=(2,), layer_type=layer_type)
        p = net.init_params(rng, np.float64, np)
        x = rng.standard_normal((2, 1, 4, 4))
        eps = T.probes("rademacher", 2, x.shape, rng, "float64", np)
        y, ydot, cache = net.forward(p, x, eps, 0.2)
        net.backward(y, ydot, cache)


def _multiscale(rng):
    MultiscaleCNF = importlib.import_module("npflow.multiscale").MultiscaleCNF
    m = MultiscaleCNF(image_shape=(1, 4, 4), hidden=(2,), scales=1, blocks=1, steps=1,
                      dtype="float64")
    x = rng.uniform(0, 1, (2, 1, 4, 4))
    m.loss_and_grad(x, np.random.default_rng(0))


PIECES = [("layers/odenet/trace", _layers_odenet_trace), ("solvers", _solvers), ("cnf", _cnf),
          ("otflow", _otflow), ("conv", _conv), ("multiscale", _multiscale)]


def _run_workload():
    """Run every piece under recording; returns (names, pieces run, pieces left out)."""
    ran, left_out = [], []
    with backend.record_array_functions() as names:
        for label, piece in PIECES:
            rng = np.random.default_rng(0)
            try:
                piece(rng)
            except (ImportError, AttributeError) as exc:
                if label == "layers/odenet/trace":
                    raise
                left_out.append(f"{label} (not available: {exc})")
                continue
            except Exception as exc:  # another module's API moved; its own tests catch bugs
                if label == "layers/odenet/trace":
                    raise
                left_out.append(f"{label} (raised {type(exc).__name__}: {exc})")
                continue
            ran.append(label)
    return set(names), ran, left_out


# ----------------------------------------------------------------------------- the tests

def test_missing_in_flags_names_absent_from_a_module():
    """The checker can fail: bogus names (top-level and in a submodule) are flagged."""
    assert missing_in(np, {"tanh", "linalg.norm", "random.default_rng"}) == set()
    assert missing_in(np, {"tanh", "definitely_not_an_array_function", "linalg.bogus_solve"}) \
        == {"definitely_not_an_array_function", "linalg.bogus_solve"}


def test_every_recorded_array_function_exists_in_cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA library at import time
        pytest.skip(f"CuPy cannot be imported here ({type(exc).__name__}: {exc}); "
                    "install cupy-cuda12x to run the CuPy coverage check")
    names, ran, left_out = _run_workload()
    assert "layers/odenet/trace" in ran
    for note in left_out:
        warnings.warn(f"CuPy coverage workload left out {note}")
    assert len(names) >= 10, f"suspiciously few names recorded: {sorted(names)}"
    assert {"tanh", "concatenate"} <= names          # the layers do go through the proxy
    session = _session_names()
    names |= session
    missing = missing_in(cupy, names)
    assert not missing, (f"npflow uses array-module functions that CuPy lacks: {sorted(missing)}"
                         f" (of {len(names)} recorded)")
    assert missing_in(cupy, names | {"definitely_not_a_cupy_function"}) == {
        "definitely_not_a_cupy_function"}
