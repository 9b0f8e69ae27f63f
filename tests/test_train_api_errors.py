"""The API-level items of issue 11 (docs/training.md, section 10): bad constructor arguments,
bad data and bad dynamics are one clear ValueError before any work; library messages use API
words, not command-line flags; OT-Flow's parameters never alias."""
import numpy as np
import pytest

import npflow
from npflow.solvers import odeint


def test_cnf_refuses_a_non_integer_dimension_instead_of_truncating():
    with pytest.raises(ValueError, match=r"dim must be an integer >= 1, got 2\.5"):
        npflow.CNF(dim=2.5)
    with pytest.raises(ValueError, match="hidden widths"):
        npflow.CNF(dim=2, hidden=(8, 4.5))
    assert npflow.CNF(dim=2.0, hidden=(4,)).dim == 2          # an integral float is an integer
    with pytest.raises(ValueError, match="dim must be an integer"):
        npflow.OTFlow(2.5)


def test_cnf_refuses_an_unknown_solver_and_bad_tolerances_at_construction():
    with pytest.raises(ValueError, match="unknown solver 'bogus'.*dopri5"):
        npflow.CNF(dim=2, solver="bogus")
    with pytest.raises(ValueError, match="rtol > 0"):
        npflow.CNF(dim=2, solver="dopri5", rtol=0.0)


@pytest.mark.parametrize("n", [-1, 2.5, "3"])
def test_sample_refuses_a_bad_count(n):
    rng = np.random.default_rng(0)
    for model in (npflow.CNF(dim=2, hidden=(4,)), npflow.OTFlow(2, width=4)):
        with pytest.raises(ValueError, match="number of samples n must be an integer >= 1"):
            model.sample(n, rng)


def test_loss_and_grad_takes_a_python_list_as_data():
    model = npflow.CNF(dim=2, hidden=(4,), dtype="float64")
    rng = np.random.default_rng(0)
    loss_list, _, _ = model.loss_and_grad([[0.1, 0.2], [0.3, -0.1]], rng)
    loss_arr, _, _ = model.loss_and_grad(np.array([[0.1, 0.2], [0.3, -0.1]]),
                                         np.random.default_rng(0))
    assert loss_list == loss_arr
    with pytest.raises(ValueError, match=r"shape \(B, 2\).*not a rectangular list"):
        model.loss_and_grad([[0.1, 0.2], [0.3]], rng)
    with pytest.raises(ValueError, match=r"shape \(B, 2\), got a str"):
        model.loss_and_grad("data", rng)
    ot = npflow.OTFlow(2, width=4, dtype="float64")
    a, _, _ = ot.loss_and_grad([[0.1, 0.2], [0.3, -0.1]], np.random.default_rng(0))
    b, _, _ = ot.loss_and_grad(np.array([[0.1, 0.2], [0.3, -0.1]]), np.random.default_rng(0))
    assert a == b


@pytest.mark.parametrize("dtype, big", [("float32", 1e30), ("float64", 1e200)])
def test_overflowing_input_is_refused_instead_of_an_inf_loss(dtype, big):
    model = npflow.CNF(dim=2, hidden=(4,), dtype=dtype)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="overflow.*standardize"):
        model.loss_and_grad(np.array([[big, 0.0], [0.0, 1.0]]), rng)
    with pytest.raises(ValueError, match="overflow"):
        model.log_prob(np.array([[big, 0.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        model.loss_and_grad(np.array([[np.nan, 0.0]]), rng)
    with pytest.raises(ValueError, match="overflow"):
        npflow.OTFlow(2, width=4, dtype=dtype).loss_and_grad(np.array([[big, 0.0]]), rng)


class _WrongShape:
    """dy/dt of the wrong shape: (B, D+1) for a (B, D) state."""
    params = {}

    def forward(self, t, y):
        return np.concatenate([y, y[:, :1]], axis=1), None

    def backward(self, cache, dydt_bar):
        raise AssertionError("not reached")


@pytest.mark.parametrize("method, kw", [("rk4", {"steps": 2}), ("dopri5", {})])
def test_odeint_names_a_dynamics_output_of_the_wrong_shape(method, kw):
    with pytest.raises(ValueError, match=r"shape \(3, 3\) but the state has shape \(3, 2\).*"
                                         r"must return dy/dt of y's shape"):
        odeint(_WrongShape(), np.zeros((3, 2)), 0.0, 1.0, method=method, **kw)


def test_device_errors_use_api_words_not_command_line_flags(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)        # CuPy "not installed"
    with pytest.raises(npflow.DeviceError) as info:
        npflow.CNF(dim=2, device="gpu")
    assert "--device" not in str(info.value)
    import inspect
    from npflow import backend
    assert "--device" not in inspect.getsource(backend)


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_otflow_residual_layers_never_share_an_array(depth, dtype):
    model = npflow.OTFlow(2, width=5, depth=depth, dtype=dtype)
    p = model.params
    names = [k for k in p if k[0] in "Kb" and k[1:].isdigit() and int(k[1:]) >= 1]
    assert len(names) == 2 * (depth - 1)
    before = {k: p[k].copy() for k in p}
    p["K1"] += 1.0                                    # in place, as an optimiser might
    p["b1"] -= 1.0
    for k in p:
        if k not in ("K1", "b1"):
            np.testing.assert_array_equal(p[k], before[k], err_msg=k)
    for a in names:
        for b in names:
            if a != b:
                assert not np.shares_memory(p[a], p[b]), (a, b)
    # the initial draw is still the reference's: every residual layer starts equal
    for i in range(2, depth):
        np.testing.assert_array_equal(before[f"K{i}"], before["K1"])
