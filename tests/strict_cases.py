"""Model step cases for the device tests (tests/test_strict_models.py, bench/gpu_check.py).

One ``Case`` per model and training method: how to build the model (small sizes), a host
batch, and the training hooks of its method. Every case is run for one training step through
``npflow.training.train`` under the strict device backend (tests/strict_xp.py) and, by
bench/gpu_check.py, on a real GPU.

Adding a model or method is one entry in CASES, e.g. (once npflow.VAE exists)::

    "vae-planar": Case(lambda dev, dt: npflow.VAE(8, 2, hidden=(8,), flow="planar",
                                                  dtype=dt, device=dev), _binary(8)),
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
    solver: "fixed" (no host sync inside the solve) or "adaptive" (one per step attempt)."""
    build: Callable
    batch: Callable
    hooks: Callable = field(default=lambda model: [])
    solver: str = "fixed"


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
MODEL_CASES = ["cnf-exact", "multiscale", "otflow"]
