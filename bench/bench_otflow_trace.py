#!/usr/bin/env python
"""Time OT-Flow's exact trace against the exact trace by basis tangents (docs/otflow.md §5).

For d = 2, 8, 32, 64, 128 on the same potential network (width m, depth M + 1, batch B):

  otflow        potential_forward: ∇Φ and tr ∇ₓ²Φ by the OT-Flow recursion (eq. 2.3-2.6)
  grad only     potential_forward(need_trace=False): the gradient sweep alone (the floor)
  basis-stacked potential_hvp with the d basis tangents e_1..e_d stacked into one pass of
                d·B rows (forward-over-reverse Hessian-vector products, eq. 5.1-5.3): the
                best a basis-tangent method can do with batched matrix products
  basis-loop    d separate Hessian-vector passes, one basis vector each (what d reverse or
                forward-over-reverse sweeps of an AD framework do)

All four give the same trace to rounding (checked before timing). Prints medians over
--repeats runs, the ratio to "otflow", how each grows from d = 2 and the log-log slope of
time against d (1 = linear in d).

    python bench/bench_otflow_trace.py [--width 32 --depth 2 --batch 512 --repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from npflow.backend import tune_malloc  # noqa: E402
from npflow.otflow_net import (basis_tangent_trace, init_potential,  # noqa: E402
                               potential_forward, potential_hvp)

DIMS = (2, 8, 32, 64, 128)


def basis_loop_trace(params, s, d):
    """d passes of potential_hvp, one basis tangent each: tr = Σ_k (∇²Φ e_k)_k."""
    B = s.shape[0]
    tr = np.zeros(B, dtype=s.dtype)
    for k in range(d):
        e = np.zeros((1, B, d + 1), dtype=s.dtype)
        e[0, :, k] = 1
        _, He = potential_hvp(params, s, e)
        tr += He[0, :, k]
    return tr


def median_time(fn, repeats):
    fn()                                        # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    tune_malloc(mmap_threshold=1 << 30)         # keep freed memory for reuse (glibc only)
    dims = [int(v) for v in args.dims.split(",")]
    dtype = np.dtype(args.dtype)
    rows = []
    for d in dims:
        rng = np.random.default_rng(d)
        params = init_potential(d, args.width, args.depth, min(10, d + 1), rng, dtype, np)
        params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype)
                  for k, v in params.items()}
        s = rng.standard_normal((args.batch, d + 1)).astype(dtype)
        ref = potential_forward(params, s, d)[2]
        for other in (basis_tangent_trace(params, s, d), basis_loop_trace(params, s, d)):
            err = np.abs(other - ref).max() / max(1.0, np.abs(ref).max())
            if err > (1e-10 if dtype == np.float64 else 1e-3):
                raise AssertionError(f"traces disagree at d={d}: relative error {err:.2e}")
        t = {
            "otflow": median_time(lambda: potential_forward(params, s, d), args.repeats),
            "grad only": median_time(lambda: potential_forward(params, s, d, need_trace=False),
                                     args.repeats),
            "basis-stacked": median_time(lambda: basis_tangent_trace(params, s, d),
                                         args.repeats),
            "basis-loop": median_time(lambda: basis_loop_trace(params, s, d),
                                      max(3, args.repeats // 2)),
        }
        rows.append({"d": d, **t})
        print(f"d={d:4d}  " + "  ".join(f"{k} {v * 1e3:9.2f} ms" for k, v in t.items()),
              flush=True)

    keys = ["otflow", "grad only", "basis-stacked", "basis-loop"]
    print(f"\nmedian seconds (width {args.width}, depth {args.depth}, batch {args.batch}, "
          f"{args.dtype}); ratio = time / otflow time")
    print(f"{'d':>5} " + " ".join(f"{k:>14}" for k in keys) + "   ratio stacked  ratio loop")
    for r in rows:
        print(f"{r['d']:>5} " + " ".join(f"{r[k]:>14.5f}" for k in keys)
              + f"   {r['basis-stacked'] / r['otflow']:>13.2f}  {r['basis-loop'] / r['otflow']:>10.2f}")
    print(f"\ngrowth from d = {rows[0]['d']} to d = {rows[-1]['d']} ({rows[-1]['d'] / rows[0]['d']:.0f}× "
          "the dimension) and log-log slope of time vs d over the last three sizes:")
    logd = np.log([r["d"] for r in rows[-3:]])
    for k in keys:
        slope = np.polyfit(logd, np.log([r[k] for r in rows[-3:]]), 1)[0]
        print(f"  {k:>14}: ×{rows[-1][k] / rows[0][k]:8.1f}   slope {slope:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
