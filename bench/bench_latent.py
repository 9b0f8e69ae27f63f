#!/usr/bin/env python
"""Latent-space benchmarks of issue 13 (docs/latent.md, section 7).

1. time: seconds per OT-Flow training iteration (loss and parameter gradient), npflow against
   PyTorch (bench/torch_otflow.py, written from the published equations), on the same
   standardized 128-d MNIST codes, the same initial parameters and the reference's settings
   (m = 128, depth 2, α = (1, 80, 500), RK4 8 steps, float64); both in this one process,
   alternating, one BLAS / torch thread each. Also checks that the two losses and gradients
   agree (they compute the same function).

       python bench/bench_latent.py time --ae runs/latent/autoencoder.h5 \
           --batch 64 800 --reps 5 --reps-for 800:2

2. compare: OT-Flow against FFJORD from two runs of examples/train_latent.py (their --log-json
   files): validation NLL against training time (validation excluded) and against the number
   of function evaluations; the time and NFE each needed to first reach the best validation
   NLL both reached.

       python bench/bench_latent.py compare runs/latent.jsonl runs/latent_ffjord.jsonl \
           --out bench_latent_compare.png

The machine the numbers in docs/latent.md come from was shared with other jobs: medians and
ratios measured in one run are the meaningful figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def codes_from(args):
    import npflow
    from npflow.data import load_mnist
    ae = npflow.load(args.ae)
    x, _ = load_mnist(args.data_dir, "train")
    x = x.reshape(len(x), -1)[:50000].astype(np.float64) / 255.0
    rng = np.random.default_rng(args.seed)
    x = x[rng.choice(len(x), max(args.batch) * 2, replace=False)]
    return np.asarray(ae.standardize(ae.encode(x)), dtype=np.float64)


def cmd_time(args):
    import torch
    import npflow
    from torch_otflow import TorchOTFlow
    torch.set_num_threads(1)
    npflow.tune_malloc()
    codes = codes_from(args)
    d = codes.shape[1]
    flow = npflow.OTFlow(d, width=args.width, depth=2, alpha=(1.0, 80.0, 500.0), steps=args.nt,
                         dtype="float64", seed=args.seed)
    flow.params = {k: np.clip(v, -2, 2) for k, v in flow.params.items()}   # as before a step
    tflow = TorchOTFlow(flow.params, d, alpha=(1.0, 80.0, 500.0), nt=args.nt)
    reps = {int(b): args.reps for b in args.batch}
    for spec in args.reps_for or []:
        b, r = spec.split(":")
        reps[int(b)] = int(r)
    out = {"d": d, "width": args.width, "nt": args.nt, "dtype": "float64", "rows": []}
    for B in args.batch:
        x = codes[:B]
        l_np, g_np, _ = flow.loss_and_grad(x)
        l_t, g_t = tflow.loss_and_grad(x)
        gdiff = max(float(np.abs(g_np[k] - g_t[k]).max() / (np.abs(g_t[k]).max() + 1e-300))
                    for k in g_t)
        t_np, t_t = [], []
        for _ in range(reps[B]):
            t = time.perf_counter()
            flow.loss_and_grad(x)
            t_np.append(time.perf_counter() - t)
            t = time.perf_counter()
            tflow.loss_and_grad(x)
            t_t.append(time.perf_counter() - t)
        row = {"batch": B, "reps": reps[B], "npflow_median_s": float(np.median(t_np)),
               "torch_median_s": float(np.median(t_t)),
               "ratio_torch_over_npflow": float(np.median(t_t) / np.median(t_np)),
               "npflow_s": t_np, "torch_s": t_t, "loss_npflow": l_np, "loss_torch": l_t,
               "loss_rel_diff": abs(l_np - l_t) / abs(l_t), "grad_max_rel_diff": gdiff}
        out["rows"].append(row)
        print(f"B = {B:4d}: npflow {row['npflow_median_s']:.3f} s/it, torch "
              f"{row['torch_median_s']:.3f} s/it (medians of {reps[B]}), torch/npflow "
              f"{row['ratio_torch_over_npflow']:.2f}; loss {l_np:.6f} vs {l_t:.6f} (rel diff "
              f"{row['loss_rel_diff']:.1e}), gradient max rel diff {gdiff:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _validations(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    val = [r for r in recs if "val_nll" in r and "train_seconds" in r]
    final = [r for r in recs if "test_nll" in r]
    return val, (final[-1] if final else {})


def cmd_compare(args):
    runs = {}
    for path in args.logs:
        val, final = _validations(path)
        if not val:
            print(f"error: {path} holds no validation records", file=sys.stderr)
            return 2
        runs[final.get("model", os.path.basename(path))] = (val, final)
    level = max(min(r["val_nll"] for r in val) for val, _ in runs.values())
    print(f"common level: validation NLL {level:.3f} nats (the best NLL every run reached)")
    rows = {}
    for name, (val, final) in runs.items():
        first = next(r for r in val if r["val_nll"] <= level)
        rows[name] = first
        print(f"{name:>7s}: reached it at iteration {first['iteration']} after "
              f"{first['train_seconds']:.1f} s of training and {first['nfe_total']} NFE; best "
              f"{min(r['val_nll'] for r in val):.3f}; test NLL {final.get('test_nll', float('nan')):.3f}")
    names = list(rows)
    if len(names) == 2:
        a, b = rows[names[0]], rows[names[1]]
        print(f"ratio {names[1]}/{names[0]}: time {b['train_seconds'] / a['train_seconds']:.2f}, "
              f"NFE {b['nfe_total'] / max(a['nfe_total'], 1):.2f}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, (val, _) in runs.items():
            ax[0].plot([r["train_seconds"] for r in val], [r["val_nll"] for r in val], "o-",
                       ms=3, label=name)
            ax[1].plot([r["nfe_total"] for r in val], [r["val_nll"] for r in val], "o-", ms=3,
                       label=name)
        for a_, xl in zip(ax, ("training seconds (validation excluded)", "NFE (fwd + bwd)")):
            a_.axhline(level, color="gray", lw=0.8, ls="--")
            a_.set_xlabel(xl)
            a_.set_ylabel("validation NLL (nats)")
            a_.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"figure: {args.out}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="seconds per OT-Flow iteration, npflow vs PyTorch")
    t.add_argument("--ae", required=True, help="autoencoder.h5 from examples/train_latent.py")
    t.add_argument("--data-dir", default="data")
    t.add_argument("--batch", type=int, nargs="+", default=[64])
    t.add_argument("--reps", type=int, default=5)
    t.add_argument("--reps-for", nargs="*", metavar="B:R", help="repetitions per batch size")
    t.add_argument("--width", type=int, default=128)
    t.add_argument("--nt", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="write the numbers as JSON")
    c = sub.add_parser("compare", help="OT-Flow vs FFJORD from train_latent.py log files")
    c.add_argument("logs", nargs="+")
    c.add_argument("--out", default=None, help="figure path (PNG)")
    args = p.parse_args(argv)
    if args.cmd == "time":
        if not os.path.isfile(args.ae):
            p.error(f"--ae {args.ae!r} is not a file")
        if min(args.batch) < 1 or args.reps < 1:
            p.error("--batch and --reps must be >= 1")
        return cmd_time(args)
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
