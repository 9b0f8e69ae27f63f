"""Running example scripts for the bench tables (bench/vae_table.py,
bench/study_ffjord_vs_snf.py): one run per name in its own folder, its output in NAME.log,
and only the runs that have no result.json yet (so a table can be completed run by run)."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(cmd, out, name):
    """Run ``cmd`` (a list) with PYTHONPATH = the repository and one BLAS thread, its output
    in OUT/NAME.log; returns its exit status."""
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
    os.makedirs(out, exist_ok=True)
    print("running:", " ".join(cmd), flush=True)
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        return subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_missing(names, out, command):
    """``run_example(command(name), out, name)`` for each name without OUT/NAME/result.json."""
    for name in names:
        if not os.path.exists(os.path.join(out, name, "result.json")):
            print(f"{name}: exit {run_example(command(name), out, name)}", flush=True)
