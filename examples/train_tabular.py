#!/usr/bin/env python
"""Density estimation on the MAF tabular sets (or a 2-D toy set) with OT-Flow, FFJORD, RNODE or
TO-FLOW (docs/otflow.md, section 6).

    python examples/train_tabular.py --data miniboone --model otflow
    python examples/train_tabular.py --data 8gaussians --model otflow          # toy defaults
    python examples/train_tabular.py --data power --model ffjord --niters 2000
    mpiexec -n 2 python examples/train_tabular.py --data miniboone   # 2 MPI ranks per batch

Data: power | gas | hepmass | miniboone | bsds300 are read from DATA_DIR (default data/, the
files of the MAF archive's data/ folder; downloaded with checksums when missing unless
--no-download) and z-scored as in MAF; the toy names draw fresh samples from npflow.data.toy.

OT-Flow settings default to OT-Flow's own per data set (docs/reference.md, section 4): RK4 steps for
training / validation / test, batch size, width m, α = (α0, α1, α2), learning rate. Tabular
runs clamp every parameter to [−1.5, 1.5] after each step, validate every epoch with the
validation step count, divide the learning rate by --lr-drop when the validation loss has not
improved for --patience validations, and stop early after --max-drops drops; toy runs halve
the learning rate every 100 iterations. The test NLL is computed at the end with the best
validated parameters and --nt-test RK4 steps (more than training).

FFJORD / RNODE / TO-FLOW use npflow.CNF with FFJORD's tabular architecture (ConcatSquash
layers, hidden = factor·D, blocks), Hutchinson's trace and dopri5 (atol 1e-8, rtol 1e-6); RNODE
adds λ_K = λ_J = 0.01 with fixed-grid RK4 and a fixed T; TO-FLOW trains T by its own Adam.
CFM / OT-CFM (--method cfm|otcfm) train the same CNF by (OT-)conditional flow matching
(docs/cfm.md): no ODE solve in training, T = 1 on toy data; evaluated as the CNFs are.

Outputs in --save DIR: checkpoint.h5 (the training state; --resume continues from it),
best.h5 (the best validated model, loadable with npflow.load), result.json. --log-json PATH
appends one JSON object per progress line, one per validation, and a final one holding
"test_nll" (nats). A non-finite loss stops the run with a message; the last good checkpoint is
kept.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py: flags, run folder, lock, signals)
from common import fail  # noqa: E402
from npflow.methods import METHODS as REGISTRY, RNODE  # noqa: E402
from npflow.training import ClampHook, TrainHook  # noqa: E402

# every registered method (npflow.methods), OT-Flow first (the default)
METHODS = ("otflow",) + tuple(n for n in REGISTRY if n != "otflow")
# flow matching (npflow.cfm, docs/cfm.md): method name -> coupling
FLOW_MATCHING = {n: m.coupling for n, m in REGISTRY.items() if m.model == "cfm"}
MODELS = METHODS              # old name
# the settings that define the model (and its data): --resume refuses a change of any
MODEL_KEYS = ("data", "method", "width", "depth", "rank", "dtype", "seed", "trace", "sigma",
              "time_groups")
TABULAR = ("power", "gas", "hepmass", "miniboone", "bsds300")

# OT-Flow's settings (docs/reference.md section 4; OT-Flow's detailedSetup): nt train/val/test, batch,
# width m, α, learning rate. gas validates with 24-28 steps; 26 is taken here.
OTFLOW_DEFAULTS = {
    "power":     dict(nt=10, nt_val=22, nt_test=24, batch=10000, width=128,
                      alpha=(1.0, 500.0, 5.0), lr=0.03),
    "gas":       dict(nt=10, nt_val=26, nt_test=30, batch=2000, width=350,
                      alpha=(1.0, 1200.0, 40.0), lr=0.01),
    "hepmass":   dict(nt=12, nt_val=24, nt_test=24, batch=2000, width=256,
                      alpha=(1.0, 500.0, 40.0), lr=0.02),
    "miniboone": dict(nt=6, nt_val=10, nt_test=18, batch=2000, width=256,
                      alpha=(1.0, 100.0, 15.0), lr=0.02),
    "bsds300":   dict(nt=14, nt_val=30, nt_test=40, batch=300, width=512,
                      alpha=(1.0, 2000.0, 800.0), lr=0.001),
    # toy: trainToyOTflow.py's CPU defaults (batch 2048, 1000 iterations, single precision;
    # its GPU defaults, batch 4096, 1500 iterations, are docs/reference.md's: pass --batch-size 4096
    # --niters 1500 --dtype float64). Validation with the training steps, test with 4× as many.
    # One change: the lr is halved every 250 iterations, not every 100 (TOY_DROP_FREQ).
    "toy":       dict(nt=8, nt_val=8, nt_test=32, batch=2048, width=32,
                      alpha=(1.0, 100.0, 5.0), lr=0.1),
    # --data FILE.npz (arrays train, val, test of shape (N, D)): a mid-sized setting of ours
    "file":      dict(nt=8, nt_val=16, nt_test=32, batch=2000, width=64,
                      alpha=(1.0, 100.0, 5.0), lr=0.02),
}

# The toy lr schedule: halve every TOY_DROP_FREQ iterations. trainToyOTflow.py halves every 100,
# which leaves lr = 0.1/2^9 for the last 100 of 1000 iterations; on checkerboard that stopped
# at a test NLL of 3.77 here (8gaussians 2.95), against 3.67 (2.86) when halving every 250.
# --drop-freq 100 restores OT-Flow's schedule.
TOY_DROP_FREQ = 250

# FFJORD's tabular configurations (docs/reference.md, section 2): activation, hidden layers, width
# factor (hidden = factor·D), blocks, batch size.
FFJORD_DEFAULTS = {
    "power":     dict(activation="tanh", layers=3, factor=10, blocks=5, batch=10000),
    "gas":       dict(activation="tanh", layers=3, factor=20, blocks=5, batch=1000),
    "hepmass":   dict(activation="softplus", layers=2, factor=10, blocks=10, batch=10000),
    "miniboone": dict(activation="softplus", layers=2, factor=20, blocks=1, batch=1000),
    "bsds300":   dict(activation="softplus", layers=3, factor=20, blocks=2, batch=10000),
    "file":      dict(activation="softplus", layers=2, factor=10, blocks=1, batch=1000),
}


class EarlyStop(Exception):
    """Raised by the validation hook when the learning rate has been dropped --max-drops
    times and the validation loss is stale again (OT-Flow's early stopping)."""


def build_parser():
    p = common.make_parser(
        "Train OT-Flow / FFJORD / RNODE / TO-FLOW / STEER on tabular or toy data (npflow).",
        script=__file__)
    # --niters: default None = toy 1000 (OT-Flow's CPU default), tabular 8000
    common.add_run_arguments(p, niters=None, save="runs/tabular", log_every=10)
    a = p.add_argument
    a("--data", default="miniboone",
      help="power, gas, hepmass, miniboone, bsds300, or a toy name (8gaussians, checkerboard, "
           "swissroll, circles, rings, moons, pinwheel, 2spirals), or PATH.npz holding arrays "
           "train, val, test of shape (N, D) (e.g. from bench/make_product_data.py)")
    a("--no-download", action="store_true", help="never download; fail if files are missing")
    common.add_method_arguments(p, METHODS, default="otflow", t_grad_default="analytic")
    common.add_deprecated_alias(p, "--model", "--method")
    a("--sigma", type=float, default=0.0, help="cfm/otcfm: path width σ (docs/cfm.md eq. 2.2)")
    a("--time-groups", type=int, default=16,
      help="cfm/otcfm: row groups sharing one stratified time (docs/cfm.md eq. 2.6); 0: one "
           "stratified time per row and one network call (eq. 2.8)")
    a("--batch-size", type=int, default=None, help="default: the method's per-set value")
    a("--lr", type=float, default=None, help="default: OT-Flow per set; CNF 1e-3")
    a("--weight-decay", type=float, default=None, help="default: OT-Flow 0, CNF 1e-6")
    # OT-Flow
    a("--nt", type=int, default=None, help="OT-Flow: RK4 steps in training")
    a("--nt-val", type=int, default=None, help="OT-Flow: RK4 steps for validation")
    a("--nt-test", type=int, default=None, help="OT-Flow: RK4 steps for the test NLL")
    a("--width", type=int, default=None, help="OT-Flow: ResNet width m")
    a("--depth", type=int, default=2, help="OT-Flow: number of K layers (nTh)")
    a("--rank", type=int, default=None, help="OT-Flow: rank of A (default min(10, d+1))")
    a("--otflow-alpha", default=None,
      help="OT-Flow: α0,α1,α2 (transport, NLL, HJB), e.g. 1,100,5 (default: per data set)")
    common.add_deprecated_alias(p, "--alpha", "--otflow-alpha")
    a("--clamp", type=float, default=None,
      help="clamp every parameter to [-c, c] after each step (default: tabular 1.5, toy off; "
           "0 = off)")
    # learning-rate schedule, validation, early stopping
    a("--drop-freq", type=int, default=None,
      help="divide the lr by --lr-drop every N iterations (default: toy 250, tabular 0 = "
           "drop on a stale validation loss instead)")
    a("--lr-drop", type=float, default=None, help="lr divisor (default: toy 2, tabular 10)")
    a("--val-every", type=int, default=None,
      help="iterations between validations (default: one epoch, toy 25)")
    a("--patience", type=int, default=20,
      help="validations without improvement before the lr is dropped (stale-loss schedule)")
    a("--max-drops", type=int, default=3,
      help="stop early when the validation loss is stale after this many lr drops")
    a("--val-n", type=int, default=None, help="validation points (default: toy 2048, tabular all)")
    a("--test-n", type=int, default=None, help="test points (default: toy 10000, all)")
    a("--eval-batch", type=int, default=None, help="batch size of validation and test")
    a("--target-val-nll", type=float, default=None,
      help="stop as soon as the validation NLL is at or below this (method comparisons)")
    a("--trace", default=None, choices=["exact", "hutchinson", "rademacher"],
      help="CNF trace estimator (default: exact on toy data, hutchinson on tabular)")
    # CNF (FFJORD, RNODE, TO-FLOW)
    a("--atol", type=float, default=None, help="CNF: dopri5 atol (toy 1e-5, tabular 1e-8)")
    a("--rtol", type=float, default=None, help="CNF: dopri5 rtol (toy 1e-5, tabular 1e-6)")
    a("--steps", type=int, default=8, help="RNODE: RK4 steps on [0, T]")
    return p


# --------------------------------------------------------------------------------------------
# settings and data (everything checked before training)

def _positive(name, v, allow_zero=False):
    if v is None:
        return
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def resolve_settings(args, is_toy):
    """Fill every None default from the method's per-set table; return a dict of settings."""
    from npflow.data import TOY_NAMES
    if not is_toy and args.data not in TABULAR and not _is_file(args.data):
        raise ValueError(f"unknown data set {args.data!r}; valid: {', '.join(TABULAR)}, a "
                         f"toy name ({', '.join(TOY_NAMES)}) or a .npz file")
    key = "toy" if is_toy else ("file" if _is_file(args.data) else args.data)

    def pick(v, default):
        return default if v is None else v
    s = {}
    if args._method == "otflow":
        d = OTFLOW_DEFAULTS[key]
        s.update(nt=pick(args.nt, d["nt"]), nt_val=pick(args.nt_val, d["nt_val"]),
                 nt_test=pick(args.nt_test, d["nt_test"]),
                 batch=pick(args.batch_size, d["batch"]), width=pick(args.width, d["width"]),
                 lr=pick(args.lr, d["lr"]), weight_decay=pick(args.weight_decay, 0.0))
        if args.otflow_alpha is not None:
            try:
                alpha = tuple(float(v) for v in args.otflow_alpha.split(","))
            except ValueError:
                raise ValueError(f"--otflow-alpha must be three comma-separated numbers like "
                                 f"1,100,5, got {args.otflow_alpha!r}") from None
            if len(alpha) != 3 or not all(math.isfinite(v) and v >= 0 for v in alpha):
                raise ValueError(f"--otflow-alpha needs three finite values α0,α1,α2 >= 0, got "
                                 f"{args.otflow_alpha!r}")
        else:
            alpha = d["alpha"]
        s["alpha"] = alpha
        s["clamp"] = args.clamp if args.clamp is not None else (0.0 if is_toy else 1.5)
    else:
        if is_toy:
            fm = args._method in FLOW_MATCHING
            s.update(hidden=(64, 64, 64), activation="tanh", blocks=1,
                     batch=pick(args.batch_size, 256 if fm else 100), T=1.0 if fm else 0.5)
        else:
            d = FFJORD_DEFAULTS[key]
            s.update(hidden=None, factor=d["factor"], layers=d["layers"],
                     activation=d["activation"], blocks=d["blocks"],
                     batch=pick(args.batch_size, d["batch"]), T=1.0)
        s.update(lr=args.lr if args.lr is not None else 1e-3,
                 weight_decay=args.weight_decay if args.weight_decay is not None else
                 (1e-5 if is_toy else 1e-6),
                 clamp=pick(args.clamp, 0.0))
    s["niters"] = args.niters if args.niters is not None else (1000 if is_toy else 8000)
    s["drop_freq"] = args.drop_freq if args.drop_freq is not None else (
        TOY_DROP_FREQ if is_toy and args._method == "otflow" else 0)
    s["lr_drop"] = args.lr_drop if args.lr_drop is not None else (2.0 if is_toy else 10.0)
    s["dtype"] = args.dtype or "float32"
    for name in ("nt", "nt_val", "nt_test", "batch", "width"):
        _positive("--" + name.replace("_", "-"), s.get(name))
    _positive("--niters", s["niters"], allow_zero=True)
    _positive("--lr", s["lr"], allow_zero=True)
    _positive("--drop-freq", s["drop_freq"], allow_zero=True)
    _positive("--clamp", s["clamp"], allow_zero=True)
    _positive("--weight-decay", s["weight_decay"], allow_zero=True)
    if not s["lr_drop"] > 1:
        raise ValueError(f"--lr-drop must be > 1 (the lr is divided by it), got {s['lr_drop']}")
    for name, v in (("--patience", args.patience), ("--max-drops", args.max_drops)):
        _positive(name, v, allow_zero=True)
    _positive("--log-every", args.log_every)
    return s


def _is_file(name):
    return str(name).endswith(".npz")


def load_npz(path):
    """train / val / test arrays (N, D) from a .npz file, with errors that name what is wrong."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; give a .npz file with arrays "
                         f"'train', 'val' and 'test' of shape (N, D)")
    wanted = ("train", "val", "test")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single array, not an archive of arrays")
            files = list(f.files)
            arrays = {k: np.asarray(f[k], dtype=np.float64) for k in wanted if k in files}
    except Exception as exc:  # noqa: BLE001 - zip/format errors: report them as bad data
        raise ValueError(f"cannot read data file {path!r} as .npz: {type(exc).__name__}: "
                         f"{exc}") from None
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise ValueError(f"data file {path!r} has no array(s) {missing}; it holds "
                         f"{sorted(files)} (expected 'train', 'val', 'test')")
    return arrays


def load_data(args, settings):
    """train / val / test arrays (host float64), validated; toy: a fresh-sample function."""
    from npflow.data import TOY_NAMES, DataError, load_tabular, toy, validate_data

    if args.data in TOY_NAMES:
        val_n = args.val_n or 2048
        test_n = args.test_n or 10000
        _positive("--val-n", val_n)
        _positive("--test-n", test_n)
        val = toy(args.data, val_n, np.random.default_rng([args.seed, 1]))
        test = toy(args.data, test_n, np.random.default_rng([args.seed, 2]))
        batch = settings["batch"]

        def sample_batch(rng, it):          # a fresh batch every iteration
            return toy(args.data, batch, rng)
        return dict(dim=2, val=val, test=test, sample_batch=sample_batch, n_train=None)
    if _is_file(args.data):
        splits = load_npz(args.data)
    elif args.data not in TABULAR:
        raise ValueError(f"unknown data set {args.data!r}; valid: {', '.join(TABULAR)}, a "
                         f"toy name ({', '.join(TOY_NAMES)}) or a .npz file")
    else:
        try:
            splits = load_tabular(args.data, args.data_dir, download=not args.no_download)
        except DataError as exc:
            raise ValueError(f"cannot load {args.data!r} from {os.path.abspath(args.data_dir)}: "
                             f"{exc}") from None
    dim = None
    for part in ("train", "val", "test"):
        if part not in splits:
            raise ValueError(f"the {args.data} loader returned no {part!r} split")
        validate_data(splits[part], dim=dim, name=f"{args.data} {part} data")
        dim = splits[part].shape[1]
    common.warn_constant(splits["train"], f"{args.data} train data")
    train = splits["train"]
    val, test = splits["val"], splits["test"]
    if args.val_n:
        val = val[:args.val_n]
    if args.test_n:
        test = test[:args.test_n]
    batch = min(settings["batch"], len(train))

    def sample_batch(rng, it):              # uniform minibatches (with replacement)
        return train[rng.integers(0, len(train), batch)]
    return dict(dim=dim, val=val, test=test, sample_batch=sample_batch, n_train=len(train))


def build_model(args, settings, dim, is_toy):
    import npflow
    if args._method == "otflow":
        return npflow.OTFlow(dim, width=settings["width"], depth=args.depth, rank=args.rank,
                             alpha=settings["alpha"], steps=settings["nt"], T=1.0,
                             dtype=settings["dtype"], device=args.device, seed=args.seed)
    hidden = settings["hidden"] or (settings["factor"] * dim,) * settings["layers"]
    if args._method in FLOW_MATCHING:
        from npflow.cfm import FlowMatchingCNF
        if args.time_groups < 0 or not args.sigma >= 0:
            raise ValueError(f"need --time-groups >= 0 and --sigma >= 0, got "
                             f"{args.time_groups} and {args.sigma}")
        return FlowMatchingCNF(dim, hidden=hidden, layer="concatsquash",
                               activation=settings["activation"], T=settings["T"],
                               solver="dopri5", rtol=args.rtol, atol=args.atol,
                               trace=args.trace or ("exact" if is_toy else "hutchinson"),
                               blocks=settings["blocks"], dtype=settings["dtype"],
                               device=args.device, seed=args.seed, sigma=args.sigma,
                               coupling=FLOW_MATCHING[args._method],
                               time_groups=args.time_groups)
    rnode = args._method == "rnode"
    kinetic, jacobian = RNODE.weights(args, rnode)
    return npflow.CNF(dim, hidden=hidden, layer="concatsquash",
                      activation=settings["activation"], T=settings["T"],
                      train_T=args._method in ("ffjord", "toflow"),
                      solver="rk4" if rnode else "dopri5", steps=args.steps,
                      rtol=args.rtol, atol=args.atol,
                      trace=args.trace or ("exact" if is_toy else "hutchinson"),
                      kinetic=kinetic, jacobian=jacobian,
                      blocks=settings["blocks"], zero_last=rnode, dtype=settings["dtype"],
                      device=args.device, seed=args.seed)


# --------------------------------------------------------------------------------------------
# hooks of the training loop (npflow.training.TrainHook)

class ValidationHook(TrainHook):
    """Validate every ``every`` iterations; keep the best parameters (best.h5); feed the
    stale-loss schedule; raise EarlyStop after ``max_drops`` drops and a further stale period.

    evaluate(model) -> (val_loss, val_nll) floats; plateau: optim.ReduceOnPlateau or None.
    """

    name = "validation"

    def __init__(self, evaluate, every, plateau, max_drops, best_path, log_json, n_iters,
                 target=None, root=True):
        self.evaluate, self.every, self.plateau = evaluate, int(every), plateau
        self.max_drops, self.best_path, self.log_json = int(max_drops), best_path, log_json
        self.n_iters, self.target = n_iters, target
        self.root = root                # MPI rank 0 (or one process): it writes best.h5
        self.t_start = time.perf_counter()
        self.val_seconds = 0.0          # time spent validating (excluded from training time)
        self.nfe_total = 0              # forward + backward NFE of all training iterations
        self.best = math.inf
        self.best_nll = math.nan
        self.best_iter = 0
        self.drops = 0
        self.stopped = False

    def after_step(self, model, x, rng, it, stats):
        from npflow.solvers import SolverError
        from npflow.training import append_json
        done = common.validation_due(self, it, stats)
        if done is None:
            return {}
        t = time.perf_counter()
        try:
            loss, nll = self.evaluate(model)
        except SolverError as exc:
            raise FloatingPointError(f"validation: {exc}") from exc
        if not math.isfinite(loss):
            raise FloatingPointError(f"validation loss is {loss}")
        improved = loss < self.best
        if improved:
            self.best, self.best_nll, self.best_iter = loss, nll, done
            if self.root:
                model.save(self.best_path, iteration=done,
                           extra={"val_loss": loss, "val_nll": nll})
        dropped = False
        if self.plateau is not None and self.plateau.update(loss):
            # stale for more than `patience` validations: drop the lr, or stop after max_drops
            dropped = True
            if self.drops >= self.max_drops:
                self.stopped = True
            else:
                self.drops += 1
        self.val_seconds += time.perf_counter() - t
        rec = {"iteration": done, "val_loss": loss, "val_nll": nll, "best_val_loss": self.best,
               "best_iteration": self.best_iter, "lr_drops": self.drops,
               "val_seconds": time.perf_counter() - t,
               "train_seconds": time.perf_counter() - self.t_start - self.val_seconds,
               "nfe_total": self.nfe_total}
        print(f"  validation @ {done}: loss {loss:.4f}, nll {nll:.4f} "
              f"{'(best)' if improved else f'(best {self.best:.4f} @ {self.best_iter})'}"
              f"{' | lr dropped' if dropped and not self.stopped else ''}", flush=True)
        append_json(self.log_json, rec)
        if self.target is not None and nll <= self.target:
            self.stopped = True
            raise EarlyStop(f"validation NLL {nll:.4f} <= target {self.target} at iteration "
                            f"{done} after {rec['train_seconds']:.1f} s of training and "
                            f"{self.nfe_total} function evaluations")
        if self.stopped:
            raise EarlyStop(f"validation loss stale after {self.drops} lr drops; stopping at "
                            f"iteration {done} (best {self.best:.4f} at {self.best_iter})")
        return {}

    def state_dict(self):
        return {"best": self.best if math.isfinite(self.best) else None,
                "best_nll": self.best_nll if math.isfinite(self.best_nll) else None,
                "best_iter": self.best_iter, "drops": self.drops, "stopped": self.stopped,
                "nfe_total": self.nfe_total}

    def load_state_dict(self, state):
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.best_nll = math.nan if state["best_nll"] is None else float(state["best_nll"])
        self.best_iter, self.drops = int(state["best_iter"]), int(state["drops"])
        self.stopped = bool(state["stopped"])
        self.nfe_total = int(state.get("nfe_total", 0))


# --------------------------------------------------------------------------------------------

def evaluation_functions(args, settings, data, is_toy):
    """(validate(model) -> (loss, nll), test(model) -> (log p array, extra dict))."""
    from npflow.backend import to_host
    eval_batch = args.eval_batch or (10000 if args._method == "otflow" else 1000)
    if args._method == "otflow":
        def validate(model):
            c = model.evaluate(data["val"], steps=settings["nt_val"], batch_size=eval_batch)
            return c["loss"], c["nll"]

        def test(model):
            lp = model.log_prob(data["test"], steps=settings["nt_test"], batch_size=eval_batch)
            return to_host(lp).astype(np.float64), {"rk4_steps": settings["nt_test"]}
        return validate, test
    trace = "exact" if data["dim"] <= 10 else "hutchinson"

    def validate(model):
        lp = model.log_prob(data["val"], trace=trace, rng=np.random.default_rng([args.seed, 7]),
                            rtol=args.rtol, atol=args.atol, batch_size=eval_batch,
                            solver=model.config["solver"])
        nll = float(-to_host(lp).mean())
        return nll, nll

    def test(model):
        lp, nfe = model.log_prob(data["test"], trace=trace,
                                 rng=np.random.default_rng([args.seed, 8]), rtol=args.rtol,
                                 atol=args.atol, batch_size=eval_batch, solver="dopri5",
                                 return_nfe=True)
        return to_host(lp).astype(np.float64), {"trace": trace, "test_nfe": nfe}
    return validate, test


def main(argv=None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, argv)
    comm = common.init_ranks(args)       # MPI ranks under mpiexec (docs/parallel.md), else one
    # one BLAS thread (5 OT-Flow iterations took 57 s with a threaded BLAS against 2 s with one
    # thread, on a busy 2-core machine) and malloc keeping freed memory (1.3-2.2x faster here)
    common.tune_host(args)
    import npflow
    from npflow.data import TOY_NAMES
    from npflow.optim import Adam, Chain, ReduceOnPlateau, StepDecay
    from npflow.training import append_json, train

    methods = common.parse_methods(args.method, METHODS)
    if len(methods) > 1:
        fail(f"train_tabular.py trains one method at a time, got {args.method!r}")
    args._method = next(iter(methods))
    is_toy = args.data in TOY_NAMES
    if args.atol is None:
        args.atol = 1e-5 if is_toy else 1e-8
    if args.rtol is None:
        args.rtol = 1e-5 if is_toy else 1e-6
    try:
        for name, v in (("--atol", args.atol), ("--rtol", args.rtol)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be > 0 and finite, got {v}")
        settings = resolve_settings(args, is_toy)
        data = load_data(args, settings)
    except ValueError as exc:
        fail(exc)
    try:
        model = build_model(args, settings, data["dim"], is_toy)
    except ValueError as exc:
        fail(f"cannot build the model: {exc}")
    except npflow.DeviceError as exc:
        fail(f"cannot build the model: {exc}; or use --device cpu")
    with common.open_run(args, model_keys=MODEL_KEYS,
                         extra_model={k: settings[k] for k in ("width", "alpha", "hidden",
                                                                "blocks", "activation", "T")
                                      if k in settings}, comm=comm) as rf:
        return _train_and_test(args, rf, settings, data, model, is_toy, append_json, train,
                               Adam, Chain, ReduceOnPlateau, StepDecay, comm)


def _train_and_test(args, rf, settings, data, model, is_toy, append_json, train, Adam, Chain,
                    ReduceOnPlateau, StepDecay, comm):
    import npflow
    # optimiser: step decay (toy) and/or drops on a stale validation loss (tabular)
    gamma = 1.0 / settings["lr_drop"]
    parts = []
    if settings["drop_freq"]:
        parts.append(StepDecay(settings["drop_freq"], gamma))
    plateau = None
    if not settings["drop_freq"] and args.patience > 0:
        plateau = ReduceOnPlateau(gamma=gamma, patience=args.patience, threshold=0.0)
        parts.append(plateau)
    schedule = None if not parts else (parts[0] if len(parts) == 1 else Chain(*parts))
    time_names = set(model.time_names) if args._method == "toflow" else set()
    optimizer = Adam({k: v for k, v in model.params.items() if k not in time_names},
                     lr=settings["lr"], weight_decay=settings["weight_decay"],
                     decoupled=False, schedule=schedule)

    val_every = args.val_every or (25 if is_toy else
                                   max(1, math.ceil(data["n_train"] / settings["batch"])))
    best_path = rf.path("best.h5")
    validate, test = evaluation_functions(args, settings, data, is_toy)
    hooks = common.method_hooks(model, {args._method}, args,
                                args.steer_b if args.steer_b is not None else
                                0.5 * model.config["T"], comm=comm)
    if settings["clamp"]:
        hooks.append(ClampHook(settings["clamp"]))
    vhook = ValidationHook(validate, val_every, plateau, args.max_drops, best_path,
                           args.log_json if comm.root else None, settings["niters"],
                           target=args.target_val_nll, root=comm.root)
    hooks.append(vhook)

    shown = {k: v for k, v in settings.items()}
    print(f"npflow {args._method} on {args.data} (d = {data['dim']}): {model.num_params()} "
          f"parameters; {shown}; validation every {val_every} iterations", flush=True)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    status, message = "done", ""
    try:
        kw = rf.train_kwargs()
        if kw["checkpoint_every"] is None:
            kw["checkpoint_every"] = max(args.log_every, val_every)
        result = train(model, optimizer, data["sample_batch"], settings["niters"], rng,
                       hooks=hooks, print_fn=lambda m: print(m, flush=True), comm=comm,
                       **kw)
    except npflow.CheckpointError as exc:
        fail(f"cannot resume: {exc}")
    except EarlyStop as exc:
        status, message = "early-stopped", str(exc)
        iterations = vhook.best_iter
        print(message, flush=True)
    else:
        code = rf.finish(result)
        if code is not None:
            return code
        status, message, iterations = result.status, result.message, result.iteration
        print(message, flush=True)
    train_seconds = time.perf_counter() - t0
    if not comm.root:                    # the test evaluation: rank 0 alone
        return 0

    # test with the best validated parameters, more RK4 steps than training
    if os.path.exists(best_path):
        best = npflow.load(best_path)
        model.set_params(best.params)
    t1 = time.perf_counter()
    lp, extra = test(model)
    test_nll = float(-lp.mean())
    stderr = float(lp.std() / math.sqrt(len(lp)))
    final = {"test_nll": test_nll, "test_nll_stderr": stderr, "test_n": int(len(lp)),
             "test_seconds": time.perf_counter() - t1, "data": args.data, "model": args._method,
             "status": status, "iterations": int(iterations),
             "best_val_loss": vhook.best if vhook.best_iter else None,
             "best_val_nll": vhook.best_nll if vhook.best_iter else None,
             "best_iteration": vhook.best_iter, "train_seconds_this_run": train_seconds,
             "train_seconds_without_validation": train_seconds - vhook.val_seconds,
             "nfe_total": vhook.nfe_total,
             **extra}
    best_txt = (f"best validation loss {vhook.best:.4f} (NLL {vhook.best_nll:.4f}) at iteration "
                f"{vhook.best_iter}" if vhook.best_iter else
                "no validation ran (no training iterations): the untrained model was tested")
    print(f"test NLL {test_nll:.4f} ± {stderr:.4f} nats on {len(lp)} points "
          f"({', '.join(f'{k} {v}' for k, v in extra.items())}); {best_txt}")
    if not math.isfinite(test_nll):
        fail(f"the test NLL is {test_nll}: the trained model gives non-finite densities on the "
             "test data; lower the learning rate or check the data", 1)
    common.write_result(args, rf, final)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
