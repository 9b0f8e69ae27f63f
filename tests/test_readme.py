"""The README's two set-up commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in setup.splitlines() if line.startswith("    pip install")]


def test_readme_opens_with_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "examples/train_toy.py" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = readme_commands()[1]
    ci_lines = [line.strip() for line in ci.splitlines() if not line.strip().startswith("#")]
    assert test_cmd in ci_lines, (test_cmd, ci_lines)


def test_setup_cfg_declares_the_extras():
    cfg = (ROOT / "setup.cfg").read_text()
    for extra in ("gpu =", "test =", "bench =", "mpi ="):
        assert re.search(rf"^{re.escape(extra)}", cfg, re.M), extra
    assert "cupy-cuda12x" in cfg and "torchdiffeq" in cfg
    assert "mpi4py" in cfg and re.search(r"^\s+mpich\s*$", cfg, re.M)


def test_the_readme_test_command_installs_the_mpi_extra():
    """The MPI tests (tests/test_parallel_mpi.py) run in CI only if mpi4py and mpiexec are
    installed there."""
    assert "mpi" in readme_commands()[1].split("]")[0]
