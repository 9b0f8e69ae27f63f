"""Wall time and total NFE to reach a test NLL: FFJORD, RNODE, TO-FLOW, STEER, OT-Flow, CFM and
OT-CFM on checkerboard, 8gaussians and the 8-d product set of bench/make_product_data.py
(docs/cfm.md, section 7).

Every method trains for the same budget of training wall time (--budget seconds, the clock
stopped during evaluations) in this one process, one method after another. At training times
--marks (fractions of the budget, plus the end) the model is evaluated on --eval-n fixed test
points by the usual exact log-likelihood: CNFs by dopri5 (atol = rtol = 1e-5) with the exact
trace, OT-Flow by RK4 with 4× its training steps (its own test protocol, exact trace). Recorded
per mark: training seconds, iterations, total training NFE (forward + backward evaluations of
the network on a batch; flow matching counts 1 + 1 per iteration), test NLL and test-time NFE.

Same network for the five velocity-field methods: ConcatSquash ODENet D-64-64-64-D, tanh
(FFJORD's toy net); OT-Flow keeps its own potential network (width --otflow-width, 2 layers).
The methods are the registry's (npflow.methods: every registered name, their model settings by
``configure`` and their loop steps by ``hooks`` at the flags' defaults). Each method keeps its
own toy defaults otherwise:
  ffjord  dopri5 (1e-5) training, exact trace, T0 = 0.5 trained jointly, batch 100, Adam 1e-3
  rnode   RK4 8 steps, λ_K = λ_J = 0.01, T = 0.5 fixed, batch 100
  toflow  dopri5, T trained by its own Adam (analytic ∂L/∂T, α = 0.1), batch 100
  steer   dopri5, T' ~ U[T/2, 3T/2], batch 100
  otflow  RK4 8 steps, α = (1, 100, 5), width 32, batch 2048, lr 0.1 halved every 250 its
  cfm, otcfm  npflow.cfm (σ = 0, 16 time groups, T = 1), batch 128, Adam 2e-3 halved every
          10000 iterations (train_toy.py's flow-matching defaults)
Product set: d = 8, 4 rotated copies of 8gaussians (exact entropy printed by
make_product_data.py), training batches drawn from a fixed 100k-point train split.

    python bench/bench_methods.py --budget 60 --json docs/bench_methods.json --figure docs/cfm_methods.png
"""
from __future__ import annotations

import os
import sys

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from npflow.methods import METHODS as REGISTRY, compose, method_names  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

METHODS = method_names()          # every registered method, in registry order
DATASETS = ("checkerboard", "8gaussians", "product8")
# targets: a test NLL a decent fit reaches (floors: log 32 = 3.466, 2.832, 4·2.832 = 11.33)
TARGETS = {"checkerboard": 3.70, "8gaussians": 3.00, "product8": 12.0}


def make_data(name, seed):
    """(dim, sample_batch(rng, B), x_eval) for a data set name."""
    from npflow.data import toy
    if name == "product8":
        from make_product_data import make
        d = 8
        Q, _ = np.linalg.qr(np.random.default_rng([seed, 99]).standard_normal((d, d)))
        train = make("8gaussians", 4, 100_000, np.random.default_rng([seed, 5]), Q)
        test = make("8gaussians", 4, 10_000, np.random.default_rng([seed, 6]), Q)

        def sample(rng, B):
            return train[rng.integers(0, len(train), B)]
        return d, sample, test

    def sample(rng, B):
        return toy(name, B, rng)
    return 2, sample, toy(name, 10_000, np.random.default_rng([seed, 6]))


def _flag_defaults():
    """Every registered method's flags at their defaults (an argparse.Namespace)."""
    p = argparse.ArgumentParser()
    for m in REGISTRY.values():
        m.add_arguments(p)
    return p.parse_args([])


def build(method, dim, seed, otflow_width):
    """(model, optimizer, hooks, batch size) with the method's toy defaults."""
    import npflow
    from npflow.cfm import FlowMatchingCNF
    from npflow.optim import Adam, StepDecay
    hidden = (64, 64, 64)
    if REGISTRY[method].model == "otflow":
        model = npflow.OTFlow(dim, width=otflow_width, depth=2, alpha=(1.0, 100.0, 5.0),
                              steps=8, T=1.0, seed=seed)
        opt = Adam(model.params, lr=0.1, weight_decay=0.0, schedule=StepDecay(250, 0.5))
        return model, opt, [], 2048
    if REGISTRY[method].model == "cfm":
        model = FlowMatchingCNF(dim, hidden=hidden, T=1.0, sigma=0.0, time_groups=16,
                                coupling=REGISTRY[method].coupling, seed=seed)
        return model, Adam(model.params, lr=2e-3, weight_decay=1e-5, decoupled=False,
                           schedule=StepDecay(10000, 0.5)), [], 128
    combo, flags = compose(method), _flag_defaults()
    kw = dict(hidden=hidden, T=0.5, trace="exact", seed=seed, solver="dopri5",
              rtol=1e-5, atol=1e-5)
    kw = combo.configure(kw, flags)            # RNODE: λ_K = λ_J = 0.01; TO-FLOW: train_T
    if method == "ffjord":
        kw["train_T"] = True                   # FFJORD's toy set-up: T trained jointly
    if "rnode" in combo:
        kw.update(solver="rk4", steps=8)       # RNODE's fixed grid
    model = npflow.CNF(dim, **kw)
    skip = combo.optimizer_skip(model)         # TO-FLOW's end times
    weights = {k: v for k, v in model.params.items() if k not in skip}
    opt = Adam(weights, lr=1e-3, weight_decay=1e-5, decoupled=False)
    hooks = combo.hooks(model, flags)          # TO-FLOW: analytic ∂L/∂T, α = 0.1; STEER: b = T/2
    return model, opt, hooks, 100


def evaluate(method, model, x):
    """(test NLL, test-time NFE) by the usual exact evaluator of the method."""
    from npflow.backend import to_host
    if REGISTRY[method].model == "otflow":
        steps = 4 * model.config["steps"]
        lp = model.log_prob(x, steps=steps)
        nfe = 4 * steps
    else:
        lp, nfe = model.log_prob(x, solver="dopri5", rtol=1e-5, atol=1e-5, trace="exact",
                                 batch_size=5000, return_nfe=True)
    lp = to_host(lp).astype(np.float64)
    return float(-lp.mean()), float(nfe)


def run_one(method, data, args):
    dim, sample, x_eval_all = data
    x_eval = x_eval_all[:args.eval_n]
    model, opt, hooks, B = build(method, dim, args.seed, args.otflow_width)
    rng = np.random.default_rng(args.seed)
    marks = sorted(set([m * args.budget for m in args.marks] + [args.budget]))
    curve, t_train, nfe_total, it, status = [], 0.0, 0, 0, "done"
    nparams = int(sum(v.size for v in model.params.values()))
    for mark in marks:
        while t_train < mark:
            t0 = time.perf_counter()
            x = sample(rng, B)
            try:
                loss, grads, st = model.loss_and_grad(x, rng, **{k: v for h in hooks
                                                                 for k, v in
                                                                 h.loss_kwargs(model, rng,
                                                                               it).items()})
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss {loss}")
                model.params = opt.step(model.params, grads)
                for h in hooks:
                    h.after_step(model, x, rng, it, st)
            except Exception as exc:   # noqa: BLE001 - a failed method is a result, recorded
                status = f"stopped at iteration {it}: {type(exc).__name__}: {exc}"
                break
            t_train += time.perf_counter() - t0
            nfe_total += int(st.get("nfe_forward", 0)) + int(st.get("nfe_backward", 0))
            it += 1
        if status != "done":
            break
        t0 = time.perf_counter()
        try:
            nll, tnfe = evaluate(method, model, x_eval)
        except Exception as exc:       # noqa: BLE001
            nll, tnfe = math.nan, math.nan
            status = f"evaluation failed: {type(exc).__name__}: {exc}"
        curve.append(dict(train_seconds=t_train, iterations=it, nfe_total=nfe_total,
                          test_nll=nll, test_nfe=tnfe, eval_seconds=time.perf_counter() - t0))
        print(f"  {method:7s} t={t_train:7.1f}s it={it:6d} nfe={nfe_total:9d} "
              f"NLL={nll:.4f} test NFE={tnfe:.0f}", flush=True)
        if status != "done":
            break
    return dict(method=method, params=nparams, batch=B, status=status, curve=curve)


def time_to_target(curve, target):
    for c in curve:
        if math.isfinite(c["test_nll"]) and c["test_nll"] <= target:
            return c
    return None


def table(results):
    lines = ["| data | method | params | batch | iterations | final test NLL | test NFE | "
             "time to target (s) | NFE to target |", "|---|---|---|---|---|---|---|---|---|"]
    for ds, runs in results.items():
        tgt = TARGETS[ds]
        for r in runs:
            c = r["curve"][-1] if r["curve"] else None
            hit = time_to_target(r["curve"], tgt)
            lines.append(
                f"| {ds} (target {tgt}) | {r['method']} | {r['params']} | {r['batch']} | "
                f"{c['iterations'] if c else '-'} | "
                f"{c['test_nll']:.3f} | {c['test_nfe']:.0f} | "
                f"{'%.1f' % hit['train_seconds'] if hit else 'not reached'} | "
                f"{hit['nfe_total'] if hit else '-'} |" if c else
                f"| {ds} | {r['method']} | {r['params']} | {r['batch']} | - | - | - | - | - |")
    return "\n".join(lines)


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    axes = np.atleast_1d(axes)
    for ax, (ds, runs) in zip(axes, results.items()):
        for i, r in enumerate(runs):
            c = [p for p in r["curve"] if math.isfinite(p["test_nll"])]
            if c:
                ax.plot([p["train_seconds"] for p in c], [p["test_nll"] for p in c],
                        marker="o", ms=3, color=f"C{i}", label=r["method"])
        ax.axhline(TARGETS[ds], color="k", ls="--", lw=0.8, label="target")
        ax.set_xscale("log")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title(ds)
        vals = [p["test_nll"] for r in runs for p in r["curve"] if math.isfinite(p["test_nll"])]
        if vals:
            lo = min(vals)
            ax.set_ylim(lo - 0.1, min(max(vals), lo + 3.0) + 0.1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per method")
    ap.add_argument("--marks", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                    help="evaluation points as fractions of the budget (plus the end)")
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--otflow-width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None)
    args = ap.parse_args(argv)
    from npflow.backend import tune_malloc
    tune_malloc()
    results = {}
    info = {"budget": args.budget, "eval_n": args.eval_n, "loadavg_start": os.getloadavg()}
    for ds in args.data:
        data = make_data(ds, args.seed)
        print(f"{ds}: d = {data[0]}", flush=True)
        results[ds] = [run_one(m, data, args) for m in args.methods]
        if args.json:               # partial results survive an interrupted run
            with open(args.json, "w") as f:
                json.dump({"info": info, "targets": TARGETS, "results": results}, f, indent=1)
    info["loadavg_end"] = os.getloadavg()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "targets": TARGETS, "results": results}, f, indent=1)
    if args.figure:
        print("figure:", figure(results, args.figure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
