#!/usr/bin/env python
"""Train a VAE with a flow posterior on MNIST or Fashion-MNIST (docs/vae.md).

    python examples/train_vae.py --flow householder --labels
    python examples/train_vae.py --flow cnf --num-flows 1 --subset 5000 --epochs 5 --iwae-k 500
    python examples/train_vae.py --flow none --likelihood logistic256     # 8-bit, bits/dim

The model (npflow.VAE): MLP encoder (--hidden) whose head gives μ, σ = softplus(s) and every
flow's per-sample parameters, --num-flows flows of kind --flow (planar; orthogonal, Householder,
triangular Sylvester; or FFJORD's amortized low-rank CNF), MLP decoder, prior N(0, I).
Likelihood: "bernoulli" on dynamically binarized images (each batch re-binarized with
x ~ Bernoulli(pixel/255); validation and test images binarized once with a fixed seed), or
"logistic256" (a discretized logistic per pixel, NLL also in bits/dim).

--labels: heterogeneous data as in the study: the class label, scaled to (y + ½)/10 ∈ (0, 1),
is one more input column, and the decoder gives it back through a discretized logistic with 10
bins (docs/vae.md eq. 2.8): log p(x, y | z) = log p(x | z) + log p(y | z) enters the ELBO, so the
NLL is that of the pair (image, label), and every sample carries the label the model gives it.

Training: Adam (--lr), β warm-up of the KL term from --beta-start to 1 over --warmup-epochs
(eq. 6.1), early stopping on the validation −ELBO (the last --val-n training images) with
patience --early-stopping epochs counted after the warm-up; the best parameters are kept
(best.h5). At the end: test −ELBO (one sample) and the importance-sampled NLL with --iwae-k
samples (k = 5000 as in the Sylvester paper; fewer with --iwae-k) on --test-n test images.

Run folder and flags as in every example (examples/common.py): --save DIR is refused when it
holds a run unless --resume (continue it) or --force (start afresh); a lock keeps a second
process out; DIR/args.json records the settings. Written there: checkpoint.h5 (every epoch, or
--save-every), best.h5, state.json (epoch, validation curve, early-stopping counter),
result.json, and the figures reconstructions.png, samples.png (with the decoded labels when
--labels), curves.png. SIGINT / SIGTERM finish the iteration, write the checkpoint and print
the command that resumes (exit 130 / 143). --log-json PATH appends one JSON object per log
line (iteration, loss; per epoch also val_nelbo) and a last one holding test_nll (nats; with
logistic256 also test_bpd). --niters caps the total iterations (by default the epochs decide).
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

DATASETS = ("mnist", "fashion-mnist")
FLOWS = ("none", "planar", "orthogonal", "householder", "triangular", "cnf")
IMAGE_SHAPE = (1, 28, 28)
# flags that define the model: a --resume with any of them changed is refused
MODEL_KEYS = ("data", "flow", "num_flows", "householder", "ortho_m", "labels", "label_channel",
              "likelihood",
              "z_dim", "hidden", "activation", "cnf_hidden", "cnf_rank", "cnf_T", "cnf_steps",
              "cnf_solver", "dtype", "seed")


def build_parser():
    p = common.make_parser("Train a VAE with a flow posterior (npflow).", script=__file__)
    common.add_run_arguments(p, niters=10 ** 9, save="runs/vae", log_every=100)
    a = p.add_argument
    a("--data", default="mnist", help="mnist | fashion-mnist")
    a("--no-download", action="store_true", help="never download missing data files")
    a("--flow", default="householder", help="none | planar | orthogonal | householder | "
      "triangular | cnf")
    a("--num-flows", type=int, default=None,
      help="flows (CNF blocks for cnf); default 4 (1 for cnf, 0 for none)")
    a("--householder", type=int, default=8, help="Householder reflections per flow (H)")
    a("--ortho-m", type=int, default=None, help="orthonormal columns M (default z-dim/2)")
    a("--labels", action="store_true",
      help="append the label scaled to (y+½)/10 as an input column and decode it back")
    a("--label-channel", action="store_true",
      help="with --labels: feed and decode the label as a whole 28×28 channel (784 copies of "
           "the column), as the study does, instead of one column")
    a("--likelihood", default="bernoulli", help="bernoulli | logistic256")
    a("--z-dim", type=int, default=32, help="latent size (the Sylvester paper: 64)")
    a("--hidden", default="300,300", help="encoder widths (decoder mirrored)")
    a("--activation", default="relu")
    a("--cnf-hidden", default="64,64", help="widths of the amortized CNF's network")
    a("--cnf-rank", type=int, default=1, help="rank r of the per-sample weight correction")
    a("--cnf-T", type=float, default=0.5, help="end time of every CNF block")
    a("--cnf-steps", type=int, default=4, help="steps of the CNF's fixed-grid solver")
    a("--cnf-solver", default="rk4", choices=["rk4", "rk38", "midpoint", "euler", "dopri5"])
    a("--subset", type=int, default=None, help="train on the first N training images only")
    a("--val-n", type=int, default=10000,
      help="validation images, taken from the end of the training set")
    a("--test-n", type=int, default=None, help="test images for the final evaluation (all)")
    a("--epochs", type=int, default=100, help="maximum number of epochs")
    a("--batch-size", type=int, default=100)
    a("--lr", type=float, default=5e-4)
    a("--grad-clip", type=float, default=None, help="max global gradient norm")
    a("--beta-start", type=float, default=0.01, help="β at the first iteration")
    a("--warmup-epochs", type=float, default=100,
      help="epochs over which β rises linearly to 1 (0: β = 1 throughout)")
    a("--early-stopping", type=int, default=100,
      help="stop after this many epochs without a better validation −ELBO (after warm-up)")
    a("--iwae-k", type=int, default=5000, help="importance samples of the test NLL")
    a("--iwae-rows", type=int, default=5000,
      help="rows (images × samples) per IWAE chunk: bounds memory")
    a("--no-figures", action="store_true")
    return p


def _ints(text, name):
    try:
        v = tuple(int(h) for h in str(text).replace("-", ",").split(",") if h.strip())
    except ValueError:
        raise ValueError(f"{name} must be integers like 300,300, got {text!r}") from None
    if not v or min(v) < 1:
        raise ValueError(f"{name} widths must be >= 1, got {text!r}")
    return v


def check_args(args):
    """Every input checked before data or training: ValueError with one line."""
    if args.data not in DATASETS:
        raise ValueError(f"--data {args.data!r}: expected one of {', '.join(DATASETS)}")
    if args.flow not in FLOWS:
        raise ValueError(f"--flow {args.flow!r} does not exist: expected one of "
                         f"{', '.join(FLOWS)}")
    if args.likelihood not in ("bernoulli", "logistic256"):
        raise ValueError(f"--likelihood {args.likelihood!r}: expected bernoulli or logistic256")
    if args.num_flows is None:
        args.num_flows = 0 if args.flow == "none" else (1 if args.flow == "cnf" else 4)
    if args.flow == "none" and args.num_flows != 0:
        raise ValueError(f"--flow none takes --num-flows 0, got {args.num_flows}")
    if args.flow != "none" and args.num_flows < 1:
        raise ValueError(f"--num-flows must be >= 1 for --flow {args.flow}, got "
                         f"{args.num_flows}")
    for name in ("z_dim", "epochs", "batch_size", "iwae_k", "iwae_rows", "log_every",
                 "householder", "cnf_rank", "cnf_steps", "val_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    for name in ("subset", "test_n", "ortho_m"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.lr > 0 or not args.cnf_T > 0 or not 0 < args.beta_start <= 1 \
            or args.warmup_epochs < 0 or args.early_stopping < 1:
        raise ValueError("need --lr > 0, --cnf-T > 0, 0 < --beta-start <= 1, "
                         "--warmup-epochs >= 0, --early-stopping >= 1")
    if args.label_channel and not args.labels:
        raise ValueError("--label-channel needs --labels")
    args.checkpoint_every, args.checkpoint_seconds = common.parse_save_every(args.save_every)
    flow_opts = {}
    if args.flow == "householder":
        flow_opts["H"] = args.householder
    if args.flow == "orthogonal" and args.ortho_m is not None:
        if args.ortho_m > args.z_dim:
            raise ValueError(f"--ortho-m must be <= --z-dim = {args.z_dim}, got {args.ortho_m}")
        flow_opts["M"] = args.ortho_m
    return dict(x_dim=int(np.prod(IMAGE_SHAPE)), z_dim=args.z_dim,
                hidden=_ints(args.hidden, "--hidden"), flow=args.flow,
                num_flows=args.num_flows, likelihood=args.likelihood,
                n_classes=10 if args.labels else 0,
                label_dims=784 if args.label_channel else 1, activation=args.activation,
                flow_opts=flow_opts, cnf_hidden=_ints(args.cnf_hidden, "--cnf-hidden"),
                cnf_rank=args.cnf_rank, cnf_T=args.cnf_T, cnf_steps=args.cnf_steps,
                cnf_solver=args.cnf_solver, dtype=args.dtype, device=args.device,
                seed=args.seed)


# ---------------------------------------------------------------------------- data

def to_rows(images, labels, args):
    """uint8 images (N, 1, 28, 28) and labels (N,) -> float rows (N, 784 [+ 1]): pixel/255 in
    [0, 1] for bernoulli (binarized later), (pixel + ½)/256 for logistic256; the label column
    (y + ½)/10 with --labels (one-line error for labels outside 0..9 or a wrong image size)."""
    from npflow.vae import label_to_unit
    if tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must be {IMAGE_SHAPE}, got {tuple(images.shape[1:])}")
    x = images.reshape(len(images), -1).astype(np.float64)
    x = x / 255.0 if args.likelihood == "bernoulli" else (x + 0.5) / 256.0
    if args.labels:
        reps = 784 if args.label_channel else 1
        x = np.concatenate([x, np.repeat(label_to_unit(labels, 10)[:, None], reps, axis=1)],
                           axis=1)
    return x


def binarize(x, rng, labels):
    """Dynamic binarization of the 784 image columns: x_d ~ Bernoulli(x_d) (labels kept)."""
    out = x.copy()
    img = out[:, :784]
    img[...] = (rng.uniform(size=img.shape) < img).astype(out.dtype)
    return out


def load(args):
    from npflow.data import load_mnist
    dl = not args.no_download
    xi, yi = load_mnist(args.data_dir, "train", kind=args.data, download=dl)
    ti, ty = load_mnist(args.data_dir, "test", kind=args.data, download=dl)
    x_all, x_test = to_rows(xi, yi, args), to_rows(ti, ty, args)
    if args.val_n >= len(x_all):
        raise ValueError(f"--val-n {args.val_n} leaves no training images")
    x_train, x_val = x_all[:-args.val_n], x_all[-args.val_n:]
    if args.subset is not None:
        x_train = x_train[:args.subset]
    if args.test_n is not None:
        x_test = x_test[:args.test_n]
    if args.likelihood == "bernoulli":
        x_val = binarize(x_val, np.random.default_rng([args.seed, 7]), args.labels)
        x_test = binarize(x_test, np.random.default_rng([args.seed, 8]), args.labels)
    return x_train, x_val, x_test


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, argv)
    try:
        config = check_args(args)
    except ValueError as exc:
        common.fail(str(exc))
    import npflow
    from npflow.vae import VAE

    try:
        model = VAE(**config)
    except (ValueError, npflow.DeviceError) as exc:
        common.fail(f"cannot build the model: {exc}")
    try:
        x_train, x_val, x_test = load(args)
    except ValueError as exc:
        common.fail(str(exc))
    except Exception as exc:  # DataError, OSError: name the files and where to put them
        common.fail(f"cannot load {args.data}: {exc}")
    with common.open_run(args, model_keys=MODEL_KEYS) as run:
        if args.force and os.path.exists(run.path("state.json")):
            os.remove(run.path("state.json"))
        return _train_and_evaluate(args, config, model, x_train, x_val, x_test, run)


def _train_and_evaluate(args, config, model, x_train, x_val, x_test, run):
    from npflow.optim import Adam
    from npflow.training import TrainHook, append_json, format_seconds, train
    from npflow.vae import beta_schedule, unit_to_label

    N = len(x_train)
    ipe = max(1, N // args.batch_size)                     # iterations per epoch
    warmup_iters = int(round(args.warmup_epochs * ipe))
    max_iters = min(args.niters, args.epochs * ipe)
    state_path = run.path("state.json")
    print(f"npflow VAE on {args.data}{' + labels' if args.labels else ''}: flow {args.flow} × "
          f"{args.num_flows}, z {args.z_dim}, hidden {config['hidden']}, {args.likelihood}, "
          f"{model.num_params()} parameters; {N} training / {len(x_val)} validation / "
          f"{len(x_test)} test images, {ipe} iterations per epoch, β {args.beta_start} -> 1 "
          f"over {warmup_iters} iterations")

    class BetaWarmup(TrainHook):
        """β of the KL term per iteration (eq. 6.1), a pure function of the iteration."""
        name = "beta"

        def loss_kwargs(self, model, rng, it):
            return {"beta": beta_schedule(it, warmup_iters, args.beta_start)}

    def sample_batch(rng, it):
        epoch, j = divmod(it, ipe)
        perm = np.random.default_rng([args.seed, 11, epoch]).permutation(N)
        x = x_train[perm[j * args.batch_size:(j + 1) * args.batch_size]]
        return binarize(x, rng, args.labels) if args.likelihood == "bernoulli" else x

    state = {"epoch": 0, "best_val": None, "best_epoch": None, "bad_epochs": 0,
             "val_curve": [], "train_curve": [], "epoch_seconds": []}
    if args.resume and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    opt = Adam(model.params, lr=args.lr)
    rng = np.random.default_rng(args.seed)
    val_rng_seed = [args.seed, 9]

    def quiet(msg):
        if not msg.startswith("resumed from") and not msg.startswith("no checkpoint"):
            print(msg)

    kw = run.train_kwargs()
    kw.update(resume=True, print_fn=quiet)          # one train() call per epoch, continuing
    if kw["checkpoint_every"] is None:
        kw["checkpoint_every"] = ipe
    while state["epoch"] < args.epochs:
        e = state["epoch"]
        end = min((e + 1) * ipe, max_iters)
        if end <= e * ipe:
            break
        t0 = time.perf_counter()
        res = train(model, opt, sample_batch, end, rng, grad_clip=args.grad_clip,
                    hooks=[BetaWarmup()], **kw)
        status = run.finish(res)     # None when the epoch completed; 130/143/1 otherwise
        if status is not None:
            return status
        secs = time.perf_counter() - t0
        h = res.history
        lo = e * ipe
        train_loss = float(np.mean(h["loss"][lo:end])) if len(h["loss"]) >= end else None
        val = float(model.nelbo(x_val, np.random.default_rng(val_rng_seed)).mean())
        beta_now = beta_schedule(end, warmup_iters, args.beta_start)
        state["epoch"] = e + 1
        state["val_curve"].append(val)
        state["train_curve"].append(train_loss)
        state["epoch_seconds"].append(secs)
        improved = state["best_val"] is None or val < state["best_val"]
        if improved:
            state["best_val"], state["best_epoch"] = val, e + 1
            model.save(run.path("best.h5"))
        if beta_now >= 1.0:
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        bpd = (f" ({val / (model.x_in * math.log(2)):.4f} bits/dim)"
               if args.likelihood == "logistic256" else "")
        left = (args.epochs - e - 1) * float(np.median(state["epoch_seconds"]))
        print(f"epoch {e + 1}/{args.epochs} | train loss {train_loss if train_loss is None else round(train_loss, 3)} "
              f"| validation −ELBO {val:.3f}{bpd} | β {beta_now:.3f} | {secs:.1f} s | "
              f"best {state['best_val']:.3f} (epoch {state['best_epoch']}) | at most "
              f"{format_seconds(left)} left")
        append_json(args.log_json, {"iteration": end, "epoch": e + 1, "val_nelbo": val,
                                    "loss": train_loss, "beta": beta_now,
                                    "epoch_seconds": secs})
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(state_path + ".tmp", state_path)
        if state["bad_epochs"] >= args.early_stopping:
            print(f"early stopping: no better validation −ELBO for {args.early_stopping} "
                  "epochs")
            break
        if end >= max_iters:
            break

    # ---- final evaluation with the best parameters
    best = run.path("best.h5")
    if os.path.exists(best):
        from npflow.checkpoint import read_params
        model.set_params(read_params(best))
    t1 = time.perf_counter()
    test_nelbo = model.nelbo(x_test, np.random.default_rng([args.seed, 3]))
    ll = model.log_likelihood(x_test, np.random.default_rng([args.seed, 4]), k=args.iwae_k,
                              batch_rows=args.iwae_rows)
    nll = -ll
    D = model.x_in
    final = {"test_nelbo": float(test_nelbo.mean()),
             "test_nll": float(nll.mean()),
             "test_nll_stderr": float(nll.std() / math.sqrt(len(nll))),
             "iwae_k": args.iwae_k, "test_n": int(len(nll)), "flow": args.flow,
             "num_flows": args.num_flows, "labels": bool(args.labels), "data": args.data,
             "likelihood": args.likelihood, "epochs": state["epoch"],
             "best_epoch": state["best_epoch"], "best_val_nelbo": state["best_val"],
             "median_epoch_seconds": float(np.median(state["epoch_seconds"]))
             if state["epoch_seconds"] else None,
             "iterations_per_epoch": ipe, "eval_seconds": time.perf_counter() - t1,
             "num_params": model.num_params()}
    if args.labels:            # the label decoded from one posterior draw (most probable bin)
        from npflow.backend import to_host
        rec = np.concatenate([to_host(model.reconstruct(x_test[i:i + 1000],
                                                        np.random.default_rng([args.seed, 10, i])))
                              for i in range(0, len(x_test), 1000)])
        final["test_label_accuracy"] = float(np.mean(unit_to_label(rec[:, -1], 10)
                                                     == unit_to_label(x_test[:, -1], 10)))
    if args.likelihood == "logistic256":
        final["test_bpd"] = final["test_nll"] / (D * math.log(2))
        final["test_nelbo_bpd"] = final["test_nelbo"] / (D * math.log(2))
    print(f"test −ELBO {final['test_nelbo']:.3f} nats, IWAE NLL (k={args.iwae_k}) "
          f"{final['test_nll']:.3f} ± {final['test_nll_stderr']:.3f} nats on {len(nll)} test "
          f"images" + (f" = {final['test_bpd']:.4f} bits/dim" if "test_bpd" in final else "")
          + (f"; label decoded from q(z|x): {100 * final['test_label_accuracy']:.1f}% right"
             if args.labels else ""))
    common.write_result(args, run, final)
    if not args.no_figures:
        figures(model, x_test, state, args, unit_to_label)
    return 0


def figures(model, x_test, state, args, unit_to_label):
    """reconstructions.png, samples.png (with labels when --labels), curves.png."""
    from npflow.backend import to_host
    from npflow.plotting import _plt, _save, image_grid
    n = 16
    xs = x_test[:n]
    rec = to_host(model.reconstruct(xs, np.random.default_rng([args.seed, 5])))
    img = lambda a: np.asarray(a)[:, :784].reshape(-1, *IMAGE_SHAPE)
    both = np.concatenate([img(xs), img(rec)])
    if args.labels:
        titles = ([f"true {v}" for v in unit_to_label(xs[:, -1], 10)]
                  + [f"decoded {v}" for v in unit_to_label(rec[:, -1], 10)])
    else:
        titles = None
    print("reconstructions:", image_grid(both, os.path.join(args.save, "reconstructions.png"),
                                         labels=titles, ncols=n,
                                         title="test images (top) and reconstructions"))
    s = to_host(model.sample(64, np.random.default_rng([args.seed, 6])))
    titles = [f"label {v}" for v in unit_to_label(s[:, -1], 10)] if args.labels else None
    print("samples:", image_grid(img(s), os.path.join(args.save, "samples.png"), labels=titles,
                                 title=f"{args.flow} VAE samples (decoder mean)"
                                 + (" with the label the model gave them" if args.labels
                                    else "")))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = np.arange(1, len(state["val_curve"]) + 1)
    ax.plot(ep, [np.nan if v is None else v for v in state["train_curve"]],
            label="train loss (β-weighted)")
    ax.plot(ep, state["val_curve"], label="validation −ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.legend()
    ax.set_title(f"{args.flow}{' + labels' if args.labels else ''}")
    print("curves:", _save(fig, os.path.join(args.save, "curves.png")))


if __name__ == "__main__":
    common.main_guard(main)
