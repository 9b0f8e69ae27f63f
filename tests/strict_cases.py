"""Model step cases for the device tests (tests/test_strict_models.py, bench/gpu_check.py).

One ``Case`` per model and training method: how to build the model (small sizes), a host
batch, and the training hooks of its method. Every case is run for one training step through
``npflow.training.train`` under the strict device backend (tests/strict_xp.py) and, by
bench/gpu_check.py, on a real GPU.

Adding a model or method is one entry in CASES, e.g.::

    "vae-planar": Case(_vae("planar"), _binary(8), solver=None),
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import npflow
from npflow.training import SteerHook, TimeOptimizer


@dataclass
class Case:
    """build(device, dtype) -> model; batch(rng) -> host batch; hooks(model) -> [TrainHook];
    solver: "fixed" (no host sync inside the solve), "adaptive" (one per step attempt) or None
    (no ODE solve in a training step); steps(model) -> (holder, key): where the fixed-grid
    step count is read and set (``holder[key]``), so a test can double it."""
    build: Callable
    batch: Callable
    hooks: Callable = field(default=lambda model: [])
    solver: str | None = "fixed"
    steps: Callable = field(default=lambda model: (model.config, "steps"))

    def loss_inputs(self, model):
        """(x, kw) for one ``model.loss_and_grad(x, rng, **kw)`` of this case: the host batch
        (seed 1) and the loss keyword arguments its hooks give at iteration 0 (seed 2)."""
        x = self.batch(np.random.default_rng(1))
        kw = {}
        for h in self.hooks(model):
            kw.update(h.loss_kwargs(model, np.random.default_rng(2), 0))
        return x, kw


def _gauss(d, n=6):
    return lambda rng: rng.standard_normal((n, d))


def _images(shape=(1, 4, 4), n=2):
    return lambda rng: rng.integers(0, 256, (n,) + shape).astype(np.float64)


def _cnf(**kw):
    base = dict(hidden=(4,), steps=2)
    base.update(kw)
    return lambda dev, dt: npflow.CNF(2, dtype=dt, device=dev, **base)


def _multiscale(**kw):
    base = dict(image_shape=(1, 4, 4), hidden=(2,), scales=1, blocks=1, steps=1)
    base.update(kw)
    return lambda dev, dt: npflow.MultiscaleCNF(dtype=dt, device=dev, **base)


CASES = {
    "cnf-exact": Case(_cnf(trace="exact"), _gauss(2)),
    "cnf-gaussian": Case(_cnf(trace="gaussian", probes=2), _gauss(2)),
    "cnf-rademacher-2blocks": Case(_cnf(trace="rademacher", blocks=2), _gauss(2)),
    "cnf-rnode": Case(_cnf(trace="rademacher", kinetic=0.01, jacobian=0.01), _gauss(2)),
    "cnf-toflow": Case(_cnf(trace="exact", train_T=True), _gauss(2),
                       lambda m: [TimeOptimizer(m, kind="analytic")]),
    "cnf-toflow-discrete+rnode": Case(_cnf(trace="exact", train_T=True, kinetic=0.01,
                                           jacobian=0.01), _gauss(2),
                                      lambda m: [TimeOptimizer(m, kind="discrete")]),
    "cnf-steer": Case(_cnf(trace="exact"), _gauss(2), lambda m: [SteerHook(0.25)]),
    "cnf-dopri5": Case(_cnf(trace="exact", solver="dopri5", rtol=1e-4, atol=1e-4,
                            layer="concat", activation="softplus"), _gauss(2),
                       solver="adaptive"),
    "cnf-concatsquash-swish": Case(_cnf(trace="rademacher", layer="concatsquash",
                                        activation="swish"), _gauss(2)),
    "multiscale": Case(_multiscale(), _images()),
    "multiscale-labels": Case(_multiscale(image_shape=(2, 4, 4)), _images((2, 4, 4))),
    "multiscale-rnode-toflow": Case(_multiscale(kinetic=0.01, jacobian=0.01, train_T=True,
                                                layer="concatsquash"), _images(),
                                    lambda m: [TimeOptimizer(m, kind="analytic")]),
    "otflow": Case(lambda dev, dt: npflow.OTFlow(2, width=4, depth=2, steps=2, dtype=dt,
                                                 device=dev), _gauss(2)),
    "otflow-trainT": Case(lambda dev, dt: npflow.OTFlow(2, width=4, depth=2, steps=2,
                                                        train_T=True, dtype=dt, device=dev),
                          _gauss(2), lambda m: [TimeOptimizer(m, kind="stale")]),
}

#: One case per model class, for log_prob / sample / save-load.
# flow matching (npflow.cfm): no solve in training; OT-CFM's assignment runs on the host
CASES["cfm"] = Case(lambda dev, dt: npflow.FlowMatchingCNF(2, hidden=(4,), time_groups=3,
                                                          sigma=0.1, dtype=dt, device=dev),
                    _gauss(2))
CASES["otcfm"] = Case(lambda dev, dt: npflow.FlowMatchingCNF(2, hidden=(4,), blocks=2,
                                                            coupling="ot", dtype=dt,
                                                            device=dev), _gauss(2))
# one time per row (docs/cfm.md eq. 2.8), two blocks: per-row t through the gated ODENet
CASES["otcfm-per-row"] = Case(lambda dev, dt: npflow.FlowMatchingCNF(2, hidden=(4,), blocks=2,
                                                                    coupling="ot",
                                                                    time_groups=0, sigma=0.1,
                                                                    dtype=dt, device=dev),
                              _gauss(2))
# flow matching on the multiscale image CNF (npflow.cfm_multiscale), both path schedules
CASES["multiscale-cfm"] = Case(
    lambda dev, dt: npflow.FlowMatchingMultiscaleCNF((1, 4, 4), hidden=(2,), scales=2,
                                                     blocks=1, time_groups=2, dtype=dt,
                                                     device=dev), _images(n=3), solver=None)
CASES["multiscale-otcfm-constant"] = Case(
    lambda dev, dt: npflow.FlowMatchingMultiscaleCNF((1, 4, 4), hidden=(2,), scales=2,
                                                     blocks=1, coupling="ot",
                                                     schedule="constant", dtype=dt,
                                                     device=dev), _images(n=3), solver=None)


# VAEs (npflow.vae): discrete flows need no solve; the amortized CNF posterior solves on a
# fixed grid whose step count the flow object holds
def _binary(d, n=4, labels=0):
    def batch(rng):
        x = (rng.uniform(size=(n, d)) < 0.5).astype(np.float64)
        if labels:
            x = np.concatenate([x, (rng.integers(0, labels, (n, 1)) + 0.5) / labels], axis=1)
        return x
    return batch


def _vae(flow, **kw):
    base = dict(hidden=(8,), flow=flow, num_flows=0 if flow == "none" else 2)
    if flow == "cnf":
        base.update(cnf_hidden=(4,), cnf_steps=2)
    base.update(kw)
    return lambda dev, dt: npflow.VAE(8, 2, dtype=dt, device=dev, **base)


for _flow in ("none", "planar", "orthogonal", "triangular"):
    CASES[f"vae-{_flow}"] = Case(_vae(_flow), _binary(8), solver=None)
CASES["vae-householder-labels"] = Case(_vae("householder", n_classes=10),
                                       _binary(8, labels=10), solver=None)
CASES["vae-cnf"] = Case(_vae("cnf"), _binary(8), steps=lambda model: (vars(model.flow), "steps"))

MODEL_CASES = ["cnf-exact", "multiscale", "otflow"]

# the latent-space autoencoder (npflow.autoencoder); its flows are the OT-Flow and CNF cases
CASES["autoencoder"] = Case(lambda dev, dt: npflow.Autoencoder(8, 3, hidden=(5,), dtype=dt,
                                                               device=dev),
                            lambda rng: rng.uniform(size=(4, 8)), solver=None)
