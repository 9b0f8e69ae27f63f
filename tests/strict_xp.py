"""A strict CPU stand-in for CuPy, for tests (docs/backend.md).

``StrictArray`` wraps a NumPy array the way a CuPy array wraps device memory, and ``xp`` (a
module object) stands in for ``cupy``. Like CuPy, and in places stricter:

* **No implicit conversion to NumPy.** ``np.asarray(a)``, ``np.array(a)``, any numpy function
  (``np.concatenate``, ``np.einsum``, ...) or ufunc (``np.tanh``, ``np.add.at``) called on a
  strict array, and arithmetic mixing a strict array with a NumPy array, raise
  ``ImplicitConversionError`` (a TypeError, the error CuPy raises) at the offending line.
  Only ``xp.<name>``, array methods and operators compute on strict arrays; NumPy *scalars* and
  Python numbers may be operands (CuPy accepts them).
* **Only what CuPy has.** ``xp.<name>`` (``linalg.norm``, ``add.at``, an array method) that the
  installed CuPy lacks raises AttributeError naming it, and so does a keyword argument the CuPy
  function does not take. Without CuPy installed these two checks are skipped.
* **Reductions give 0-d arrays, not host scalars** (``xp.sum(a)`` as ``cupy.sum``), so a host
  value is obtained only through a counted sync.
* **Host syncs are counted**: ``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``,
  ``.get()``, ``xp.asnumpy`` (which ``npflow.backend.to_host`` calls), ``repr``. Inside
  ``with track() as t:`` each one is an ``Event`` in ``t.syncs`` with the line that caused it.
* **float64 creations are recorded** inside ``with track(float64=True) as t:``: every float64
  array made by ``xp``, a method or an operator is an ``Event`` in ``t.float64``.

``install()`` registers the module with ``npflow.backend`` for the "gpu" device, so a model
built with ``device="gpu"`` runs on strict arrays through exactly the code path it takes on a
GPU (``tests/conftest.py``'s ``device`` fixture does this per test).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from dataclasses import dataclass, field

import numpy as np

try:  # the reference for "what CuPy has"
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

__all__ = ["StrictArray", "xp", "ImplicitConversionError", "Event", "Tracker", "track",
           "install", "uninstall", "installed", "USED_NAMES", "SYNC_REPORT", "missing_in"]

_HERE = os.path.abspath(__file__)
_NUMPY_DIR = os.path.dirname(os.path.abspath(np.__file__))

#: Every name taken from ``xp`` during the process ("tanh", "linalg.norm", "add.at", ...).
USED_NAMES: set = set()

#: Host syncs per training step, by model case (filled by tests/test_strict_models.py,
#: printed in the session summary by tests/conftest.py).
SYNC_REPORT: dict = {}


class ImplicitConversionError(TypeError):
    """Device data met NumPy: what CuPy refuses ("Implicit conversion to a NumPy array is not
    allowed")."""


# ----------------------------------------------------------------------------- tracking

@dataclass
class Event:
    """One host sync or one float64 creation: what, and where (the first frame outside this
    file and numpy), plus the npflow functions on the stack (``(file basename, function)``)."""
    kind: str
    where: str
    npflow_stack: tuple = ()

    def inside(self, filename: str, function: str | None = None) -> bool:
        """True if npflow's ``filename`` (and ``function``, if given) is on the stack."""
        return any(f == filename and (function is None or fn == function)
                   for f, fn in self.npflow_stack)


@dataclass
class Tracker:
    float64_watch: bool = False
    syncs: list = field(default_factory=list)
    float64: list = field(default_factory=list)
    transfers: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.syncs)} host sync(s), {len(self.transfers)} host-to-device "
                 f"transfer(s), {len(self.float64)} float64 array(s)"]
        lines += [f"  sync {e.kind} at {e.where}" for e in self.syncs]
        lines += [f"  float64 {e.kind} at {e.where}" for e in self.float64[:20]]
        return "\n".join(lines)


_TRACKERS: list = []


@contextlib.contextmanager
def track(float64: bool = False):
    """Count host syncs (and record float64 arrays if ``float64``) inside the block."""
    t = Tracker(float64_watch=float64)
    _TRACKERS.append(t)
    try:
        yield t
    finally:
        _TRACKERS.remove(t)


def _event(kind: str) -> Event:
    f = sys._getframe(2)
    where, stack = None, []
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if where is None and fn != _HERE and not fn.startswith(_NUMPY_DIR):
            where = f"{fn}:{f.f_lineno} ({f.f_code.co_name})"
        parts = fn.split(os.sep)
        if "npflow" in parts[:-1]:
            stack.append((parts[-1], f.f_code.co_name))
        f = f.f_back
    return Event(kind, where or "?", tuple(stack))


def _sync(kind: str):
    if _TRACKERS:
        e = _event(kind)
        for t in _TRACKERS:
            t.syncs.append(e)


def _transfer(kind: str):
    if _TRACKERS:
        e = _event(kind)
        for t in _TRACKERS:
            t.transfers.append(e)


def _made(a: np.ndarray):
    if a.dtype == np.float64 and any(t.float64_watch for t in _TRACKERS):
        e = _event(f"float64 array of shape {a.shape}")
        for t in _TRACKERS:
            if t.float64_watch:
                t.float64.append(e)


# ----------------------------------------------------------------------------- wrapping

def _refuse(what: str):
    raise ImplicitConversionError(
        f"Implicit conversion to a NumPy array is not allowed ({what}); on a GPU this is "
        "CuPy's TypeError. Use xp = npflow.backend.get_array_module(x) and xp.<function>, "
        "or npflow.backend.to_host(x) at an edge (logging, checkpoints).")


def _wrap(r):
    """NumPy results -> strict arrays (numpy scalars become 0-d arrays, as in CuPy)."""
    if isinstance(r, np.ndarray):
        _made(r)
        return StrictArray(r)
    if isinstance(r, np.generic) and not isinstance(r, (np.str_, np.bytes_)):
        r = np.asarray(r)
        _made(r)
        return StrictArray(r)
    if isinstance(r, tuple) and not hasattr(r, "_fields"):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _unwrap(a, where: str):
    """Arguments of an xp function or operator: strict arrays -> their NumPy data; NumPy
    arrays are refused (host data must be moved with xp.asarray / to_device first)."""
    if isinstance(a, StrictArray):
        return a._a
    if isinstance(a, np.ndarray):
        _refuse(f"{where} got a NumPy array; move host data with xp.asarray / "
                "npflow.backend.to_device first")
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
        return type(a)(_unwrap(v, where) for v in a)
    return a


def _unwrap_index(i):
    if isinstance(i, StrictArray):
        return i._a
    if isinstance(i, tuple):
        return tuple(_unwrap_index(v) for v in i)
    return i


_SIGNATURES: dict = {}


def _check_kwargs(cupy_obj, name: str, kwargs):
    """Refuse keyword arguments the CuPy function does not accept (numpy-only keywords)."""
    if not kwargs or cupy_obj is None:
        return
    key = id(cupy_obj)
    if key not in _SIGNATURES:
        try:
            params = inspect.signature(cupy_obj).parameters.values()
            if any(p.kind is p.VAR_KEYWORD for p in params):
                _SIGNATURES[key] = None
            else:
                _SIGNATURES[key] = {p.name for p in params}
        except (TypeError, ValueError):  # compiled function: no signature to check
            _SIGNATURES[key] = None
    accepted = _SIGNATURES[key]
    if accepted is not None:
        bad = set(kwargs) - accepted
        if bad:
            raise TypeError(f"cupy.{name} takes no keyword argument(s) {sorted(bad)} "
                            "(a NumPy-only keyword: this call would fail on a GPU)")


def _cupy_attr(path: str):
    """The CuPy object at a dotted path, or raise AttributeError (None without CuPy)."""
    if _cupy is None:
        return None
    obj = _cupy
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"CuPy has no `cupy.{path}`: npflow would fail on a GPU here")
        obj = getattr(obj, part)
    return obj


def missing_in(module, names):
    """The names (dotted for submodules and ufunc methods) that ``module`` lacks."""
    out = set()
    for name in names:
        obj = module
        for part in name.split("."):
            if not hasattr(obj, part):
                out.add(name)
                break
            obj = getattr(obj, part)
    return out


def _function(fn, path: str):
    cupy_fn = _cupy_attr(path)

    def call(*args, **kwargs):
        _check_kwargs(cupy_fn, path, kwargs)
        args = [_unwrap(a, f"cupy.{path}") for a in args]
        kwargs = {k: _unwrap(v, f"cupy.{path}") for k, v in kwargs.items()}
        return _wrap(fn(*args, **kwargs))
    call.__name__ = call.__qualname__ = path
    call.__doc__ = f"strict stand-in of cupy.{path} (numpy.{path} on strict arrays)"
    return call


#: The keyword arguments a CuPy ufunc call accepts (NumPy's where=, order=, subok= ... not).
_UFUNC_KWARGS = {"out", "dtype", "casting"}


class _Ufunc:
    """A NumPy ufunc seen through ``xp``: calls, and the methods CuPy's ufuncs have."""

    def __init__(self, ufunc, path):
        self._ufunc, self._path = ufunc, path
        self._call = _function(ufunc, path)
        self.__name__ = path

    def __call__(self, *args, **kwargs):
        bad = set(kwargs) - _UFUNC_KWARGS
        if bad:
            raise TypeError(f"cupy.{self._path} takes no keyword argument(s) {sorted(bad)} "
                            "(CuPy ufuncs take out, dtype, casting): this would fail on a GPU")
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        full = f"{self._path}.{name}"
        attr = getattr(self._ufunc, name)
        out = _function(attr, full) if callable(attr) else (_cupy_attr(full), attr)[1]
        USED_NAMES.add(full)
        return out


class _Module(types.ModuleType):
    """``xp`` and its submodules: every public NumPy name CuPy also has, on strict arrays."""

    def __init__(self, numpy_module, prefix: str):
        super().__init__("strict_xp" + ("." + prefix.rstrip(".") if prefix else ""))
        self._np, self._prefix = numpy_module, prefix
        self._cache = {}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._cache[name]
        except KeyError:
            pass
        path = self._prefix + name
        attr = getattr(self._np, name)           # AttributeError for names NumPy lacks
        _cupy_attr(path)                         # AttributeError for names CuPy lacks
        USED_NAMES.add(path)
        if isinstance(attr, types.ModuleType):
            out = _Module(attr, path + ".")
        elif isinstance(attr, np.ufunc):
            out = _Ufunc(attr, path)
        elif isinstance(attr, type) or not callable(attr):
            out = attr                           # dtypes (float32, ...), constants (pi, inf)
        else:
            out = _function(attr, path)
        self._cache[name] = out
        return out

    def __repr__(self):
        sub = "." + self._prefix.rstrip(".") if self._prefix else ""
        return f"<strict stand-in for cupy{sub}>"


xp = _Module(np, "")


# The host/device edges, as CuPy spells them (npflow.backend.to_device / to_host call these).
def _asarray(a, dtype=None, order=None, *, blocking=False):
    """cupy.asarray: host data (or a strict array) -> strict array; a host-to-device copy."""
    if isinstance(a, StrictArray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return _wrap(a._a.astype(dtype))
    if isinstance(a, (list, tuple)) and any(isinstance(v, StrictArray) for v in a):
        return _wrap(np.asarray(_unwrap(a, "cupy.asarray"), dtype=dtype))
    _transfer("asarray")
    return _wrap(np.array(a, dtype=dtype, order=order or "K", copy=True))


def _array(a, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(a, StrictArray):
        return _wrap(np.array(a._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    _transfer("array")
    return _wrap(np.array(_unwrap(a, "cupy.array") if isinstance(a, (list, tuple)) else a,
                          dtype=dtype, order=order, ndmin=ndmin))


def _asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """cupy.asnumpy: strict array -> a NumPy copy (a device-to-host copy: one host sync)."""
    if isinstance(a, StrictArray):
        _sync("asnumpy")
        return np.array(a._a, order=order)
    return np.asarray(a, order=order)


for _name, _fn in (("asarray", _asarray), ("array", _array), ("asnumpy", _asnumpy)):
    xp._cache[_name] = _fn
xp._cache["get_array_module"] = lambda *arrays: (
    xp if any(isinstance(a, StrictArray) for a in arrays) else np)


# ----------------------------------------------------------------------------- the array

def _binary(ufunc, reflected=False):
    name = ufunc.__name__

    def op(self, other):
        if isinstance(other, StrictArray):
            o = other._a
        elif isinstance(other, (int, float, complex, bool, np.generic)):
            o = other
        elif isinstance(other, np.ndarray):
            _refuse(f"operator {name} mixes a device array with a NumPy array")
        else:
            return NotImplemented
        return _wrap(ufunc(o, self._a) if reflected else ufunc(self._a, o))
    return op


def _inplace(ufunc):
    name = ufunc.__name__

    def op(self, other):
        if isinstance(other, StrictArray):
            o = other._a
        elif isinstance(other, (int, float, complex, bool, np.generic)):
            o = other
        elif isinstance(other, np.ndarray):
            _refuse(f"in-place operator {name} mixes a device array with a NumPy array")
        else:
            return NotImplemented
        ufunc(self._a, o, out=self._a)
        return self
    return op


class StrictArray:
    """A device array stand-in: NumPy data that only ``xp``, methods and operators touch."""

    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- what CuPy refuses
    def __array__(self, dtype=None, copy=None):
        _refuse("numpy.asarray / numpy.array / a NumPy function on a device array")

    def __array_function__(self, func, types, args, kwargs):
        _refuse(f"numpy.{func.__name__} called on a device array; use xp.{func.__name__}")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # A NumPy scalar on the left of an operator (np.float32(2) * a) lands here; CuPy
        # computes it on the device. Any other ufunc call on device data is refused.
        if method == "__call__" and not kwargs and len(inputs) == 2 and any(
                isinstance(v, np.generic) for v in inputs) and all(
                isinstance(v, (StrictArray, np.generic, int, float)) for v in inputs):
            return _wrap(ufunc(*[v._a if isinstance(v, StrictArray) else v for v in inputs]))
        name = ufunc.__name__ + ("" if method == "__call__" else "." + method)
        _refuse(f"numpy.{name} called on a device array; use xp.{name}")

    # -- host syncs (device -> host)
    def __float__(self):
        _sync("float()")
        return float(self._a)

    def __int__(self):
        _sync("int()")
        return int(self._a)

    def __index__(self):
        _sync("index")
        return self._a.__index__()

    def __bool__(self):
        _sync("bool()")
        return bool(self._a)

    def __complex__(self):
        _sync("complex()")
        return complex(self._a)

    def item(self, *args):
        _sync(".item()")
        return self._a.item(*args)

    def tolist(self):
        _sync(".tolist()")
        return self._a.tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync(".get()")
        return np.array(self._a, order=order)

    def __repr__(self):
        _sync("repr()")
        return "strict_" + repr(self._a)

    __str__ = __repr__

    def __format__(self, spec):
        _sync("format()")
        return format(self._a, spec)

    # -- metadata (host side, no sync)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    base = property(lambda self: None if self._a.base is None else _wrap(self._a.base))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __getitem__(self, i):
        return _wrap(self._a[_unwrap_index(i)])

    def __setitem__(self, i, v):
        if isinstance(v, StrictArray):
            v = v._a
        elif isinstance(v, np.ndarray):
            _transfer("__setitem__ of a NumPy array")
        elif isinstance(v, (list, tuple)):
            v = _unwrap(v, "__setitem__")
        self._a[_unwrap_index(i)] = v

    def __getattr__(self, name):
        # the remaining ndarray methods (reshape, sum, astype, ...), if CuPy's ndarray has them
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        cupy_meth = _cupy_attr("ndarray." + name)
        USED_NAMES.add("ndarray." + name)
        if not callable(attr):
            return attr

        def method(*args, **kwargs):
            _check_kwargs(cupy_meth, "ndarray." + name, kwargs)
            args = [_unwrap(a, f"ndarray.{name}") for a in args]
            kwargs = {k: _unwrap(v, f"ndarray.{name}") for k, v in kwargs.items()}
            return _wrap(attr(*args, **kwargs))
        return method

    def __copy__(self):
        return _wrap(self._a.copy())

    def __deepcopy__(self, memo):
        return _wrap(self._a.copy())

    def __reduce__(self):  # pickling moves data to the host, as for CuPy arrays
        _sync("pickle")
        return (_from_host, (self._a.copy(),))

    def __neg__(self):
        return _wrap(-self._a)

    def __pos__(self):
        return _wrap(+self._a)

    def __abs__(self):
        return _wrap(abs(self._a))

    def __invert__(self):
        return _wrap(~self._a)


def _from_host(a):
    return StrictArray(a)


for _op, _uf in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                 ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                 ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                 ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                 ("lshift", np.left_shift), ("rshift", np.right_shift)):
    setattr(StrictArray, f"__{_op}__", _binary(_uf))
    setattr(StrictArray, f"__r{_op}__", _binary(_uf, reflected=True))
    setattr(StrictArray, f"__i{_op}__", _inplace(_uf))
for _op, _uf in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                 ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(StrictArray, f"__{_op}__", _binary(_uf))

xp._cache["ndarray"] = StrictArray


# ----------------------------------------------------------------------------- registration

def install(device: str = "gpu"):
    """Register ``xp`` with npflow.backend: strict arrays select it, and ``device`` means it."""
    from npflow import backend
    backend.unregister_array_module(xp)
    backend.register_array_module(StrictArray, xp, device=device)


def uninstall():
    from npflow import backend
    backend.unregister_array_module(xp)


@contextlib.contextmanager
def installed(device: str = "gpu"):
    """``install(device)`` for the block."""
    install(device)
    try:
        yield xp
    finally:
        uninstall()
