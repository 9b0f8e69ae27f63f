"""npflow's OT-CFM / CFM against torchcfm on the same toy problem, in one run (docs/cfm.md §7).

Both sides train the same network from the same initial weights: FFJORD's toy ODEnet,
ConcatSquashLinear 2-64-64-64-2 with tanh (bench/torch_cnf.py's torch module; npflow's
ODENet), on the same 8gaussians batches (batch 256), Adam lr 1e-3 without weight decay, float32,
end time 1:

    torch   torchcfm's ExactOptimalTransportConditionalFlowMatcher (otcfm) or
            ConditionalFlowMatcher (cfm) with sigma = --sigma, called with x0 = data and
            x1 = noise (so x_t = (1 − t) x + t z, u = z − x: npflow's direction; torchcfm's
            objects are symmetric in x0, x1); per-sample t; loss = MSE; autograd; torch.optim.Adam
    npflow  npflow.cfm.FlowMatchingCNF(coupling="ot" | "independent", time_groups=--groups
            (0: one time per row, one network call), ot_solver=--ot-solver):
            loss_and_grad (layers' hand-written backward) + npflow.optim.Adam

Timed iteration = everything per batch from the host batch to updated weights and the loss as
a float (noise draws and the OT assignment included on both sides). The runners take turns in
blocks of --block iterations, so a change of load hits both. After --iters iterations each,
the two trained networks are evaluated by the same exact evaluator: npflow's
CNF.log_prob (dopri5, atol = rtol = 1e-5, exact trace) on the same --test-n test points (the
torch weights are copied into an npflow CNF), which also gives each model's test-time NFE.

    python bench/torch_cfm_toy.py --method otcfm --iters 2000 --json /tmp/torch_cfm.json

Needs torch and torchcfm (see bench/README.md: `pip install --no-deps torchcfm POT`).
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

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def torch_velocity(net, t, x):
    """The ODEnet of bench/torch_cnf.py with one time per row: t (B,), x (B, D) -> (B, D);
    each layer y = (W h + b) ⊙ sigmoid(W_g t_b + b_g) + W_b t_b."""
    import torch
    tt = t.view(-1, 1)
    h = x
    n = len(net.layers)
    for i, layer in enumerate(net.layers):
        h = layer._layer(h) * torch.sigmoid(layer._hyper_gate(tt)) + layer._hyper_bias(tt)
        if i < n - 1:
            h = torch.tanh(h)
    return h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="otcfm", choices=["cfm", "otcfm"])
    ap.add_argument("--data", default="8gaussians")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sigma", type=float, default=0.0)
    ap.add_argument("--groups", type=int, default=16,
                    help="npflow's time_groups (0: one time per row, one network call)")
    ap.add_argument("--ot-solver", default="scipy", choices=["scipy", "pot"],
                    help="npflow's exact assignment for otcfm: scipy's linear_sum_assignment "
                         "or POT's ot.emd (torchcfm's solver)")
    ap.add_argument("--block", type=int, default=50, help="iterations per alternating block")
    ap.add_argument("--test-n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    import npflow
    from npflow.cfm import FlowMatchingCNF
    from npflow.data import toy
    from npflow.optim import Adam
    from torch_cnf import TorchCNF, load_npflow_params, npflow_param_names
    torch.set_num_threads(1)

    coupling = "ot" if args.method == "otcfm" else "independent"
    model = FlowMatchingCNF(2, hidden=(64, 64, 64), T=1.0, sigma=args.sigma, coupling=coupling,
                            time_groups=args.groups, ot_solver=args.ot_solver, seed=args.seed)
    opt = Adam(model.params, lr=args.lr, weight_decay=0.0)
    tmodel = TorchCNF(2, (64, 64, 64), T=1.0, seed=args.seed)
    load_npflow_params(tmodel, model.params)          # the same initial weights
    net = tmodel.odefunc.net
    topt = torch.optim.Adam(net.parameters(), lr=args.lr)
    fm = (ExactOptimalTransportConditionalFlowMatcher(sigma=args.sigma) if coupling == "ot"
          else ConditionalFlowMatcher(sigma=args.sigma))

    data_rng = np.random.default_rng([args.seed, 1])
    batches = [toy(args.data, args.batch, data_rng).astype(np.float32)
               for _ in range(args.iters)]
    rng = np.random.default_rng([args.seed, 2])
    torch.manual_seed(args.seed)

    def np_step(x):
        loss, grads, _ = model.loss_and_grad(x, rng)
        model.params = opt.step(model.params, grads)
        return loss

    def torch_step(x):
        xt_data = torch.from_numpy(x)
        z = torch.randn_like(xt_data)
        t, xt, ut = fm.sample_location_and_conditional_flow(xt_data, z)
        topt.zero_grad(set_to_none=True)
        loss = ((torch_velocity(net, t, xt) - ut) ** 2).mean()
        loss.backward()
        topt.step()
        return loss.item()

    runners = {"npflow": np_step, "torchcfm": torch_step}
    times = {k: [] for k in runners}
    losses = {k: [] for k in runners}
    done = {k: 0 for k in runners}
    order = list(runners)
    load0 = os.getloadavg()
    rnd = 0
    while min(done.values()) < args.iters:
        for name in order[rnd % 2:] + order[:rnd % 2]:
            for _ in range(min(args.block, args.iters - done[name])):
                x = batches[done[name]]
                t0 = time.perf_counter()
                loss = runners[name](x)
                times[name].append(time.perf_counter() - t0)
                losses[name].append(loss)
                done[name] += 1
        rnd += 1
    load1 = os.getloadavg()

    # the same exact evaluator for both trained networks
    x_test = toy(args.data, args.test_n, np.random.default_rng([args.seed, 3]))
    tparams = {k: p.detach().numpy().reshape(model.params[k].shape).copy()
               for k, p in npflow_param_names(tmodel).items()}
    result = {"method": args.method, "data": args.data, "iters": args.iters,
              "batch": args.batch, "sigma": args.sigma, "npflow_time_groups": args.groups,
              "npflow_ot_solver": args.ot_solver,
              "loadavg_start": load0, "loadavg_end": load1}
    for name, params in (("npflow", model.params), ("torchcfm", tparams)):
        t0 = time.perf_counter()
        lp, nfe = model.log_prob(x_test, params=params, solver="dopri5", rtol=1e-5, atol=1e-5,
                                 trace="exact", batch_size=5000, return_nfe=True)
        lp = npflow.backend.to_host(lp).astype(np.float64)
        ts = np.asarray(times[name])
        result[name] = {
            "ms_per_iter_median": 1e3 * float(np.median(ts)),
            "ms_per_iter_iqr": [1e3 * float(v) for v in np.percentile(ts, [25, 75])],
            "train_seconds": float(ts.sum()),
            "final_loss_mean_last100": float(np.mean(losses[name][-100:])),
            "test_nll": float(-lp.mean()), "test_nll_stderr": float(lp.std() / math.sqrt(len(lp))),
            "test_nfe": nfe, "eval_seconds": time.perf_counter() - t0}
    result["ratio_npflow_over_torchcfm_ms"] = (result["npflow"]["ms_per_iter_median"] /
                                               result["torchcfm"]["ms_per_iter_median"])
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
