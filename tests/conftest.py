"""Shared test set-up: hypothesis profiles, the --runslow flag, and array-function recording
for the CuPy coverage check (tests/test_zz_cupy_coverage.py)."""
import os

# Small matrix products are many times slower with a multi-threaded BLAS on a busy 2-core
# machine; the tests run single-threaded unless the environment says otherwise. (Effective
# only if numpy is not imported yet, which is the case when pytest loads this file first.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from npflow import backend  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every name the package takes from the array module during the whole test session.
RECORDED_ARRAY_FUNCTIONS: set = set()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (training runs, benchmarks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _record_array_functions():
    with backend.record_array_functions() as names:
        yield
    RECORDED_ARRAY_FUNCTIONS.update(names)
