"""bench/bench_floor.py records one npflow toy iteration's ufunc calls and replays them alone."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_floor  # noqa: E402
import bench_toy  # noqa: E402


def test_recorded_iteration_holds_the_matrix_products_of_every_evaluation_and_replays_fully():
    batches = bench_toy.make_batches(8, 3, 0)
    runner = bench_toy.make_runner("npflow:rk38", batches, 0)
    runner.step(0)
    log = bench_floor.record(runner, 1)
    layers = len(bench_toy.MODEL["hidden"]) + 1
    nfe = 4 * bench_toy.MODEL["steps"]                   # 3/8 rule: 4 stages a step
    matmuls = sum(1 for u, *_ in log if u is np.matmul)
    # at least one product per layer in every forward evaluation, two in every backward one
    assert matmuls >= 3 * layers * nfe
    totals, counts = bench_floor.replay(log, repeats=1)
    assert counts["skipped"] == 0
    assert counts["matmul"] == matmuls and counts["matmul"] + counts["other"] == len(log)
    assert totals["matmul"] > 0 and totals["other"] > 0
