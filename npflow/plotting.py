"""Figures for the example scripts (matplotlib, Agg backend; host-side numpy).

    toy_figure(data, log_prob_fn, samples, path, ...)   data | learned density | samples
    training_curves(history, path, ...)                 loss, NFE, T, gradient norm
    image_grid(images, path, labels=None, ...)          MNIST / CIFAR samples

Every function writes a PNG and returns the path; nothing is shown on screen.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .backend import to_host

__all__ = ["toy_figure", "training_curves", "image_grid", "density_grid"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, title=None, top=None):
    """Title (suptitle, the axes below ``top`` of the figure height when given), tight layout,
    write ``path`` (folders made), close the figure; returns the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout(**({"rect": (0, 0, 1, top)} if title and top else {}))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return os.fspath(path)


def density_grid(log_prob_fn, limits, n: int = 100):
    """Evaluate exp(log_prob_fn) on an n×n grid over limits ((x0, x1), (y0, y1)).

    log_prob_fn: callable (M, 2) float64 array -> (M,) log densities (any array module).
    Returns (xs (n,), ys (n,), density (n, n) with rows indexed by y)."""
    (x0, x1), (y0, y1) = limits
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    lp = np.asarray(to_host(log_prob_fn(pts)), dtype=np.float64).reshape(n, n)
    return xs, ys, np.exp(lp)


def toy_figure(data, log_prob_fn, samples, path, title: str = "", limits=None,
               grid: int = 100, density=None):
    """Three panels side by side: training data, learned density exp(log p) on a grid, and
    model samples, on the same axes.

    data: (N, 2) array; log_prob_fn: callable (M, 2) -> (M,) or None (if ``density`` given);
    samples: (S, 2) array; limits: ((x0, x1), (y0, y1)), default the data's 1-99.5 %
    range padded (FFJORD uses [-4, 4]²); density: precomputed (xs, ys, p) from density_grid.
    """
    plt = _plt()
    data = np.asarray(to_host(data), dtype=np.float64)
    samples = np.asarray(to_host(samples), dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 2 or samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"toy_figure needs 2-D points, got data {data.shape} and samples "
                         f"{samples.shape}")
    if limits is None:
        lo = np.percentile(data, 0.5, axis=0)
        hi = np.percentile(data, 99.5, axis=0)
        pad = 0.15 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        half = 0.5 * max(hi - lo)
        mid = 0.5 * (hi + lo)
        limits = ((mid[0] - half, mid[0] + half), (mid[1] - half, mid[1] + half))
    if density is None:
        density = density_grid(log_prob_fn, limits, grid)
    xs, ys, p = density
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.4))
    bins = [np.linspace(*limits[0], 120), np.linspace(*limits[1], 120)]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=bins, cmap="viridis")
    axes[0].set_title(f"data ({len(data)} points)")
    # colour scale robust to a few extreme grid values (a spike would hide the rest)
    finite_p = p[np.isfinite(p)]
    vmax = float(np.percentile(finite_p, 99.5)) if finite_p.size else 1.0
    axes[1].pcolormesh(xs, ys, np.nan_to_num(p), cmap="viridis", shading="auto", vmin=0.0,
                       vmax=vmax if vmax > 0 else None)
    axes[1].set_title("learned density exp(log p)")
    finite = samples[np.isfinite(samples).all(axis=1)]
    axes[2].hist2d(finite[:, 0], finite[:, 1], bins=bins, cmap="viridis")
    axes[2].set_title(f"samples ({len(finite)} points)")
    for ax in axes:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path, title, top=0.94)


def _smooth(y, k):
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    return np.concatenate([np.cumsum(y[: k - 1]) / np.arange(1, k), (c[k:] - c[:-k]) / k])


def loss_limits(loss, k, floor=None):
    """y-limits of the loss panel: from the 1st percentile of the loss (or the floor) up to
    the highest running mean (window k), so the early, high part of the curve stays in view
    while single spikes do not stretch the axis. None when the loss gives no finite range."""
    loss = np.asarray(loss, dtype=np.float64)
    if not np.isfinite(loss).any():
        return None
    lo = float(np.nanpercentile(loss, 1))
    hi = max(float(np.nanmax(_smooth(loss, k))), float(np.nanpercentile(loss, 99)))
    if floor is not None:
        lo = min(lo, floor)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        return None
    return lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo)


def training_curves(history: dict, path, title: str = "", smooth: int | None = None,
                    floor: float | None = None):
    """Four panels against the iteration: loss (raw and running mean), NFE forward and
    backward, end time T, gradient norm (log scale). history: dict with arrays "iteration",
    "loss", "nfe_forward", "nfe_backward", "T", "grad_norm" (as TrainResult.history), each
    (n,); smooth: running-mean window (default n/50); floor: a known lower bound of the
    expected NLL (the data entropy), drawn as a dashed line."""
    plt = _plt()
    h = {k: np.asarray(v, dtype=np.float64) for k, v in history.items()}
    it = h.get("iteration")
    if it is None or len(it) == 0:
        raise ValueError("training_curves needs a non-empty history with an 'iteration' array")
    k = smooth or max(1, len(it) // 50)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0, 0]
    ax.plot(it, h["loss"], color="0.75", lw=0.6, label="loss")
    ax.plot(it, _smooth(h["loss"], k), color="C0", lw=1.4, label=f"running mean ({k})")
    if "nll" in h and not np.allclose(h["nll"], h["loss"], equal_nan=True):
        ax.plot(it, _smooth(h["nll"], k), color="C3", lw=1.0, label="NLL")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=0.8, label=f"entropy of the data {floor:.3f}")
    ax.set_ylabel("loss (nats)")
    ax.legend(fontsize=8)
    lim = loss_limits(h["loss"], k, floor)
    if lim is not None:
        ax.set_ylim(*lim)
    ax = axes[0, 1]
    ax.plot(it, _smooth(h["nfe_forward"], k), label="forward")
    ax.plot(it, _smooth(h["nfe_backward"], k), ls="--", label="backward")
    ax.set_ylabel("NFE per iteration")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(it, h["T"], color="C2", lw=1.0)
    ax.set_ylabel("end time T")
    ax = axes[1, 1]
    g = h["grad_norm"]
    ax.plot(it, g, color="0.75", lw=0.6)
    ax.plot(it, _smooth(g, k), color="C1", lw=1.4)
    if np.all(g[np.isfinite(g)] > 0):
        ax.set_yscale("log")
    ax.set_ylabel("gradient norm (before clipping)")
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    return _save(fig, path, title, top=0.96)


def image_grid(images, path, labels=None, ncols: int | None = None, title: str = "",
               cmap: str = "gray"):
    """A grid of images. images: (N, H, W), (N, 1, H, W) or (N, 3, H, W) with values in
    [0, 1] (clipped); labels: optional N titles (e.g. class names)."""
    plt = _plt()
    x = np.asarray(to_host(images), dtype=np.float64)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs (N, H, W), (N, 1, H, W) or (N, 3, H, W), got "
                         f"{x.shape}")
    n = x.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.3 * nrows + 0.3),
                             squeeze=False)
    x = np.clip(x, 0.0, 1.0)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        if x.shape[1] == 1:
            ax.imshow(x[i, 0], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(np.transpose(x[i], (1, 2, 0)), interpolation="nearest")
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=7)
    return _save(fig, path, title)
