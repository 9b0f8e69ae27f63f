"""Backend (npflow/backend.py): devices, dtypes, host/device moves, finiteness checks.

CuPy is optional. Without a usable GPU, device="gpu" must fail with a DeviceError that says
which piece is missing: CuPy itself (simulated by making `import cupy` fail) or a GPU/driver
(the real situation on a machine with CuPy installed but no GPU).
"""
import sys

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
    assert backend.array_module("cpu") is np or backend.array_module("cpu")._module is np
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


def test_recording_proxy_records_names_including_submodules():
    with backend.record_array_functions() as names:
        xp = backend.get_array_module(np.zeros(2))
        xp.tanh(np.zeros(2))
        xp.linalg.norm(np.ones(2))
        backend.array_module("cpu").random.default_rng(0)
    assert {"tanh", "linalg.norm", "random.default_rng"} <= names


# ------------------------------------------------------------------ BLAS threads (threadpoolctl)

def test_blas_thread_helpers_set_restore_and_respect_the_environment(monkeypatch):
    from npflow import backend
    before = backend.get_blas_threads()
    if before is None:
        pytest.skip("threadpoolctl finds no BLAS in this numpy")
    try:
        assert backend.set_blas_threads(2) == 2
        with backend.blas_threads(1):
            assert backend.get_blas_threads() == 1
        assert backend.get_blas_threads() == 2                 # restored after the block
        for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(v, raising=False)
        assert backend.limit_blas_threads(1) == 1
        backend.set_blas_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")             # the environment rules
        assert backend.limit_blas_threads(1) == 2
    finally:
        backend.set_blas_threads(before)
