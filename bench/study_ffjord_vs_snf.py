#!/usr/bin/env python
"""The heterogeneous-data study (FFJORD against Householder Sylvester VAE, with and without
labels) at a CPU budget: docs/vae.md section 8.

    python bench/study_ffjord_vs_snf.py --run     # train the four runs that have no result
    python bench/study_ffjord_vs_snf.py           # figures and summary from runs/study/

Runs (RUNS below, the exact commands):
  snf, snf_labels        examples/train_vae.py --flow householder, discretized logistic with
                         256 bins per pixel (so the NLL is in bits/dim like the CNF's);
  snf_label_channel      the label fed and decoded as a whole channel (--label-channel), as the
                         study feeds it to both models
  ffjord, ffjord_labels  examples/train_mnist.py, a small multiscale CNF
Figures in runs/study/:
  fig3_bpd_per_epoch.png   bits/dim per epoch of all four runs (the study's Fig. 3): the VAE's
                           validation −ELBO bound and the CNF's mean training bits/dim
  fig12_samples.png        samples of both labelled models with the label each carries
  fig4_latent_noise.png    a test image with its label encoded, uniform noise U(−a, a) added
                           to the latent for growing a, decoded (image and decoded label)
  summary.md               the numbers
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from example_runs import run_missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("runs", "study")
sys.path.insert(0, os.path.join(ROOT, "examples"))

VAE_BUDGET = ["--data", "mnist", "--flow", "householder", "--num-flows", "4",
              "--householder", "8", "--likelihood", "logistic256", "--subset", "10000",
              "--val-n", "2000", "--epochs", "10", "--warmup-epochs", "5", "--test-n", "500",
              "--iwae-k", "200", "--z-dim", "32", "--hidden", "300,300", "--seed", "0",
              "--log-every", "50"]
FFJORD_ITERS_PER_EPOCH = 20          # --subset 2000 / --batch-size 100
FFJORD_BUDGET = ["--data", "mnist", "--subset", "2000", "--batch-size", "100",
                 "--dims", "16,16", "--num-blocks", "1", "--steps", "2", "--solver", "rk4",
                 "--niters", str(5 * FFJORD_ITERS_PER_EPOCH), "--warmup", "20",
                 "--log-every", str(FFJORD_ITERS_PER_EPOCH), "--test-n", "200", "--seed", "0"]
RUNS = {
    "snf": ("train_vae.py", VAE_BUDGET),
    "snf_labels": ("train_vae.py", VAE_BUDGET + ["--labels"]),
    "snf_label_channel": ("train_vae.py", VAE_BUDGET + ["--labels", "--label-channel"]),
    "ffjord": ("train_mnist.py", FFJORD_BUDGET),
    "ffjord_labels": ("train_mnist.py", FFJORD_BUDGET + ["--labels"]),
}
NOISE = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0)


def command(name):
    script, flags = RUNS[name]
    return [sys.executable, os.path.join(ROOT, "examples", script)] + flags + [
        "--save", os.path.join(OUT, name), "--log-json", os.path.join(OUT, f"{name}.jsonl")]


def _records(name):
    path = os.path.join(OUT, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves():
    """name -> (epochs, bits/dim per epoch, what it is)."""
    out = {}
    for name in ("snf", "snf_labels", "snf_label_channel"):
        recs = [r for r in _records(name) if "val_nelbo" in r]
        if recs:
            D = 784 + {"snf": 0, "snf_labels": 1, "snf_label_channel": 784}[name]
            out[name] = ([r["epoch"] for r in recs],
                         [r["val_nelbo"] / (D * math.log(2)) for r in recs],
                         "validation −ELBO (bits/dim, upper bound)")
    for name in ("ffjord", "ffjord_labels"):
        recs = [r for r in _records(name) if "loss_avg" in r]
        if recs:
            out[name] = ([r["iteration"] / FFJORD_ITERS_PER_EPOCH for r in recs],
                         [r["loss_avg"] for r in recs], "mean training bits/dim of the epoch")
    return out


def fig3(cs):
    from npflow.plotting import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (ep, bpd, what) in cs.items():
        ax.plot(ep, bpd, marker="o", label=f"{name}: {what}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits/dim")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("MNIST, homogeneous vs heterogeneous (labels), CPU budget")
    return _save(fig, os.path.join(OUT, "fig3_bpd_per_epoch.png"))


def _load_vae(name):
    import npflow.vae  # noqa: F401  (registers VAE for npflow.load)
    from npflow.checkpoint import load
    path = os.path.join(OUT, name, "best.h5")
    return load(path) if os.path.exists(path) else None


def _load_cnf(name):
    from npflow.checkpoint import load
    path = os.path.join(OUT, name, "checkpoint.h5")
    return load(path) if os.path.exists(path) else None


def _test_image(label_needed=True):
    from npflow.data import load_mnist
    x, y = load_mnist("data", "test", download=False)
    return x[:1], y[:1]


def fig12_and_4():
    """Samples with labels from both labelled models, and the latent-noise experiment."""
    from npflow.backend import to_host
    from npflow.plotting import _plt, _save
    from npflow.vae import label_to_unit, unit_to_label
    from train_mnist import label_channel, read_labels
    plt = _plt()
    vaes = [(t, m) for t, m in (("H-SNF, label column", _load_vae("snf_labels")),
                                ("H-SNF, label channel", _load_vae("snf_label_channel")))
            if m is not None]
    cnf = _load_cnf("ffjord_labels")
    made = []
    n = 10
    rows = []
    for title, vae in vaes:
        s = to_host(vae.sample(n, np.random.default_rng(1)))
        rows.append((title, s[:, :784].reshape(n, 28, 28), unit_to_label(s[:, -1], 10)))
    if cnf is not None:
        s = to_host(cnf.sample(n, np.random.default_rng(1)))
        rows.append(("FFJORD", s[:, 0], read_labels(s)))
    if rows:
        fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.6 * len(rows)),
                                 squeeze=False)
        for r, (title, imgs, labs) in enumerate(rows):
            for j in range(n):
                ax = axes[r, j]
                ax.imshow(np.clip(imgs[j], 0, 1), cmap="gray", vmin=0, vmax=1)
                ax.axis("off")
                ax.set_title(f"{title if j == 0 else ''}\nlabel {labs[j]}", fontsize=7)
        fig.suptitle("samples with the label the model gave them")
        made.append(_save(fig, os.path.join(OUT, "fig12_samples.png")))

    x, y = _test_image()
    rows = []
    for title, vae in vaes:
        xr = np.concatenate([(x.reshape(1, -1) + 0.5) / 256,
                             np.repeat(label_to_unit(y, 10)[:, None], vae.label_dims, 1)], 1)
        mu, sigma, p = vae.encode(xr)
        zK, _, _ = vae.flow_forward(mu, p)                 # the posterior's mean path
        zK = to_host(zK)
        imgs, labs = [], []
        for a in NOISE:
            u = np.random.default_rng(3).uniform(-a, a, zK.shape)
            out = to_host(vae.output_to_x(vae.decode(zK + u)))
            imgs.append(out[0, :784].reshape(28, 28))
            labs.append(unit_to_label(out[:, -1], 10)[0])
        rows.append((title, imgs, labs))
    if cnf is not None:
        from npflow.images import logit_inverse
        xl = label_channel(x, y)
        yy, _ = cnf.preprocess(xl, np.random.default_rng(4))
        parts = [to_host(p) for p in cnf.encode(yy)]
        imgs, labs = [], []
        for a in NOISE:
            r = np.random.default_rng(3)
            noisy = [cnf.xp.asarray(p + r.uniform(-a, a, p.shape).astype(p.dtype))
                     for p in parts]
            out = to_host(logit_inverse(cnf.decode(noisy), cnf.config["alpha"]))
            imgs.append(out[0, 0])
            labs.append(read_labels(out)[0])
        rows.append(("FFJORD", imgs, labs))
    if rows:
        fig, axes = plt.subplots(len(rows), len(NOISE), figsize=(1.5 * len(NOISE),
                                                                  1.8 * len(rows)),
                                 squeeze=False)
        for r, (title, imgs, labs) in enumerate(rows):
            for j, a in enumerate(NOISE):
                ax = axes[r, j]
                ax.imshow(np.clip(imgs[j], 0, 1), cmap="gray", vmin=0, vmax=1)
                ax.axis("off")
                ax.set_title(f"{title if j == 0 else ''}\nnoise {a}: label {labs[j]}",
                             fontsize=7)
        fig.suptitle(f"test image (true label {int(y[0])}) encoded, latent + U(−a, a), decoded")
        made.append(_save(fig, os.path.join(OUT, "fig4_latent_noise.png")))
    return made


def summary(cs):
    lines = ["| run | per-epoch bits/dim | final test | seconds |", "|---|---|---|---|"]
    for name in RUNS:
        res = os.path.join(OUT, name, "result.json")
        if not os.path.exists(res):
            lines.append(f"| {name} | not run | | |")
            continue
        with open(res) as f:
            r = json.load(f)
        per = ", ".join(f"{v:.3f}" for v in cs.get(name, ([], [], ""))[1])
        if name.startswith("snf"):
            fin = (f"−ELBO {r['test_nelbo_bpd']:.3f}, IWAE NLL (k={r['iwae_k']}) "
                   f"{r['test_bpd']:.3f} bits/dim on {r['test_n']} test images")
            secs = f"{r['median_epoch_seconds']:.1f} s/epoch"
            if "test_label_accuracy" in r:
                fin += f"; label from q(z|x) right for {100 * r['test_label_accuracy']:.1f}%"
        else:
            fin = f"{r['test_bpd']:.3f} ± {r['test_bpd_stderr']:.3f} bits/dim on {r['test_n']}"
            secs = f"{r['median_sec_per_iter']:.2f} s/it"
        lines.append(f"| {name} | {per} | {fin} | {secs} |")
    cmds = "\n".join(f"    {name}: python examples/{RUNS[name][0]} {' '.join(RUNS[name][1])}"
                     for name in RUNS)
    return "Commands:\n\n" + cmds + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="train the runs that have no result")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the runs")
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    bad = [n for n in names if n not in RUNS]
    if bad:
        p.error(f"unknown runs {bad}: expected some of {list(RUNS)}")
    if args.run:
        run_missing(names, OUT, command)
    cs = curves()
    os.makedirs(OUT, exist_ok=True)
    if cs:
        print("figure:", fig3(cs))
    for path in fig12_and_4():
        print("figure:", path)
    text = summary(cs)
    print(text)
    with open(os.path.join(OUT, "summary.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
