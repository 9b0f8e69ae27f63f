"""The arithmetic floor of one npflow toy training iteration: its numpy operations, replayed alone.

Records every numpy ufunc call (arithmetic, matmul, reductions, with their operand shapes,
layouts and keyword arguments) of one ``loss_and_grad`` of bench_toy's model, then times each
recorded operation again on fresh arrays of the same shapes, with nothing in between: no Python
of npflow, no allocation of the caches, warm CPU caches. The sum is what the same operations cost
at best when run one after another, split into matrix products and the rest. It is a floor for
any implementation that does the same arithmetic through numpy, and the matrix-product part is the
same work PyTorch does (its backward through the exact trace multiplies the same matrices).

Usage:
    OPENBLAS_NUM_THREADS=1 python bench/bench_floor.py --batch 100 1000 [--torch-ms 53.4 139.9]

With --torch-ms (PyTorch's medians from bench_toy.py, same order as --batch) it prints the time
that a quarter of PyTorch leaves, next to the floor on one core and split ideally over --cores.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_toy  # noqa: E402


class _Recording(np.ndarray):
    """ndarray subclass that records each ufunc call: (ufunc, method, operand specs, kwargs)."""

    log: list = []

    @staticmethod
    def _spec(x):
        if not isinstance(x, np.ndarray):
            return ("scalar", x)
        a = x.view(np.ndarray)
        layout = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "C*"
        return ("array", a.shape, a.dtype.str, layout)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = tuple(x.view(np.ndarray) if isinstance(x, _Recording) else x for x in inputs)
        kw = dict(kwargs)
        if "out" in kw:
            kw["out"] = tuple(x.view(np.ndarray) if isinstance(x, _Recording) else x
                              for x in kw["out"])
        res = getattr(ufunc, method)(*plain, **kw)
        spec_kw = {k: v for k, v in kwargs.items() if k != "out"}
        outs = [self._spec(x) for x in kw.get("out", ())]
        _Recording.log.append((ufunc, method, [self._spec(x) for x in plain], spec_kw, outs))
        if isinstance(res, np.ndarray):
            return res.view(_Recording)
        if isinstance(res, tuple):
            return tuple(x.view(_Recording) if isinstance(x, np.ndarray) else x for x in res)
        return res


def record(runner, i=0):
    """The ufunc calls of one loss_and_grad + Adam step of an npflow runner."""
    params = {k: np.asarray(v).view(_Recording) for k, v in runner.params.items()}
    _Recording.log = []
    batch = runner.batches[i % len(runner.batches)].view(_Recording)
    _, grads, _ = runner.model.loss_and_grad(batch, runner.rng, params=params)
    runner.opt.step(params, grads)
    return list(_Recording.log)


def _make(spec, rng):
    if spec[0] == "scalar":
        return spec[1]
    _, shape, dt, layout = spec
    dt = np.dtype(dt)
    if layout == "F" and len(shape) >= 2:
        a = rng.standard_normal(shape[::-1]).astype(dt).T
    else:
        a = rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt)
    if dt.kind == "f":
        np.clip(a, -3, 3, out=a)         # keep exp/log-like ufuncs in range
    return a


def replay(log, repeats=5):
    """Seconds per recorded op (the best of ``repeats`` runs of each), by category."""
    rng = np.random.default_rng(0)
    np.seterr(all="ignore")               # random operands: sqrt of negatives and the like
    totals = collections.Counter()
    counts = collections.Counter()
    for ufunc, method, ins, kw, outs in log:
        args = [_make(s, rng) for s in ins]
        kws = dict(kw)
        if outs:
            kws["out"] = tuple(_make(s, rng) for s in outs)
        fn = getattr(ufunc, method)
        try:
            fn(*args, **kws)
        except Exception:  # noqa: BLE001 - an op that needs its real operands: skip
            counts["skipped"] += 1
            continue
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args, **kws)
            best = min(best, time.perf_counter() - t0)
        cat = "matmul" if ufunc is np.matmul else "other"
        totals[cat] += best
        counts[cat] += 1
    return totals, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--torch-ms", type=float, nargs="*", default=None,
                    help="PyTorch's median ms per iteration (bench_toy.py), one per batch")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--solver", default="rk38")
    args = ap.parse_args(argv)
    if args.torch_ms and len(args.torch_ms) != len(args.batch):
        ap.error("--torch-ms needs one value per --batch")
    print(f"# OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, model "
          f"{bench_toy.MODEL}, solver {args.solver}")
    for j, batch in enumerate(args.batch):
        batches = bench_toy.make_batches(batch, 4, 0)
        runner = bench_toy.make_runner(f"npflow:{args.solver}", batches, 0)
        for i in range(2):                                    # warm up (and record the 3rd)
            runner.step(i)
        log = record(runner, 2)
        totals, counts = replay(log)
        total = totals["matmul"] + totals["other"]
        line = (f"batch {batch}: {len(log)} ufunc calls; replayed alone: matmul "
                f"{1e3 * totals['matmul']:.1f} ms ({counts['matmul']} calls), other "
                f"{1e3 * totals['other']:.1f} ms ({counts['other']} calls), total "
                f"{1e3 * total:.1f} ms on one core, {1e3 * total / args.cores:.1f} ms split "
                f"ideally over {args.cores} cores (matmul alone "
                f"{1e3 * totals['matmul'] / args.cores:.1f} ms)")
        if counts["skipped"]:
            line += f"; {counts['skipped']} calls could not be replayed"
        if args.torch_ms:
            line += f"; a quarter of PyTorch's {args.torch_ms[j]:.1f} ms is " \
                    f"{args.torch_ms[j] / 4:.1f} ms"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
