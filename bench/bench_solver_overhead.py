"""The solver's own share of an RK4 training step (docs/solvers.md, section 6).

A training step of the solver is: forward solve (odeint) + discrete adjoint (Solution.backward).
Its time splits into the dynamics' own forward and backward calls and everything else (stage
combinations, error-free bookkeeping, parameter-cotangent accumulation, time cotangents): the
solver's overhead. The dynamics is wrapped so every forward / backward call is timed where it
happens (two perf_counter calls per evaluation, ~0.1 µs each); the overhead is

    share = (t_step − t_dynamics) / t_step,          target < 15 %.

Cases (float32, 8 RK4 steps on [0, 0.5], batch B, FFJORD's toy network 2-64-64-64-2):
    mlp      y' = f(y, t) with npflow.odenet.ODENet (concatsquash, tanh); a plain array state
             (falls back to a small tanh MLP written here if npflow.odenet is missing)
    cnf      the CNF's augmented tuple state (z, ℓ) with the exact trace (2 basis tangents),
             npflow.cnf.CNFDynamics, when that module exists
each with store="states" (recompute stages in the backward) and store="caches".

Two estimates of the overhead are printed: the share measured inside the real step (its
median over steps; on a loaded machine it is noisy, since preemption and memory management
outside the dynamics' calls are charged to the solver), and the "null" time: the same solve and
backward with a dynamics that returns recorded outputs at no cost, i.e. the solver's own work,
divided by the real step time. Medians over --repeats timed steps (after --warmup). No
pass/fail. Run with OPENBLAS_NUM_THREADS=1 on a shared machine: multi-threaded BLAS on small
matrices stalls badly when the cores are oversubscribed.

Usage:
    python bench/bench_solver_overhead.py --batch 100 --repeats 30
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from npflow.solvers import odeint  # noqa: E402


class Timed:
    """Wraps a dynamics; accumulates the seconds spent inside its forward and backward."""

    def __init__(self, inner):
        self.inner = inner
        self.params = inner.params
        self.seconds = 0.0
        self.calls = 0

    def forward(self, t, y):
        t0 = time.perf_counter()
        out = self.inner.forward(t, y)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def backward(self, cache, g):
        t0 = time.perf_counter()
        out = self.inner.backward(cache, g)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class Replay:
    """The solver's work alone: returns one recorded forward / backward result of ``inner``
    (same shapes, same parameter keys) at no cost, so a solve with it times only the solver."""

    def __init__(self, inner, y0):
        self.params = inner.params
        self.fwd = inner.forward(0.0, y0)
        dydt = self.fwd[0]
        if isinstance(dydt, tuple):
            g = type(dydt)._make([p.copy() for p in dydt])
        else:
            g = dydt.copy()
        self.bwd = inner.backward(self.fwd[1], g)

    def forward(self, t, y):
        return self.fwd

    def backward(self, cache, g):
        return self.bwd


class NetDynamics:
    """y' = net(y, t) for a layer-interface network (ODENet)."""

    def __init__(self, net, params):
        self.net, self.params = net, params

    def forward(self, t, y):
        f, _, cache = self.net.forward(self.params, y, None, t)
        return f, cache

    def backward(self, cache, g):
        yb, _, pb, tb = self.net.backward(g, None, cache)
        return yb, pb, tb


class TinyMLP:
    """Fallback: y' = tanh(tanh(y W1ᵀ + t u + c1) W2ᵀ + c2) W3ᵀ + c3, hand backward."""

    def __init__(self, rng, D, H, dtype):
        def p(*shape):
            return (rng.normal(size=shape) / math.sqrt(shape[-1])).astype(dtype)
        self.params = {"W1": p(H, D), "u": p(H), "c1": p(H), "W2": p(H, H), "c2": p(H),
                       "W3": p(D, H), "c3": p(D)}

    def forward(self, t, y):
        q = self.params
        h1 = np.tanh(y @ q["W1"].T + t * q["u"] + q["c1"])
        h2 = np.tanh(h1 @ q["W2"].T + q["c2"])
        return h2 @ q["W3"].T + q["c3"], (t, y, h1, h2)

    def backward(self, cache, g):
        t, y, h1, h2 = cache
        q = self.params
        a2 = (g @ q["W3"]) * (1 - h2 * h2)
        a1 = (a2 @ q["W2"]) * (1 - h1 * h1)
        s1 = a1.sum(0)
        grads = {"W3": g.T @ h2, "c3": g.sum(0), "W2": a2.T @ h1, "c2": a2.sum(0),
                 "W1": a1.T @ y, "u": t * s1, "c1": s1}
        return a1 @ q["W1"], grads, s1 @ q["u"]


def make_cases(B, dtype, rng):
    cases = {}
    x = rng.normal(size=(B, 2)).astype(dtype)
    try:
        from npflow.odenet import ODENet
        net = ODENet(2, (64, 64, 64))
        params = net.init_params(rng, dtype)
        cases["mlp (ODENet 2-64-64-64-2)"] = (NetDynamics(net, params), x)
    except ImportError:
        net = None
        cases["mlp (tiny tanh MLP, fallback)"] = (TinyMLP(rng, 2, 64, dtype), x)
    if net is not None:
        try:
            from npflow.cnf import CNFDynamics, CNFState
            eps = np.broadcast_to(np.eye(2, dtype=dtype)[:, None, :], (2, B, 2)).copy()
            cases["cnf (z, ℓ), exact trace"] = (
                CNFDynamics(net, params, eps, 1.0),
                CNFState(x, np.zeros(B, dtype)))
        except ImportError:
            pass
    return cases


def cotangent(y1):
    if isinstance(y1, tuple):
        return type(y1)._make([np.full_like(p, 1.0 / p.shape[0]) for p in y1])
    return y1 / y1.shape[0]


def run_null(dyn, y0, store, repeats, warmup, steps, T):
    null = Replay(dyn, y0)
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        sol = odeint(null, y0, 0.0, T, method="rk4", steps=steps, store=store)
        sol.backward(cotangent(sol.y1))
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(dyn, y0, store, repeats, warmup, steps, T):
    timed = Timed(dyn)
    totals, inside = [], []
    for r in range(warmup + repeats):
        timed.seconds = 0.0
        t0 = time.perf_counter()
        sol = odeint(timed, y0, 0.0, T, method="rk4", steps=steps, store=store)
        g = sol.backward(cotangent(sol.y1))
        total = time.perf_counter() - t0
        if r >= warmup:
            totals.append(total)
            inside.append(timed.seconds)
    shares = [(a - b) / a for a, b in zip(totals, inside)]
    return (statistics.median(totals), statistics.median(inside), statistics.median(shares),
            sol.nfe, g.nfe + g.nfe_recompute)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[100])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--T", type=float, default=0.5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"RK4, {args.steps} steps on [0, {args.T}], {args.dtype}; medians of "
          f"{args.repeats} steps (forward solve + backward) after {args.warmup} warm-up")
    print(f"{'case':30s} {'B':>5s} {'store':>7s} {'step ms':>8s} {'dyn ms':>8s} "
          f"{'solver %':>9s} {'null ms':>8s} {'null %':>7s} {'nfe f/b':>8s}")
    for B in args.batch:
        for name, (dyn, y0) in make_cases(B, args.dtype, rng).items():
            for store in ("states", "caches"):
                total, inside, share, nf, nb = run(dyn, y0, store, args.repeats, args.warmup,
                                                   args.steps, args.T)
                null = run_null(dyn, y0, store, args.repeats, args.warmup, args.steps, args.T)
                print(f"{name:30s} {B:5d} {store:>7s} {1e3 * total:8.2f} {1e3 * inside:8.2f} "
                      f"{100 * share:8.1f}% {1e3 * null:8.2f} {100 * null / total:6.1f}% "
                      f"{nf:4d}/{nb:<4d}")
    print("solver % = median over steps of (step − time inside dynamics.forward/backward) / step")
    print("null ms  = the same solve + backward with a free dynamics (replayed outputs): the "
          "solver's own work; null % = null ms / step ms.  Target for both: < 15 %")


if __name__ == "__main__":
    main()
