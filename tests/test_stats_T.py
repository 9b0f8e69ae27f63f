"""``stats["T"]`` has one type for every model: a list of floats, one per block (CNF with one
or several blocks, MultiscaleCNF, OT-Flow, flow matching), as have TO-FLOW's logged T and the
JSON records; the progress line stays short for many blocks."""
import numpy as np
import pytest

import npflow
from npflow.cfm import FlowMatchingCNF
from npflow.multiscale import MultiscaleCNF
from npflow.training import TimeOptimizer, _progress_line


def _x(d=2, n=4):
    return np.random.default_rng(0).standard_normal((n, d))


@pytest.mark.parametrize("build, x, n", [
    (lambda: npflow.CNF(2, hidden=(4,), steps=2, dtype="float64"), _x(), 1),
    (lambda: npflow.CNF(2, hidden=(4,), steps=2, blocks=3, train_T=True, dtype="float64"),
     _x(), 3),
    (lambda: MultiscaleCNF((1, 4, 4), hidden=(3,), scales=2, blocks=1, steps=1,
                           dtype="float64"),
     np.random.default_rng(1).integers(0, 256, (2, 1, 4, 4)), 3),
    (lambda: npflow.OTFlow(2, width=4, steps=2, dtype="float64"), _x(), 1),
    (lambda: FlowMatchingCNF(2, hidden=(4,), dtype="float64"), _x(), 1),
])
def test_stats_T_is_a_list_of_floats_one_per_block(build, x, n):
    model = build()
    _, _, stats = model.loss_and_grad(x, np.random.default_rng(0))
    assert isinstance(stats["T"], list) and len(stats["T"]) == n
    assert all(type(t) is float for t in stats["T"])


def test_time_optimizer_logs_T_as_a_list_for_one_block():
    model = npflow.CNF(2, hidden=(4,), steps=2, train_T=True, dtype="float64")
    hook = TimeOptimizer(model, kind="discrete")
    logged = hook.after_step(model, _x(), np.random.default_rng(0), 0, {})
    assert isinstance(logged["T"], list) and len(logged["T"]) == 1


@pytest.mark.parametrize("T, text", [([0.5], "| T 0.5000 |"),
                                     ([0.5, 0.75], "| T 0.5000, 0.7500 |"),
                                     ([1.0] * 9 + [0.25], "| T 0.2500..1.0000 (10 blocks) |")])
def test_progress_line_prints_few_end_times_or_their_range(T, text):
    rec = dict(iteration=3, loss=1.0, loss_avg=1.0, nfe_forward=2, nfe_backward=2, T=T,
               grad_norm=0.5, sec_per_iter=0.1, time_left_s=1.0, kinetic=0.25)
    line = _progress_line(rec, 10)
    assert text in line and "| kin 0.25 |" in line
