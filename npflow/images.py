"""Image preprocessing and bookkeeping (docs/images.md, sections 2-4).

- ``squeeze`` / ``unsqueeze``: 2×2 space-to-depth and its inverse, FFJORD's SqueezeLayer
  (eq. 2.1); a permutation, so its log-determinant is 0.
- ``factor_out`` / ``factor_in``: the multiscale split of the channels in half (eq. 3.1).
- ``dequantize``: x̃ = (x + u)/256 for x ∈ {0..255}, u ~ U(0,1) from an explicit generator
  (eq. 4.1); ``quantize`` is its left inverse.
- ``logit_transform`` / ``logit_inverse``: y = logit(α + (1 − 2α)x̃) with its exact
  per-sample log-determinant (eq. 4.2-4.3).
- ``bits_per_dim``: bits/dim of the 8-bit data from the flow's NLL of y and the
  preprocessing log-determinant (eq. 4.4; the sign convention of docs/cnf.md eq. 1.2).

Functions take their array module from their inputs; squeeze and the split act on the last three
axes (C, H, W), so they apply to primals (B, C, H, W) and tangents (K, B, C, H, W) alike.
"""
from __future__ import annotations

import math

from .backend import get_array_module, to_device

__all__ = ["squeeze", "unsqueeze", "factor_out", "factor_in", "dequantize", "quantize",
           "logit_transform", "logit_inverse", "bits_per_dim", "ALPHA"]

ALPHA = 1e-6  # FFJORD's logit margin for MNIST/CIFAR-10 (RNODE uses 1e-5)
LOG2_256 = 8.0  # log2 of the number of intensity levels


def _check_image(x, name):
    if x.ndim < 3:
        raise ValueError(f"{name}: expected (..., C, H, W), got shape {tuple(x.shape)}")


def squeeze(x, factor: int = 2):
    """Space-to-depth (eq. 2.1): (..., C, H, W) -> (..., C·f², H/f, W/f),
    out[..., c·f² + f·a + b, h, w] = x[..., c, f·h + a, f·w + b] (FFJORD's squeeze)."""
    _check_image(x, "squeeze")
    C, H, W = x.shape[-3:]
    f = int(factor)
    if H % f or W % f:
        raise ValueError(f"squeeze: H and W must be divisible by {f}, got shape {tuple(x.shape)}")
    lead = x.shape[:-3]
    n = len(lead)
    v = x.reshape(lead + (C, H // f, f, W // f, f))
    perm = tuple(range(n)) + (n, n + 2, n + 4, n + 1, n + 3)
    return v.transpose(perm).reshape(lead + (C * f * f, H // f, W // f))


def unsqueeze(y, factor: int = 2):
    """Depth-to-space, the inverse of eq. 2.1: (..., C·f², h, w) -> (..., C, h·f, w·f)."""
    _check_image(y, "unsqueeze")
    Cf, h, w = y.shape[-3:]
    f = int(factor)
    if Cf % (f * f):
        raise ValueError(f"unsqueeze: channels must be divisible by {f * f}, got shape "
                         f"{tuple(y.shape)}")
    lead = y.shape[:-3]
    n = len(lead)
    C = Cf // (f * f)
    v = y.reshape(lead + (C, f, f, h, w))
    perm = tuple(range(n)) + (n, n + 3, n + 1, n + 4, n + 2)
    return v.transpose(perm).reshape(lead + (C, h * f, w * f))


def factor_out(z):
    """Split the channels in half (eq. 3.1): z (..., C, H, W) -> (kept (..., C/2, H, W),
    factored (..., C − C/2, H, W)); the kept half flows on, the factored half is final."""
    _check_image(z, "factor_out")
    d = z.shape[-3] // 2
    if d < 1:
        raise ValueError(f"factor_out: need at least 2 channels, got shape {tuple(z.shape)}")
    return z[..., :d, :, :], z[..., d:, :, :]


def factor_in(kept, factored):
    """Inverse of eq. 3.1: concatenate along the channel axis."""
    xp = get_array_module(kept, factored)
    return xp.concatenate([kept, factored], axis=-3)


def dequantize(x, rng, xp=None, dtype="float32"):
    """eq. 4.1: x̃ = (x + u)/256, u ~ U(0, 1)^D drawn on the host from ``rng``.

    x: integer intensities in {0, ..., 255}, shape (B, C, H, W) (host or device array);
    rng: numpy.random.Generator; returns x̃ ∈ (0, 1) of ``dtype`` in module ``xp`` (default: the
    module of x).
    """
    xp = get_array_module(x) if xp is None else xp
    u = rng.random(tuple(x.shape))
    xt = to_device(u, xp, dtype)
    return (xt + to_device(x, xp, dtype)) / 256


def quantize(xt):
    """Left inverse of eq. 4.1: floor(256·x̃) clipped to {0..255}, as uint8."""
    xp = get_array_module(xt)
    return xp.clip(xp.floor(xt * 256), 0, 255).astype(xp.uint8)


def logit_transform(xt, alpha: float = ALPHA):
    """eq. 4.2: s = α + (1 − 2α)x̃, y = log s − log(1 − s);
    eq. 4.3: log|det ∂y/∂x̃| = Σ_i [log(1 − 2α) − log s_i − log(1 − s_i)], one per sample.

    xt (B, ...) in [0, 1]; returns (y (B, ...), logdet (B,)).
    """
    xp = get_array_module(xt)
    if not 0 <= alpha < 0.5:
        raise ValueError(f"logit_transform: alpha must be in [0, 0.5), got {alpha}")
    s = alpha + (1 - 2 * alpha) * xt
    ls, l1s = xp.log(s), xp.log1p(-s)
    y = ls - l1s
    per = math.log(1 - 2 * alpha) - ls - l1s
    logdet = per.reshape(per.shape[0], -1).sum(axis=1)
    return y, logdet


def logit_inverse(y, alpha: float = ALPHA):
    """Inverse of eq. 4.2: x̃ = (sigmoid(y) − α)/(1 − 2α), y (B, ...) -> x̃ (B, ...)."""
    xp = get_array_module(y)
    s = 0.5 * (xp.tanh(0.5 * y) + 1)
    return (s - alpha) / (1 - 2 * alpha)


def bits_per_dim(nll, logdet_pre, D: int):
    """eq. 4.4: bits/dim = (−log p(y) − log|det ∂y/∂x̃|)/(D ln 2) + log2 256.

    nll (B,): −log p(y) in nats of the preprocessed data under the flow (docs/images.md:
    ½‖z‖² + D/2 log 2π − ℓ(T), summed over every factored-out part); logdet_pre (B,): the
    preprocessing log-determinant (eq. 4.3); D: dimensions per image (C·H·W).
    Returns bits/dim per sample (B,); average them (equal D) for a data set figure.
    """
    return (nll - logdet_pre) / (D * math.log(2)) + LOG2_256
