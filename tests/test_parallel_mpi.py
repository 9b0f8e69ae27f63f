"""Data parallelism on real MPI ranks (npflow.parallel, docs/parallel.md): ``mpiexec -n 2`` on
small float64 problems. Every launch has a timeout, so a rank left waiting fails the test
instead of hanging it. Skipped when mpi4py or mpiexec is missing (pip install ".[mpi]")."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "parallel_mpi_checks.py"
TOY = ROOT / "examples" / "train_toy.py"
TOL = 1e-11


def mpiexec(n, args, timeout=240):
    """Run ``python ARGS`` on n ranks; (returncode, stdout, stderr). Open MPI refuses root
    without --allow-run-as-root and more ranks than cores without --oversubscribe; MPICH's
    mpiexec (hydra) needs neither."""
    cmd = [MPIEXEC]
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--allow-run-as-root", "--oversubscribe"]
    cmd += ["-n", str(n), sys.executable] + [str(a) for a in args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """One launch of tests/parallel_mpi_checks.py on 2 ranks: every case and the training."""
    out = tmp_path_factory.mktemp("mpi")
    code, stdout, stderr = mpiexec(2, [CHECKS, out])
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), out


CASES = ["ffjord_exact_dopri5", "ffjord_hutchinson_rk4_2blocks", "ffjord_hutchinson_dopri5",
         "rnode_rademacher_rk4", "rnode_toflow_2blocks", "steer_T_override", "steer_T_per_block",
         "otflow_train_T", "multiscale_rnode_toflow", "multiscale_dopri5"]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_loss_gradients_and_stats_of_one_process(checks, case):
    r = checks[0]["cases"][case]
    assert r["rel_diff"] <= TOL, r
    assert r["same_rng"], "the ranks consumed the generator differently from one process"
    assert r["grads_identical_across_ranks"], r


@pytest.mark.parametrize("case", ["ffjord_exact_dopri5", "rnode_toflow_2blocks",
                                  "steer_T_override", "multiscale_rnode_toflow"])
def test_two_ranks_give_the_time_gradients_of_one_process(checks, case):
    r = checks[0]["cases"][case]
    assert r["time_gradient_analytic_rel_diff"] <= TOL
    assert r["time_gradient_discrete_rel_diff"] <= TOL


def test_parameters_are_bit_identical_across_ranks_after_training(checks):
    ranks = checks[0]["training"]
    assert [r["status"] for r in ranks] == ["done", "done"]
    assert ranks[0]["crc"] == ranks[1]["crc"]
    assert ranks[0]["T"] == ranks[1]["T"]


def test_training_on_two_ranks_follows_the_one_process_losses(checks):
    mpi, alone = checks[0]["training"][0], checks[0]["training_alone"][0]
    assert len(mpi["loss"]) == 8
    np.testing.assert_allclose(mpi["loss"], alone["loss"], rtol=TOL)
    assert mpi["T"] == pytest.approx(alone["T"], rel=TOL)


def test_only_rank_0_prints_logs_and_writes_checkpoints(checks):
    result, out = checks
    printed = [r["printed"] for r in result["training"]]
    assert printed[0] == result["training_alone"][0]["printed"] > 0 and printed[1] == 0
    lines = (out / "mpi.json").read_text().splitlines()
    assert len(lines) == 4                       # 8 iterations, a record every 2: not doubled
    assert (out / "mpi" / "checkpoint.h5").exists()


def _losses(path):
    recs = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "test_nll" in r]


def test_train_toy_on_two_ranks_equals_one_process_and_resumes_on_one(tmp_path):
    """The done-when run: mpiexec -n 2 python examples/train_toy.py (default solver dopri5,
    FFJORD's toy set-up) gives the losses of one process; a run of 3 iterations on 2 ranks,
    resumed on 1 rank to 6, gives the 6-iteration one-process losses."""
    base = ["--niters", "6", "--log-every", "1", "--dtype", "float64", "--dims", "16-16",
            "--test-n", "100", "--no-figures"]

    def run(n, extra):
        if n == 1:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
            p = subprocess.run([sys.executable, str(TOY)] + base + extra, capture_output=True,
                               text=True, timeout=240, env=env)
            code, err = p.returncode, p.stderr
        else:
            code, _, err = mpiexec(n, [TOY] + base + extra)
        assert code == 0, err[-3000:]

    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    run(1, ["--save", one, "--log-json", one / "log.json"])
    run(2, ["--save", two, "--log-json", two / "log.json"])
    run(2, ["--save", mixed, "--log-json", mixed / "log.json", "--niters", "3"])
    run(1, ["--save", mixed, "--log-json", mixed / "log.json", "--resume"])
    l1, t1 = _losses(one / "log.json")
    l2, t2 = _losses(two / "log.json")
    lm, tm = _losses(mixed / "log.json")
    assert len(l1) == 6
    np.testing.assert_allclose(l2, l1, rtol=TOL)
    np.testing.assert_allclose(lm, l1, rtol=TOL)
    assert len(t2) == 1 and t2[0]["test_nll"] == pytest.approx(t1[0]["test_nll"], rel=1e-9)
    assert len(tm) == 2                                     # the 3-iteration run and the resume
    assert tm[-1]["test_nll"] == pytest.approx(t1[0]["test_nll"], rel=1e-9)
    # rank 0 alone wrote: one result.json, no output from rank 1
    assert (two / "result.json").exists()


def test_a_rank_that_raises_stops_every_rank_with_its_message(tmp_path):
    """Rank 1 raises in the middle of training while rank 0 waits in the Allreduce: the job
    ends at once (no hang: the launch has a timeout), non-zero, with rank 1's message."""
    script = tmp_path / "boom.py"
    script.write_text(
        "import numpy as np\nimport npflow\nfrom npflow import parallel\n"
        "comm = parallel.init()\n"
        "m = npflow.CNF(2, hidden=(4,), solver='rk4', steps=2, dtype='float64')\n"
        "x = npflow.data.toy('8gaussians', 10, np.random.default_rng(0))\n"
        "parallel.loss_and_grad(m, x, np.random.default_rng(1), comm)\n"
        "if comm.rank == 1:\n"
        "    raise ValueError('boom on rank one')\n"
        "parallel.loss_and_grad(m, x, np.random.default_rng(1), comm)\n"
        "print('rank', comm.rank, 'was not stopped')\n")
    code, out, err = mpiexec(2, [script], timeout=60)
    assert code != 0
    assert "boom on rank one" in err and "rank 1/2" in err
    assert "was not stopped" not in out


def test_a_rank_that_exits_with_an_error_code_stops_every_rank(tmp_path):
    """parallel.run: sys.exit(3) on rank 1 alone ends the job (after LEAVE_TIMEOUT) instead of
    leaving rank 0 in a collective; sys.exit(2) on every rank (an argument error) ends it at
    once with code 2."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import sys\nimport numpy as np\nfrom npflow import parallel\n"
        "parallel.LEAVE_TIMEOUT = 2.0\n"
        "def main():\n"
        "    comm = parallel.init()\n"
        "    if comm.rank == 1 or sys.argv[1] == 'all':\n"
        "        sys.exit(int(sys.argv[2]))\n"
        "    comm.barrier()\n"
        "    comm.allreduce(np.zeros(3))\n"
        "    print('rank 0 was not stopped')\n"
        "sys.exit(parallel.run(main))\n")
    code, out, _ = mpiexec(2, [script, "one", 3], timeout=60)
    assert code != 0 and "not stopped" not in out
    code, out, _ = mpiexec(2, [script, "all", 2], timeout=60)
    assert code == 2 and "not stopped" not in out


def test_non_finite_values_on_one_rank_stop_every_rank_together(tmp_path):
    """A NaN in rank 1's rows only: both ranks raise FloatingPointError from the same step
    (the failure flag of the reduction), so the training loop stops on all of them."""
    script = tmp_path / "nan.py"
    script.write_text(
        "import numpy as np\nimport npflow\nfrom npflow import parallel\n"
        "comm = parallel.init()\n"
        "m = npflow.OTFlow(2, width=4, steps=2, dtype='float64')\n"
        "x = npflow.data.toy('8gaussians', 10, np.random.default_rng(0))\n"
        "parallel.loss_and_grad(m, x, None, comm)\n"
        "x[7] = 1e200                      # overflows in rank 1's rows only\n"
        "try:\n"
        "    parallel.loss_and_grad(m, x, None, comm)\n"
        "    print('rank', comm.rank, 'no error')\n"
        "except FloatingPointError as e:\n"
        "    print('rank', comm.rank, 'FloatingPointError', flush=True)\n"
        "comm.barrier()\n")
    code, out, err = mpiexec(2, [script], timeout=60)
    assert code == 0, err[-2000:]
    assert out.count("FloatingPointError") == 2, out


def test_a_signal_on_one_rank_interrupts_every_rank_at_the_same_iteration(tmp_path):
    """SIGINT reaches rank 1 alone (a hook sends it in iteration 3): train() agrees on it, so
    both ranks finish that iteration, rank 0 writes the checkpoint, and both return
    "interrupted" at iteration 3 (training.md §7.3; docs/parallel.md §3)."""
    script = tmp_path / "sig.py"
    script.write_text(
        "import os, signal, sys\nimport numpy as np\nimport npflow\n"
        "from npflow import parallel\nfrom npflow.optim import Adam\n"
        "from npflow.training import TrainHook, train\n"
        "comm = parallel.init()\n"
        "class Poke(TrainHook):\n"
        "    name = 'poke'\n"
        "    def after_step(self, model, x, rng, it, stats):\n"
        "        if comm.rank == 1 and it == 2:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return {}\n"
        "m = npflow.CNF(2, hidden=(4,), solver='rk4', steps=2, dtype='float64')\n"
        "r = train(m, Adam(m.params), lambda rng, it: npflow.data.toy('8gaussians', 8, rng), 50,\n"
        "          np.random.default_rng(0), log_every=100, save_dir=sys.argv[1], hooks=[Poke()],\n"
        "          print_fn=lambda s: None, comm=comm)\n"
        "print('rank', comm.rank, r.status, r.iteration, flush=True)\n")
    code, out, err = mpiexec(2, [script, tmp_path / "run"], timeout=60)
    assert code == 0, err[-2000:]
    assert sorted(out.split("\n")[:2]) == ["rank 0 interrupted 3", "rank 1 interrupted 3"], out
    assert (tmp_path / "run" / "checkpoint.h5").exists()
