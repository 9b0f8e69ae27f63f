"""Data-parallel loss_and_grad (docs/cnf.md, eq. 10.1): the loss and its gradient are sums over
samples, so row blocks solved in threads or in worker processes add up to the single-thread
numbers."""
import numpy as np
import pytest

import npflow


def _pair(threads, kind="threads", **kw):
    m = npflow.CNF(2, hidden=(16, 16), T=0.5, steps=3, solver="rk38", dtype="float64", **kw)
    x = npflow.data.toy("8gaussians", 301, np.random.default_rng(0))
    one = m.loss_and_grad(x, np.random.default_rng(5))
    setattr(m, kind, threads)
    m.min_rows_per_thread = m.min_rows_per_process = 50
    assert m._parallel_parts(x.shape[0]) == threads
    try:
        many = m.loss_and_grad(x, np.random.default_rng(5))
    finally:
        m.close()
    setattr(m, kind, 1)
    return one, many


def _assert_same(one, many):
    (l1, g1, s1), (l2, g2, s2) = one, many
    assert l2 == pytest.approx(l1, rel=1e-13, abs=1e-13)
    assert g1.keys() == g2.keys()
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-11, atol=1e-13, err_msg=k)
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_allclose(s2[k], s1[k], rtol=1e-11, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(trace="hutchinson", probes=2, kinetic=0.1, jacobian=0.1, train_T=True, blocks=2),
    dict(trace="rademacher", train_T=True),
])
def test_threaded_row_blocks_sum_to_single_thread_loss_and_grad(threads, kw):
    _assert_same(*_pair(threads, **kw))


@pytest.mark.parametrize("processes, kw", [
    (2, dict(trace="hutchinson", probes=2, kinetic=0.1, jacobian=0.1, train_T=True, blocks=2)),
    (3, dict()),
])
def test_process_row_blocks_sum_to_single_process_loss_and_grad(processes, kw):
    _assert_same(*_pair(processes, kind="processes", **kw))


def _two_process_model():
    """A small float64 CNF with 2 processes that splits a batch of 40 rows, and that batch."""
    m = npflow.CNF(2, hidden=(8,), steps=2, solver="rk4", dtype="float64")
    m.processes = 2
    m.min_rows_per_process = 10
    return m, npflow.data.toy("8gaussians", 40, np.random.default_rng(1))


def test_processes_keep_working_across_calls_and_restart_after_close():
    m, x = _two_process_model()
    try:
        a = m.loss_and_grad(x, np.random.default_rng(0))
        b = m.loss_and_grad(x, np.random.default_rng(0))        # the same workers again
        m.close()
        assert m._workers is None
        c = m.loss_and_grad(x, np.random.default_rng(0))        # fresh workers
    finally:
        m.close()
    assert a[0] == b[0] == c[0]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], c[1][k])


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
    with pytest.raises(ValueError, match="processes"):
        m.processes = 0
    with pytest.raises(ValueError, match="cannot both"):
        m.processes = 2                                # threads is 2
    m.threads = 1
    m.processes = 2
    assert m._parallel_parts(m.min_rows_per_process * 2) == 2
    assert m._parallel_parts(m.min_rows_per_process * 2 - 1) == 1
    with pytest.raises(ValueError, match="cannot both"):
        m.threads = 2


def test_a_killed_worker_gives_a_clear_error_and_the_next_call_starts_a_fresh_one():
    import os
    import signal

    from npflow.workers import WorkerError

    m, x = _two_process_model()
    try:
        a = m.loss_and_grad(x, np.random.default_rng(0))
        proc = m._workers._procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with pytest.raises(WorkerError, match="gone|died"):
            m.loss_and_grad(x, np.random.default_rng(0))
        assert m._workers is None
        b = m.loss_and_grad(x, np.random.default_rng(0))
    finally:
        m.close()
    assert a[0] == b[0]
