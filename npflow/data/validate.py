"""Checks on data before training starts (docs/data.md, section 5).

``validate_data`` refuses malformed data with a ValueError that says what is wrong and what to
do about it: the wrong number of dimensions, the wrong feature dimension or image shape, a
non-numeric dtype, no samples, NaN or Inf values (counted, with the first bad row). It is meant
for entry points (example scripts, ``fit``-style functions), not inner loops: it synchronises
with the host once.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_host

__all__ = ["validate_data"]


def _shape_hint(x, dim, image_shape):
    if image_shape is not None:
        return f"(N, {', '.join(str(s) for s in image_shape)})"
    if dim is not None:
        return f"(N, {dim})"
    return "(N, D)"


def validate_data(x, dim=None, name: str = "data", image_shape=None):
    """Return ``x`` unchanged if it is well-formed data, else raise ValueError.

    Args:
        x: array (numpy or cupy) of shape (N, D), or (N, *image_shape) when ``image_shape`` is
            given. Must be a real numeric dtype with N >= 1 and only finite values.
        dim: expected feature dimension D (for 2-D data), or None to accept any D >= 1.
        name: how the data are called in error messages (e.g. "training data").
        image_shape: expected per-sample shape, e.g. (1, 28, 28), or None for 2-D data.

    Returns:
        ``x`` itself (no copy).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(
            f"{name} must be an array of shape {_shape_hint(x, dim, image_shape)}, got "
            f"{type(x).__name__}; convert it with numpy.asarray(...) first")
    kind = np.dtype(x.dtype).kind
    if kind not in "biuf":
        raise ValueError(
            f"{name} must hold real numbers (float or int), got dtype {x.dtype}; "
            "convert it with .astype(numpy.float64) after removing non-numeric columns")
    if image_shape is not None:
        image_shape = tuple(int(s) for s in image_shape)
        if x.ndim != 1 + len(image_shape) or tuple(x.shape[1:]) != image_shape:
            raise ValueError(
                f"{name} must have shape (N, {', '.join(map(str, image_shape))}) "
                f"(N images of shape {image_shape}), got {tuple(x.shape)}; "
                "check the channel order (N, C, H, W) and the data set")
    else:
        if x.ndim != 2:
            extra = (" (a single sample? use x.reshape(1, -1))" if x.ndim == 1 else
                     " (images? flatten them with x.reshape(len(x), -1) or pass image_shape)")
            raise ValueError(
                f"{name} must be 2-D of shape {_shape_hint(x, dim, None)} (N samples, D "
                f"features), got {x.ndim}-D with shape {tuple(x.shape)}{extra}")
        if dim is not None and x.shape[1] != dim:
            raise ValueError(
                f"{name} has feature dimension {x.shape[1]} but the model expects {dim} "
                f"(shape {tuple(x.shape)}); use data of the model's dimension or build the "
                f"model with dim={x.shape[1]}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no samples (shape {tuple(x.shape)})")
    if kind == "f":
        xp = get_array_module(x)
        n_nan = int(xp.isnan(x).sum())
        n_inf = int(xp.isinf(x).sum())
        if n_nan or n_inf:
            rows = x.reshape(x.shape[0], -1)
            bad_rows = to_host(~xp.isfinite(rows).all(axis=1))
            first = int(np.flatnonzero(bad_rows)[0])
            n_rows = int(bad_rows.sum())
            raise ValueError(
                f"{name} contains {n_nan} NaN and {n_inf} Inf value(s) in {n_rows} of "
                f"{x.shape[0]} samples (first bad sample: row {first}); remove or impute "
                "those rows before training, e.g. x[numpy.isfinite(x).all(axis=1)]")
    return x
