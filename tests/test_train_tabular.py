"""Tests of examples/train_tabular.py: tiny runs end to end (toy and a fake MINIBOONE), JSON log
and checkpoints, resume, clear errors for missing / malformed data, the non-finite stop, and a
slow quality run of OT-Flow on 8gaussians."""
import json
import math
import os

import numpy as np
import pytest

from example_files import load_example

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


script = load_example("train_tabular")

TINY = ["--niters", "4", "--batch-size", "64", "--val-n", "64", "--test-n", "64",
        "--log-every", "2", "--val-every", "2", "--nt", "2", "--nt-val", "2", "--nt-test", "4",
        "--width", "6"]


def _json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_toy_otflow_run_writes_log_checkpoints_and_test_nll(tmp_path, capsys):
    log = tmp_path / "log.json"
    save = tmp_path / "run"
    assert script.main(["--data", "8gaussians", "--save", str(save), "--log-json", str(log)]
                       + TINY) == 0
    out = capsys.readouterr().out
    assert "test NLL" in out and "validation @ 2" in out
    recs = _json_lines(log)
    final = recs[-1]
    assert math.isfinite(final["test_nll"]) and final["model"] == "otflow"
    assert final["rk4_steps"] == 4 and final["test_n"] == 64
    assert any("val_loss" in r for r in recs) and any("loss" in r and "lr" in r for r in recs)
    assert (save / "checkpoint.h5").exists() and (save / "best.h5").exists()
    import npflow
    best = npflow.load(str(save / "best.h5"))
    assert type(best).__name__ == "OTFlow" and best.config["steps"] == 2

    # resume continues from iteration 4 up to 6
    assert script.main(["--data", "8gaussians", "--save", str(save), "--resume"]
                       + TINY[:0] + [a if a != "4" else "6" for a in TINY]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "iter      6/6" in out


def _fake_miniboone(data_dir, rows=400, bad=None):
    folder = data_dir / "miniboone"
    folder.mkdir(parents=True)
    x = np.random.default_rng(0).standard_normal((rows, 43))
    if bad == "nan":
        x[5, 3] = np.nan
    if bad == "1d":
        x = x[:, 0]
    np.save(folder / "data.npy", x)


def test_tabular_otflow_run_on_a_fake_miniboone_with_clamping(tmp_path, capsys):
    _fake_miniboone(tmp_path / "data")
    log = tmp_path / "log.json"
    assert script.main(["--data", "miniboone", "--data-dir", str(tmp_path / "data"),
                        "--no-download", "--save", str(tmp_path / "run"), "--log-json",
                        str(log), "--clamp", "0.05"] + TINY) == 0
    final = _json_lines(log)[-1]
    assert math.isfinite(final["test_nll"])
    import npflow
    m = npflow.load(str(tmp_path / "run" / "checkpoint.h5"))
    assert m.dim == 43 and m.config["width"] == 6
    assert max(float(np.abs(v).max()) for v in m.params.values()) <= 0.05 + 1e-7


def test_missing_offline_data_names_files_and_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--data", "power", "--data-dir", str(tmp_path / "nowhere"),
                     "--no-download", "--save", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "power" in err and "data.npy" in err and "nowhere" in err


@pytest.mark.parametrize("bad, words", [("nan", "NaN"), ("1d", "2-D")])
def test_malformed_data_is_rejected_before_training(tmp_path, capsys, bad, words):
    _fake_miniboone(tmp_path / "data", bad=bad)
    with pytest.raises(SystemExit):
        script.main(["--data", "miniboone", "--data-dir", str(tmp_path / "data"),
                     "--no-download", "--save", str(tmp_path / "run")] + TINY)
    err = capsys.readouterr().err
    assert words in err and "miniboone" in err
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


@pytest.mark.parametrize("argv, words", [
    (["--data", "nosuchset"], "unknown data set"),
    (["--otflow-alpha", "1,2"], "--otflow-alpha"),
    (["--nt", "-1"], "--nt"),
    (["--lr-drop", "0.5"], "--lr-drop"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit):
        script.main(["--data", "8gaussians", "--save", str(tmp_path / "r")] + argv)
    assert words in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """An absurd learning rate blows the parameters up; the run stops with a message, exit
    code 1, and the checkpoint of the last good iteration stays readable."""
    save = tmp_path / "run"
    log = tmp_path / "log.json"
    code = script.main(["--data", "8gaussians", "--save", str(save), "--log-json", str(log),
                        "--lr", "1e12", "--drop-freq", "0", "--patience", "0",
                        "--niters", "30", "--batch-size", "32", "--val-n", "32", "--test-n",
                        "32", "--log-every", "1", "--val-every", "1", "--nt", "2", "--nt-val",
                        "2", "--width", "4"])
    out = capsys.readouterr()
    assert code == 1
    assert "stopped at iteration" in out.out and "non-finite" in out.err
    err = [r for r in _json_lines(log) if "error" in r]
    assert err
    import npflow
    if (save / "checkpoint.h5").exists():
        m = npflow.load(str(save / "checkpoint.h5"))
        assert all(np.isfinite(v).all() for v in m.params.values())


def test_target_validation_nll_stops_the_run_and_reports_time_and_nfe(tmp_path, capsys):
    log = tmp_path / "log.json"
    assert script.main(["--data", "8gaussians", "--save", str(tmp_path / "run"), "--log-json",
                        str(log), "--target-val-nll", "100"] + TINY) == 0
    final = _json_lines(log)[-1]
    assert final["status"] == "early-stopped" and final["iterations"] == 2
    assert final["nfe_total"] == 2 * 2 * 4 * 2        # 2 iterations, fwd + bwd, 4 stages, nt 2
    assert 0 < final["train_seconds_without_validation"] <= final["train_seconds_this_run"]
    assert "target" in capsys.readouterr().out


def test_cnf_model_runs_through_the_same_script(tmp_path, capsys):
    log = tmp_path / "log.json"
    assert script.main(["--data", "8gaussians", "--method", "rnode", "--save",
                        str(tmp_path / "run"), "--log-json", str(log), "--niters", "2",
                        "--batch-size", "16", "--val-n", "16", "--test-n", "16",
                        "--log-every", "1", "--val-every", "2", "--steps", "2",
                        "--atol", "1e-3", "--rtol", "1e-3"]) == 0
    final = _json_lines(log)[-1]
    assert final["model"] == "rnode" and math.isfinite(final["test_nll"])


@pytest.mark.slow
def test_otflow_learns_8gaussians_in_a_short_run(tmp_path):
    """A short OT-Flow run (300 iterations, batch 1024, default α, nt 8) brings the test NLL
    (32 RK4 steps) well below the standard normal's ≈ 4.4 nats on this data."""
    log = tmp_path / "log.json"
    assert script.main(["--data", "8gaussians", "--save", str(tmp_path / "run"),
                        "--log-json", str(log), "--niters", "300", "--batch-size", "1024",
                        "--log-every", "50", "--val-every", "50", "--test-n", "5000"]) == 0
    final = _json_lines(log)[-1]
    assert final["test_nll"] < 3.2, final


@pytest.mark.slow
@pytest.mark.parametrize("data, bar", [("8gaussians", 2.95), ("checkerboard", 3.70)])
def test_otflow_default_settings_meet_the_toy_bars(tmp_path, data, bar):
    """Issue 5 item 5: the script's default OT-Flow settings, test NLL (32 RK4 steps, 10,000
    fresh points). Measured 2.8560 ± 0.0095 and 3.6709 ± 0.0041 (docs/otflow.md §7); about
    2.5 min each on an idle core. (With the reference's lr halved every 100 iterations,
    checkerboard stops at 3.765.)"""
    log = tmp_path / "log.json"
    assert script.main(["--data", data, "--save", str(tmp_path / "run"),
                        "--log-json", str(log), "--log-every", "100"]) == 0
    assert _json_lines(log)[-1]["test_nll"] <= bar


def _npz(path, d=3, drop=None, nan=False):
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal((n, d)) for k, n in (("train", 300), ("val", 64),
                                                            ("test", 64))}
    if nan:
        arrays["val"][3, 1] = np.nan
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("model", ["otflow", "ffjord"])
def test_npz_data_file_trains_with_the_file_defaults(tmp_path, model, capsys):
    path = _npz(tmp_path / "data.npz")
    log = tmp_path / "log.json"
    extra = [] if model == "otflow" else ["--atol", "1e-4", "--rtol", "1e-4"]
    assert script.main(["--data", path, "--method", model, "--save", str(tmp_path / "run"),
                        "--log-json", str(log)] + TINY + extra) == 0
    final = _json_lines(log)[-1]
    assert math.isfinite(final["test_nll"]) and "(d = 3)" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("nokey", "no array(s) ['val']"),
    ("nan", "NaN"),
    ("garbage", "cannot read data file"),
])
def test_npz_data_file_errors_name_the_problem(tmp_path, case, message, capsys):
    path = tmp_path / "data.npz"
    if case == "nokey":
        _npz(path, drop="val")
    elif case == "nan":
        _npz(path, nan=True)
    elif case == "garbage":
        path.write_bytes(b"not a zip file")
    with pytest.raises(SystemExit):
        script.main(["--data", str(path), "--save", str(tmp_path / "run")] + TINY)
    assert message in capsys.readouterr().err
