#!/usr/bin/env python
"""OT-Flow (or an FFJORD CNF) in an autoencoder's latent space: MNIST generation and
interpolation (docs/latent.md; OT-Flow's "MNIST Synthetic Generation").

    python examples/train_latent.py                                  # CPU budget (below)
    python examples/train_latent.py --model ffjord --ae-load runs/latent/autoencoder.h5 ...
    python examples/train_latent.py --ae-epochs 600 --niters 50000 --batch-size 800 \
        --nt-test 16 --test-n 10000                                  # the reference's run length
    python examples/train_latent.py --hidden 512,256 --dim 16 --ae-epochs 20 --niters 3000 \
        --batch-size 256 --time-limit 1800    # recognisable digits on a CPU (docs/latent.md §7)

Stage 1 trains the autoencoder (npflow.autoencoder: 784 -> 128 linear + ReLU, 128 -> 784
linear + sigmoid, MSE, Adam 1e-3 divided by 10 every 150 epochs, batch 800; --hidden adds
layers), keeps the parameters of the best validation epoch, and standardizes the codes by their
training mean and standard deviation (saved in autoencoder.h5). Unlike the reference's trainAE,
no optimizer step is taken on validation batches: validation only measures.
Stage 2 trains the flow on the standardized codes: OT-Flow with the reference's MNIST settings
(d = 128, m = 128, depth 2, α = (1, 80, 500), RK4 8 steps in training and 16 in validation,
Adam 0.008 divided by √10 every 5000 iterations, parameters clamped to [−2, 2] before every
step, float64), or FFJORD (npflow.CNF: ConcatSquash MLP, Hutchinson trace, dopri5, trained T).

CPU budget of the defaults: the OT-Flow settings above are the reference's, the run length is
not: --ae-epochs 30, --niters 1000, --batch-size 64, validation on 500 codes every 50
iterations, test NLL on --test-n 1000 codes. One OT-Flow iteration at d = m = 128 costs
O(B·m²·d) for the exact trace; at the reference batch of 800 it is ~40 s on one busy core.

Run folder, lock, signals and one-line errors come from examples/common.py: a new --save
folder per run (--resume continues it, reusing its autoencoder.h5 and the flow's checkpoint;
--force replaces it); SIGINT / SIGTERM during training write a checkpoint and exit 130 / 143.
Outputs in --save DIR: autoencoder.h5,
checkpoint.h5 / best.h5 (the flow), samples.png (generated digits D(f⁻¹(z))),
interpolation.png (rows y(λ), λ = 0..1, between pairs of test images, the originals boxed in
red), curves.png, result.json. Printed: latent test NLL (nats, per dimension), the
autoencoder's test MSE, NFE, the f⁻¹∘f round-trip error, and the label histogram of generated
digits given by a logistic-regression referee trained here on MNIST (--no-classifier skips it).
--log-json PATH appends one JSON object per log line and a last one holding "test_nll".
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py: shared flags, run folder, lock, signals)

from npflow.training import ClampHook, TrainHook  # noqa: E402

MODELS = ("otflow", "ffjord")


def build_parser():
    p = common.make_parser("OT-Flow / FFJORD on an autoencoder's MNIST codes (npflow).",
                           script=__file__)
    common.add_run_arguments(p, niters=1000, save="runs/latent", log_every=10, dtype="float64")
    a = p.add_argument
    a("--data", default="mnist", choices=["mnist", "fashion-mnist"])
    a("--model", default="otflow", choices=MODELS)
    a("--conditional", type=int, default=-1, metavar="K",
      help="train on digit class K only (0-9); -1: all classes")
    # autoencoder
    a("--ae-epochs", type=int, default=30, help="autoencoder epochs (reference: 600)")
    a("--ae-batch", type=int, default=800, help="autoencoder batch size (reference: 800)")
    a("--ae-lr", type=float, default=1e-3)
    a("--ae-drop-every", type=int, default=150, help="divide the AE lr by 10 every N epochs")
    a("--hidden", default="", help="hidden widths of a deeper encoder, e.g. 512,256 "
      "(decoder mirrored); empty: the reference's one layer each way")
    a("--ae-load", default=None, help="load a trained autoencoder.h5 instead of training one")
    a("--dim", type=int, default=128, help="code dimension d")
    # flow
    a("--batch-size", type=int, default=64, help="flow batch size (reference: 800)")
    a("--lr", type=float, default=None, help="default: OT-Flow 0.008, FFJORD 1e-3")
    a("--drop-freq", type=int, default=5000, help="divide the lr every N iterations")
    a("--lr-drop", type=float, default=math.sqrt(10.0), help="lr divisor")
    a("--width", type=int, default=128, help="OT-Flow: ResNet width m")
    a("--depth", type=int, default=2, help="OT-Flow: number of K layers (nTh)")
    a("--alpha", default="1,80,500", help="OT-Flow: α0,α1,α2 (transport, NLL, HJB)")
    a("--nt", type=int, default=8, help="OT-Flow: RK4 steps in training")
    a("--nt-val", type=int, default=16, help="OT-Flow: RK4 steps for validation")
    a("--nt-test", type=int, default=16, help="OT-Flow: RK4 steps for the test NLL, "
      "sampling and interpolation")
    a("--clamp", type=float, default=2.0, help="clamp parameters to [-c, c] before every "
      "step (0 = off)")
    a("--ffjord-hidden", default="256,256", help="FFJORD: hidden widths")
    a("--atol", type=float, default=1e-5, help="FFJORD: dopri5 atol")
    a("--rtol", type=float, default=1e-5, help="FFJORD: dopri5 rtol")
    # validation, test, budget
    a("--val-every", type=int, default=50)
    a("--val-n", type=int, default=500, help="validation codes (reference: 10000)")
    a("--test-n", type=int, default=1000, help="test codes for the latent NLL (10000 = all)")
    a("--target-val-nll", type=float, default=None,
      help="stop when the validation NLL (nats, standardized codes) reaches this")
    a("--time-limit", type=float, default=None,
      help="stop the flow's training after this many seconds (checked at validations)")
    a("--no-classifier", action="store_true", help="skip the digit referee")
    return p


def _ints(text, name):
    if not text.strip():
        return ()
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers like 256,256, got "
                         f"{text!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"{name} widths must be >= 1, got {text!r}")
    return vals


def check_args(args):
    """Every setting checked before any work; ValueError with a one-line message."""
    for name in ("ae_batch", "dim", "batch_size", "width", "nt", "nt_val", "nt_test",
                 "val_every", "val_n", "test_n", "drop_freq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    for name in ("ae_epochs",):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(args, name)}")
    if args.depth < 2:
        raise ValueError(f"--depth must be >= 2, got {args.depth}")
    if not -1 <= args.conditional <= 9:
        raise ValueError(f"--conditional must be a class 0-9 or -1, got {args.conditional}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit must be > 0 seconds (leave it out for no limit), got "
                         f"{args.time_limit}")
    if args.clamp < 0 or not args.lr_drop >= 1 or (args.lr is not None and args.lr <= 0):
        raise ValueError("--clamp must be >= 0, --lr-drop >= 1 and --lr > 0")
    try:
        alpha = tuple(float(v) for v in args.alpha.split(","))
    except ValueError:
        raise ValueError(f"--alpha must be three numbers like 1,80,500, got "
                         f"{args.alpha!r}") from None
    if len(alpha) != 3:
        raise ValueError(f"--alpha needs three values α0,α1,α2, got {args.alpha!r}")
    hidden = _ints(args.hidden, "--hidden")
    ffjord_hidden = _ints(args.ffjord_hidden, "--ffjord-hidden")
    if args.ae_load and not os.path.isfile(args.ae_load):
        raise ValueError(f"--ae-load {args.ae_load!r} is not a file; give an autoencoder.h5 "
                         "written by this script")
    return alpha, hidden, ffjord_hidden


# --------------------------------------------------------------------------------------------
# data

def load_images(args):
    """(train, val, test) dicts of x (N, 784) float64 in [0, 1] and labels; the reference's
    split: the first 5/6 of the training images (50,000) train, the last 1/6 (10,000)
    validate."""
    from npflow.data import DataError, load_mnist
    try:
        xtr, ytr = load_mnist(args.data_dir, "train", kind=args.data)
        xte, yte = load_mnist(args.data_dir, "test", kind=args.data)
    except (DataError, OSError) as exc:
        raise ValueError(f"cannot load {args.data} from {os.path.abspath(args.data_dir)}: "
                         f"{exc}") from None
    flat = lambda a: a.reshape(a.shape[0], -1).astype(np.float64) / 255.0   # noqa: E731
    xtr, xte = flat(xtr), flat(xte)
    n_tr = len(xtr) - len(xtr) // 6
    parts = {"train": (xtr[:n_tr], ytr[:n_tr]), "val": (xtr[n_tr:], ytr[n_tr:]),
             "test": (xte, yte)}
    out = {}
    for k, (x, y) in parts.items():
        if args.conditional >= 0:
            keep = y == args.conditional
            x, y = x[keep], y[keep]
        out[k] = {"x": x, "y": np.asarray(y, dtype=np.int64)}
    return out


def gaussian_fit_codes(c, n, rng):
    """n draws of N(m, S), m and S the mean and covariance of the codes c (N, d) (docs/latent.md
    eq. 6.4; host numpy, a baseline only): (n, d)."""
    c = np.asarray(c, dtype=np.float64)
    m = c.mean(axis=0)
    S = np.cov(c, rowvar=False).reshape(c.shape[1], c.shape[1])
    w, V = np.linalg.eigh(S)                       # S may be singular (dead code dimensions)
    L = V * np.sqrt(np.clip(w, 0.0, None))
    return m + rng.standard_normal((int(n), c.shape[1])) @ L.T


def epoch_batches(n, batch, seed):
    """sample_batch index function: a fresh permutation per epoch, from (seed, epoch) only, so
    that a resumed run draws the same batches."""
    per_epoch = max(1, n // batch)

    def indices(it):
        epoch, i = divmod(it, per_epoch)
        perm = np.random.default_rng([seed, 17, epoch]).permutation(n)
        return perm[i * batch:(i + 1) * batch]
    return indices, per_epoch


# --------------------------------------------------------------------------------------------
# stage 1: the autoencoder

def train_autoencoder(args, hidden, data, print_fn=print):
    import npflow
    from npflow.autoencoder import Autoencoder
    from npflow.optim import Adam, StepDecay
    from npflow.training import append_json, train

    path = os.path.join(args.save, "autoencoder.h5")
    src = args.ae_load or (path if args.resume and os.path.exists(path) else None)
    if src:
        ae = npflow.load(src)
        if not isinstance(ae, Autoencoder) or ae.z_dim != args.dim:
            raise ValueError(f"{src!r} does not hold an Autoencoder with code dimension "
                             f"{args.dim}")
        print_fn(f"autoencoder loaded from {src}")
        return ae, [], None
    ae = Autoencoder(784, args.dim, hidden=hidden, dtype=args.dtype, device=args.device,
                     seed=args.seed)
    x = data["train"]["x"]
    idx, per_epoch = epoch_batches(len(x), args.ae_batch, args.seed)
    opt = Adam({k: ae.params[k] for k in ae.network_names()}, lr=args.ae_lr,
               schedule=StepDecay(args.ae_drop_every * per_epoch, 0.1))
    best = {"val": math.inf, "params": None, "epoch": 0}
    curve = []

    def on_epoch(rec):
        val = ae.reconstruction_error(data["val"]["x"])
        epoch = rec["iteration"] // per_epoch
        if val < best["val"]:
            best.update(val=val, params=dict(ae.params), epoch=epoch)
        curve.append({"epoch": epoch, "train_mse": rec["loss_avg"], "val_mse": val})
        print_fn(f"  autoencoder epoch {epoch}: train MSE {rec['loss_avg']:.5f}, "
                 f"validation MSE {val:.5f}")
        append_json(args.log_json, {"stage": "autoencoder", "epoch": epoch,
                                    "iteration": rec["iteration"], "loss": rec["loss"],
                                    "train_mse": rec["loss_avg"], "val_mse": val})

    n_iters = args.ae_epochs * per_epoch
    print_fn(f"stage 1: autoencoder {ae.encoder.sizes} / {ae.decoder.sizes}, {args.ae_epochs} "
             f"epochs of {per_epoch} batches of {args.ae_batch}")
    res = None
    if n_iters:
        res = train(ae, opt, lambda rng, it: x[idx(it)], n_iters, np.random.default_rng(
            args.seed), log_every=per_epoch, save_dir=os.path.join(args.save, "ae"),
            resume=args.resume, on_log=[on_epoch], print_fn=lambda s: None)
        if res.status not in ("done", "already-done"):
            return ae, curve, res
        if best["params"] is not None:
            ae.params = best["params"]
            print_fn(f"  best validation MSE {best['val']:.5f} at epoch {best['epoch']}")
    ae.fit_standardization(x)
    ae.save(path)
    return ae, curve, res


# --------------------------------------------------------------------------------------------
# stage 2: the flow

class StopTraining(Exception):
    pass


class ValidationHook(TrainHook):
    """Validate every ``every`` iterations: keep the best parameters (best.h5), log the
    validation NLL with the training time (validation excluded) and the NFE so far; stop at a
    target NLL or a time limit."""

    name = "validation"

    def __init__(self, validate, every, n_iters, best_path, log_json, target=None,
                 time_limit=None, print_fn=print):
        self.validate, self.every, self.n_iters = validate, int(every), int(n_iters)
        self.best_path, self.log_json, self.print_fn = best_path, log_json, print_fn
        self.target, self.time_limit = target, time_limit
        self.t_start = time.perf_counter()
        self.val_seconds = 0.0
        self.nfe_total = 0
        self.best, self.best_iter = math.inf, 0
        self.curve = []

    def after_step(self, model, x, rng, it, stats):
        from npflow.training import append_json
        done = common.validation_due(self, it, stats)
        if done is None:
            return {}
        t = time.perf_counter()
        loss, nll = self.validate(model)
        if not math.isfinite(nll):
            raise FloatingPointError(f"validation NLL is {nll}")
        if loss < self.best:
            self.best, self.best_iter = loss, done
            model.save(self.best_path, iteration=done, extra={"val_loss": loss, "val_nll": nll})
        self.val_seconds += time.perf_counter() - t
        train_s = time.perf_counter() - self.t_start - self.val_seconds
        rec = {"iteration": done, "val_loss": loss, "val_nll": nll,
               "val_nll_per_dim": nll / model.dim, "train_seconds": train_s,
               "nfe_total": self.nfe_total}
        self.curve.append(rec)
        self.print_fn(f"  validation @ {done}: loss {loss:.4f}, NLL {nll:.4f} nats "
                      f"({nll / model.dim:.4f}/dim), {train_s:.0f} s of training, "
                      f"{self.nfe_total} NFE")
        append_json(self.log_json, rec)
        if self.target is not None and nll <= self.target:
            raise StopTraining(f"validation NLL {nll:.4f} <= target {self.target} at "
                               f"iteration {done}: {train_s:.1f} s, {self.nfe_total} NFE")
        if self.time_limit is not None and train_s >= self.time_limit:
            raise StopTraining(f"time limit {self.time_limit:.0f} s reached at iteration "
                               f"{done}")
        return {}

    def state_dict(self):
        return {"best": self.best if math.isfinite(self.best) else None,
                "best_iter": self.best_iter, "nfe_total": self.nfe_total,
                "curve": json.dumps(self.curve)}

    def load_state_dict(self, state):
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.best_iter, self.nfe_total = int(state["best_iter"]), int(state["nfe_total"])
        self.curve = json.loads(state.get("curve", "[]"))


def build_flow(args, alpha, ffjord_hidden):
    import npflow
    if args.model == "otflow":
        return npflow.OTFlow(args.dim, width=args.width, depth=args.depth, alpha=alpha,
                             steps=args.nt, T=1.0, dtype=args.dtype, device=args.device,
                             seed=args.seed)
    return npflow.CNF(args.dim, hidden=ffjord_hidden, layer="concatsquash",
                      activation="softplus", T=1.0, train_T=True, solver="dopri5",
                      rtol=args.rtol, atol=args.atol, trace="hutchinson", dtype=args.dtype,
                      device=args.device, seed=args.seed)


def validation_function(args, model, codes_val):
    from npflow.backend import to_host
    if args.model == "otflow":
        def validate(m):
            c = m.evaluate(codes_val, steps=args.nt_val, batch_size=500)
            return c["loss"], c["nll"]
        return validate

    def validate(m):
        lp = m.log_prob(codes_val, trace="hutchinson", rng=np.random.default_rng([args.seed, 7]),
                        rtol=args.rtol, atol=args.atol, batch_size=500)
        nll = float(-to_host(lp).mean())
        return nll, nll
    return validate


# --------------------------------------------------------------------------------------------
# figures

def interpolation_figure(lf, x1, x2, lambdas, path):
    """Rows: original x2 (red box), y(λ) for the lambdas, original x1 (red box) (eq. 4.2)."""
    from npflow.backend import to_host
    from npflow.plotting import _plt, _save
    plt = _plt()
    y = np.asarray(to_host(lf.interpolate(x1, x2, lambdas)))
    P, L = y.shape[:2]
    fig, axes = plt.subplots(P, L + 2, figsize=(0.9 * (L + 2), 0.95 * P + 0.4), squeeze=False)
    for p in range(P):
        row = [x2[p]] + [y[p, j] for j in range(L)] + [x1[p]]
        for j, img in enumerate(row):
            ax = axes[p, j]
            ax.imshow(np.asarray(img).reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            original = j in (0, L + 1)
            for s in ax.spines.values():
                s.set_visible(original)
                if original:
                    s.set_color("red")
                    s.set_linewidth(2.5)
            if p == 0:
                ax.set_title("x2" if j == 0 else "x1" if j == L + 1 else
                             f"λ={lambdas[j - 1]:.2g}", fontsize=7)
    fig.suptitle("y(λ) = D(f⁻¹(λ f(B(x1)) + (1 − λ) f(B(x2)))), originals in red", fontsize=8)
    return _save(fig, path)


def curves_figure(ae_curve, history, val_curve, path):
    """Autoencoder MSE per epoch; the flow's training loss; training and validation NLL;
    NFE per iteration."""
    from npflow.plotting import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.4))
    if ae_curve:
        e = [r["epoch"] for r in ae_curve]
        ax[0].plot(e, [r["train_mse"] for r in ae_curve], label="train")
        ax[0].plot(e, [r["val_mse"] for r in ae_curve], label="validation")
        ax[0].set_yscale("log")
        ax[0].legend()
    ax[0].set_title("autoencoder MSE")
    ax[0].set_xlabel("epoch")
    it = np.asarray(history.get("iteration", []))
    if len(it):
        ax[1].plot(it, history["loss"], lw=0.6)
        ax[1].set_yscale("log")
        ax[2].plot(it, history["nll"], lw=0.6, label="training batch")
        ax[3].plot(it, np.asarray(history["nfe_forward"]) + np.asarray(history["nfe_backward"]),
                   lw=0.8)
    if val_curve:
        ax[2].plot([r["iteration"] for r in val_curve], [r["val_nll"] for r in val_curve],
                   "o-", ms=3, label="validation")
    ax[1].set_title("flow training loss")
    ax[2].set_title("NLL of standardized codes (nats)")
    ax[2].legend()
    ax[3].set_title("NFE per iteration (forward + backward)")
    for a in ax[1:]:
        a.set_xlabel("iteration")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, argv)
    try:
        alpha, hidden, ffjord_hidden = check_args(args)
    except ValueError as exc:
        common.fail(str(exc))
    import npflow
    npflow.tune_malloc()
    try:
        data = load_images(args)
        flow = build_flow(args, alpha, ffjord_hidden)
    except (ValueError, npflow.DeviceError) as exc:
        common.fail(str(exc))
    model_keys = ("data", "model", "conditional", "dim", "hidden", "ae_epochs", "ae_batch",
                  "ae_lr", "ae_drop_every", "ae_load", "width", "depth", "alpha", "nt",
                  "ffjord_hidden", "dtype", "seed")
    with common.open_run(args, model_keys=model_keys) as run:
        return run_stages(args, run, data, flow, hidden)


def run_stages(args, run, data, flow, hidden):
    """Stage 1 (autoencoder), stage 2 (flow), evaluation and figures, inside the open run."""
    import npflow
    from npflow.backend import to_host
    from npflow.latent import LatentFlow, SoftmaxRegression
    from npflow.optim import Adam, StepDecay
    from npflow.plotting import image_grid
    from npflow.training import train
    t_all = time.perf_counter()

    # stage 1
    try:
        ae, ae_curve, res = train_autoencoder(args, hidden, data)
    except ValueError as exc:
        common.fail(f"autoencoder: {exc}")
    status = None if res is None else run.finish(res)
    if status is not None:
        return status
    ae_test_mse = ae.reconstruction_error(data["test"]["x"])
    print(f"autoencoder test MSE {ae_test_mse:.5f}", flush=True)
    codes = {k: np.asarray(to_host(ae.standardize(ae.encode(v["x"]))), dtype=np.float64)
             for k, v in data.items()}
    codes["val"] = codes["val"][:args.val_n]
    codes["test"] = codes["test"][:args.test_n]
    dead = int((to_host(ae.params["code_std"]) == 0).sum())

    # stage 2
    lr = args.lr if args.lr is not None else (0.008 if args.model == "otflow" else 1e-3)
    time_names = set(flow.time_names) if getattr(flow, "config", {}).get("train_T") else set()
    opt = Adam({k: v for k, v in flow.params.items()}, lr=lr,
               weight_decay=0.0 if args.model == "otflow" else 1e-6, decoupled=False,
               schedule=StepDecay(args.drop_freq, 1.0 / args.lr_drop))
    hooks = []
    if args.clamp and args.model == "otflow":
        clamp = ClampHook(args.clamp)
        clamp.clamp(flow)
        hooks.append(clamp)
    best_path = os.path.join(args.save, "best.h5")
    vhook = ValidationHook(validation_function(args, flow, codes["val"]), args.val_every,
                           args.niters, best_path, args.log_json, args.target_val_nll,
                           args.time_limit)
    hooks.append(vhook)
    xtr = codes["train"]
    idx, _ = epoch_batches(len(xtr), min(args.batch_size, len(xtr)), args.seed + 1)
    print(f"stage 2: {args.model} on {xtr.shape[1]}-d standardized codes ({len(xtr)} train, "
          f"{len(codes['val'])} validation, {len(codes['test'])} test; {dead} dead code "
          f"dimensions), {flow.num_params()} parameters, {args.niters} iterations of batch "
          f"{args.batch_size}, lr {lr}, {args.dtype}" + (f", T trained ({sorted(time_names)})"
                                                       if time_names else ""), flush=True)
    status, message, history = "done", "", {}
    t0 = time.perf_counter()
    kw = run.train_kwargs()
    if kw["checkpoint_every"] is None and kw["checkpoint_seconds"] is None:
        kw["checkpoint_every"] = args.val_every
    try:
        res = train(flow, opt, lambda rng, it: xtr[idx(it)], args.niters,
                    np.random.default_rng(args.seed), hooks=hooks, **kw)
        status, message, history = res.status, res.message, res.history
    except StopTraining as exc:
        status, message, res = "stopped", str(exc), None
    train_seconds = time.perf_counter() - t0
    print(message, flush=True)
    best_path_exists = os.path.exists(best_path)
    if res is not None and res.status in ("diverged", "nonfinite") and best_path_exists:
        print(f"note: evaluating the best validated parameters ({best_path}, iteration "
              f"{vhook.best_iter})", flush=True)
    elif res is not None:
        code = run.finish(res)
        if code is not None:
            return code
    if not history:
        from npflow.checkpoint import load_training_state
        ck = os.path.join(args.save, "checkpoint.h5")
        if os.path.exists(ck):
            history = (load_training_state(ck)["extra"] or {}).get("history", {})
    if os.path.exists(best_path):
        flow.set_params(npflow.load(best_path).params)

    # evaluation with the best validated flow
    lf = LatentFlow(ae, flow, steps=args.nt_test, rtol=args.rtol, atol=args.atol)
    t1 = time.perf_counter()
    kw = {} if args.model == "otflow" else {"trace": "hutchinson", "rng": np.random.default_rng(
        [args.seed, 8]), "batch_size": 500, "return_nfe": True}
    out = lf.log_prob_codes(codes["test"], **kw)
    lp, test_nfe = (out, 4 * args.nt_test) if args.model == "otflow" else out
    lp = np.asarray(to_host(lp), dtype=np.float64)
    d = args.dim
    test_nll = float(-lp.mean())
    nll_b = test_nll - ae.standardize_log_det()
    test_seconds = time.perf_counter() - t1
    rt = lf.roundtrip_error(data["test"]["x"][:100])
    rng = np.random.default_rng([args.seed, 9])
    gen = np.asarray(to_host(lf.generate(1000 if not args.no_classifier else 64, rng)))
    image_grid(gen[:64].reshape(-1, 1, 28, 28), os.path.join(args.save, "samples.png"))
    te = data["test"]["x"]
    pairs = max(1, min(6, len(te) // 2))
    pick = np.random.default_rng([args.seed, 10]).choice(len(te), 2 * pairs,
                                                         replace=len(te) < 2 * pairs)
    lambdas = np.linspace(0.0, 1.0, 9)
    interpolation_figure(lf, te[pick[:pairs]], te[pick[pairs:]], lambdas,
                         os.path.join(args.save, "interpolation.png"))
    curves_figure(ae_curve, {k: np.asarray(v) for k, v in history.items()}, vhook.curve,
                  os.path.join(args.save, "curves.png"))

    final = {"test_nll": test_nll, "test_nll_per_dim": test_nll / d,
             "test_nll_stderr": float(lp.std() / math.sqrt(len(lp))),
             "test_nll_code_space": nll_b, "test_nll_code_space_per_dim": nll_b / d,
             "test_n": int(len(lp)), "test_nfe": test_nfe, "test_seconds": test_seconds,
             "ae_test_mse": ae_test_mse, "dead_code_dimensions": dead,
             "roundtrip_code_max_abs": rt["code_max_abs"],
             "roundtrip_image_max_abs": rt["image_max_abs"], "model": args.model,
             "status": status, "best_iteration": vhook.best_iter, "best_val_loss": vhook.best,
             "nfe_total_training": vhook.nfe_total, "train_seconds": train_seconds,
             "train_seconds_without_validation": train_seconds - vhook.val_seconds,
             "conditional": args.conditional}
    if not args.no_classifier:
        t2 = time.perf_counter()
        clf = SoftmaxRegression()
        sub = np.random.default_rng([args.seed, 11]).choice(len(data["train"]["x"]),
                                                            min(20000, len(data["train"]["x"])),
                                                            replace=False)
        clf.fit(data["train"]["x"][sub], data["train"]["y"][sub], iters=200)
        acc = clf.accuracy(te, data["test"]["y"])
        rec = np.asarray(to_host(ae.decode(ae.encode(te[:2000]))))
        acc_rec = clf.accuracy(rec, data["test"]["y"][:2000])
        labels = clf.predict(gen)
        hist = np.bincount(labels, minlength=10).tolist()
        conf = float(clf.probabilities(gen).max(axis=1).mean())
        conf_real = float(clf.probabilities(te[:2000]).max(axis=1).mean())
        # baseline without the flow: decode z ~ N(0, I) as if it were a standardized code
        plain = np.asarray(to_host(lf.decode_codes(np.random.default_rng(
            [args.seed, 12]).standard_normal((1000, d)))))
        final.update(no_flow_label_histogram=np.bincount(clf.predict(plain),
                                                         minlength=10).tolist(),
                     no_flow_mean_confidence=float(clf.probabilities(plain).max(axis=1).mean()))
        # a stronger baseline: the best Gaussian, N(mean, covariance) of the training codes
        # (docs/latent.md eq. 6.4); a flow that has learned more than second moments beats it
        g = gaussian_fit_codes(codes["train"], 1000, np.random.default_rng([args.seed, 13]))
        gauss = np.asarray(to_host(lf.decode_codes(g)))
        final.update(gaussian_fit_label_histogram=np.bincount(clf.predict(gauss),
                                                              minlength=10).tolist(),
                     gaussian_fit_mean_confidence=float(
                         clf.probabilities(gauss).max(axis=1).mean()))
        final.update(classifier_test_accuracy=acc, classifier_reconstruction_accuracy=acc_rec,
                     generated_label_histogram=hist, generated_mean_confidence=conf,
                     test_mean_confidence=conf_real,
                     classifier_seconds=time.perf_counter() - t2)
    print(f"latent test NLL {test_nll:.3f} ± {final['test_nll_stderr']:.3f} nats "
          f"({test_nll / d:.4f} per dimension) on {len(lp)} standardized codes; in code space "
          f"(with the standardization's Jacobian) {nll_b:.3f} nats ({nll_b / d:.4f}/dim)")
    print(f"autoencoder test MSE {ae_test_mse:.5f}; test NFE {test_nfe}; training NFE "
          f"{vhook.nfe_total}; f⁻¹∘f error on 100 test codes: {rt['code_max_abs']:.2e} (codes), "
          f"{rt['image_max_abs']:.2e} (decoded pixels)")
    if not args.no_classifier:
        print(f"digit referee (logistic regression, test accuracy {final['classifier_test_accuracy']:.3f}, "
              f"on reconstructions {final['classifier_reconstruction_accuracy']:.3f}): labels of "
              f"1000 generated digits {final['generated_label_histogram']}, mean confidence "
              f"{final['generated_mean_confidence']:.3f} (real test digits "
              f"{final['test_mean_confidence']:.3f}); without the flow (D(μ + s z)): "
              f"{final['no_flow_label_histogram']}, confidence "
              f"{final['no_flow_mean_confidence']:.3f}; codes drawn from the Gaussian fit "
              f"N(mean, cov) of the training codes: {final['gaussian_fit_label_histogram']}, "
              f"confidence {final['gaussian_fit_mean_confidence']:.3f}")
    print(f"figures in {args.save}: samples.png, interpolation.png, curves.png; total "
          f"{time.perf_counter() - t_all:.0f} s", flush=True)
    common.write_result(args, run, final)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
