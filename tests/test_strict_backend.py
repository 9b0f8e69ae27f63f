"""The strict device backend itself (tests/strict_xp.py): each refusal and each count can fail.

These tests are what make the device tests (test_strict_models.py, test_strict_layers.py)
mean something: numpy on device data raises at the offending line, host syncs are counted,
float64 creations recorded, and names or keywords CuPy lacks are refused.
"""
import numpy as np
import pytest

import strict_xp as S
from strict_xp import ImplicitConversionError, xp


@pytest.fixture
def a():
    return xp.asarray(np.arange(6.0, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("call", [
    lambda a: np.asarray(a), lambda a: np.array(a), lambda a: np.tanh(a),
    lambda a: np.concatenate([a, a]), lambda a: np.einsum("ij->i", a),
    lambda a: np.add.at(a, 0, 1.0), lambda a: np.zeros((2, 3)) + a,
    lambda a: a + np.zeros((2, 3)), lambda a: xp.tanh(np.zeros(3)),
    lambda a: np.float32(2.0) * a + np.ones(3, np.float32),
])
def test_numpy_on_device_data_is_refused(a, call):
    with pytest.raises(ImplicitConversionError, match="Implicit conversion to a NumPy array"):
        call(a)


def test_the_error_points_at_the_offending_line(a):
    with pytest.raises(ImplicitConversionError) as info:
        np.tanh(a)  # THE LINE
    assert any("THE LINE" in (entry.statement.lines[0] if entry.statement.lines else "")
               or "np.tanh(a)" in str(entry.statement) for entry in info.traceback)


def test_xp_methods_and_operators_stay_on_the_device(a):
    for r in (xp.tanh(a), a.sum(axis=0), a @ a.T, 2.0 * a, np.float32(2.0) * a, a[0],
              xp.concatenate([a, a]), a.reshape(3, 2), -a, a > 1, xp.sum(a)):
        assert isinstance(r, S.StrictArray)
    assert xp.sum(a).shape == ()           # a 0-d device array, as in CuPy, not a host scalar
    b = a.copy()
    b += 1.0
    b[0] = xp.zeros(3, dtype=np.float32)
    assert xp.asnumpy(b)[0].tolist() == [0.0, 0.0, 0.0]


def test_host_syncs_are_counted_with_their_line(a):
    with S.track() as t:
        float(a[0, 0]), int(a[0, 1]), bool(a[0, 1]), a[1, 1].item(), a.tolist(), a.get()
        xp.asnumpy(a)
        xp.tanh(a) * 2.0 + a                                 # no sync
    assert [e.kind for e in t.syncs] == ["float()", "int()", "bool()", ".item()",
                                         ".tolist()", ".get()", "asnumpy"]
    assert all("test_strict_backend.py" in e.where for e in t.syncs)


def test_float64_arrays_are_recorded_only_when_watched(a):
    with S.track(float64=True) as t:
        a * np.float64(2.0)                      # NumPy scalar: float64 under NEP 50
        a * 2.0                                  # Python scalar: stays float32
        xp.zeros(3)                              # default dtype float64
    assert len(t.float64) == 2
    with S.track() as t:
        xp.zeros(3)
    assert not t.float64


def test_names_and_keywords_cupy_lacks_are_refused(a):
    if S._cupy is None:
        pytest.skip("CuPy is not installed: nothing to check names against")
    for name in ("insert", "geomspace", "errstate"):        # NumPy has them, CuPy 14 not
        with pytest.raises(AttributeError, match=f"CuPy has no `cupy.{name}`"):
            getattr(xp, name)
    with pytest.raises(TypeError, match=r"no keyword argument\(s\) \['where'\]"):
        xp.sum(a, where=a > 1)                   # NumPy-only keyword
    with pytest.raises(TypeError, match=r"no keyword argument\(s\) \['where'\]"):
        xp.exp(a, where=a > 1)                   # NumPy-only ufunc keyword
    with pytest.raises(AttributeError, match="CuPy has no `cupy.ndarray.resize`"):
        a.copy().resize((6,))
    assert S.missing_in(S._cupy, {"tanh", "linalg.norm", "add.at", "no_such_name"}) == {
        "no_such_name"}


def test_strict_arrays_select_the_strict_module_while_installed(a):
    from npflow import backend
    with S.installed("gpu"):
        assert backend.get_array_module(a) is xp
        assert backend.array_module("gpu") is xp
        with S.track() as t:
            h = backend.to_host(a)
        assert type(h) is np.ndarray and len(t.syncs) == 1
    assert backend.get_array_module(a) is np
