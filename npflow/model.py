"""The base class of npflow's models and the registry ``npflow.load`` rebuilds them from.

A model is its constructor arguments (``config``, JSON-able) plus a dict of arrays (``params``).
That is all a checkpoint stores (docs/training.md, section 4): ``npflow.load`` looks the class
up by name in the registry, calls ``cls.from_config(config)`` and puts the saved arrays in
``params``. Every subclass is registered under its class name when it is defined.

Subclasses (CNF, OTFlow) offer:
    loss_and_grad(x, rng, ...) -> (loss: float, grads: dict like params, stats: dict)
    log_prob(x, ...) -> (B,)      sample(n, rng) -> (n, ...)
and read ``self.params`` at every call (no copies of the arrays kept elsewhere), so that
replacing ``params`` is all an optimiser step or a checkpoint load needs to do.
"""
from __future__ import annotations

import math

import numpy

from .backend import array_module, check_finite, get_array_module, resolve_dtype, to_device

from typing import NamedTuple

__all__ = ["FlowModel", "Part", "register_model", "model_class", "registered_models"]


class Part(NamedTuple):
    """A model's loss and gradient over some rows of a batch of B samples, in parts that add up
    over any split of the batch into row blocks (docs/parallel.md, eq. 1.2):

    sums   dict name -> 0-d array or float: Σ over the rows of a per-row term (e.g. "nll"),
           or the rows' share of a batch mean (e.g. the analytic ∂L/∂T)
    grads  dict like params: the rows' share of ∂loss/∂θ (their cotangent is the whole batch's,
           1/B per row, so the shares of all the row blocks sum to the gradient)
    same   dict name -> float: equal for every row block (the NFE: every block takes the same
           steps)

    ``model.loss_and_grad_part(x, rng, rows=(lo, hi), ...)`` returns one,
    ``model.loss_from_part(part, B, ...)`` turns the sum of all the parts into (loss, grads,
    stats), and ``loss_and_grad`` is the two with rows = the whole batch."""
    sums: dict
    grads: dict
    same: dict


def check_rows(rows, B):
    """(lo, hi) with 0 <= lo < hi <= B from rows (None: the whole batch); ValueError if bad."""
    if rows is None:
        return 0, B
    lo, hi = (int(r) for r in rows)
    if not 0 <= lo < hi <= B:
        raise ValueError(f"rows {rows!r} must satisfy 0 <= lo < hi <= B = {B}")
    return lo, hi

_REGISTRY: dict = {}


def register_model(cls=None, *, name: str | None = None):
    """Register a FlowModel subclass for ``npflow.load`` (usable as ``@register_model`` or
    ``@register_model(name="...")``). Subclasses are already registered under their class name;
    use this for an extra or different name."""
    def deco(c):
        _REGISTRY[name or c.__name__] = c
        return c
    return deco if cls is None else deco(cls)


def model_class(name: str):
    """The registered model class called ``name``; ValueError listing the known names if none.

    "CNF" and "OTFlow" are imported on demand, so a checkpoint loads without the caller having
    imported their modules."""
    if name not in _REGISTRY:
        lazy = {"CNF": "npflow.cnf", "OTFlow": "npflow.otflow",
                "MultiscaleCNF": "npflow.multiscale", "FlowMatchingCNF": "npflow.cfm",
                "FlowMatchingMultiscaleCNF": "npflow.cfm_multiscale",
                "Autoencoder": "npflow.autoencoder"}
        if name in lazy:
            from importlib import import_module
            import_module(lazy[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown model class {name!r}; registered: {sorted(_REGISTRY)} "
                         "(import the module that defines it before loading)")
    return _REGISTRY[name]


def registered_models() -> list:
    """Names of the registered model classes."""
    return sorted(_REGISTRY)


class FlowModel:
    """Base of every npflow model: config, device, dtype, array module and params.

    config: dict of the JSON-able constructor keyword arguments (``cls(**config)`` rebuilds
        the model); device: "cpu" or "gpu"; dtype: "float32" or "float64".
    Subclasses call ``super().__init__(config, device, dtype)`` first and then fill
    ``self.params`` (dict name -> array of ``self.xp``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, config: dict, device: str = "cpu", dtype="float32"):
        self.config = dict(config)
        self.device = device
        self.dtype = resolve_dtype(dtype)
        self.xp = array_module(device)
        self.params: dict = {}

    @classmethod
    def from_config(cls, config: dict, device: str | None = None):
        """Rebuild a model from its config; ``device`` (if given) overrides config["device"]."""
        config = dict(config)
        if device is not None:
            config["device"] = device
        return cls(**config)

    # -- parameters ---------------------------------------------------------------------------
    def set_params(self, params: dict, check: bool = True) -> None:
        """Replace ``self.params`` by ``params`` (moved to this model's device, dtype kept).

        check: require the same names and shapes as the current params (ValueError naming the
        differences otherwise)."""
        if check:
            problems = params_mismatch(self.params, params)
            if problems:
                raise ValueError(f"{type(self).__name__}.set_params: {problems}")
        xp = self.xp
        self.params = {k: (a if get_array_module(a) is xp else xp.asarray(a))
                       for k, a in params.items()}

    def prepare_data(self, x, event_shape):
        """Check a batch x of shape (B, *event_shape) and move it to this model's device and
        dtype; ValueError naming the shapes, or the count of NaN/Inf (one host check)."""
        expected = tuple(int(s) for s in event_shape)
        dims = ", ".join(str(s) for s in expected)
        if isinstance(x, (list, tuple)):          # host data given as nested lists: convert
            try:
                x = numpy.asarray(x, dtype=numpy.float64)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"data must be an array of shape (B, {dims}); the given "
                                 f"{type(x).__name__} is not a rectangular list of numbers "
                                 f"({exc})") from None
        shape = getattr(x, "shape", None)
        if shape is None:
            raise ValueError(f"data must be an array of shape (B, {dims}), got a "
                             f"{type(x).__name__}; convert it with numpy.asarray(...)")
        if tuple(shape[1:]) != expected or len(shape) != len(expected) + 1:
            raise ValueError(f"data must have shape (B, {dims}), got {tuple(shape)}")
        if shape[0] < 1:
            raise ValueError("data batch is empty")
        x = to_device(x, self.xp, self.dtype)
        # one host synchronisation: NaN propagates through max, so one number decides both the
        # finiteness and the overflow checks (squares of values above √max overflow)
        xp = self.xp
        m = float(xp.abs(x).max())
        if not math.isfinite(m):
            check_finite(x, "data x")
        limit = math.sqrt(float(numpy.finfo(x.dtype).max))
        if m > limit:
            raise DataOverflowError(
                f"data x has values up to {m:.3g}: beyond {limit:.3g} their squares overflow "
                f"{x.dtype} and the loss becomes inf; standardize the data (e.g. z-score each "
                "feature) first")
        return x

    def num_params(self) -> int:
        """Number of scalar parameters."""
        return int(sum(int(a.size) for a in self.params.values()))

    # -- interface of the concrete models -------------------------------------------------------
    def loss_and_grad(self, x, rng, **kwargs):
        raise NotImplementedError

    def log_prob(self, x, **kwargs):
        raise NotImplementedError

    def sample(self, n, rng, **kwargs):
        raise NotImplementedError

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path, optimizer=None, rng=None, iteration=None, extra=None) -> None:
        """Write an HDF5 checkpoint atomically (npflow.checkpoint.save; docs/training.md §4)."""
        from . import checkpoint
        checkpoint.save(path, self, optimizer=optimizer, rng=rng, iteration=iteration,
                        extra=extra)

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({cfg})"


class DataOverflowError(ValueError, FloatingPointError):
    """Data whose magnitude overflows the model's floating-point arithmetic (their squares
    exceed the dtype's range): bad input (a ValueError) and a floating-point failure (a
    FloatingPointError, so the training loop and the MPI reduction treat it as a non-finite
    step)."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (int, integral numpy number) >= ``minimum``;
    ValueError naming ``name`` otherwise (2.5 is not silently truncated to 2)."""
    ok = isinstance(value, (int, numpy.integer)) and not isinstance(value, bool)
    if not ok and isinstance(value, (float, numpy.floating)) and float(value).is_integer():
        ok = True
    if not ok or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def params_mismatch(expected: dict, got: dict) -> str:
    """A message describing missing / unexpected names and shape differences ('' if none)."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}"
              for k in sorted(set(expected) & set(got))
              if tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing parameters {missing}")
    if extra:
        parts.append(f"unexpected parameters {extra}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes))
    return ", ".join(parts)
