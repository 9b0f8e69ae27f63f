"""Shared test set-up: hypothesis profiles, the --runslow flag, and the device backend of the
device tests (tests/test_strict_*.py): the strict CPU stand-in for CuPy (tests/strict_xp.py)
by default, the real CuPy with --device-backend cupy (bench/gpu_check.py on a GPU).

The CuPy coverage check lives in the strict backend itself: every name npflow takes from the
array module is checked against the installed CuPy when it is first taken (AttributeError at
that line otherwise), in whatever order the tests run; the session summary lists the count.
"""
import os
import sys

# Small matrix products are many times slower with a multi-threaded BLAS on a busy 2-core
# machine; the tests run single-threaded unless the environment says otherwise. (Effective
# only if numpy is not imported yet, which is the case when pytest loads this file first.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import strict_xp  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (training runs, benchmarks)")
    parser.addoption("--device-backend", choices=("strict", "cupy"), default="strict",
                     help="what device='gpu' means in the device tests: 'strict' (the CPU "
                          "stand-in for CuPy, tests/strict_xp.py) or 'cupy' (a real GPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class DeviceBackend:
    """What a device test needs: ``xp`` (the device's array module), ``strict`` (True for the
    stand-in), ``track(float64=False)`` (a strict_xp.Tracker; None on real CuPy, whose syncs
    and float64 creations are not observable), and ``is_device(a)``."""

    def __init__(self, name, xp):
        self.name, self.xp, self.strict = name, xp, name == "strict"

    def track(self, float64=False):
        if self.strict:
            return strict_xp.track(float64=float64)
        import contextlib
        return contextlib.nullcontext(None)

    def is_device(self, a):
        return isinstance(a, self.xp.ndarray)


@pytest.fixture
def device(request):
    """The device backend behind model(device="gpu") for this test (see DeviceBackend)."""
    name = request.config.getoption("--device-backend")
    if name == "cupy":
        from npflow.backend import DeviceError, array_module
        try:
            xp = array_module("gpu")
        except DeviceError as exc:
            pytest.skip(str(exc))
        yield DeviceBackend("cupy", xp)
        return
    with strict_xp.installed("gpu") as xp:
        yield DeviceBackend("strict", xp)


def pytest_terminal_summary(terminalreporter):
    if strict_xp.SYNC_REPORT:
        terminalreporter.write_line(
            "strict device backend, host syncs per loss_and_grad: " + ", ".join(
            f"{k} {v}" for k, v in sorted(strict_xp.SYNC_REPORT.items())))
    names = strict_xp.USED_NAMES
    if not names:
        return
    cupy = strict_xp._cupy
    if cupy is None:
        terminalreporter.write_line(
            f"strict device backend: {len(names)} array-module names used; CuPy is not "
            "installed, so they were not checked against it")
        return
    missing = strict_xp.missing_in(cupy, names)
    terminalreporter.write_line(
        f"strict device backend: {len(names)} array-module names used, each checked against "
        f"CuPy {cupy.__version__} at first use; missing in CuPy: {sorted(missing) or 'none'}")
