#!/usr/bin/env python
"""Every --flow of examples/train_vae.py on MNIST at one small equal budget, side by side with
the published −ELBO table (docs/vae.md section 7).

    python bench/vae_table.py --run            # train the missing runs, then write the table
    python bench/vae_table.py                  # only collect runs/vae_table/*/result.json

Every run uses the same encoder, decoder, latent size, data subset, epochs, β warm-up and test
evaluation (BUDGET below; the flows' own settings are FLOWS). The table gives test −ELBO,
IWAE NLL (nats), seconds per epoch (median, on a shared 2-core machine: noisy) and the
published anchors (FFJORD paper Table 3 / Sylvester paper, statically binarized MNIST, full
budget), which a CPU budget does not reach; the ordering at equal budget is the comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from example_runs import run_missing

EXTRA = []          # flags appended to BUDGET (--extra), e.g. a larger subset; later flags win
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("runs", "vae_table")

BUDGET = ["--data", "mnist", "--subset", "10000", "--val-n", "2000", "--epochs", "10",
          "--warmup-epochs", "5", "--test-n", "500", "--iwae-k", "200", "--z-dim", "32",
          "--hidden", "300,300", "--batch-size", "100", "--lr", "5e-4", "--seed", "0",
          "--log-every", "50"]
FLOWS = {
    "none": ["--flow", "none"],
    "planar": ["--flow", "planar", "--num-flows", "4"],
    "orthogonal": ["--flow", "orthogonal", "--num-flows", "4"],
    "householder": ["--flow", "householder", "--num-flows", "4", "--householder", "8"],
    "triangular": ["--flow", "triangular", "--num-flows", "4"],
    "cnf": ["--flow", "cnf", "--num-flows", "1", "--cnf-hidden", "64,64", "--cnf-rank", "1",
            "--cnf-steps", "4"],
}
# −ELBO on statically binarized MNIST (nats), FFJORD paper Table 3 (Sylvester paper's numbers)
PUBLISHED = {"none": 86.55, "planar": 86.06, "orthogonal": 83.32, "householder": 83.32,
             "triangular": 83.32, "cnf": 82.82}
PUBLISHED_NOTE = {"orthogonal": "Sylvester (best kind)", "householder": "Sylvester (best kind)",
                  "triangular": "Sylvester (best kind)", "cnf": "FFJORD"}


def command(flow):
    return [sys.executable, os.path.join(ROOT, "examples", "train_vae.py")] + BUDGET + EXTRA + \
        FLOWS[flow] + ["--save", os.path.join(OUT, flow),
                       "--log-json", os.path.join(OUT, f"{flow}.jsonl")]


def table():
    rows = ["| flow | test −ELBO | IWAE NLL (k) | best epoch / epochs | s/epoch (median) | "
            "published −ELBO |", "|---|---|---|---|---|---|"]
    for flow in FLOWS:
        path = os.path.join(OUT, flow, "result.json")
        pub = f"{PUBLISHED[flow]} ({PUBLISHED_NOTE.get(flow, flow)})"
        if not os.path.exists(path):
            rows.append(f"| {flow} | not run | | | | {pub} |")
            continue
        with open(path) as f:
            r = json.load(f)
        rows.append(f"| {flow} | {r['test_nelbo']:.2f} | {r['test_nll']:.2f} ± "
                    f"{r['test_nll_stderr']:.2f} ({r['iwae_k']}) | {r['best_epoch']} / "
                    f"{r['epochs']} | {r['median_epoch_seconds']:.1f} | {pub} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="train the runs that have no result")
    p.add_argument("--flows", default=",".join(FLOWS), help="comma-separated subset")
    p.add_argument("--out", default=None, help="folder of the runs and table.md "
                   "(default runs/vae_table)")
    p.add_argument("--extra", default="",
                   help="flags added to every run, e.g. '--subset 48000 --epochs 10'")
    args = p.parse_args(argv)
    global OUT, EXTRA
    EXTRA = args.extra.split()
    OUT = args.out or OUT
    flows = [f for f in args.flows.split(",") if f]
    bad = [f for f in flows if f not in FLOWS]
    if bad:
        p.error(f"unknown flows {bad}: expected some of {list(FLOWS)}")
    if args.run:
        run_missing(flows, OUT, command)
    text = table()
    print(text)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write("Command of every row: python examples/train_vae.py " + " ".join(BUDGET + EXTRA)
                + " <flow flags>\n\n" + text + "\n")


if __name__ == "__main__":
    main()
