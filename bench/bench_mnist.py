#!/usr/bin/env python
"""npflow vs PyTorch + torchdiffeq on real MNIST, the small multiscale configuration of
issue 6 item 7, same settings on both sides:

    dims 32,32 (ConcatConv2d + softplus), 3 scales, --blocks per stage, RK4 3/8 rule
    (torchdiffeq "rk4" = npflow "rk38") with --steps steps on [0, 1], one Rademacher probe,
    batch 64, Adam lr 1e-3, float32, --iters iterations on the first --subset training
    images, then test bits/dim on the first --test-n test images with the same solver.

    python bench/bench_mnist.py --iters 200 --json runs/bench_mnist.json

On N MPI ranks (npflow.parallel, docs/parallel.md), npflow only; --ranks 1 2 launches
``mpiexec -n N`` for each N in turn, --rounds times, and reports the medians and the scaling
efficiency time(1 rank) / (N × time(N ranks)):

    python bench/bench_mnist.py --iters 10 --test-n 64 --ranks 1 2 --rounds 2

Reports the median seconds per iteration (wall clock) and the final test bits/dim of each.
The machine is shared: the medians are what this run saw, not a controlled benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_npflow(args, x_train, x_test):
    from npflow import parallel
    from npflow.multiscale import MultiscaleCNF
    from npflow.optim import Adam
    comm = parallel.init()
    m = MultiscaleCNF((1, 28, 28), hidden=args.dims, blocks=args.blocks, solver="rk38",
                      steps=args.steps, trace="rademacher", store="caches", dtype="float32",
                      seed=args.seed)
    opt = Adam(m.params, lr=args.lr)
    rng = np.random.default_rng(args.seed)
    times, losses = [], []
    for it in range(args.iters):
        t = time.perf_counter()
        x = x_train[rng.integers(0, len(x_train), args.batch_size)]
        loss, grads, _ = parallel.loss_and_grad(m, x, rng, comm)
        m.params = opt.step(m.params, grads)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if (it + 1) % args.log_every == 0:
            comm.print(f"npflow iter {it + 1}: bits/dim {loss:.4f}, {times[-1]:.2f} s/it")
    if not comm.root:
        return None
    bpd = m.bits_per_dim(x_test, np.random.default_rng(args.seed + 1),
                         batch_size=args.batch_size) if args.test_n else np.array([np.nan])
    return dict(median_sec_per_iter=float(np.median(times)), test_bpd=float(bpd.mean()),
                final_train_bpd=float(np.mean(losses[-10:])), ranks=comm.size,
                sec_per_iter=[float(t) for t in times])


def run_ranks(args, argv):
    """--ranks: this script under ``mpiexec -n N`` for each N, --rounds times in turn."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("mpiexec")
    if exe is None:
        raise SystemExit("--ranks needs mpiexec on PATH (pip install mpi4py mpich)")
    rest, skip = [], False
    for a in argv:                       # the same flags without --ranks / --rounds / --json
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a in ("--ranks", "--rounds", "--json"):
            skip = True
            continue
        rest.append(a)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    times = {n: [] for n in args.ranks}
    runs = []
    for rd in range(args.rounds):
        for n in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                cmd = [exe, "-n", str(n), sys.executable, os.path.abspath(__file__), *rest,
                       "--only", "npflow", "--json", out]
                print("#", " ".join(cmd[:3]), "python bench_mnist.py", " ".join(rest),
                      flush=True)
                subprocess.run(cmd, check=True, env=env)
                with open(out) as f:
                    r = json.load(f)["npflow"]
            runs.append(dict(r, round=rd))
            times[n] += r["sec_per_iter"][1:]          # the first iteration warms up
    med = {n: float(np.median(t)) for n, t in times.items()}
    one = med.get(1)
    print("\nranks  median s/iteration  scaling efficiency t1/(N tN)")
    summary = {}
    for n in args.ranks:
        eff = one / (n * med[n]) if one else None
        summary[n] = dict(median_sec_per_iter=med[n], scaling_efficiency=eff,
                          iterations=len(times[n]))
        print(f"{n:5d}  {med[n]:19.3f}  {'' if eff is None else f'{eff:.3f}'}")
    res = {"settings": vars(args), "runs": runs, "summary": summary,
           "loadavg_end": os.getloadavg()}
    print(f"# load average at the end {os.getloadavg()}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=list)
    return 0


def run_torch(args, x_train, x_test):
    import torch
    from torch_mnist import TorchMultiscaleCNF, preprocess
    torch.manual_seed(args.seed)
    m = TorchMultiscaleCNF((1, 28, 28), hidden=args.dims, scales=3, blocks=args.blocks,
                           steps=args.steps)
    opt = torch.optim.Adam(m.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    times, losses = [], []
    for it in range(args.iters):
        t = time.perf_counter()
        x = x_train[rng.integers(0, len(x_train), args.batch_size)]
        y, logdet = preprocess(x, g)
        loss = m.bits_per_dim(y, logdet, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        if (it + 1) % args.log_every == 0:
            print(f"torch  iter {it + 1}: bits/dim {losses[-1]:.4f}, {times[-1]:.2f} s/it",
                  flush=True)
    out = []
    for s in range(0, len(x_test), args.batch_size):
        y, logdet = preprocess(x_test[s:s + args.batch_size], g)
        out.append(m.bits_per_dim(y, logdet, g).detach().numpy())
    return dict(median_sec_per_iter=float(np.median(times)),
                test_bpd=float(np.concatenate(out).mean()),
                final_train_bpd=float(np.mean(losses[-10:])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--dims", default="32,32")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--test-n", type=int, default=1000)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--only", choices=["npflow", "torch"], default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="npflow on each of these numbers of MPI ranks (mpiexec -n N)")
    p.add_argument("--rounds", type=int, default=1, help="with --ranks: rounds over the Ns")
    args = p.parse_args(argv)
    if args.ranks:
        return run_ranks(args, sys.argv[1:] if argv is None else list(argv))
    args.dims = tuple(int(v) for v in args.dims.split(","))
    from npflow.data import load_mnist
    x_train, _ = load_mnist(args.data_dir, "train", download=False)
    x_test, _ = load_mnist(args.data_dir, "test", download=False)
    x_train, x_test = x_train[:args.subset], x_test[:args.test_n]
    res = {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in vars(args).items()}}
    if args.only in (None, "npflow"):
        res["npflow"] = run_npflow(args, x_train, x_test)
        if res["npflow"] is None:          # an MPI rank other than 0: rank 0 reports
            return 0
        print("npflow:", {k: v for k, v in res["npflow"].items() if k != "sec_per_iter"},
              flush=True)
    if args.only in (None, "torch"):
        res["torch"] = run_torch(args, x_train, x_test)
        print("torch: ", res["torch"], flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
