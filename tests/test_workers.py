"""npflow.workers: the worker processes behind CNF.processes (docs/cnf.md section 10)."""
import os
import signal

import pytest

from npflow.workers import WorkerError, WorkerPool


def test_worker_pool_returns_each_handlers_result_in_order():
    pool = WorkerPool(2, "operator", "itemgetter", (0,))      # handler(p) = p[0]
    try:
        pool.submit([("a", 1), ("b", 2)])
        assert pool.collect() == ["a", "b"]
        pool.submit([[7]])                                       # fewer payloads than workers
        assert pool.collect() == [7]
        with pytest.raises(ValueError, match="payloads"):
            pool.submit([[1], [2], [3]])
    finally:
        pool.close()


def test_worker_exception_comes_back_with_its_traceback_and_the_worker_survives():
    pool = WorkerPool(1, "operator", "itemgetter", (0,))
    try:
        pool.submit([()])                                        # ()[0]: IndexError there
        with pytest.raises(WorkerError, match="IndexError"):
            pool.collect()
        pool.submit([[5]])
        assert pool.collect() == [5]
    finally:
        pool.close()


def test_a_killed_worker_is_reported_not_waited_for_forever():
    pool = WorkerPool(1, "operator", "itemgetter", (0,))
    try:
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].wait()
        with pytest.raises(WorkerError, match="gone|died"):
            pool.submit([[1]])
            pool.collect()
    finally:
        pool.close()


def test_a_factory_that_fails_is_reported_at_start():
    with pytest.raises(WorkerError, match="no_such_factory"):
        WorkerPool(1, "operator", "no_such_factory")


def test_close_ends_the_worker_processes():
    pool = WorkerPool(2, "operator", "itemgetter", (0,))
    procs = list(pool._procs)
    pool.close()
    assert all(p.poll() is not None for p in procs)


class _OnlyHere:
    """Defined in this test module only: a worker cannot unpickle it."""


def test_a_payload_the_worker_cannot_unpickle_is_reported_and_the_worker_survives():
    pool = WorkerPool(1, "operator", "itemgetter", (0,))
    try:
        pool.submit([[_OnlyHere()]])
        with pytest.raises(WorkerError, match="_OnlyHere|test_workers"):
            pool.collect()
        pool.submit([[3]])
        assert pool.collect() == [3]
    finally:
        pool.close()


def test_ctrl_c_is_left_to_the_parent_the_worker_keeps_serving():
    pool = WorkerPool(1, "operator", "itemgetter", (0,))
    try:
        os.kill(pool._procs[0].pid, signal.SIGINT)
        pool.submit([[9]])
        assert pool.collect() == [9]
        assert pool._procs[0].poll() is None
    finally:
        pool.close()
