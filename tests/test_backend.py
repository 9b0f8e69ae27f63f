"""Backend (npflow/backend.py): devices, dtypes, host/device moves, finiteness checks.

CuPy is optional. Without a usable GPU, device="gpu" must fail with a DeviceError that says
which piece is missing: CuPy itself (simulated by making `import cupy` fail) or a GPU/driver
(the real situation on a machine with CuPy installed but no GPU).
"""
import sys
import types

import numpy as np
import pytest

from npflow import backend
from npflow.backend import DeviceError


def _gpu_usable():
    try:
        backend.array_module("gpu")
        return True
    except DeviceError:
        return False


def test_cpu_device_is_numpy():
    assert backend.array_module("cpu") is np
    assert backend.get_array_module(np.zeros(2)).zeros is np.zeros
    assert backend.get_array_module(1.0, 2).tanh is np.tanh      # host scalars -> numpy


def test_gpu_without_cupy_says_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # makes `import cupy` raise ImportError
    with pytest.raises(DeviceError, match="needs CuPy, which is not installed") as info:
        backend.array_module("gpu")
    assert "pip install" in str(info.value)


def test_gpu_without_a_gpu_says_the_gpu_is_missing():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pytest.skip("cupy is not installed here; the no-CuPy message is tested separately")
    if _gpu_usable():
        pytest.skip("a GPU is usable on this machine")
    with pytest.raises(DeviceError) as info:
        backend.array_module("gpu")
    msg = str(info.value)
    assert "CuPy is installed" in msg and "GPU" in msg and "device='cpu'" in msg and "--device" not in msg


def test_gpu_with_zero_devices_says_so(monkeypatch):
    """CUDA present but reporting no device: a third distinct message."""
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(DeviceError, match="sees no GPU"):
        backend.array_module("gpu")


def test_device_error_is_a_runtime_error():
    assert issubclass(DeviceError, RuntimeError)


@pytest.mark.parametrize("device", ["cuda", "GPU", "tpu", "", None])
def test_unknown_device_raises_value_error(device):
    with pytest.raises(ValueError, match="unknown device"):
        backend.array_module(device)


@pytest.mark.parametrize("name,want", [("float32", np.float32), ("float64", np.float64),
                                       (np.float32, np.float32), (np.dtype("float64"), np.float64)])
def test_resolve_dtype_accepts_float32_and_float64(name, want):
    assert backend.resolve_dtype(name) == np.dtype(want)


@pytest.mark.parametrize("name", ["float16", "int32", "complex128", "nonsense", "f128x"])
def test_unknown_or_unsupported_dtype_raises_value_error(name):
    with pytest.raises(ValueError, match="dtype"):
        backend.resolve_dtype(name)


def test_to_device_and_to_host_round_trip():
    a = np.arange(6.0).reshape(2, 3)
    d = backend.to_device(a, np, np.float32)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(backend.to_host(d), a)
    assert backend.to_device(d, np, np.float32) is d           # no copy when nothing changes


def test_check_finite_names_the_input_and_counts():
    backend.check_finite(np.ones(3), "fine")
    bad = np.array([1.0, np.nan, np.inf, 2.0])
    with pytest.raises(ValueError, match=r"data x contains 2 non-finite value\(s\) .* out of 4"):
        backend.check_finite(bad, "data x")


class _FakeArray:
    pass


class _FakeModule:
    """A minimal stand-in array module: what register_array_module requires."""

    def asarray(self, a, dtype=None):
        out = _FakeArray()
        out.data = np.asarray(a, dtype=dtype)
        return out

    def asnumpy(self, a):
        return a.data.copy()


def test_registered_module_is_chosen_for_its_arrays_and_its_device():
    fake = _FakeModule()
    backend.register_array_module(_FakeArray, fake, device="gpu")
    try:
        a = backend.to_device(np.arange(3.0), fake, np.float32)
        assert backend.get_array_module(np.zeros(1), a) is fake
        assert backend.array_module("gpu") is fake and backend.array_module("cpu") is np
        h = backend.to_host(a)
        assert type(h) is np.ndarray and h.dtype == np.float32
    finally:
        backend.unregister_array_module(fake)
    assert backend.get_array_module(a) is np          # unregistered: back to production
    assert not backend._REGISTERED


def test_register_array_module_refuses_a_module_without_the_host_device_edges():
    with pytest.raises(ValueError, match="lacks 'asnumpy'"):
        backend.register_array_module(_FakeArray, types.SimpleNamespace(asarray=np.asarray))
    with pytest.raises(ValueError, match="unknown device"):
        backend.register_array_module(_FakeArray, _FakeModule(), device="tpu")


def test_to_device_casts_on_the_way_without_a_float64_copy():
    import strict_xp
    with strict_xp.installed("gpu") as sxp, strict_xp.track(float64=True) as t:
        d = backend.to_device(np.arange(4.0), sxp, np.float32)
        assert d.dtype == np.float32 and backend.get_array_module(d) is sxp
    assert not t.float64 and len(t.transfers) == 1
