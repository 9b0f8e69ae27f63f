#!/usr/bin/env python
"""Train FFJORD's multiscale CNF on MNIST, Fashion-MNIST or CIFAR-10 (docs/images.md).

    python examples/train_mnist.py --device cpu --niters 20 --subset 1000
    python examples/train_mnist.py --device gpu                      # FFJORD's configuration
    python examples/train_mnist.py --method rnode                    # RK4 step 0.25, λ = 0.01
    python examples/train_mnist.py --dims 32,32 --batch-size 64 --solver rk4 --steps 4
    mpiexec -n 2 python examples/train_mnist.py ...                 # 2 MPI ranks per batch

The model (npflow.multiscale.MultiscaleCNF): dequantization and logit transform, then
(1,28,28) -> blocks -> squeeze -> blocks -> factor out half -> ... with --num-blocks ODE blocks
per stage (FFJORD: 2, 10 blocks in all), each block a ConvNet of ConcatConv2d layers of widths
--dims with softplus, Hutchinson trace with --trace probes, its own end time T. The loss is
bits/dim (plus the RNODE regularizers).

Writes to --save DIR: checkpoint.h5 (every --log-every iterations and at the end; atomic;
--resume continues exactly), samples_iterNNNNNN.png every --sample-every iterations and
samples.png at the end, result.json with the test bits/dim on --test-n test images. With
--log-json PATH one JSON object per log line is appended to PATH, and a last one holding
"test_bpd".

Methods (docs/training.md §6):
  ffjord  maximum likelihood (bits/dim)
  rnode   adds λ_K ∫‖f‖² and λ_J ∫‖∂f/∂z‖²_F (0.01 each), zero-initialised last layers
          (RNODE trains with RK4, step 0.25: pass --solver rk4 --step-size 0.25, the default)
  toflow  every block's end time trained by its own Adam (lr --lr-T) after each weight step,
          temporal regularization α|T|, clipping to [t0 + ε, 2T0 − t0 − ε]
  steer   each training step integrates block b to T'_b ~ U[T_b − b, T_b + b]
  cfm     flow matching (docs/cfm.md §9): every block's ConvNet regressed onto the velocity of
          a straight path from the logit image to N(0, I) noise in the multiscale map's final
          coordinates, each coordinate reaching its noise at the block where it is factored
          out; no ODE solve in training (--time-groups stratified times per block)
  otcfm   the same with the last part's noise paired with the data by exact OT per batch
          (cfm/otcfm evaluate and sample with dopri5 unless --solver says otherwise)
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

from npflow.methods import METHODS as REGISTRY, RNODE, STEER, compose  # noqa: E402
from npflow.tableau import fixed_grid, solver_names  # noqa: E402

# the registered methods of the multiscale CNF (npflow.methods): the likelihood methods and
# flow matching (npflow.cfm_multiscale)
METHODS = tuple(n for n, m in REGISTRY.items() if m.model in (None, "cfm"))
# defaults of the flow-matching methods (explicit flags win): they never solve in training, so
# --solver is the solver of the test evaluation and the samples, dopri5 as FFJORD evaluates
FLOW_MATCHING_DEFAULTS = {"cfm": dict(solver="dopri5"), "otcfm": dict(solver="dopri5")}
# the settings that define the model (and its data): --resume refuses a change of any
MODEL_KEYS = ("data", "labels", "dims", "num_blocks", "scales", "layer_type", "T", "method",
              "trace", "alpha_logit", "zero_last", "dtype", "seed", "kinetic", "jacobian")
# (--time-groups and --path-schedule shape the flow-matching loss only: training settings,
# recorded, and a change on --resume is allowed and noted like --lr's)
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DATASETS = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def build_parser():
    p = common.make_parser("Train a multiscale continuous normalizing flow on images (npflow).",
                           script=__file__)
    common.add_run_arguments(p, niters=10000, save="runs/mnist", log_every=10)
    a = p.add_argument
    a("--data", default="mnist", choices=sorted(DATASETS),
      help="image set, read from DATA_DIR/<name>/ (--data-dir)")
    a("--no-download", action="store_true",
      help="never download: fail with a message naming the missing files")
    a("--subset", type=int, default=None,
      help="train on the first N training images only (quick runs); also the default --test-n")
    a("--labels", action="store_true",
      help="labels as data: append the class label as an extra channel, intensity "
           "255·(label + ½)/10, so the flow models (image, label) jointly; bits/dim is then "
           "over C+1 channels, and sample grids show the label each sample carries")
    a("--dims", default="64,64,64", help="ConvNet widths, comma- or dash-separated (FFJORD)")
    a("--num-blocks", type=int, default=2, help="CNF blocks per stage (FFJORD: 2)")
    a("--scales", type=int, default=None,
      help="number of scales (default FFJORD's: 3 for 28×28, 4 for 32×32)")
    a("--layer-type", default="concat", choices=["concat", "concatsquash"])
    a("--T", type=float, default=1.0, help="(initial) end time of every block; t0 = 0")
    a("--solver", default="rk4", choices=solver_names())
    a("--steps", type=int, default=4, help="steps per block of a fixed-grid solver")
    a("--step-size", type=float, default=None,
      help="fixed-grid step size (RNODE: 0.25); overrides --steps")
    a("--atol", type=float, default=1e-5)
    a("--rtol", type=float, default=1e-5)
    a("--trace", default="rademacher", choices=["rademacher", "gaussian"],
      help="Hutchinson probe distribution (one probe per sample, drawn once per solve)")
    a("--store", default="states", choices=["states", "caches"],
      help="backward memory: recompute each step's stages (states) or keep every stage's "
           "layer caches (caches: faster, memory ∝ steps × activations; fixed grid only)")
    a("--alpha-logit", type=float, default=1e-6, help="logit margin α (RNODE: 1e-5)")
    a("--zero-last", action="store_true",
      help="zero-initialise every block's last layer (the default with rnode)")
    common.add_method_arguments(p, METHODS, t_grad_default="stale")
    common.add_deprecated_alias(p, "--alpha", "--alpha-T", type=float)
    a("--time-groups", type=int, default=4,
      help="cfm/otcfm: row groups sharing one stratified time in each block (docs/cfm.md "
           "eq. 2.6, 9.6)")
    a("--path-schedule", default="channel", choices=["channel", "constant"],
      help="cfm/otcfm: how far each coordinate moves in each block (docs/cfm.md eq. 9.4): "
           "one speed per channel of the block's input (channel) or each coordinate at "
           "constant speed to its exit block (constant)")
    a("--batch-size", type=int, default=200)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=1000, help="linear learning-rate warm-up iterations")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=None, help="max global gradient norm (default: off)")
    a("--sample-every", type=int, default=0,
      help="write a sample grid every N iterations (0: only at the end)")
    a("--n-samples", type=int, default=64, help="images per sample grid")
    a("--test-n", type=int, default=None,
      help="test images for the final bits/dim (default: all, or --subset if given)")
    a("--test-batch", type=int, default=200)
    a("--test-solver", default=None, choices=solver_names(),
      help="solver of the test evaluation (default: the training solver)")
    a("--no-figures", action="store_true", help="skip the sample grids")
    a("--no-tune-malloc", action="store_true",
      help="keep glibc's malloc settings as they are (otherwise npflow.backend.tune_malloc("
           "mmap_max=0) keeps freed memory in the heap for reuse, so the large arrays of each "
           "iteration do not page-fault in fresh, zeroed memory)")
    return p


def parse_dims(text):
    try:
        dims = tuple(int(h) for h in text.replace("-", ",").split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--dims must be integers like 64,64,64, got {text!r}") from None
    if not dims or any(h < 1 for h in dims):
        raise ValueError(f"--dims widths must be >= 1, got {text!r}")
    return dims


def label_channel(images, labels):
    """Append the label channel: intensity round(255·(label + ½)/10) everywhere (uint8)."""
    level = np.rint(255.0 * (np.asarray(labels) + 0.5) / 10).astype(np.uint8)
    chan = np.broadcast_to(level[:, None, None, None], (len(images), 1) + images.shape[2:])
    return np.concatenate([images, chan], axis=1)


def read_labels(samples):
    """Labels carried by generated samples x̃ (n, C+1, H, W): the class whose level
    (label + ½)/10 is nearest to the mean of the last channel."""
    m = np.asarray(samples)[:, -1].reshape(len(samples), -1).mean(axis=1)
    return np.clip(np.rint(m * 10 - 0.5), 0, 9).astype(int)


def load_images(args):
    """(train images, test images) as uint8 (N, C, H, W) on the host (C + 1 with labels)."""
    from npflow.data import load_cifar10, load_mnist
    if args.data == "cifar10":
        dl = not args.no_download
        x_train, y_train = load_cifar10(args.data_dir, "train", download=dl)
        x_test, y_test = load_cifar10(args.data_dir, "test", download=dl)
    else:
        dl = not args.no_download
        x_train, y_train = load_mnist(args.data_dir, "train", kind=args.data, download=dl)
        x_test, y_test = load_mnist(args.data_dir, "test", kind=args.data, download=dl)
    if args.labels:
        x_train, x_test = label_channel(x_train, y_train), label_channel(x_test, y_test)
    if args.subset is not None:
        x_train = x_train[:args.subset]
    test_n = args.test_n if args.test_n is not None else (
        args.subset if args.subset is not None else len(x_test))
    return x_train, x_test[:test_n]


def prepare(args):
    """Check every input and build the model config, before any data or training."""
    methods = common.parse_methods(args.method, METHODS)
    for name, v in (("--batch-size", args.batch_size), ("--steps", args.steps),
                    ("--num-blocks", args.num_blocks), ("--n-samples", args.n_samples),
                    ("--test-batch", args.test_batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    for name, v, zero_ok in (("--lr", args.lr, True), ("--weight-decay", args.weight_decay, True),
                             ("--atol", args.atol, False), ("--rtol", args.rtol, False),
                             ("--grad-clip", args.grad_clip, False),
                             ("--alpha-logit", args.alpha_logit, False)):
        if v is not None and (not math.isfinite(v) or not (v > 0 or (zero_ok and v == 0))):
            raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'} and finite, "
                             f"got {v}")
    if args.warmup < 0 or args.sample_every < 0:
        raise ValueError(f"--warmup and --sample-every must be >= 0, got {args.warmup}, "
                         f"{args.sample_every}")
    for name, v in (("--subset", args.subset), ("--test-n", args.test_n)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not args.T > 0:
        raise ValueError(f"--T must be > 0, got {args.T}")
    if args.step_size is not None and not args.step_size > 0:
        raise ValueError(f"--step-size must be > 0, got {args.step_size}")
    combo = compose(methods)           # each method's checks and model settings (configure)
    combo.check(args, args.T)
    if combo.model == "cfm":           # flow matching: its own model (npflow.cfm_multiscale)
        if args.time_groups < 1:
            raise ValueError(f"--time-groups must be >= 1, got {args.time_groups}")
        (m,) = methods
        flow_matching = dict(coupling=REGISTRY[m].coupling, time_groups=args.time_groups,
                             schedule=args.path_schedule)
    else:
        flow_matching = None
    rnode = "rnode" in methods
    kinetic, jacobian = RNODE.weights(args, False)
    steer_b = STEER.half_width(args, args.T)
    C, H, W = DATASETS[args.data]
    config = dict(image_shape=(C + int(args.labels), H, W), hidden=parse_dims(args.dims),
                  layer=args.layer_type, scales=args.scales, blocks=args.num_blocks, T=args.T,
                  train_T=False, solver=args.solver, steps=args.steps,
                  step_size=args.step_size, rtol=args.rtol, atol=args.atol, trace=args.trace,
                  kinetic=kinetic, jacobian=jacobian, zero_last=bool(args.zero_last or rnode),
                  alpha=args.alpha_logit, store=args.store, dtype=args.dtype, device=args.device,
                  seed=args.seed)
    return methods, combo.configure(config, args), steer_b, flow_matching


def missing_data_message(args, exc):
    """One line naming every missing file of the data set and how to get it."""
    folder = os.path.join(args.data_dir, args.data)
    if args.data in ("mnist", "fashion-mnist"):
        missing = [f for f in MNIST_FILES if not os.path.exists(os.path.join(folder, f))]
        if missing:
            how = ("run without --no-download to fetch them (SHA-256 checked)"
                   if args.no_download else "the download failed")
            return (f"cannot load {args.data}: missing {', '.join(missing)} in {folder}/; "
                    f"{how}, or copy the four standard files there by hand (docs/data.md "
                    f"section 3; --data-dir sets the folder above {args.data}/)")
    return (f"cannot load {args.data} from {folder}/: {exc} (docs/data.md section 3 lists the "
            "files; --data-dir sets their folder)")


def main(argv=None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, argv, FLOW_MATCHING_DEFAULTS)   # the method's defaults
    comm = common.init_ranks(args)       # MPI ranks under mpiexec (docs/parallel.md), else one
    import npflow
    from npflow.backend import to_host
    from npflow.multiscale import MultiscaleCNF
    from npflow.optim import Adam, Warmup
    from npflow.training import append_json, train

    common.tune_host(args, mmap_max=0)   # OPENBLAS_NUM_THREADS=2: two BLAS threads instead
    try:
        methods, config, steer_b, flow_matching = prepare(args)
    except ValueError as exc:
        fail(exc)
    try:
        if flow_matching is not None:
            from npflow.cfm_multiscale import FlowMatchingMultiscaleCNF
            model = FlowMatchingMultiscaleCNF(**config, **flow_matching)
        else:
            model = MultiscaleCNF(**config)
    except ValueError as exc:
        fail(f"cannot build the model: {exc}")
    except npflow.DeviceError as exc:
        fail(f"cannot build the model: {exc}; or use --device cpu")
    try:
        x_train, x_test = load_images(args)
    except Exception as exc:  # DataError and OSError: name the files and where to put them
        fail(missing_data_message(args, exc))

    time_names = set(model.time_names) if config["train_T"] else set()
    weights = {k: v for k, v in model.params.items() if k not in time_names}
    optimizer = Adam(weights, lr=args.lr, weight_decay=args.weight_decay,
                     schedule=Warmup(args.warmup) if args.warmup else None)
    hooks = common.method_hooks(model, methods, args, steer_b, comm=comm)
    with common.open_run(args, model_keys=MODEL_KEYS, comm=comm) as rf:
        return _train_and_test(args, rf, model, optimizer, hooks, methods, config, x_train,
                               x_test, train, append_json, to_host, comm)


def _train_and_test(args, rf, model, optimizer, hooks, methods, config, x_train, x_test, train,
                    append_json, to_host, comm):
    cfg = model.config
    solver_txt = cfg["solver"] if not fixed_grid(cfg["solver"]) else (
        f"{cfg['solver']} " + (f"step {cfg['step_size']}" if cfg["step_size"]
                               else f"{cfg['steps']} steps"))
    print(f"npflow multiscale CNF on {args.data} ({len(x_train)} training images): method "
          f"{'+'.join(sorted(methods))}, {len(model.nets)} blocks, {model.num_params()} "
          f"parameters, dims {cfg['hidden']}, solver {solver_txt}"
          f"{' (evaluation only; coupling ' + cfg['coupling'] + ')' if 'coupling' in cfg else ''}"
          f", trace {cfg['trace']}, "
          f"λ_K {cfg['kinetic']}, λ_J {cfg['jacobian']}, T {cfg['T']}"
          f"{' (trained)' if cfg['train_T'] else ''}, {cfg['dtype']} on {cfg['device']}",
          flush=True)

    def sample_batch(rng, it):
        return x_train[rng.integers(0, len(x_train), args.batch_size)]

    def draw(path):
        from npflow.plotting import image_grid
        s = to_host(model.sample(args.n_samples, np.random.default_rng([args.seed, 5])))
        if args.labels:
            return image_grid(s[:, :-1], path, labels=[f"label {v}" for v in read_labels(s)],
                              title=f"{args.data}, {args.method}: samples with the label "
                                    "the model gave them")
        return image_grid(s, path, title=f"{args.data}, {args.method}")

    def on_log(rec):
        if "coupling" in model.config:          # flow matching: the loss is a regression
            print(f"    flow-matching loss {rec['loss']:.5f} (last batch; not a bits/dim)")
        else:
            print(f"    bits/dim {rec['nll']:.4f} (last batch)")
        if args.sample_every and not args.no_figures and rec["iteration"] % args.sample_every == 0:
            draw(rf.path(f"samples_iter{rec['iteration']:06d}.png"))

    result, train_seconds, status = rf.train(
        model, optimizer, sample_batch, args.niters, np.random.default_rng(args.seed),
        grad_clip=args.grad_clip, hooks=hooks, on_log=[on_log], comm=comm)
    if status is not None:
        return status
    if not comm.root:                    # the test evaluation and the samples: rank 0 alone
        return 0

    t1 = time.perf_counter()
    bpd, nfe = model.bits_per_dim(x_test, np.random.default_rng([args.seed, 2]),
                                  solver=args.test_solver, batch_size=args.test_batch,
                                  return_nfe=True)
    test_bpd = float(bpd.mean())
    stderr = float(bpd.std() / math.sqrt(len(bpd)))
    h = result.history
    final = {
        "test_bpd": test_bpd, "test_bpd_stderr": stderr, "test_n": int(len(bpd)),
        "test_nfe": nfe, "test_seconds": time.perf_counter() - t1, "data": args.data,
        "method": "+".join(sorted(methods)), "iterations": int(result.iteration),
        "train_seconds_this_run": train_seconds,
        "mean_nfe_forward": float(np.mean(h["nfe_forward"])) if len(h["loss"]) else None,
        "mean_nfe_backward": float(np.mean(h["nfe_backward"])) if len(h["loss"]) else None,
        "mean_sec_per_iter": float(np.mean(h["seconds"])) if len(h["loss"]) else None,
        "median_sec_per_iter": float(np.median(h["seconds"])) if len(h["loss"]) else None,
        "T": [float(t) for t in (to_host(model.params[n]) for n in model.time_names)]
        if cfg["train_T"] else cfg["T"],
    }
    print(f"test bits/dim {test_bpd:.4f} ± {stderr:.4f} on {len(bpd)} test images "
          f"(solver {args.test_solver or cfg['solver']}, NFE {nfe:.0f}); "
          f"median {final['median_sec_per_iter']} s/it")
    common.write_result(args, rf, final)
    if not args.no_figures:
        print("samples:", draw(rf.path("samples.png")))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
