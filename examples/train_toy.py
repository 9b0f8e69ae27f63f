#!/usr/bin/env python
"""Train a CNF on a 2-D toy density with FFJORD, RNODE, TO-FLOW or STEER (docs/training.md §6).

    python examples/train_toy.py --data checkerboard --method toflow --niters 10000
    python examples/train_toy.py --data 8gaussians --method rnode --solver rk4 --steps 8
    python examples/train_toy.py --method toflow+rnode      # methods combine with "+"
    mpiexec -n 2 python examples/train_toy.py               # 2 MPI ranks share every batch

Writes to --save DIR: checkpoint.h5 (every --log-every iterations and at the end; atomic),
toy.png (data | learned density | samples), curves.png (loss, NFE, T, gradient norm), and
prints the test NLL on --test-n fresh samples (dopri5, atol = rtol = 1e-5, exact trace). With
--log-json PATH one JSON object per log line is appended to PATH, and a last one holding
"test_nll". --resume continues an interrupted run exactly from DIR/checkpoint.h5.

Methods (docs/training.md §6):
  ffjord  maximum likelihood; T is trained jointly with the weights as in FFJORD's toy
          set-up (--no-train-T keeps it fixed)
  rnode   adds λ_K ∫‖f‖² and λ_J ∫‖∂f/∂z‖²_F (defaults 0.01 each)
  toflow  end time T trained by its own Adam (lr --lr-T) after each weight step, with the
          analytic ∂L/∂T at the updated weights, temporal regularization α|T| and clipping
          to [t0 + ε, 2T0 − t0 − ε]
  steer   each training step integrates to T' ~ U[T − b, T + b]
  cfm     conditional flow matching (docs/cfm.md): regress f onto the straight-path velocity,
          no ODE solve in training; evaluation is the same exact log-likelihood
  otcfm   the same with data and noise paired by exact optimal transport in each batch
          (cfm/otcfm change the defaults of --T, --niters, --batch-size, --lr,
          --lr-halve-every, and otcfm of --ema;
          see FLOW_MATCHING_DEFAULTS)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py: flags, run folder, lock, signals)
from common import fail  # noqa: E402

from npflow.layers import ACTIVATIONS  # noqa: E402
from npflow.methods import METHODS as REGISTRY, RNODE, STEER, compose  # noqa: E402
from npflow.odenet import LAYER_TYPES  # noqa: E402
from npflow.tableau import fixed_grid, solver_names  # noqa: E402

# the registered methods this script's models run (npflow.methods): the CNF's and flow matching
METHODS = tuple(n for n, m in REGISTRY.items() if m.model in (None, "cfm"))
# the settings that define the model (and its data): --resume refuses a change of any
MODEL_KEYS = ("data", "data_file", "dims", "layer_type", "nonlinearity", "blocks", "T",
              "train_T", "method", "seed", "dtype", "trace", "kinetic", "jacobian", "sigma",
              "time_groups")

# defaults of the flow-matching methods (docs/cfm.md, section 6: OT-CFM measured 2.839 nats on
# 8gaussians, 3.5993 on checkerboard (asked: 3.60), 14-16 min of training each under load);
# cfm keeps the first session's (not measured at these); explicit flags still win
FLOW_MATCHING_DEFAULTS = {
    "cfm": dict(T=1.0, niters=80000, batch_size=128, lr=2e-3, lr_halve_every=20000),
    "otcfm": dict(T=1.0, niters=160000, batch_size=128, lr=4e-3, lr_halve_every=40000,
                  ema=0.999),
}


def build_parser():
    p = common.make_parser("Train a continuous normalizing flow on 2-D toy data (npflow).",
                           script=__file__)
    common.add_run_arguments(p, niters=10000, save="runs/toy", log_every=100, data_dir=None)
    a = p.add_argument
    a("--data", default="8gaussians",
      help="toy set: swissroll, circles, rings, moons, 8gaussians, pinwheel, 2spirals, "
           "checkerboard")
    a("--data-file", default=None,
      help="train on your own (N, 2) points instead: .npy, or .csv/.txt (comma or space "
           "separated); 10%% are held out for the test NLL")
    a("--dims", default="64-64-64", help="hidden widths of the ODENet, dash-separated")
    a("--layer-type", default="concatsquash", choices=list(LAYER_TYPES))
    a("--nonlinearity", default="tanh",
      choices=list(ACTIVATIONS))
    a("--blocks", type=int, default=1, help="number of stacked CNF blocks")
    a("--T", type=float, default=0.5, help="(initial) end time T0; t0 = 0")
    a("--train-T", action=argparse.BooleanOptionalAction, default=None,
      help="train T jointly with the weights by the same Adam (FFJORD's train_T; default: on "
           "for plain --method ffjord, as in FFJORD's toy set-up, off otherwise)")
    a("--solver", default="dopri5", choices=solver_names(),
      help="training solver. dopri5 is FFJORD's toy set-up. A coarse fixed grid without "
           "RNODE's regularizers can be exploited: on checkerboard, rk4 with 8 steps trained "
           "to 2.99 nats under rk4-8 (below the log 32 = 3.47 floor) but 4.44 under dopri5")
    a("--steps", type=int, default=8, help="steps of a fixed-grid solver")
    a("--step-size", type=float, default=None,
      help="fixed-grid step size; overrides --steps with ceil(T / step-size)")
    a("--atol", type=float, default=1e-5)
    a("--rtol", type=float, default=1e-5)
    a("--trace", default="exact", choices=["exact", "hutchinson", "rademacher"])
    a("--batch-size", type=int, default=100)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=1e-5)
    a("--weight-decay-mode", default="l2", choices=["l2", "adamw"],
      help="l2: added to the gradient (torch.optim.Adam, FFJORD); adamw: decoupled")
    a("--warmup", type=int, default=0, help="linear learning-rate warm-up iterations")
    a("--lr-halve-every", type=int, default=0,
      help="halve the learning rate every N iterations (0: constant)")
    a("--lr-cosine", action="store_true",
      help="decay the lr along a half cosine to 0 over --niters (docs/training.md eq. 3.5) "
           "instead of halving it every --lr-halve-every iterations")
    a("--grad-clip", type=float, default=None, help="max global gradient norm (default: off)")
    a("--ema", type=float, default=0.0,
      help="decay γ of an exponential moving average of the weights (docs/training.md eq. "
           "1.6; 0: off); the average is what is evaluated, drawn and saved to "
           "DIR/model_ema.h5, and it is in the checkpoint (exact resume)")
    common.add_method_arguments(p, METHODS, t_grad_default="analytic")
    common.add_deprecated_alias(p, "--alpha", "--alpha-T", type=float)
    a("--sigma", type=float, default=0.0,
      help="cfm/otcfm: width σ of the Gaussian path around the straight line (docs/cfm.md)")
    a("--time-groups", type=int, default=16,
      help="cfm/otcfm: row groups sharing one stratified time per batch (docs/cfm.md eq. 2.6); "
           "0: one stratified time per row and one network call (eq. 2.8, faster)")
    a("--ot-solver", default="scipy", choices=("scipy", "pot"),
      help="otcfm: the exact assignment, scipy's linear_sum_assignment or POT's ot.emd "
           "(optional package POT; same pairs, faster on clustered data: docs/cfm.md eq. 4.3)")
    a("--no-tune-malloc", action="store_true",
      help="keep glibc's malloc settings as they are (otherwise npflow.backend.tune_malloc() "
           "keeps freed memory for reuse: no per-iteration page faults)")
    a("--test-n", type=int, default=10000, help="fresh samples for the final test NLL")
    a("--test-batch", type=int, default=5000)
    a("--no-figures", action="store_true", help="skip the figures at the end")
    a("--viz", action="store_true",
      help="also draw the toy figure every --viz-every iterations during training")
    a("--viz-every", type=int, default=1000)
    a("--viz-n", type=int, default=5000, help="samples in the toy figure")
    return p


def load_data_file(path):
    """(N, 2) float64 points from .npy or a text file."""
    if not os.path.exists(path):
        raise ValueError(f"--data-file {path!r} does not exist")
    try:
        if path.endswith(".npy"):
            x = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                first = f.readline()
            delim = "," if "," in first else None
            try:
                np.asarray(first.replace(",", " ").split(), dtype=np.float64)
            except ValueError:
                raise ValueError(f"its first line {first.strip()[:40]!r} is not numbers: remove "
                                 "the header line (or comment it out with '#')") from None
            x = np.loadtxt(path, delimiter=delim, ndmin=2)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"cannot read --data-file {path!r} as (N, 2) points (.npy, or .csv/.txt "
                         f"numbers): {exc}") from None
    return np.asarray(x, dtype=np.float64) if x.dtype.kind in "biuf" else x


def prepare(args):
    """Check every input and build what the run needs, before any training (clear errors)."""
    from npflow.data import TOY_NAMES, toy, validate_data

    methods = common.parse_methods(args.method, METHODS)
    for name, v in (("--batch-size", args.batch_size), ("--test-n", args.test_n),
                    ("--steps", args.steps), ("--blocks", args.blocks),
                    ("--test-batch", args.test_batch), ("--viz-every", args.viz_every),
                    ("--viz-n", args.viz_n), ("--warmup", args.warmup + 1)):
        if v < 1:
            raise ValueError(f"{name} must be >= {1 if name != '--warmup' else 0}, got "
                             f"{v if name != '--warmup' else args.warmup}")
    for name, v, zero_ok in (("--lr", args.lr, True), ("--weight-decay", args.weight_decay, True),
                             ("--atol", args.atol, False), ("--rtol", args.rtol, False),
                             ("--grad-clip", args.grad_clip, False),
                             ("--lr-T", args.lr_T, True), ("--alpha-T", args.alpha_T, True),
                             ("--ema", args.ema, True)):
        if v is not None and not (v > 0 or (zero_ok and v == 0)) or (
                v is not None and not math.isfinite(v)):
            raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'} and finite, "
                             f"got {v}")
    if not args.T > 0:
        raise ValueError(f"--T must be > 0, got {args.T}")
    if not args.ema < 1:
        raise ValueError(f"--ema must be in [0, 1) (0: off), got {args.ema}")
    if args.lr_halve_every < 0:
        raise ValueError(f"--lr-halve-every must be >= 0 (0: constant lr), got "
                         f"{args.lr_halve_every}")
    try:
        hidden = tuple(int(h) for h in args.dims.split("-"))
    except ValueError:
        raise ValueError(f"--dims must be dash-separated integers like 64-64-64, got "
                         f"{args.dims!r}") from None
    if any(h < 1 for h in hidden):
        raise ValueError(f"--dims widths must be >= 1, got {args.dims!r}")
    steps = args.steps
    if args.step_size is not None:
        if not args.step_size > 0:
            raise ValueError(f"--step-size must be > 0, got {args.step_size}")
        steps = max(1, math.ceil(args.T / args.step_size - 1e-9))

    rng_test = np.random.default_rng([args.seed, 2])
    if args.data_file is not None:
        x_all = load_data_file(args.data_file)
        validate_data(x_all, dim=2, name=f"data file {args.data_file!r} (train_toy.py trains "
                                          "on 2-D points)")
        common.warn_constant(x_all, f"data file {args.data_file!r}")
        perm = np.random.default_rng([args.seed, 3]).permutation(len(x_all))
        n_test = max(1, len(x_all) // 10)
        if len(x_all) - n_test < 1:
            raise ValueError(f"data file {args.data_file!r} has too few points ({len(x_all)})")
        x_test, x_train = x_all[perm[:n_test]], x_all[perm[n_test:]]
        data_name = os.path.basename(args.data_file)

        def sample_batch(rng, it):
            return x_train[rng.integers(0, len(x_train), args.batch_size)]
        limits = None
    else:
        if args.data not in TOY_NAMES:
            raise ValueError(f"unknown data set {args.data!r}; valid names: "
                             f"{', '.join(TOY_NAMES)} (or --data-file PATH)")
        data_name = args.data
        x_test = toy(args.data, args.test_n, rng_test)

        def sample_batch(rng, it):
            return toy(args.data, args.batch_size, rng)
        limits = ((-4.0, 4.0), (-4.0, 4.0))
    # the first batch is checked like every data set: finite values, (B, 2)
    validate_data(sample_batch(np.random.default_rng([args.seed, 4]), 0), dim=2,
                  name="training batch")
    validate_data(x_test, dim=2, name="test data")

    if methods & set(FLOW_MATCHING_DEFAULTS):
        (m,) = methods
        if args.time_groups < 0:
            raise ValueError(f"--time-groups must be >= 0 (0: one time per row), got "
                             f"{args.time_groups}")
        if not args.sigma >= 0:
            raise ValueError(f"--sigma must be >= 0, got {args.sigma}")
        flow_matching = dict(sigma=args.sigma, time_groups=args.time_groups,
                             ot_solver=args.ot_solver,
                             coupling=REGISTRY[m].coupling)
    else:
        flow_matching = None
    if args.train_T is None:           # FFJORD's toy default: T trained jointly
        args.train_T = methods == {"ffjord"}
    combo = compose(methods)           # each method's checks and model settings (configure)
    combo.check(args, args.T)
    kinetic, jacobian = RNODE.weights(args, False)
    config = dict(dim=2, hidden=hidden, layer=args.layer_type, activation=args.nonlinearity,
                  T=args.T, train_T=bool(args.train_T), solver=args.solver,
                  steps=steps, rtol=args.rtol, atol=args.atol, trace=args.trace,
                  kinetic=kinetic, jacobian=jacobian, blocks=args.blocks, dtype=args.dtype,
                  device=args.device, seed=args.seed)
    config = combo.configure(config, args)
    return dict(methods=methods, config=config, sample_batch=sample_batch, x_test=x_test,
                data_name=data_name, limits=limits, steer_b=STEER.half_width(args, args.T),
                flow_matching=flow_matching, combo=combo)


def main(argv=None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, argv, FLOW_MATCHING_DEFAULTS)   # the method's defaults
    comm = common.init_ranks(args)       # MPI ranks under mpiexec (docs/parallel.md), else one
    common.tune_host(args)               # one BLAS thread (the products are small), malloc
    import npflow
    from npflow.optim import Adam
    from npflow.training import append_json, train

    try:
        run = prepare(args)
    except ValueError as exc:
        fail(exc)
    try:
        if run["flow_matching"] is not None:
            from npflow.cfm import FlowMatchingCNF
            model = FlowMatchingCNF(**run["config"], **run["flow_matching"])
        else:
            model = npflow.CNF(**run["config"])
    except ValueError as exc:
        fail(f"cannot build the model: {exc}")
    except npflow.DeviceError as exc:
        fail(f"cannot build the model: {exc}; or use --device cpu")
    methods, cfg = run["methods"], run["config"]

    skip = run["combo"].optimizer_skip(model)        # TO-FLOW's end times: its own optimizer
    weight_keys = {k: v for k, v in model.params.items() if k not in skip}
    optimizer = Adam(weight_keys, lr=args.lr, weight_decay=args.weight_decay,
                     decoupled=args.weight_decay_mode == "adamw",
                     schedule=_schedule(args), ema_decay=args.ema)
    hooks = run["combo"].hooks(model, args, comm=comm, steer_b=run["steer_b"])

    with common.open_run(args, model_keys=MODEL_KEYS, comm=comm) as rf:
        return _train_and_evaluate(args, rf, run, model, optimizer, hooks, methods, cfg,
                                   train, append_json, comm)


def _train_and_evaluate(args, rf, run, model, optimizer, hooks, methods, cfg, train,
                        append_json, comm):
    import npflow
    print(f"npflow CNF on {run['data_name']}: method {'+'.join(sorted(methods))}, "
          f"{model.num_params()} parameters, solver {cfg['solver']}"
          f"{' ' + str(cfg['steps']) + ' steps' if fixed_grid(cfg['solver']) else ''}, "
          f"trace {cfg['trace']}, λ_K {cfg['kinetic']}, λ_J {cfg['jacobian']}, T {cfg['T']}"
          f"{' (trained)' if cfg['train_T'] else ''}, {cfg['dtype']} on {cfg['device']}",
          flush=True)

    on_log = []
    if args.viz:
        def viz(rec):
            if rec["iteration"] % args.viz_every == 0:
                draw_toy(model, run, args, rf.path(f"toy_iter{rec['iteration']:06d}.png"),
                         fast=True)
        on_log.append(viz)

    result, train_seconds, status = rf.train(
        model, optimizer, run["sample_batch"], args.niters, np.random.default_rng(args.seed),
        grad_clip=args.grad_clip, hooks=hooks, on_log=on_log, comm=comm)
    if status is not None:
        return status
    if not comm.root:                    # the evaluation and the figures: rank 0 alone
        return 0
    if args.ema:      # evaluate, draw and save the moving average of the weights (eq. 1.6)
        from npflow.checkpoint import save as save_model
        model.params = optimizer.averaged(model.params)
        save_model(rf.path("model_ema.h5"), model, iteration=int(result.iteration))
        print(f"evaluating the weights' moving average (γ = {args.ema}), saved to "
              f"{rf.path('model_ema.h5')}")

    # final evaluation: dopri5, atol = rtol = 1e-5, exact trace, fresh samples
    t1 = time.perf_counter()
    lp, nfe = model.log_prob(run["x_test"], solver="dopri5", rtol=1e-5, atol=1e-5,
                             trace="exact", batch_size=args.test_batch, return_nfe=True)
    lp = npflow.backend.to_host(lp).astype(np.float64)
    test_nll = float(-lp.mean())
    stderr = float(lp.std() / math.sqrt(len(lp)))
    test_seconds = time.perf_counter() - t1
    nll_train_solver = None
    if fixed_grid(cfg["solver"]):
        # the same test set under the training solver: a much lower value than the dopri5
        # one means the training exploited the discretization (an unnormalised density)
        lp_fixed = model.log_prob(run["x_test"], solver=cfg["solver"], steps=cfg["steps"],
                                  trace="exact", batch_size=args.test_batch)
        nll_train_solver = float(-npflow.backend.to_host(lp_fixed).astype(np.float64).mean())
    h = result.history
    final = {
        "test_nll": test_nll, "test_nll_stderr": stderr, "test_n": int(len(lp)),
        "ema": args.ema,
        "test_nfe": nfe, "test_seconds": test_seconds,
        "test_nll_train_solver": nll_train_solver, "data": run["data_name"],
        "method": "+".join(sorted(methods)), "iterations": int(result.iteration),
        "train_seconds_this_run": train_seconds,
        "mean_nfe_forward": float(np.mean(h["nfe_forward"])) if len(h["loss"]) else None,
        "mean_nfe_backward": float(np.mean(h["nfe_backward"])) if len(h["loss"]) else None,
        "mean_sec_per_iter": float(np.mean(h["seconds"])) if len(h["loss"]) else None,
        "T": [float(npflow.backend.to_host(model.params[n])) for n in model.time_names]
        if cfg["train_T"] else cfg["T"],
    }
    print(f"test NLL {test_nll:.4f} ± {stderr:.4f} nats on {len(lp)} fresh samples "
          f"(dopri5 1e-5, exact trace, NFE {nfe:.0f}); mean training NFE forward "
          f"{final['mean_nfe_forward']}, backward {final['mean_nfe_backward']}")
    if nll_train_solver is not None:
        print(f"test NLL under the training solver ({cfg['solver']}, {cfg['steps']} steps): "
              f"{nll_train_solver:.4f}"
              + ("  <- much lower than dopri5's: the training exploited the discretization; "
                 "use dopri5, more steps or RNODE's regularizers"
                 if nll_train_solver < test_nll - 0.1 else ""))
    common.write_result(args, rf, final)

    if not args.no_figures:
        from npflow.plotting import training_curves
        p1 = draw_toy(model, run, args, rf.path("toy.png"))
        p2 = None
        if len(h["loss"]):
            # known entropies (docs/reference.md, section 1): no model's expected NLL is below them
            floor = ({"checkerboard": math.log(32.0), "8gaussians": 2.8318}.get(args.data)
                     if args.data_file is None and run["flow_matching"] is None else None)
            p2 = training_curves(h, rf.path("curves.png"), floor=floor,
                                 title=f"{run['data_name']}, {final['method']}")
        print("figures:", p1, p2 or "(no training curves: no iterations)")
    return 0


def _schedule(args):
    """Warm-up, then a half-cosine decay over --niters (--lr-cosine) or halving every
    --lr-halve-every iterations (npflow.optim, eq. 3.1-3.5)."""
    from npflow.optim import Chain, Cosine, StepDecay, Warmup
    parts = [Warmup(args.warmup)] if args.warmup else []
    if args.lr_cosine:
        parts.append(Cosine(max(args.niters, 1)))
    elif args.lr_halve_every:
        parts.append(StepDecay(args.lr_halve_every, 0.5))
    return None if not parts else parts[0] if len(parts) == 1 else Chain(*parts)


def draw_toy(model, run, args, path, fast=False):
    """Data | learned density | samples. fast: the training solver instead of dopri5."""
    from npflow.data import toy
    from npflow.plotting import density_grid, toy_figure
    kw = (dict(solver=model.config["solver"], steps=model.config["steps"]) if fast and
          fixed_grid(model.config["solver"]) else dict(solver="dopri5", rtol=1e-4, atol=1e-4))
    rng = np.random.default_rng([args.seed, 5])
    if args.data_file is None:
        data = toy(args.data, args.viz_n, rng)
    else:
        data = run["x_test"]
    limits = run["limits"]
    if limits is None:
        lo, hi = np.percentile(data, [0.5, 99.5], axis=0)
        pad = 0.15 * (hi - lo)
        limits = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    density = density_grid(lambda pts: model.log_prob(pts, **kw), limits, 100)
    samples = model.sample(args.viz_n, rng, **kw)
    return toy_figure(data, None, samples, path, limits=limits, density=density,
                      title=f"{run['data_name']}, {args.method}")


if __name__ == "__main__":
    common.main_guard(main)
