"""Array backend: one source for NumPy (CPU) and CuPy (GPU).

Compute code never imports numpy for model data. It asks for the array module of its inputs,
``xp = get_array_module(x)``, or of the model's device, ``xp = array_module(device)``, and calls
``xp.<function>``. The same source then runs on CuPy arrays unchanged.

Host <-> device moves go through ``to_host`` (``xp.asnumpy``) and ``to_device``
(``xp.asarray``) only. Test suites may register another array module that stands in for CuPy
(``register_array_module``; the project's own is tests/strict_xp.py, docs/backend.md): its
arrays then select it in ``get_array_module``, and ``array_module("gpu")`` returns it while it
is registered for that device. Nothing is registered in production.
"""
from __future__ import annotations

import numpy

__all__ = [
    "DeviceError", "get_array_module", "array_module", "resolve_dtype", "to_host",
    "to_device", "check_finite", "register_array_module", "unregister_array_module",
    "tune_malloc", "get_blas_threads", "set_blas_threads",
]

#: Registered stand-in array modules: [(array type, module, device or None)], newest first.
_REGISTERED: list = []


class DeviceError(RuntimeError):
    """Raised when the requested device cannot be used (no CuPy, or no GPU)."""


def register_array_module(array_type, module, device: str | None = None):
    """Make ``get_array_module`` return ``module`` for arrays of ``array_type``, and (if
    ``device`` is given, e.g. "gpu") ``array_module(device)`` return it too. ``module`` must
    offer ``asarray`` and ``asnumpy`` as CuPy does (they are the host/device edges). For test
    backends; undo with ``unregister_array_module(module)``."""
    if device is not None and device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    for name in ("asarray", "asnumpy"):
        if not hasattr(module, name):
            raise ValueError(f"register_array_module: the module lacks {name!r}, which "
                             "to_device/to_host need; give it CuPy's host/device functions")
    _REGISTERED.insert(0, (array_type, module, device))


def unregister_array_module(module):
    """Undo every ``register_array_module`` of ``module``."""
    _REGISTERED[:] = [r for r in _REGISTERED if r[1] is not module]


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """The array module (numpy or cupy) of the given arrays; numpy for host scalars."""
    for a in arrays:
        if type(a) is numpy.ndarray:
            continue
        for array_type, module, _ in _REGISTERED:
            if isinstance(a, array_type):
                return module
        if _is_cupy(a):
            import cupy
            return cupy
    return numpy


def _load_cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DeviceError(
            "device='gpu' needs CuPy, which is not installed: "
            "pip install cupy-cuda12x (or: pip install 'npflow[gpu]'); "
            f"the import said: {exc}") from exc
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise DeviceError(
            "device='gpu': CuPy is installed but no CUDA GPU is usable on this machine "
            f"(CUDA said: {exc}). Use device='cpu', or run on a machine with an NVIDIA GPU "
            "and a CUDA 12 driver.") from exc
    if n < 1:
        raise DeviceError(
            "device='gpu': CuPy is installed but it sees no GPU (device count 0). "
            "Use device='cpu', or run on a machine with an NVIDIA GPU and a CUDA 12 driver.")
    return cupy


def array_module(device: str = "cpu"):
    """The array module of a device: "cpu" -> numpy, "gpu" -> cupy (clear error if unusable)."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    for _, module, dev in _REGISTERED:
        if dev == device:
            return module
    return numpy if device == "cpu" else _load_cupy()


def resolve_dtype(dtype) -> numpy.dtype:
    """float32 (the default, also for None) or float64, given as a name or a dtype."""
    if dtype is None:
        return numpy.dtype("float32")
    try:
        dt = numpy.dtype(dtype)
    except TypeError:  # numpy says TypeError for an unknown name; users get ValueError
        raise ValueError(f"unknown dtype {dtype!r}: expected 'float32' or 'float64'") from None
    if dt not in (numpy.dtype("float32"), numpy.dtype("float64")):
        raise ValueError(f"unsupported dtype {dtype!r}: expected 'float32' or 'float64'")
    return dt


def to_host(a):
    """A NumPy array of an array of any module (for logging, plotting, checkpoints): the array
    itself for numpy, ``xp.asnumpy(a)`` (one device-to-host copy, a host sync) otherwise."""
    xp = get_array_module(a)
    if xp is numpy:
        return numpy.asarray(a)
    return xp.asnumpy(a)


def to_device(a, xp, dtype=None):
    """Move host data to the array module ``xp`` (``xp.asarray``: a no-op for numpy arrays
    already there), optionally casting."""
    out = xp.asarray(a, dtype=dtype)    # cast while moving: no float64 copy on the device
    return out


def check_finite(x, name: str = "input"):
    """Raise ValueError if ``x`` holds NaN or Inf, naming where it entered.

    One host synchronisation: use at entry points (data, user arguments), never in inner loops.
    """
    xp = get_array_module(x)
    finite = xp.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or Inf) out of {x.size}; "
            "clean or filter the data before passing it to npflow")
    return x


# ---------------------------------------------------------------- host-side tuning
def _openblas_functions():
    """(get, set) of the OpenBLAS that numpy loaded, through ctypes; (None, None) if not found."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower()
                            and ln.split()[-1].startswith("/")})
    except OSError:
        return None, None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_openblas_", "64_"), ("openblas_", ""), ("openblas_", "64_"),
                         ("scipy_openblas_", "")):
            get = getattr(lib, f"{pre}get_num_threads{suf}", None)
            set_ = getattr(lib, f"{pre}set_num_threads{suf}", None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                return get, set_
    return None, None


def get_blas_threads():
    """numpy's OpenBLAS thread count, or None if OpenBLAS was not found (another BLAS)."""
    get, _ = _openblas_functions()
    return None if get is None else int(get())


def set_blas_threads(n):
    """Set numpy's OpenBLAS thread count to n (if found); return the count now in force or None."""
    get, set_ = _openblas_functions()
    if get is None:
        return None
    import ctypes

    set_(ctypes.c_int(int(n)))
    return int(get())


def tune_malloc(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 2**31 - 1,
                mmap_max: int | None = None) -> bool:
    """Opt-in: ask glibc's malloc to keep freed memory for reuse (whole process, irreversible).

    A training iteration allocates and frees many large temporaries and stage caches. With
    glibc's defaults each block above the (dynamic) mmap threshold is a fresh mmap and freed
    heap tops are trimmed, so the next iteration touches fresh, kernel-zeroed pages: tens of
    thousands of minor page faults per iteration at batch 1000 (bench/README.md). This sets
    M_MMAP_THRESHOLD (blocks up to ``mmap_threshold`` bytes come from the heap) and
    M_TRIM_THRESHOLD (the heap is not trimmed below ``trim_threshold`` bytes of free top) with
    ``mallopt`` through ctypes. The cost: the process keeps its peak heap resident.
    With the default threshold (32 MiB, the most glibc's own dynamic threshold grows to), larger
    blocks are still mapped afresh each time; ``mmap_max=0`` (M_MMAP_MAX) takes every block
    from the heap instead, for models whose arrays are larger (the image CNFs: tens of MiB per
    activation at batch 200).

    Returns True when both settings were applied; False (and changes nothing) when the C
    library is not glibc (macOS, Windows, musl) or mallopt is unavailable or refuses.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
              and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    if ok and mmap_max is not None:
        ok = bool(mallopt(M_MMAP_MAX, int(mmap_max)))
    return ok
