"""bench/gpu_check.py's steps, with the strict CPU stand-in for CuPy as the "gpu" device.

The check itself needs a GPU; here each step runs on tests/strict_xp.py (so the code paths it
takes on CuPy run, and numpy on device data would fail), PyTorch on the CPU, and the no-GPU
path ends with exit code 2.
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import gpu_check  # noqa: E402

TINY_MNIST = dict(image_shape=(1, 4, 4), hidden=(2,), blocks=1, steps=1, batch=2)


def test_without_a_gpu_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "find_gpu", lambda: (False, "no driver (test)"))
    monkeypatch.setattr(gpu_check, "install_extras", lambda **kw: pytest.fail("installed"))
    assert gpu_check.main(["--quick"]) == gpu_check.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert "no usable NVIDIA GPU" in err and "no driver (test)" in err


def test_find_gpu_reports_no_gpu_on_this_machine():
    found, why = gpu_check.find_gpu()
    if found:
        pytest.skip(f"a GPU is here: {why}")
    assert why


def test_float64_step_on_the_stand_in_matches_numpy(device):
    rows = gpu_check.compare_float64_step("gpu", names=["cnf-exact", "otflow", "multiscale"])
    assert [r["case"] for r in rows] == ["cnf-exact", "multiscale", "otflow"] or \
        sorted(r["case"] for r in rows) == ["cnf-exact", "multiscale", "otflow"]
    assert all(r["ok"] and r["grad_max_rel_diff"] <= 1e-10 for r in rows), rows


def test_float64_comparison_can_fail(device, monkeypatch):
    """A device model that differs (another seed) is flagged, not passed."""
    import strict_cases
    case = strict_cases.CASES["cnf-exact"]
    other = strict_cases.Case(
        lambda dev, dt: case.build("cpu", dt) if dev == "cpu" else
        __import__("npflow").CNF(2, hidden=(4,), steps=2, trace="exact", dtype=dt,
                                 device=dev, seed=7), case.batch)
    monkeypatch.setitem(strict_cases.CASES, "cnf-other-seed", other)
    (row,) = gpu_check.compare_float64_step("gpu", names=["cnf-other-seed"])
    assert not row["ok"] and row["grad_max_rel_diff"] > 1e-6


def test_npflow_timings_run_on_the_device(device):
    toy = gpu_check.time_npflow_toy(16, iters=2, warmup=1, device="gpu")
    assert toy["median_s"] > 0 and np.isfinite(toy["loss_last"]) and toy["peak_bytes"] is None
    mn = gpu_check.time_npflow_mnist(iters=1, warmup=0, device="gpu", config=TINY_MNIST)
    assert mn["median_s"] > 0 and np.isfinite(mn["bpd_last"])


def test_torch_timings_run_on_the_cpu():
    pytest.importorskip("torchdiffeq")
    toy = gpu_check.time_torch_toy(16, iters=1, warmup=0, device="cpu")
    assert toy["median_s"] > 0 and np.isfinite(toy["loss_first"])
    mn = gpu_check.time_torch_mnist(iters=1, warmup=0, device="cpu", config=TINY_MNIST)
    assert mn["median_s"] > 0 and np.isfinite(mn["bpd_first"])


def test_device_tests_run_and_are_counted():
    res = gpu_check.run_device_tests("strict", extra=["-k", "cnf-exact and keeps_params"])
    assert res["ok"] and res["counts"].get("passed") == 1, res


def test_pytest_output_is_parsed_including_failures():
    text = ("..F\nFAILED tests/test_strict_models.py::test_x[cnf-exact] - TypeError: boom\n"
            "1 failed, 2 passed, 3 deselected in 1.23s\n")
    summary, counts, failures = gpu_check.parse_pytest_output(text)
    assert counts == {"failed": 1, "passed": 2, "deselected": 3}
    assert failures == ["FAILED tests/test_strict_models.py::test_x[cnf-exact] - TypeError: boom"]


def test_whole_check_on_the_stand_in_writes_json_and_markdown(device, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "TOY_BATCHES", (8, 16))
    monkeypatch.setattr(gpu_check, "MNIST", TINY_MNIST)
    monkeypatch.setattr(gpu_check, "run_device_tests", lambda *a, **k: {
        "command": "pytest (stubbed in this test)", "summary": "1 passed in 0.1s",
        "counts": {"passed": 1}, "failures": [], "seconds": 0.1, "ok": True})
    monkeypatch.setattr(gpu_check, "compare_float64_step",
                        lambda dev: [{"case": "cnf-exact", "loss_cpu": 1.0, "loss_device": 1.0,
                                      "loss_rel_diff": 0.0, "grad_max_rel_diff": 0.0,
                                      "ok": True}])
    res = gpu_check.run_check("gpu", quick=True, gpu="strict stand-in",
                              torch_too="torchdiffeq" in sys.modules or
                              __import__("importlib").util.find_spec("torchdiffeq") is not None)
    assert res["ok"], res
    assert [r["what"] for r in res["timings"]][:2] == ["toy batch 8", "toy batch 16"]
    assert all("median_s" in r["npflow"] for r in res["timings"])
    jp, mp = gpu_check.write_summaries(res, str(tmp_path / "out"))
    back = json.load(open(jp))
    assert back["ok"] and back["mode"] == "quick"
    md = open(mp).read()
    assert "Verdict: **PASS**" in md and "| toy batch 8 |" in md and "MNIST" in md
    with pytest.raises(FileExistsError, match="not empty"):
        gpu_check.write_summaries(res, str(tmp_path / "out"))


def test_budget_skips_steps_that_do_not_fit(device):
    rows = gpu_check.run_timings("gpu", quick=True, budget=gpu_check.Budget(0), torch_too=False)
    assert all(r.get("skipped") == "time budget" for r in rows) and len(rows) == 3
