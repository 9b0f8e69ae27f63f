"""Data-parallel training over MPI processes (docs/parallel.md).

    mpiexec -n N python examples/train_toy.py ...

starts N copies of a script; ``init()`` connects them through mpi4py. Every process (rank)
draws the whole batch and all its random numbers from the same seeded stream, computes its
share of the rows with the model's ``loss_and_grad_part`` (docs/parallel.md, eq. 1.2-1.3),
and one ``Allreduce`` of one flat float64 buffer sums the shares (gradients, loss terms, ∂L/∂T,
NFE, a failure flag); the model's ``loss_from_part`` then gives every rank the same (loss,
grads, stats) as one process computing the whole batch, so all take the same optimizer step
and the parameters stay bit-identical. An adaptive solver's error norm is summed over the
ranks at every step (odeint's ``allreduce``), so all ranks take the steps one process takes.

Without an MPI launcher (no PMI_SIZE / OMPI_COMM_WORLD_SIZE / ... in the environment), or
with one rank, nothing is imported and everything runs as one process. Started by a launcher
with several ranks but without mpi4py: ``init`` raises ParallelError saying what to install.

With several ranks, an exception that reaches the top of a rank is printed with the rank's
number and ends the whole job (``MPI.COMM_WORLD.Abort``), so no rank waits forever for one
that died. On GPUs: one rank per GPU, rank r on device (node-local rank) mod (GPUs on the
node); the buffer goes through the host unless NPFLOW_MPI_CUDA_AWARE=1 says the MPI library
reads device memory.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import zlib

import numpy as np  # host side only: the reduction buffer on its way through MPI

from .backend import get_array_module, to_host
from .model import Part

__all__ = ["Comm", "ParallelError", "init", "run", "launched_size", "row_range",
           "loss_and_grad", "time_gradient", "agree", "check_same"]

#: environment variables by which MPI launchers tell a process how many ranks were started
#: (MPICH / Intel MPI / Slurm's PMI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; MVAPICH)
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: set to 1 when the MPI library reads GPU memory (CUDA-aware): the buffer stays on the GPU
CUDA_AWARE_VAR = "NPFLOW_MPI_CUDA_AWARE"


class ParallelError(RuntimeError):
    """MPI set-up failed (launched by mpiexec without mpi4py, a batch too small to split)."""


def launched_size():
    """The number of ranks an MPI launcher started (from its environment), or None."""
    for var in SIZE_VARS:
        v = os.environ.get(var)
        if v and v.strip().isdigit():
            return int(v)
    if "PMIX_RANK" in os.environ:              # PMIx (srun --mpi=pmix): the size is Slurm's
        v = os.environ.get("SLURM_NTASKS", "")
        return int(v) if v.isdigit() else None
    return None


class Comm:
    """The ranks of one training job: ``rank``, ``size``, ``local_rank`` (rank among the
    processes of this node) and ``mpi`` (the mpi4py communicator, None for one process).

    ``root`` is True on rank 0, the only rank that prints, logs, plots and writes files;
    ``print`` prints there only. ``allreduce(vec)`` sums a host float64 vector over the
    ranks (returns it; in place)."""

    def __init__(self, mpi=None, local_rank=0):
        self.mpi = mpi
        self.rank = 0 if mpi is None else mpi.Get_rank()
        self.size = 1 if mpi is None else mpi.Get_size()
        self.local_rank = int(local_rank)
        self._layouts = {}          # model class -> buffer layout of its last reduced Part

    @property
    def root(self):
        return self.rank == 0

    def print(self, *args, **kwargs):
        """print on rank 0 only (flushed)."""
        if self.root:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def allreduce(self, vec):
        """Σ over the ranks of the host float64 vector ``vec`` (in place; returned)."""
        if self.mpi is not None and self.size > 1:
            from mpi4py import MPI
            self.mpi.Allreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
        return vec

    def barrier(self):
        if self.mpi is not None and self.size > 1:
            self.mpi.Barrier()

    def abort(self, message, code=1):
        """Print ``message`` (with this rank's number) to stderr and end every rank."""
        sys.stderr.write(f"npflow rank {self.rank}/{self.size}: {message}\n")
        sys.stderr.flush()
        if self.mpi is not None and self.size > 1:
            _let_the_launcher_forward()
            self.mpi.Abort(code)
        raise SystemExit(code)

    def __repr__(self):
        return f"Comm(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


SINGLE = Comm()


def init(device="cpu"):
    """The ranks this process belongs to: a one-process Comm when not started by an MPI
    launcher (or started with one rank), else MPI.COMM_WORLD through mpi4py, with

    - an exception hook: an uncaught exception on any rank is printed with the rank's number
      and aborts the whole job (no rank left waiting in a collective);
    - device "gpu": this rank's GPU chosen, node-local rank mod the GPUs of the node.

    Raises ParallelError (one line) when launched with several ranks but mpi4py is missing.
    """
    n = launched_size()
    if n is None:
        return _gpu(SINGLE, device)
    try:
        from mpi4py import MPI
    except ImportError:
        if n > 1:
            raise ParallelError(
                f"started by an MPI launcher with {n} ranks but mpi4py is not installed: "
                "pip install 'npflow[mpi]' (or pip install mpi4py mpich), or run without "
                "mpiexec") from None
        return _gpu(SINGLE, device)
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return _gpu(SINGLE, device)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    comm = Comm(world, local_rank=node.Get_rank())
    node.Free()
    if not _LEAVE:
        _LEAVE.append(world.Dup())
    _abort_on_uncaught(comm)
    return _gpu(comm, device)


def _abort_on_uncaught(comm):
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            sys.stderr.write(f"npflow rank {comm.rank}/{comm.size} raised; stopping every "
                             "rank:\n")
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - whatever happens, the other ranks must stop
            previous(kind, value, tb)
        finally:
            _let_the_launcher_forward()
            comm.mpi.Abort(1)

    sys.excepthook = hook


#: seconds a failing rank waits, after flushing its message, before MPI_Abort: the launcher
#: (MPICH's hydra proxy) forwards a rank's stderr through a pipe, and an abort can tear the job
#: down before the proxy has read the message (seen in CI on a loaded machine: empty stderr)
ABORT_GRACE = 1.0


def _let_the_launcher_forward():
    time.sleep(ABORT_GRACE)


#: seconds a rank leaving with an error code waits for the others to leave too (run)
LEAVE_TIMEOUT = 10.0
_LEAVE = []       # init(): a duplicate of MPI.COMM_WORLD on which run() agrees to leave


def run(main, *args):
    """``main(*args)``'s exit code (for ``sys.exit(parallel.run(main))`` in a script): with
    several MPI ranks, a rank that leaves with a non-zero code (``sys.exit(2)``, argparse's
    error, a non-finite stop) waits up to LEAVE_TIMEOUT seconds for every rank to leave too
    (they do when all took the same decision), and otherwise ends every rank (MPI_Abort)
    instead of leaving them waiting in a collective. Exceptions are the exception hook's
    (init)."""
    try:
        code = main(*args)
    except SystemExit as exc:
        code = exc.code
    mpi = sys.modules.get("mpi4py.MPI")
    if _LEAVE and mpi is not None and not mpi.Is_finalized():
        sys.stderr.flush()
        sys.stdout.flush()
        if code not in (None, 0):
            # on a communicator of its own: it cannot match the program's collectives
            req = _LEAVE[0].Ibarrier()
            t_end = time.monotonic() + LEAVE_TIMEOUT
            while not req.Test():
                if time.monotonic() > t_end:
                    mpi.COMM_WORLD.Abort(code if isinstance(code, int) else 1)
                time.sleep(0.01)
    return code


def _gpu(comm, device):
    """device "gpu": make GPU (local_rank mod count) current for CuPy (docs/parallel.md §4)."""
    if device == "gpu":
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # noqa: BLE001 - no CuPy or no driver: the model reports it
            return comm
        if count > 0:
            cupy.cuda.Device(comm.local_rank % count).use()
    return comm


def row_range(B, comm):
    """Rows lo:hi of a batch of B that rank ``comm.rank`` of ``comm.size`` computes: the
    batch cut into contiguous blocks whose sizes differ by at most one (eq. 1.1)."""
    if B < comm.size:
        raise ParallelError(f"a batch of {B} rows cannot be split over {comm.size} ranks: "
                            "use a batch of at least as many rows as ranks")
    return B * comm.rank // comm.size, B * (comm.rank + 1) // comm.size


# ----------------------------------------------------------------------------- reductions

def _flat_entries(part):
    """(section, name) pairs of a Part in buffer order: grads, sums, same, each sorted."""
    return ([("grads", k) for k in sorted(part.grads)] + [("sums", k) for k in sorted(part.sums)]
            + [("same", k) for k in sorted(part.same)])


def _layout(part):
    """(entries, shapes, dtypes, size) of a Part's flat buffer (after the failure flag)."""
    entries = _flat_entries(part)
    shapes, dtypes, size = [], [], 1
    for sec, k in entries:
        v = getattr(part, sec)[k]
        shape = tuple(getattr(v, "shape", ()))
        shapes.append(shape)
        dtypes.append(getattr(v, "dtype", None))
        size += int(np.prod(shape, dtype=np.int64))
    return entries, shapes, dtypes, size


def _reduce_buffer(buf, comm):
    """Σ over the ranks of the float64 vector buf (host, or device when CUDA-aware)."""
    xp = get_array_module(buf)
    if xp is np or os.environ.get(CUDA_AWARE_VAR) != "1":
        host = np.ascontiguousarray(to_host(buf), dtype=np.float64)
        return comm.allreduce(host)
    xp.cuda.get_current_stream().synchronize()    # the buffer is complete before MPI reads it
    from mpi4py import MPI
    comm.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


def reduce_part(part, comm, failure=None, model_key=None):
    """Σ over the ranks of every rank's Part, in one Allreduce of one float64 buffer:
    [failure flag, grads..., sums..., same...]; "same" entries are averaged (equal on every
    rank). A rank whose part failed (``failure``, a message; part None) sends the flag and
    zeros with the layout of that model's last reduction; then every rank raises
    FloatingPointError. Returns the summed Part (grads in their dtypes, on their device)."""
    key = model_key
    if failure is None:
        layout = _layout(part)
        comm._layouts[key] = layout
    else:
        layout = comm._layouts.get(key)
        if layout is None:     # the first step failed here: the other ranks cannot be told
            comm.abort(f"failed in its first training step, before the layout of the "
                       f"reduction was known: {failure}")
    entries, shapes, dtypes, size = layout
    if failure is not None:
        buf = np.zeros(size)
        buf[0] = 1.0
        xp = np
    else:
        first = next(iter(part.grads.values()), None)
        xp = get_array_module(first) if first is not None else np
        pieces = [xp.zeros(1, dtype=xp.float64)]
        for sec, k in entries:
            pieces.append(xp.asarray(getattr(part, sec)[k], dtype=xp.float64).reshape(-1))
        buf = xp.concatenate(pieces)
    buf = _reduce_buffer(buf, comm)
    # the flag and the scalars (sums, same: after the gradients) on the host, in one copy
    # when the buffer stayed on the device (CUDA-aware), none when it came back to the host
    g_end = 1 + sum(int(np.prod(shape, dtype=np.int64))
                    for (sec, _), shape in zip(entries, shapes) if sec == "grads")
    bxp = get_array_module(buf)
    host = to_host(bxp.concatenate([buf[:1], buf[g_end:]]))
    failed = int(round(float(host[0])))
    if failed:
        raise FloatingPointError(
            f"a non-finite value or a solver failure on {failed} of {comm.size} ranks"
            + (f" (rank {comm.rank}: {failure})" if failure is not None else ""))
    out = {"grads": {}, "sums": {}, "same": {}}
    dbuf = xp.asarray(buf)                 # back on the gradients' device: one copy
    o = 1
    for (sec, k), shape, dt in zip(entries, shapes, dtypes):
        n = int(np.prod(shape, dtype=np.int64))
        if sec == "grads":
            a = dbuf[o:o + n].reshape(shape)
            out[sec][k] = a.astype(dt) if dt is not None else a.copy()
        elif sec == "sums":
            out[sec][k] = float(host[1 + o - g_end])
        else:
            out[sec][k] = float(host[1 + o - g_end]) / comm.size
        o += n
    return Part(out["sums"], out["grads"], out["same"])


def loss_and_grad(model, x, rng, comm=None, **kwargs):
    """``model.loss_and_grad(x, rng, **kwargs)`` computed by all the ranks of ``comm`` together
    (docs/parallel.md, eq. 1.2): x (B, ...) is the whole batch (every rank draws it alike),
    each rank computes the rows ``row_range(B, comm)`` with ``model.loss_and_grad_part`` (the
    random numbers of the whole batch drawn from rng on every rank), one Allreduce sums the
    parts, and ``model.loss_from_part`` gives (loss, grads, stats), the same on every rank.
    With no comm or one rank this is model.loss_and_grad itself.

    A FloatingPointError or SolverError on any rank makes every rank raise FloatingPointError
    (the training loop's non-finite stop, taken by all ranks together)."""
    if comm is None or comm.size == 1:
        return model.loss_and_grad(x, rng, **kwargs)
    from .solvers import SolverError
    if not hasattr(model, "loss_and_grad_part"):
        raise ParallelError(f"{type(model).__name__} has no loss_and_grad_part: it cannot be "
                            "trained on several MPI ranks; run it with one")
    B = int(x.shape[0])
    rows = row_range(B, comm)
    try:
        part, failure = model.loss_and_grad_part(x, rng, rows=rows, allreduce=comm.allreduce,
                                                 **kwargs), None
    except (FloatingPointError, SolverError) as exc:
        part, failure = None, f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"npflow rank {comm.rank}/{comm.size}: {failure}\n")
    part = reduce_part(part, comm, failure, model_key=type(model).__name__)
    return model.loss_from_part(part, B, **{k: v for k, v in kwargs.items()
                                            if k in ("params", "T")})


def time_gradient(model, x, rng, comm=None, kind="analytic"):
    """``model.time_gradient(x, rng, kind=kind)`` (TO-FLOW's ∂L/∂T_b, a list of floats, one
    per block) for the whole batch x (B, ...), computed by all the ranks of comm together: each
    rank's share of its rows, summed by one Allreduce (with the failure flag of reduce_part)."""
    if comm is None or comm.size == 1:
        return model.time_gradient(x, rng, kind=kind)
    from .solvers import SolverError
    n = len(model.time_names)
    buf = np.zeros(n + 1)
    failure = None
    try:
        g = model.time_gradient(x, rng, kind=kind, rows=row_range(int(x.shape[0]), comm),
                                allreduce=comm.allreduce)
        buf[1:] = g
    except (FloatingPointError, SolverError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        buf[0] = 1.0
    comm.allreduce(buf)
    if buf[0]:
        raise FloatingPointError(
            f"TO-FLOW ∂L/∂T: a non-finite value or a solver failure on {int(buf[0])} of "
            f"{comm.size} ranks" + (f" (rank {comm.rank}: {failure})" if failure else ""))
    return [float(v) for v in buf[1:]]


def agree(signum, clock, comm):
    """The training loop's local decisions made common (npflow.training.train): a signal
    number received on any rank (the largest; None if none) and rank 0's checkpoint clock
    (True when due). One Allreduce (MAX) of two numbers."""
    from mpi4py import MPI
    v = np.array([float(signum or 0), 1.0 if (clock and comm.root) else 0.0])
    comm.mpi.Allreduce(MPI.IN_PLACE, v, op=MPI.MAX)
    return (int(v[0]) or None), bool(v[1])


def check_same(params, comm=None):
    """Raise RuntimeError unless ``params`` (dict of arrays) are bit-identical on every rank
    (a CRC-32 of each array's bytes, gathered); a cheap guard, e.g. before a checkpoint."""
    if comm is None or comm.size == 1:
        return
    mine = [(k, zlib.crc32(np.ascontiguousarray(to_host(params[k])).tobytes()))
            for k in sorted(params)]
    everyone = comm.mpi.allgather(mine)
    bad = sorted({k for other in everyone for (k, c), (_, c0) in zip(other, mine) if c != c0})
    if bad:
        raise RuntimeError(f"the parameters differ between MPI ranks in {bad[:5]}"
                           f"{' ...' if len(bad) > 5 else ''}: the ranks ran different "
                           "computations (e.g. different library builds on different nodes)")
