"""Runs that never lose work (docs/training.md, section 9): run folders, the lock, signals,
resume checks, shared flags, one-line errors - the behaviour of examples/common.py, tested
through the example scripts (subprocesses where the behaviour is the script's)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TOY = os.path.join(EXAMPLES, "train_toy.py")
TAB = os.path.join(EXAMPLES, "train_tabular.py")
MNIST = os.path.join(EXAMPLES, "train_mnist.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           OPENBLAS_NUM_THREADS="1")

# a tiny toy run: ~5 ms per iteration, deterministic (fixed-grid solver)
TINY = ["--dims", "8-8", "--batch-size", "16", "--test-n", "100", "--solver", "rk4",
        "--steps", "4", "--seed", "3", "--no-figures"]
TAB_TINY = ["--data", "8gaussians", "--batch-size", "64", "--val-n", "64", "--test-n", "64",
            "--log-every", "2", "--val-every", "2", "--nt", "2", "--nt-val", "2", "--nt-test",
            "4", "--width", "6"]


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _common():
    sys.path.insert(0, EXAMPLES)
    import common
    return common


def _run(script, argv, **kw):
    return subprocess.run([sys.executable, script] + argv, capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def _losses(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if "loss" in r and "iteration" in r:
            out[r["iteration"]] = r["loss"]
    return out


def _one_line_error(proc, code, *words):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [s for s in proc.stderr.strip().splitlines() if not s.startswith("note:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _wait_for_lines(path, n, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------------------------
# the two runs the issue names

@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_run_then_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path,
                                                                             signame, code):
    n = "300"
    # every loss in the JSON log; checkpoints only at the end and at the signal
    base = TINY + ["--niters", n, "--log-every", "1", "--save-every", "100000"]
    full = _run(TOY, base + ["--save", str(tmp_path / "full"), "--log-json",
                             str(tmp_path / "full.jsonl")])
    assert full.returncode == 0, full.stderr
    log_a = tmp_path / "a.jsonl"
    proc = subprocess.Popen([sys.executable, TOY] + base + ["--save", str(tmp_path / "run"),
                                                            "--log-json", str(log_a)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert _wait_for_lines(log_a, 5, proc), "the run ended before it could be interrupted"
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"interrupted by {signame}" in err and "rerun with --resume" in err
    assert "--resume" in err.split("rerun with --resume:")[1]
    done = json.loads(open(log_a).read().splitlines()[-1])
    stopped_at = done["iteration"]
    assert 5 <= stopped_at < int(n)
    from npflow.checkpoint import load_training_state
    assert load_training_state(tmp_path / "run" / "checkpoint.h5")["iteration"] == stopped_at
    res = _run(TOY, base + ["--save", str(tmp_path / "run"), "--resume", "--log-json",
                            str(tmp_path / "b.jsonl")])
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    got = {**_losses(log_a), **_losses(tmp_path / "b.jsonl")}
    want = _losses(tmp_path / "full.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, int(n) + 1))
    assert [got[i] for i in sorted(got)] == [want[i] for i in sorted(want)]


def test_two_runs_started_together_in_one_folder_one_refuses_naming_the_pid(tmp_path):
    save = str(tmp_path / "run")
    argv = [sys.executable, TOY] + TINY + ["--niters", "300", "--log-every", "50", "--save",
                                           save]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [(p.returncode, o[1]) for p, o in zip(procs, outs)]
    winner = next(p for p in procs if p.returncode == 0)
    loser_err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 1)
    assert f"in use by another run (PID {winner.pid}" in loser_err
    assert len(loser_err.strip().splitlines()) == 1
    # nothing lost: the winner's run is complete and recorded as the only run
    from npflow.checkpoint import load_training_state
    assert load_training_state(os.path.join(save, "checkpoint.h5"))["iteration"] == 300
    assert os.path.exists(os.path.join(save, "result.json"))
    record = json.load(open(os.path.join(save, "args.json")))
    assert [r["pid"] for r in record["runs"]] == [winner.pid]


# --------------------------------------------------------------------------------------------
# run folders

def test_a_new_run_in_an_existing_run_folder_is_refused_and_nothing_is_touched(tmp_path):
    save = str(tmp_path / "run")
    assert _run(TOY, TINY + ["--niters", "4", "--save", save]).returncode == 0
    def stamps():     # the lock file is rewritten with each holder's PID: not run output
        return {n: os.path.getmtime(os.path.join(save, n)) for n in os.listdir(save)
                if n != ".lock"}
    before = stamps()
    ck = open(os.path.join(save, "checkpoint.h5"), "rb").read()
    p = _run(TOY, TINY + ["--niters", "2", "--save", save])
    _one_line_error(p, 2, "already holds a run", "--resume", "--force")
    assert stamps() == before
    assert open(os.path.join(save, "checkpoint.h5"), "rb").read() == ck


def test_force_starts_afresh_and_records_a_new_history(tmp_path):
    save = str(tmp_path / "run")
    assert _run(TOY, TINY + ["--niters", "4", "--save", save]).returncode == 0
    # a temporary left by an interrupted save of the old run (another host's, so the next
    # save's own clean-up would keep it): --force removes it with the old run's files
    stale = os.path.join(save, "checkpoint.h5.otherhost.1.0000abcd.tmp")
    open(stale, "w").close()
    p = _run(TOY, TINY + ["--niters", "2", "--save", save, "--force"])
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(stale)
    from npflow.checkpoint import load_training_state
    assert load_training_state(os.path.join(save, "checkpoint.h5"))["iteration"] == 2
    record = json.load(open(os.path.join(save, "args.json")))
    assert len(record["runs"]) == 1 and record["training"]["niters"] == 2
    p = _run(TOY, TINY + ["--niters", "2", "--save", save, "--force", "--resume"])
    _one_line_error(p, 2, "--resume and --force exclude each other")


def test_a_stale_lock_of_a_dead_process_does_not_block(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (save / ".lock").write_text(dead + "\n")           # a lock file left by a dead run
    p = _run(TOY, TINY + ["--niters", "2", "--save", str(save)])
    assert p.returncode == 0, p.stderr


def test_resume_refuses_changed_model_settings_naming_each(tmp_path):
    save = str(tmp_path / "run")
    assert _run(TOY, TINY + ["--niters", "3", "--save", save]).returncode == 0
    args_json = open(os.path.join(save, "args.json")).read()
    p = _run(TOY, TINY[:1] + ["32-32"] + TINY[2:] + ["--niters", "6", "--save", save,
                                                      "--resume", "--data", "moons"])
    line = _one_line_error(p, 2, "cannot resume", "--dims was '8-8', now '32-32'",
                           "--data was '8gaussians', now 'moons'")
    assert "shape" not in line                         # no wall of per-parameter mismatches
    p = _run(TOY, TINY + ["--niters", "6", "--save", save, "--resume", "--method", "rnode"])
    _one_line_error(p, 2, "--method was 'ffjord', now 'rnode'")
    assert open(os.path.join(save, "args.json")).read() == args_json   # history untouched


def test_resume_with_changed_training_settings_is_announced_and_recorded(tmp_path):
    save = str(tmp_path / "run")
    assert _run(TOY, TINY + ["--niters", "3", "--save", save]).returncode == 0
    p = _run(TOY, TINY + ["--niters", "6", "--save", save, "--resume", "--lr", "0.01",
                          "--batch-size", "8"])
    assert p.returncode == 0, p.stderr
    assert "changed training settings" in p.stdout and "--lr 0.001 -> 0.01" in p.stdout
    record = json.load(open(os.path.join(save, "args.json")))
    assert record["training"]["lr"] == 0.001 and record["training"]["batch_size"] == 16
    assert record["runs"][1]["changed"] == {"batch_size": [16, 8], "lr": [0.001, 0.01],
                                            "niters": [3, 6]}
    # a third run compares against the settings in force (lr 0.01), not the original ones
    p = _run(TOY, TINY + ["--niters", "7", "--save", save, "--resume", "--lr", "0.01",
                          "--batch-size", "8"])
    record = json.load(open(os.path.join(save, "args.json")))
    assert record["runs"][2]["changed"] == {"niters": [6, 7]}


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_save_naming_a_file_or_an_unusable_place_is_one_line(tmp_path, where):
    f = tmp_path / "afile"
    f.write_text("x")
    save = str(f) if where == "file" else str(f / "sub")
    p = _run(TOY, TINY + ["--niters", "2", "--save", save])
    _one_line_error(p, 2, "--save", repr(save))


# --------------------------------------------------------------------------------------------
# checkpoints of another script or method given to --resume

def _tab_run(save, extra=()):
    return _run(TAB, TAB_TINY + ["--niters", "2", "--save", save] + list(extra))


def test_foreign_checkpoints_given_to_resume_are_one_line_errors(tmp_path):
    import shutil
    toy_run, tab_run, cnf_run = (str(tmp_path / n) for n in ("toy", "tab", "cnf"))
    assert _run(TOY, TINY + ["--niters", "2", "--save", toy_run]).returncode == 0
    assert _tab_run(tab_run).returncode == 0
    assert _tab_run(cnf_run, ["--method", "ffjord"]).returncode == 0
    # with args.json: refused by the recorded script name
    p = _run(TOY, TINY + ["--niters", "4", "--save", tab_run, "--resume"])
    _one_line_error(p, 2, "train_tabular.py")
    # only the checkpoint copied into a fresh folder (no args.json): refused by the checkpoint
    for src, script, argv in ((cnf_run, TOY, TINY), (toy_run, TAB, TAB_TINY),
                              (tab_run, TAB, TAB_TINY + ["--method", "ffjord"])):
        dst = tmp_path / f"copy-{os.path.basename(src)}-{os.path.basename(script)}"
        dst.mkdir()
        shutil.copy(os.path.join(src, "checkpoint.h5"), dst / "checkpoint.h5")
        p = _run(script, argv + ["--niters", "4", "--save", str(dst), "--resume"])
        _one_line_error(p, 2, "cannot resume")
    # corrupt and foreign files under train_tabular
    dst = tmp_path / "corrupt"
    dst.mkdir()
    (dst / "checkpoint.h5").write_bytes(b"not hdf5 at all")
    p = _run(TAB, TAB_TINY + ["--niters", "4", "--save", str(dst), "--resume"])
    _one_line_error(p, 2, "cannot resume", "corrupt")


def test_resume_with_another_method_on_a_checkpoint_without_args_json(tmp_path):
    save = tmp_path / "run"
    assert _run(TOY, TINY + ["--niters", "2", "--save", str(save)]).returncode == 0
    os.remove(save / "args.json")                     # as a run of an older npflow
    p = _run(TOY, TINY + ["--niters", "4", "--save", str(save), "--resume", "--method",
                          "rnode"])
    _one_line_error(p, 2, "cannot resume")
    assert not os.path.exists(save / "args.json")     # a refused resume records nothing
    p = _run(TOY, ["--dims", "32-32"] + TINY[2:] + ["--niters", "4", "--save", str(save),
                                                     "--resume"])
    line = _one_line_error(p, 2, "cannot resume", "do not fit")
    assert len(line) < 600


# --------------------------------------------------------------------------------------------
# flags

def test_help_shows_every_default_once_in_every_example():
    common = _common()
    for path, name in ((TOY, "train_toy"), (TAB, "train_tabular"), (MNIST, "train_mnist")):
        parser = _load(path, name).build_parser()
        fmt = parser._get_formatter()
        for action in parser._actions:
            if action.help in (None, "==SUPPRESS==") or action.dest == "help":
                continue
            text = fmt._get_help_string(action) % {"default": action.default}
            assert text.lower().count("default") == 1, (name, action.option_strings, text)
        for flag in ("--niters", "--seed", "--method", "--save", "--resume", "--force",
                     "--device", "--dtype", "--log-json", "--save-every", "--log-every"):
            assert flag in parser.format_help(), (name, flag)
        assert "--max-iters" not in parser.format_help()
    assert common.METHODS[-1] == "otflow"


def test_old_spellings_still_work_with_a_deprecation_note(tmp_path):
    p = _run(TOY, TINY + ["--max-iters", "2", "--alpha", "0.2", "--save",
                          str(tmp_path / "a")])
    assert p.returncode == 0, p.stderr
    assert "--max-iters is deprecated" in p.stderr and "use --niters" in p.stderr
    assert "--alpha is deprecated" in p.stderr
    rec = json.load(open(tmp_path / "a" / "args.json"))
    assert rec["training"]["niters"] == 2 and rec["training"]["alpha_T"] == 0.2
    p = _run(TAB, TAB_TINY + ["--niters", "2", "--model", "otflow", "--alpha", "1,50,5",
                              "--save", str(tmp_path / "b")])
    assert p.returncode == 0, p.stderr
    assert "--model is deprecated" in p.stderr and "use --method" in p.stderr
    rec = json.load(open(tmp_path / "b" / "args.json"))
    assert rec["model"]["method"] == "otflow" and rec["training"]["otflow_alpha"] == "1,50,5"


def test_train_tabular_trains_steer(tmp_path):
    p = _run(TAB, TAB_TINY + ["--niters", "2", "--method", "steer", "--save",
                              str(tmp_path / "s")])
    assert p.returncode == 0, p.stderr
    assert "test NLL" in p.stdout


def test_save_every_parses_iterations_and_minutes():
    common = _common()
    assert common.parse_save_every("500") == (500, None)
    assert common.parse_save_every("10m") == (None, 600.0)
    assert common.parse_save_every("0.5m") == (None, 30.0)
    assert common.parse_save_every(None) == (None, None)
    for bad in ("0", "-3", "m", "xm", "1.5", "0m"):
        with pytest.raises(ValueError, match="--save-every"):
            common.parse_save_every(bad)


def test_bad_save_every_is_a_one_line_error(tmp_path):
    p = _run(TOY, TINY + ["--niters", "2", "--save-every", "soon", "--save",
                          str(tmp_path / "a")])
    _one_line_error(p, 2, "--save-every")


# --------------------------------------------------------------------------------------------
# one-line errors and the right results (issue 11's list)

@pytest.mark.parametrize("script, argv, words", [
    (TOY, ["--lr", "-1"], "--lr must be >= 0"),
    (TOY, ["--rtol", "0", "--solver", "dopri5"], "--rtol must be > 0"),
    (TOY, ["--method", "otflow"], "unknown method 'otflow'"),
    (TOY, ["--niters", "x"], "--niters"),
    (TAB, TAB_TINY[2:] + ["--data", "8gaussians", "--lr", "-1"], "--lr must be >= 0"),
    (TAB, TAB_TINY[2:] + ["--data", "8gaussians", "--method", "ffjord", "--rtol", "0"],
     "--rtol must be > 0"),
    (TAB, TAB_TINY[2:] + ["--data", "8gaussians", "--method", "otflow+ffjord"],
     "one method at a time"),
])
def test_bad_arguments_are_one_line_errors_with_status_2(tmp_path, script, argv, words):
    p = _run(script, argv + ["--save", str(tmp_path / "r")])
    _one_line_error(p, 2, words)
    assert not os.path.exists(tmp_path / "r")          # refused before any work


def test_text_file_or_renamed_npy_given_as_npz_data_names_the_file(tmp_path):
    txt = tmp_path / "data.npz"
    txt.write_text("1,2\n3,4\n")
    p = _run(TAB, TAB_TINY[2:] + ["--data", str(txt), "--save", str(tmp_path / "r")])
    _one_line_error(p, 2, str(txt))
    npy = tmp_path / "arr.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((10, 2)))
    p = _run(TAB, TAB_TINY[2:] + ["--data", str(npy), "--save", str(tmp_path / "r")])
    _one_line_error(p, 2, str(npy))


def test_csv_with_a_header_line_names_the_file(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("x,y\n" + "\n".join(f"{i * 0.1},{i * 0.2}" for i in range(30)) + "\n")
    p = _run(TOY, TINY + ["--data-file", str(csv), "--niters", "1", "--save",
                          str(tmp_path / "r")])
    _one_line_error(p, 2, str(csv), "header")


def test_constant_data_warns(tmp_path):
    pts = tmp_path / "const.npy"
    np.save(pts, np.ones((50, 2)))
    p = _run(TOY, TINY + ["--data-file", str(pts), "--niters", "1", "--save",
                          str(tmp_path / "r")])
    assert "constant" in p.stderr and "warning" in p.stderr


@pytest.mark.parametrize("clamp, word", [("0", "non-finite"), ("1.5", "diverged")])
def test_otflow_at_an_absurd_learning_rate_exits_nonzero(tmp_path, clamp, word):
    """Unclamped, the state overflows (non-finite); clamped to [-1.5, 1.5] (the tabular
    default) the loss stays finite but explodes (eq. 5.2): both are reported, status 1."""
    p = _run(TAB, TAB_TINY + ["--niters", "30", "--lr", "1e6", "--clamp", clamp, "--save",
                              str(tmp_path / "r")])
    assert p.returncode == 1, (p.returncode, p.stdout[-500:], p.stderr)
    assert "Traceback" not in p.stderr
    assert word in p.stderr


def test_zero_iterations_say_so_and_tabular_reports_no_validation(tmp_path):
    p = _run(TOY, TINY + ["--niters", "0", "--save", str(tmp_path / "a")])
    assert p.returncode == 0, p.stderr
    assert "nothing to train" in p.stdout and ">= n_iters" not in p.stdout
    p = _run(TAB, TAB_TINY + ["--niters", "0", "--save", str(tmp_path / "b")])
    assert p.returncode == 0, p.stderr
    assert "no validation ran" in p.stdout and "inf" not in p.stdout


def test_signal_outside_the_training_loop_is_one_line(tmp_path):
    """SIGTERM while the script is still loading (before train()): one line, status 143."""
    script = tmp_path / "loading.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {EXAMPLES!r})\n"
        "import common\n"
        "def main(argv):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    return 0\n"
        "common.main_guard(main)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err


@pytest.mark.parametrize("old", [
    {"dims": "8-8", "lr": 0.001},                        # an args.json of an older npflow
    {"dims": "8-8", "model": "otflow"},                  # ... whose flags had a --model
])
def test_resume_keeps_an_old_format_args_json_under_legacy(tmp_path, old):
    save = tmp_path / "run"
    assert _run(TOY, TINY + ["--niters", "2", "--save", str(save)]).returncode == 0
    (save / "args.json").write_text(json.dumps(old))
    p = _run(TOY, TINY + ["--niters", "3", "--save", str(save), "--resume"])
    assert p.returncode == 0, p.stderr
    assert "predates recorded settings" in p.stdout
    record = json.load(open(save / "args.json"))
    assert record["legacy"] == old and record["model"]["dims"] == "8-8"
