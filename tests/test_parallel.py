"""npflow.parallel in one process (docs/parallel.md): the row split, the launcher detection, and
the identity the MPI reduction rests on, that the parts of any split of a batch add up to the
part of the whole batch (eq. 1.2-1.3). The MPI runs themselves: tests/test_parallel_mpi.py."""
import sys

import numpy as np
import pytest

import npflow
from npflow import parallel
from npflow.model import Part
from npflow.multiscale import MultiscaleCNF


class FakeComm(parallel.Comm):
    """``size`` ranks that all hold the same part: the Allreduce multiplies by size."""

    def __init__(self, size, rank=0):
        super().__init__()
        self.size, self.rank = size, rank

    def allreduce(self, vec):
        vec *= self.size
        return vec


@pytest.mark.parametrize("B, size", [(10, 1), (10, 2), (10, 3), (7, 7), (1000, 6)])
def test_row_ranges_tile_the_batch_in_blocks_differing_by_at_most_one(B, size):
    ranges = [parallel.row_range(B, FakeComm(size, r)) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == B
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    lengths = [hi - lo for lo, hi in ranges]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_a_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(parallel.ParallelError, match="3 rows cannot be split over 4 ranks"):
        parallel.row_range(3, FakeComm(4, 0))


def _clear_launch_env(monkeypatch):
    for v in parallel.SIZE_VARS + ("PMIX_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)


def test_without_a_launcher_init_gives_one_process(monkeypatch):
    _clear_launch_env(monkeypatch)
    assert parallel.launched_size() is None
    comm = parallel.init()
    assert (comm.rank, comm.size, comm.root, comm.mpi) == (0, 1, True, None)
    v = np.arange(3.0)
    assert comm.allreduce(v) is v and list(v) == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("var", parallel.SIZE_VARS)
def test_launched_by_mpiexec_without_mpi4py_is_a_one_line_error(monkeypatch, var):
    _clear_launch_env(monkeypatch)
    monkeypatch.setenv(var, "2")
    assert parallel.launched_size() == 2
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # import mpi4py fails
    with pytest.raises(parallel.ParallelError) as info:
        parallel.init()
    msg = str(info.value)
    assert "\n" not in msg and "mpi4py is not installed" in msg and "npflow[mpi]" in msg
    monkeypatch.setenv(var, "1")                                # one rank: run alone
    assert parallel.init().size == 1


def _split_sum(model, x, n, kw):
    """Σ of the parts of rows split into n blocks, each from a generator in the same state."""
    B = x.shape[0]
    total = None
    for r in range(n):
        rows = parallel.row_range(B, FakeComm(n, r))
        p = model.loss_and_grad_part(x, np.random.default_rng(3), rows=rows, **kw)
        if total is None:
            total = Part(dict(p.sums), dict(p.grads), dict(p.same))
        else:
            for k in p.sums:
                total.sums[k] = total.sums[k] + p.sums[k]
            for k in p.grads:
                total.grads[k] = total.grads[k] + p.grads[k]
            for k in p.same:
                assert p.same[k] == total.same[k], k      # every block takes the same steps
    return total


MODELS = {
    "cnf_hutchinson_rnode_toflow": lambda: (
        npflow.CNF(2, hidden=(6,), T=0.5, solver="rk4", steps=2, trace="hutchinson", probes=2,
                   kinetic=0.1, jacobian=0.1, train_T=True, blocks=2, dtype="float64"),
        npflow.data.toy("8gaussians", 13, np.random.default_rng(0)), {}),
    "cnf_steer": lambda: (
        npflow.CNF(2, hidden=(6,), solver="rk38", steps=2, trace="rademacher", dtype="float64"),
        npflow.data.toy("8gaussians", 9, np.random.default_rng(1)), {"T": 0.4}),
    "otflow": lambda: (npflow.OTFlow(2, width=6, steps=2, train_T=True, dtype="float64"),
                       np.random.default_rng(2).standard_normal((11, 2)), {}),
    "multiscale": lambda: (
        MultiscaleCNF((1, 4, 4), hidden=(3,), scales=2, blocks=1, steps=1, kinetic=0.1,
                      jacobian=0.1, train_T=True, dtype="float64"),
        np.random.default_rng(3).integers(0, 256, (5, 1, 4, 4)), {}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n", [2, 3])
def test_parts_of_a_split_batch_add_up_to_the_whole_batch(name, n):
    model, x, kw = MODELS[name]()
    whole = model.loss_and_grad(x, np.random.default_rng(3), **kw)
    split = model.loss_from_part(_split_sum(model, x, n, kw), x.shape[0], **kw)
    assert split[0] == pytest.approx(whole[0], rel=1e-12)
    for k in whole[1]:
        np.testing.assert_allclose(split[1][k], whole[1][k], rtol=1e-11, atol=1e-14, err_msg=k)
    for k in whole[2]:
        np.testing.assert_allclose(split[2][k], whole[2][k], rtol=1e-11, atol=1e-14, err_msg=k)


def test_reduce_part_sums_grads_and_sums_and_keeps_same_values():
    model, x, _ = MODELS["cnf_hutchinson_rnode_toflow"]()
    part = model.loss_and_grad_part(x, np.random.default_rng(0))
    red = parallel.reduce_part(part, FakeComm(3), model_key="CNF")
    assert sorted(red.grads) == sorted(part.grads)
    for k in part.grads:
        assert red.grads[k].dtype == part.grads[k].dtype
        assert red.grads[k].shape == part.grads[k].shape
        np.testing.assert_allclose(red.grads[k], 3 * part.grads[k], rtol=1e-15)
    for k in part.sums:
        assert red.sums[k] == pytest.approx(3 * float(part.sums[k]), rel=1e-15)
    assert red.same == pytest.approx(part.same, rel=1e-15)


def test_a_failed_part_raises_floating_point_error_after_the_reduction():
    comm = FakeComm(2)
    model, x, _ = MODELS["otflow"]()
    with pytest.raises(SystemExit):      # no layout yet: the other ranks cannot be told; abort
        parallel.reduce_part(None, comm, failure="boom", model_key="OTFlow")
    parallel.reduce_part(model.loss_and_grad_part(x), comm, model_key="OTFlow")
    with pytest.raises(FloatingPointError, match="on 2 of 2 ranks.*boom"):
        parallel.reduce_part(None, comm, failure="boom", model_key="OTFlow")


def test_one_process_loss_and_grad_is_the_models_own():
    model, x, kw = MODELS["cnf_steer"]()
    a = parallel.loss_and_grad(model, x, np.random.default_rng(5), None, **kw)
    b = model.loss_and_grad(x, np.random.default_rng(5), **kw)
    assert a[0] == b[0] and all(np.array_equal(a[1][k], b[1][k]) for k in b[1])


def test_dopri5_with_the_error_norm_summed_over_copies_of_the_rows_takes_the_same_steps():
    """odeint's allreduce (eq. 1.4): ranks that held identical rows would sum identical Σq²
    and counts, so the RMS, and with it every step, is that of one process."""
    model = npflow.CNF(2, hidden=(6,), solver="dopri5", rtol=1e-6, atol=1e-6, dtype="float64")
    x = npflow.data.toy("8gaussians", 12, np.random.default_rng(0))
    one = model.loss_and_grad_part(x, np.random.default_rng(0))
    calls = []

    def allreduce(v):
        calls.append(v.shape)
        v *= 2
        return v

    two = model.loss_and_grad_part(x, np.random.default_rng(0), allreduce=allreduce)
    assert calls and all(s == (4,) for s in calls)        # Σq² and the count of z and ℓ
    assert one.same == two.same
    assert float(two.sums["nll"]) == pytest.approx(float(one.sums["nll"]), rel=1e-13)


@pytest.mark.parametrize("local_rank, gpus, device", [(0, 2, 0), (1, 2, 1), (3, 2, 1), (5, 4, 1)])
def test_each_rank_takes_gpu_local_rank_mod_the_gpus_of_its_node(monkeypatch, local_rank, gpus,
                                                                  device):
    """One rank per GPU (docs/parallel.md §4), with a stand-in for CuPy's device API."""
    import types
    used = []

    class Device:
        def __init__(self, i):
            self.i = i

        def use(self):
            used.append(self.i)

    cuda = types.SimpleNamespace(Device=Device,
                                 runtime=types.SimpleNamespace(getDeviceCount=lambda: gpus))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    comm = parallel.Comm(local_rank=local_rank)
    assert parallel._gpu(comm, "gpu") is comm and used == [device]
    assert parallel._gpu(comm, "cpu") is comm and used == [device]      # cpu: untouched


def test_the_reduction_runs_on_device_arrays_with_one_host_copy(device):
    """The reduction on the device backend (the strict CuPy stand-in, tests/strict_xp.py, or
    real CuPy with --device-backend cupy): every array function it takes exists in CuPy, the
    gradients come back on the device in their dtype, and the only device-to-host copy is the
    buffer's, once."""
    model = npflow.CNF(2, hidden=(6,), solver="rk4", steps=2, trace="hutchinson", train_T=True,
                       dtype="float32", device="gpu")
    x = npflow.data.toy("8gaussians", 8, np.random.default_rng(0))
    part = model.loss_and_grad_part(x, np.random.default_rng(1))
    red = parallel.reduce_part(part, FakeComm(2), model_key="CNF")
    for k, g in part.grads.items():
        assert type(red.grads[k]) is type(g) and red.grads[k].dtype == g.dtype
        np.testing.assert_allclose(npflow.backend.to_host(red.grads[k]),
                                   2 * npflow.backend.to_host(g), rtol=1e-6)
    if device.strict:
        import strict_xp
        with strict_xp.track() as t:
            parallel.reduce_part(part, FakeComm(2), model_key="CNF")
        assert len(t.syncs) == 1, [str(e) for e in t.syncs]     # the buffer to the host
