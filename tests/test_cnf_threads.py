"""Data-parallel loss_and_grad (docs/cnf.md, eq. 3.13): the loss and its gradient are sums over
samples, so row blocks solved in threads add up to the single-thread numbers."""
import numpy as np
import pytest

import npflow


def _pair(threads, **kw):
    m = npflow.CNF(2, hidden=(16, 16), T=0.5, steps=3, solver="rk38", dtype="float64", **kw)
    x = npflow.data.toy("8gaussians", 301, np.random.default_rng(0))
    one = m.loss_and_grad(x, np.random.default_rng(5))
    m.threads = threads
    m.min_rows_per_thread = 50
    assert m._parallel_parts(x.shape[0]) == threads
    many = m.loss_and_grad(x, np.random.default_rng(5))
    m.threads = 1
    return one, many


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(trace="hutchinson", probes=2, kinetic=0.1, jacobian=0.1, train_T=True, blocks=2),
    dict(trace="rademacher", train_T=True),
])
def test_threaded_row_blocks_sum_to_single_thread_loss_and_grad(threads, kw):
    (l1, g1, s1), (l2, g2, s2) = _pair(threads, **kw)
    assert l2 == pytest.approx(l1, rel=1e-13, abs=1e-13)
    assert g1.keys() == g2.keys()
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-11, atol=1e-13, err_msg=k)
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_allclose(s2[k], s1[k], rtol=1e-11, atol=1e-13, err_msg=k)


def test_threads_fall_back_to_one_part_for_adaptive_solver_and_small_batches():
    m = npflow.CNF(2, hidden=(8,), solver="dopri5")
    m.threads = 2
    assert m._parallel_parts(10_000) == 1          # one error norm couples the rows
    m = npflow.CNF(2, hidden=(8,), solver="rk4")
    m.threads = 2
    assert m._parallel_parts(m.min_rows_per_thread * 2) == 2
    assert m._parallel_parts(m.min_rows_per_thread * 2 - 1) == 1
    with pytest.raises(ValueError, match="threads"):
        m.threads = 0
