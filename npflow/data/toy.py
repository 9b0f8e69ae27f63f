"""The eight toy 2-D densities of FFJORD's benchmark set (docs/data.md, section 1).

Each generator draws ``n`` samples from an explicit ``numpy.random.Generator`` and returns a
float64 array of shape (n, 2); the same generator state gives the same samples. The recipes
follow FFJORD's benchmark set (eqs. 1.1-1.8 of docs/data.md; docs/reference.md, section 1); the scikit-learn-style sets
(swissroll, circles, moons) are written out here from their definitions, with no dependency on
scikit-learn. Sets built block by block (two circles, four rings, two moons, five arms, two
spirals) are shuffled, so any slice of a sample is itself a sample of the density.

Two densities are known in closed form and are offered for tests and reports
(``toy_log_density``): checkerboard, uniform on a support of area 32 (eq. 1.9), and
8gaussians, an equal-weight mixture of eight isotropic Gaussians (eq. 1.10).

Data generation is host-side (numpy), as allowed for data loading in DESIGN.md section 6.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["TOY_NAMES", "toy", "toy_log_density", "CLOSED_FORM_NAMES"]

TOY_NAMES = ("swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals",
             "checkerboard")
CLOSED_FORM_NAMES = ("checkerboard", "8gaussians")

# 8gaussians (eq. 1.5): centres 4·(cos kπ/4, sin kπ/4) and noise 0.5, both divided by 1.414
# (FFJORD divides by the literal 1.414, not by √2).
_G8_SCALE = 1.414
_G8_CENTRES = 4.0 * np.stack([np.cos(np.arange(8) * math.pi / 4),
                              np.sin(np.arange(8) * math.pi / 4)], axis=1) / _G8_SCALE
_G8_STD = 0.5 / _G8_SCALE


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n must be a positive int (the number of samples), got {n!r}")
    if n < 1:
        raise ValueError(f"n must be a positive int (the number of samples), got {n}")
    return int(n)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), "
            f"got {type(rng).__name__}")
    return rng


def _check_name(name) -> str:
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy data set {name!r}; valid names: {', '.join(TOY_NAMES)}")
    return name


def _swissroll(n, rng):
    """Eq. 1.1: t = 1.5π(1 + 2U), (t cos t, t sin t) + N(0, 1), divided by 5."""
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    x += rng.standard_normal((n, 2))
    return x / 5.0


def _circles(n, rng):
    """Eq. 1.2: n//2 points on the unit circle, the rest on radius 0.5 (evenly spaced angles),
    shuffled, plus N(0, 0.08²), times 3."""
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0.0, 2 * math.pi, n_out, endpoint=False)
    a_in = np.linspace(0.0, 2 * math.pi, n_in, endpoint=False)
    x = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], axis=1),
                        0.5 * np.stack([np.cos(a_in), np.sin(a_in)], axis=1)])
    x = x[rng.permutation(n)]
    x += 0.08 * rng.standard_normal((n, 2))
    return 3.0 * x


def _rings(n, rng):
    """Eq. 1.3: radii 1, 0.75, 0.5 (n//4 points each) and 0.25 (the rest), evenly spaced
    angles, times 3, shuffled, plus N(0, 0.08²)."""
    q = n // 4
    counts = (q, q, q, n - 3 * q)
    parts = []
    for radius, m in zip((1.0, 0.75, 0.5, 0.25), counts):
        a = np.linspace(0.0, 2 * math.pi, m, endpoint=False)
        parts.append(radius * np.stack([np.cos(a), np.sin(a)], axis=1))
    x = 3.0 * np.concatenate(parts)
    x = x[rng.permutation(n)]
    return x + 0.08 * rng.standard_normal((n, 2))


def _moons(n, rng):
    """Eq. 1.4: upper moon (cos θ, sin θ), lower moon (1 − cos θ, 0.5 − sin θ), θ evenly spaced
    in [0, π]; shuffled, plus N(0, 0.1²), times 2, shifted by (−1, −0.2)."""
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0.0, math.pi, n_out)
    a_in = np.linspace(0.0, math.pi, n_in)
    x = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], axis=1),
                        np.stack([1.0 - np.cos(a_in), 0.5 - np.sin(a_in)], axis=1)])
    x = x[rng.permutation(n)]
    x += 0.1 * rng.standard_normal((n, 2))
    return 2.0 * x + np.array([-1.0, -0.2])


def _8gaussians(n, rng):
    """Eq. 1.5: a uniformly chosen centre 4·(cos kπ/4, sin kπ/4) plus N(0, 0.5²), over 1.414."""
    k = rng.integers(0, 8, size=n)
    return _G8_CENTRES[k] + _G8_STD * rng.standard_normal((n, 2))


def _pinwheel(n, rng):
    """Eq. 1.6: arm k = i mod 5; f = (r, s), r ~ N(1, 0.3²), s ~ N(0, 0.1²); rotated
    (counter-clockwise) by φ = 2πk/5 + 0.25·exp(r); times 2; shuffled."""
    k = np.arange(n) % 5
    r = 1.0 + 0.3 * rng.standard_normal(n)
    s = 0.1 * rng.standard_normal(n)
    phi = 2 * math.pi * k / 5 + 0.25 * np.exp(r)
    c, si = np.cos(phi), np.sin(phi)
    x = np.stack([c * r - si * s, si * r + c * s], axis=1)
    return 2.0 * x[rng.permutation(n)]


def _2spirals(n, rng):
    """Eq. 1.7: m = √U·3π; (−m cos m + U'/2, m sin m + U''/2) and its negation, divided by 3,
    plus N(0, 0.1²); independent uniforms U, U', U''; shuffled."""
    h = (n + 1) // 2
    m = np.sqrt(rng.random(h)) * 3 * math.pi
    d = np.stack([-m * np.cos(m) + 0.5 * rng.random(h), m * np.sin(m) + 0.5 * rng.random(h)],
                 axis=1)
    x = np.concatenate([d, -d])[:n] / 3.0
    x = x[rng.permutation(n)]
    return x + 0.1 * rng.standard_normal((n, 2))


def _checkerboard(n, rng):
    """Eq. 1.8: x1 ~ U[−2, 2); x2 = U[0, 1) − 2·Bernoulli(½) + (⌊x1⌋ mod 2); both times 2."""
    x1 = 4.0 * rng.random(n) - 2.0
    x2 = rng.random(n) - 2.0 * rng.integers(0, 2, size=n) + np.mod(np.floor(x1), 2.0)
    return 2.0 * np.stack([x1, x2], axis=1)


_GENERATORS = {
    "swissroll": _swissroll, "circles": _circles, "rings": _rings, "moons": _moons,
    "8gaussians": _8gaussians, "pinwheel": _pinwheel, "2spirals": _2spirals,
    "checkerboard": _checkerboard,
}


def toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of the toy density ``name`` (docs/data.md, eqs. 1.1-1.8).

    Args:
        name: one of TOY_NAMES.
        n: positive int, the number of samples.
        rng: numpy.random.Generator; the only source of randomness (same state, same samples).

    Returns:
        float64 array of shape (n, 2).
    """
    gen = _GENERATORS[_check_name(name)]
    n = _check_n(n)
    x = gen(n, _check_rng(rng))
    return np.ascontiguousarray(x, dtype=np.float64)


def _checkerboard_log_density(x):
    """Eq. 1.9: log(1/32) on the support {u = x/2 ∈ [−2, 2)², ⌊u1⌋ + ⌊u2⌋ even}, else −inf."""
    u = 0.5 * x
    inside = np.all((u >= -2.0) & (u < 2.0), axis=1)
    parity = np.mod(np.floor(u[:, 0]) + np.floor(u[:, 1]), 2.0) == 0.0
    return np.where(inside & parity, -math.log(32.0), -np.inf)


def _8gaussians_log_density(x):
    """Eq. 1.10: log p(x) = logsumexp_k(−‖x − μ_k‖²/(2s²)) − log 8 − log(2πs²), s = 0.5/1.414."""
    d2 = np.sum((x[:, None, :] - _G8_CENTRES[None, :, :]) ** 2, axis=2)  # (B, 8)
    e = -d2 / (2.0 * _G8_STD ** 2)
    emax = e.max(axis=1)
    lse = emax + np.log(np.exp(e - emax[:, None]).sum(axis=1))
    return lse - math.log(8.0) - math.log(2.0 * math.pi * _G8_STD ** 2)


def toy_log_density(name: str, x) -> np.ndarray:
    """Exact log-density of a toy set that has one in closed form (docs/data.md, eqs. 1.9-1.10).

    Args:
        name: "checkerboard" or "8gaussians" (CLOSED_FORM_NAMES).
        x: array-like of shape (B, 2).

    Returns:
        float64 array of shape (B,); −inf outside the checkerboard's support.
    """
    if name not in CLOSED_FORM_NAMES:
        raise ValueError(
            f"no closed-form log-density for {name!r}; available for: "
            f"{', '.join(CLOSED_FORM_NAMES)} (valid toy names: {', '.join(TOY_NAMES)})")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (B, 2), got {x.shape}")
    if name == "checkerboard":
        return _checkerboard_log_density(x)
    return _8gaussians_log_density(x)
