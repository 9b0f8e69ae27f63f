"""Trace and Frobenius estimators from tangents, and their adjoints (docs/layers.md, section 3).

A network forward with tangents eps (K, B, ...) returns ydot_k = J eps_k (eq. 1.1), with J the
per-sample Jacobian ∂f/∂z. From those tangents:

    trace_estimate(eps, ydot, w)   = w Σ_k <eps_k, J eps_k>     (B,)              (eq. 3.1)
    frobenius_estimate(ydot, w)    = w Σ_k ‖J eps_k‖²            (B,)              (eq. 3.2)

The weight w says which estimator runs, explicitly and visibly (probe_weight, eq. 3.3):
w = 1 for the exact basis (K = D probes e_1..e_D: eq. 3.1 is then tr J exactly and eq. 3.2 is
‖J‖²_F exactly), w = 1/K for Hutchinson probes (Gaussian or Rademacher: the mean over K probes,
unbiased since E[ε εᵀ] = I). The adjoints (eq. 3.4-3.5) map a cotangent of the (B,) estimate to
the cotangent ydotbar of the tangents, which the network's backward turns into gradients with
respect to z, t and θ (the probes themselves are constants).
"""
from __future__ import annotations

import math

import numpy

from .backend import get_array_module, resolve_dtype, to_device

__all__ = ["PROBE_KINDS", "probes", "probe_weight", "trace_estimate", "trace_estimate_adjoint",
           "frobenius_estimate", "frobenius_estimate_adjoint"]

PROBE_KINDS = ("exact", "gaussian", "rademacher")


def _n_features(x_shape):
    return int(math.prod(x_shape[1:]))


def probes(kind: str, K, x_shape, rng=None, dtype="float32", xp=numpy):
    """Probe tangents eps of shape (K, *x_shape) for x of shape x_shape = (B, D) or (B, C, H, W).

    kind "exact": the D = prod(x_shape[1:]) basis vectors e_i (features flattened), each
        broadcast over the batch; K must be None or D; no randomness (rng unused).
    kind "gaussian": K probes with i.i.d. N(0, 1) entries; "rademacher": i.i.d. ±1 entries.
        Drawn on the host from the numpy Generator ``rng`` (float64, then cast), so the same
        generator state gives the same probes on every device, and moved once to ``xp``.
    Use probe_weight(kind, K) for the matching estimator weight (eq. 3.3).
    """
    dtype = resolve_dtype(dtype)
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) < 2 or min(x_shape) < 1:
        raise ValueError(f"probes: x_shape must be (B, D) or (B, C, H, W) with positive sizes, "
                         f"got {x_shape}")
    D = _n_features(x_shape)
    if kind == "exact":
        if K is not None and int(K) != D:
            raise ValueError(f"probes: the exact trace needs K = D = {D} basis probes for "
                             f"x_shape {x_shape}, got K={K}")
        eye = xp.eye(D, dtype=dtype).reshape((D, 1) + x_shape[1:])
        return xp.ascontiguousarray(xp.broadcast_to(eye, (D,) + x_shape))
    if kind not in PROBE_KINDS:
        raise ValueError(f"probes: unknown kind {kind!r}: expected one of {PROBE_KINDS}")
    if K is None or int(K) < 1:
        raise ValueError(f"probes: {kind} probes need K >= 1, got K={K}")
    if not isinstance(rng, numpy.random.Generator):
        raise ValueError(f"probes: {kind} probes need an explicit numpy.random.Generator, "
                         f"got {type(rng).__name__}")
    shape = (int(K),) + x_shape
    if kind == "gaussian":
        host = rng.standard_normal(shape)
    else:
        host = 2.0 * rng.integers(0, 2, size=shape) - 1.0
    return to_device(host.astype(dtype), xp)


def probe_weight(kind: str, K: int) -> float:
    """Estimator weight w (eq. 3.3): 1 for the exact basis (a sum over the D basis vectors),
    1/K for Hutchinson probes (a mean over the K probes)."""
    if kind == "exact":
        return 1.0
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe_weight: unknown kind {kind!r}: expected one of {PROBE_KINDS}")
    return 1.0 / int(K)


def _check_pair(name, eps, ydot):
    if eps.shape != ydot.shape or eps.ndim < 3:
        raise ValueError(f"{name}: eps and ydot must both have shape (K, B, ...), got eps "
                         f"{tuple(eps.shape)} and ydot {tuple(ydot.shape)}")


def _per_sample(a):
    """Σ over K and the feature axes: (K, B, ...) -> (B,)."""
    K, B = a.shape[:2]
    return a.reshape(K, B, -1).sum(axis=(0, 2))


def _batch_view(v, ndim):
    """(B,) -> (1, B, 1, ...) for broadcasting over (K, B, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def trace_estimate(eps, ydot, weight):
    """eq. 3.1: w Σ_k <eps_k, ydot_k> per sample, ydot_k = J eps_k.

    eps, ydot (K, B, ...); weight w (probe_weight) -> (B,). With the exact basis and w = 1 this
    is tr J; with Hutchinson probes and w = 1/K it is the unbiased mean of ε_kᵀ J ε_k.
    """
    _check_pair("trace_estimate", eps, ydot)
    return weight * _per_sample(eps * ydot)


def trace_estimate_adjoint(eps, tr_bar, weight):
    """eq. 3.4: cotangent tr_bar (B,) of trace_estimate -> ydotbar_k = w tr_bar ⊙ eps_k (K, B, ...)."""
    return (weight * _batch_view(tr_bar, eps.ndim)) * eps


def frobenius_estimate(ydot, weight):
    """eq. 3.2: w Σ_k ‖ydot_k‖² per sample (B,). Exact basis, w = 1: ‖J‖²_F; Hutchinson,
    w = 1/K: the unbiased mean of ‖J ε_k‖² (E[εεᵀ] = I)."""
    if ydot.ndim < 3:
        raise ValueError(f"frobenius_estimate: ydot must have shape (K, B, ...), got "
                         f"{tuple(ydot.shape)}")
    return weight * _per_sample(ydot * ydot)


def frobenius_estimate_adjoint(ydot, fro_bar, weight):
    """eq. 3.5: cotangent fro_bar (B,) of frobenius_estimate -> ydotbar_k = 2 w fro_bar ⊙ ydot_k."""
    return (2.0 * weight * _batch_view(fro_bar, ydot.ndim)) * ydot
