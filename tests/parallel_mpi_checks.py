"""Run under ``mpiexec -n N`` by tests/test_parallel_mpi.py (one launch for many checks).

Every rank computes each case twice: alone, on the whole batch (model.loss_and_grad), and
together with the other ranks (npflow.parallel.loss_and_grad: its rows, one Allreduce), from
generators in the same state. Rank 0 prints one JSON object: per case the largest relative
difference over loss, gradients and stats, whether the generators ended in the same state, and
whether the reduced gradients are bit-identical across ranks; then a short training run
(train(), TO-FLOW hook, checkpoints) and what it printed and wrote on each rank.

usage: mpiexec -n N python tests/parallel_mpi_checks.py OUTDIR
"""
import json
import os
import sys
import zlib

import numpy as np

import npflow
from npflow import parallel
from npflow.multiscale import MultiscaleCNF


def rel_diff(a, b):
    a = np.asarray(npflow.backend.to_host(a), dtype=np.float64)
    b = np.asarray(npflow.backend.to_host(b), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def compare(one, many):
    (l1, g1, s1), (l2, g2, s2) = one, many
    worst = rel_diff(l2, l1)
    assert g1.keys() == g2.keys(), (sorted(g1), sorted(g2))
    assert s1.keys() == s2.keys(), (sorted(s1), sorted(s2))
    for k in g1:
        assert g1[k].dtype == g2[k].dtype and g1[k].shape == g2[k].shape, k
        worst = max(worst, rel_diff(g2[k], g1[k]))
    for k in s1:
        worst = max(worst, rel_diff(s2[k], s1[k]))
    return worst


def crc(arrays):
    return [zlib.crc32(np.ascontiguousarray(npflow.backend.to_host(arrays[k])).tobytes())
            for k in sorted(arrays)]


def toy(n, seed):
    return npflow.data.toy("8gaussians", n, np.random.default_rng(seed))


def cnf(**kw):
    base = dict(hidden=(8, 8), T=0.5, solver="rk4", steps=3, dtype="float64", seed=1)
    base.update(kw)
    return npflow.CNF(2, **base)


CASES = {
    "ffjord_exact_dopri5": lambda: (cnf(solver="dopri5", trace="exact", train_T=True),
                                    toy(21, 0), {}),
    "ffjord_hutchinson_rk4_2blocks": lambda: (cnf(trace="hutchinson", probes=2, blocks=2),
                                              toy(23, 1), {}),
    "ffjord_hutchinson_dopri5": lambda: (cnf(solver="dopri5", trace="hutchinson",
                                             rtol=1e-6, atol=1e-6), toy(40, 2), {}),
    "rnode_rademacher_rk4": lambda: (cnf(trace="rademacher", kinetic=0.1, jacobian=0.1,
                                         zero_last=False), toy(30, 3), {}),
    "rnode_toflow_2blocks": lambda: (cnf(trace="exact", kinetic=0.05, jacobian=0.05,
                                         train_T=True, blocks=2), toy(25, 4), {}),
    "steer_T_override": lambda: (cnf(trace="exact", train_T=True), toy(20, 5), {"T": 0.37}),
    "steer_T_per_block": lambda: (cnf(trace="hutchinson", blocks=2), toy(20, 6),
                                  {"T": [0.31, 0.44]}),
    "otflow_train_T": lambda: (npflow.OTFlow(3, width=8, steps=3, train_T=True,
                                             dtype="float64", seed=2),
                               np.random.default_rng(7).standard_normal((19, 3)), {}),
    "multiscale_rnode_toflow": lambda: (
        MultiscaleCNF((1, 8, 8), hidden=(4,), scales=2, blocks=1, steps=2, T=0.5,
                      kinetic=0.1, jacobian=0.1, train_T=True, dtype="float64", seed=3),
        np.random.default_rng(8).integers(0, 256, (6, 1, 8, 8)), {}),
    "multiscale_dopri5": lambda: (
        MultiscaleCNF((1, 8, 8), hidden=(4,), scales=2, blocks=1, solver="dopri5",
                      rtol=1e-4, atol=1e-4, T=0.3, dtype="float64", seed=4),
        np.random.default_rng(9).integers(0, 256, (5, 1, 8, 8)), {}),
}


def run_cases(comm):
    out = {}
    for name, make in CASES.items():
        model, x, kw = make()
        r1, r2 = np.random.default_rng(11), np.random.default_rng(11)
        one = model.loss_and_grad(x, r1, **kw)
        many = parallel.loss_and_grad(model, x, r2, comm, **kw)
        same_rng = r1.bit_generator.state == r2.bit_generator.state
        sums = comm.mpi.allgather(crc(many[1]))
        out[name] = {"rel_diff": compare(one, many), "same_rng": same_rng,
                     "grads_identical_across_ranks": all(s == sums[0] for s in sums)}
        if model.config.get("train_T") and hasattr(model, "time_gradient"):
            for kind in ("analytic", "discrete"):
                a = model.time_gradient(x, np.random.default_rng(12), kind=kind)
                b = parallel.time_gradient(model, x, np.random.default_rng(12), comm, kind=kind)
                out[name][f"time_gradient_{kind}_rel_diff"] = rel_diff(b, a)
    return out


def run_training(comm, outdir, comm_or_none, tag):
    """Eight TO-FLOW + RNODE iterations through npflow.training.train."""
    from npflow.optim import Adam
    from npflow.training import SteerHook, TimeOptimizer, train

    model = cnf(trace="hutchinson", kinetic=0.01, jacobian=0.01, train_T=True, steps=2)
    opt = Adam({k: v for k, v in model.params.items() if k != "T"}, lr=1e-2)
    hooks = [SteerHook(0.1), TimeOptimizer(model, comm=comm_or_none)]
    lines = []

    def sample_batch(rng, it):
        return npflow.data.toy("8gaussians", 33, rng)

    res = train(model, opt, sample_batch, 8, np.random.default_rng(0), log_every=2,
                save_dir=os.path.join(outdir, tag), log_json=os.path.join(outdir, tag + ".json"),
                hooks=hooks, print_fn=lines.append, comm=comm_or_none)
    if comm_or_none is not None:
        parallel.check_same(model.params, comm)    # raises if the ranks drifted apart
    return comm.mpi.allgather({"rank": comm.rank, "printed": len(lines),
                               "crc": crc(model.params), "status": res.status,
                               "loss": [float(v) for v in res.history["loss"]],
                               "T": float(model.params["T"])})


def main():
    outdir = sys.argv[1]
    comm = parallel.init()
    assert comm.size > 1, "run me under mpiexec -n N with N > 1"
    result = {"size": comm.size, "cases": run_cases(comm),
              "training": run_training(comm, outdir, comm, "mpi"),
              "training_alone": run_training(comm, outdir, None, f"alone{comm.rank}")}
    if comm.root:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
