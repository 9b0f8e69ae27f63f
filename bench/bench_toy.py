"""Time whole training iterations of npflow.CNF against the PyTorch + torchdiffeq incumbent.

One process, one run: the same 8gaussians batches, the same model (ConcatSquash 2-64-64-64-2,
tanh, T = 0.5, exact trace, 8 fixed steps), float32, 2 threads, for each batch size:

    torch   torchdiffeq "rk4" (Kutta's 3/8 rule), backprop through the solver, torch.optim.Adam
    npflow  solver "rk38" (the same rule) and "rk4" (classical, same cost), discrete adjoint,
            npflow.Adam(decoupled=False) (the same L2-coupled update as torch.optim.Adam)

A timed iteration is: forward solve + backward + optimiser step + the loss as a Python float
(torch: zero_grad, loss, backward, step, loss.item(); npflow: loss_and_grad, Adam.step). Data
batches are made before timing. After ``--warmup`` untimed iterations per runner, the runners
take turns in blocks of ``--block`` iterations (order rotated every round) until each has
``--iters`` timed iterations, so slow drifts of a shared machine's load hit all alike.

Printed per batch size and runner: median, IQR (25th-75th percentile) and minimum of the
seconds per iteration, the ratio of medians npflow/torch (target <= 0.25), function evaluations
(NFE) per iteration, and peak memory (see --memory). ``--json PATH`` writes everything.

Usage:
    python bench/bench_toy.py --batch 100 1000 --iters 50 --warmup 5 --json bench_toy.json

MPI data parallelism (npflow.parallel): "npflow-mpiN:SOLVER" runs the npflow step on N ranks of
one ``mpiexec -n N`` job (MpiRunner), interleaved with the others like any runner; the printed
"eff." is the scaling efficiency, time on 1 rank / (N × time on N ranks):

    python bench/bench_toy.py --batch 100 1000 --iters 40 --warmup 5 --threads 2 --no-memory \
        --no-count-ops --runners torch:rk38 npflow-mpi1:rk38 npflow-mpi2:rk38
"""
from __future__ import annotations

import os
import sys

# Threads: 2 for every library unless --threads says otherwise. The environment variables must
# be set before numpy / torch are imported; set_blas_threads() also adjusts OpenBLAS at run time
# (when this module is imported after numpy, e.g. by the tests).
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "2"
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    if "--threads" in sys.argv:
        os.environ[_v] = _THREADS
    else:
        os.environ.setdefault(_v, _THREADS)

import argparse  # noqa: E402
import collections  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MODEL = dict(dim=2, hidden=(64, 64, 64), T=0.5, steps=8)
LR, WEIGHT_DECAY = 1e-3, 1e-5


# ------------------------------------------------------------------------------------ threads
# numpy's OpenBLAS thread count at run time: npflow.backend's ctypes helpers
# and glibc's malloc tuning (--mallopt: no mmap below 32 MiB, no trimming, whole process)
from npflow.backend import get_blas_threads, set_blas_threads, tune_malloc  # noqa: E402


# ------------------------------------------------------------------------------------ data
def sample_8gaussians(n, rng):
    """8gaussians: npflow.data.toy when available, else the same recipe (shared/REFERENCE.md)."""
    try:
        from npflow.data.toy import toy
    except ImportError:
        k = rng.integers(0, 8, size=n)
        ang = k * math.pi / 4
        centres = 4.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        return (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414
    return toy("8gaussians", n, rng)


def make_batches(batch, count, seed):
    """``count`` float32 host batches (batch, 2) from one seeded generator (shared by all runners)."""
    rng = np.random.default_rng(seed)
    return [np.ascontiguousarray(sample_8gaussians(batch, rng), dtype=np.float32)
            for _ in range(count)]


# ------------------------------------------------------------------------------------ runners
class TorchRunner:
    """FFJORD-style PyTorch model (bench/torch_cnf.py); step(i) trains on batch i."""

    framework = "torch"

    def __init__(self, solver, batches, seed=0, threads=2):
        import torch
        from torch_cnf import TorchCNF, make_optimizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.solver = solver
        self.name = f"torch[{'torchdiffeq rk4 (3/8 rule)' if solver == 'rk38' else solver}]"
        self.model = TorchCNF(solver=solver, dtype=torch.float32, seed=seed, **MODEL)
        self.opt = make_optimizer(self.model, lr=LR, weight_decay=WEIGHT_DECAY, kind="adam")
        self.batches = [torch.from_numpy(b) for b in batches]

    def step(self, i):
        """One iteration on batch i; returns (loss, nfe forward, nfe backward)."""
        from torch_cnf import train_step

        n0 = self.model.odefunc.nfe
        loss = train_step(self.model, self.opt, self.batches[i % len(self.batches)])
        # the backward pass replays the recorded graph: no further function evaluations
        return loss, self.model.odefunc.nfe - n0, 0


class NpflowRunner:
    """npflow.CNF with npflow.Adam(decoupled=False) (FFJORD's coupled weight decay), in this
    process, OpenBLAS at the process setting (--threads)."""

    framework = "npflow"

    def __init__(self, solver, batches, seed=0):
        import npflow

        self.solver = solver
        self.name = f"npflow[{solver}]"
        self.model = npflow.CNF(layer="concatsquash", activation="tanh", solver=solver,
                                trace="exact", dtype="float32", seed=seed, **MODEL)
        self.params = self.model.params
        self.opt = npflow.Adam(self.params, lr=LR, weight_decay=WEIGHT_DECAY, decoupled=False)
        self.rng = np.random.default_rng(seed + 1)
        self.batches = batches

    def step(self, i):
        loss, grads, stats = self.model.loss_and_grad(self.batches[i % len(self.batches)],
                                                      self.rng, params=self.params)
        self.params = self.opt.step(self.params, grads)
        return loss, stats.get("nfe_forward", -1), stats.get("nfe_backward", -1)


class MpiRunner:
    """The NpflowRunner's training step on N MPI ranks (npflow.parallel, docs/parallel.md): a
    job ``mpiexec -n N python bench_toy.py --_mpi-child ...`` started once, one BLAS thread
    per rank, each rank computing its rows of every batch and one Allreduce per step. step(i)
    sends i to rank 0 over a pipe; rank 0 passes it on (a non-blocking broadcast polled with
    short sleeps, so that waiting ranks leave the cores to the other runners), every rank
    trains on batch i, and rank 0 answers with the step's seconds as it measured them (from
    the broadcast to the end of the optimizer step), which ``seconds`` holds for the timer.
    """

    framework = "npflow"

    def __init__(self, solver, batch, count, seed=0, ranks=2):
        import shutil
        import subprocess

        exe = shutil.which("mpiexec")
        if exe is None:
            raise RuntimeError("no mpiexec on PATH (pip install mpi4py mpich)")
        self.solver, self.ranks = solver, int(ranks)
        self.name = f"npflow[{solver}] mpiexec -n {self.ranks}"
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        root = os.path.dirname(HERE)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        self.proc = subprocess.Popen(
            [exe, "-n", str(self.ranks), sys.executable, os.path.abspath(__file__),
             "--_mpi-child", solver, str(batch), str(count), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the MPI job of {self.name} did not start")
        self.seconds = None
        self.reduce_seconds = []   # per step: seconds rank 0 spent inside Allreduce

    def step(self, i):
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the MPI job of {self.name} ended (exit {self.proc.wait()})")
        self.seconds, loss, nf, nb, reduce_s = json.loads(line)
        self.reduce_seconds.append(reduce_s)
        return loss, nf, nb

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("-1\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _mpi_child(solver, batch, count, seed):
    """The MPI job of MpiRunner: rank 0 reads batch indices from stdin (-1: stop)."""
    import time as _time

    from npflow import parallel

    comm = parallel.init()
    set_blas_threads(1)
    batches = make_batches(batch, count, seed)
    runner = NpflowRunner(solver, batches, seed)
    buf = np.zeros(1, dtype=np.int64)
    in_reduce = [0.0]          # seconds inside Allreduce calls (incl. waiting for other ranks)
    plain_allreduce = comm.allreduce

    def timed_allreduce(vec):
        t = _time.perf_counter()
        out = plain_allreduce(vec)
        in_reduce[0] += _time.perf_counter() - t
        return out
    comm.allreduce = timed_allreduce
    if comm.root:
        print("ready", flush=True)
    while True:
        if comm.root:
            line = sys.stdin.readline()
            buf[0] = int(line) if line.strip() else -1
        if comm.size > 1:
            req = comm.mpi.Ibcast(buf, root=0)
            while not req.Test():
                _time.sleep(2e-4)
        i = int(buf[0])
        if i < 0:
            break
        in_reduce[0] = 0.0
        t0 = _time.perf_counter()
        loss, grads, stats = parallel.loss_and_grad(
            runner.model, batches[i % len(batches)], runner.rng, comm, params=runner.params)
        runner.params = runner.opt.step(runner.params, grads)
        dt = _time.perf_counter() - t0
        if comm.root:
            print(json.dumps([dt, loss, stats["nfe_forward"], stats["nfe_backward"],
                              in_reduce[0]]), flush=True)
    return 0


def make_runner(spec, batches, seed, threads=2):
    """FRAMEWORK:SOLVER; "npflow-mpiN:SOLVER" is npflow on N MPI ranks (MpiRunner)."""
    framework, solver = spec.split(":")
    if framework == "torch":
        runner = TorchRunner(solver, batches, seed, threads)
    elif framework == "npflow":
        runner = NpflowRunner(solver, batches, seed)
    elif framework.startswith("npflow-mpi") and framework[10:].isdigit():
        runner = MpiRunner(solver, len(batches[0]), len(batches), seed, int(framework[10:]))
    else:
        runner = None
    if runner is not None:
        runner.spec = spec
        return runner
    raise ValueError(f"unknown runner {spec!r}: expected torch:SOLVER, npflow:SOLVER or "
                     f"npflow-mpiN:SOLVER (N ranks)")


# ------------------------------------------------------------------------------------ timing
def summarize(times):
    a = np.asarray(times)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return dict(median=float(med), q25=float(q25), q75=float(q75), iqr=float(q75 - q25),
                min=float(a.min()), mean=float(a.mean()), n=int(a.size))


def time_interleaved(runners, iters, warmup, block):
    """Warm up each runner, then alternate blocks of ``block`` timed iterations.

    Returns {name: dict(times=[s...], losses=[...], nfe=(fwd, bwd), faults=minor page faults
    summed over the timed iterations)}."""
    out = {r.name: dict(times=[], losses=[], nfe=None, faults=0) for r in runners}
    counters = {r.name: 0 for r in runners}
    for r in runners:
        for _ in range(warmup):
            loss, nf, nb = r.step(counters[r.name])
            counters[r.name] += 1
        out[r.name]["nfe"] = (nf, nb) if warmup else None
    rounds = math.ceil(iters / block)
    for rd in range(rounds):
        order = runners[rd % len(runners):] + runners[:rd % len(runners)]
        for r in order:
            rec = out[r.name]
            gc.collect()
            for _ in range(min(block, iters - len(rec["times"]))):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                loss, nf, nb = r.step(counters[r.name])
                dt = time.perf_counter() - t0
                # an MPI job reports the seconds of the step as its rank 0 measured them
                rec["times"].append(getattr(r, "seconds", None) or dt)
                rec["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                rec["losses"].append(loss)
                rec["nfe"] = (nf, nb)
                counters[r.name] += 1
    return out


# ------------------------------------------------------------------------------------ counts
def count_torch_ops(runner, i=0):
    """aten operators dispatched in one torch iteration (forward, backward and Adam), by a
    TorchDispatchMode counter: (total, Counter by op name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as c:
        runner.step(i)
    return sum(c.counts.values()), c.counts


def count_torch_profiler_ops(runner, i=0):
    """aten:: events that torch.profiler records in one iteration (composite ops such as
    aten::linear and the ops they call are both counted; the measure of shared/REFERENCE.md)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step(i)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


class _CountingArray(np.ndarray):
    """ndarray subclass counting ufunc calls (incl. matmul and reductions) and array functions."""

    counts = collections.Counter()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _CountingArray.counts[ufunc.__name__ + ("" if method == "__call__" else "." + method)] += 1
        inputs = tuple(x.view(np.ndarray) if isinstance(x, _CountingArray) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(x.view(np.ndarray) if isinstance(x, _CountingArray) else x
                                  for x in kwargs["out"])
        res = getattr(ufunc, method)(*inputs, **kwargs)
        if isinstance(res, np.ndarray):
            return res.view(_CountingArray)
        if isinstance(res, tuple):
            return tuple(x.view(_CountingArray) if isinstance(x, np.ndarray) else x for x in res)
        return res

    def __array_function__(self, func, types, args, kwargs):
        _CountingArray.counts[func.__name__] += 1
        return super().__array_function__(func, types, args, kwargs)


def count_numpy_ops(runner, i=0):
    """numpy operations in one npflow iteration (lower bound): ufunc calls (arithmetic, matmul,
    reductions) and numpy functions on arrays derived from the parameters and data; views,
    reshapes and methods such as astype are not counted. Returns (total, Counter).
    Counted in this process only (not for the MPI runners)."""
    params = {k: np.asarray(v).view(_CountingArray) for k, v in runner.params.items()}
    saved = runner.params
    _CountingArray.counts = collections.Counter()
    try:
        batch = runner.batches[i % len(runner.batches)].view(_CountingArray)
        runner.model.loss_and_grad(batch, runner.rng, params=params)
    finally:
        runner.params = saved
    c = _CountingArray.counts
    return sum(c.values()), c


# ------------------------------------------------------------------------------------ memory
def _proc_status_kib(field):
    """A memory field of /proc/self/status in KiB (Linux: VmRSS now, VmHWM peak); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss():
    """Reset this process's peak-RSS mark (Linux >= 4.0, /proc/self/clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory_child(spec, batch, iters, seed, threads):
    """Run in a fresh process: peak resident set while running ``iters`` iterations, its growth
    over the resident set just before them (model built, data made), and the tracemalloc peak.

    The peak is /proc/self/status VmHWM after resetting the mark just before the iterations
    (not ru_maxrss: on Linux a child's ru_maxrss starts from the parent's peak at fork)."""
    batches = make_batches(batch, iters + 1, seed)
    runner = make_runner(spec, batches, seed, threads)
    gc.collect()
    rss0 = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    tracemalloc.start()
    for i in range(iters):
        runner.step(i)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _proc_status_kib("VmHWM")
    if hwm is None or rss0 is None or not reset:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss0 = rss0 if rss0 is not None else float("nan")
    return dict(peak_rss_mib=hwm / 1024, rss_growth_mib=(hwm - rss0) / 1024,
                tracemalloc_peak_mib=peak / 2**20, peak_source="VmHWM" if reset else "ru_maxrss")


def measure_memory(spec, batch, seed, threads, iters=3, mallopt=False):
    """Peak memory of ``spec`` at ``batch`` in a fresh subprocess (see _memory_child)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
           "--_memory-child", spec, str(batch), str(iters), str(seed)] + (
               ["--mallopt"] if mallopt else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return dict(error=res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def available_runners(requested):
    """Drop runners whose framework cannot be imported (with a message)."""
    ok = []
    for spec in requested:
        fw = spec.split(":")[0]
        try:
            if fw == "torch":
                import torch  # noqa: F401
                import torchdiffeq  # noqa: F401
            elif fw.startswith("npflow-mpi"):
                import shutil

                import mpi4py  # noqa: F401
                if shutil.which("mpiexec") is None:
                    raise RuntimeError("no mpiexec on PATH")
            else:
                import npflow
                npflow.CNF, npflow.Adam  # noqa: B018
        except Exception as exc:  # noqa: BLE001 - report any import failure and go on
            print(f"# skipping {spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        ok.append(spec)
    return ok


def fmt_ms(s):
    return f"{1e3 * s:8.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--iters", type=int, default=50, help="timed iterations per runner")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations per runner")
    ap.add_argument("--block", type=int, default=5, help="iterations per alternating block")
    ap.add_argument("--runners", nargs="+",
                    default=["torch:rk38", "npflow:rk38", "npflow:rk4"],
                    help="FRAMEWORK:SOLVER; torch solvers rk38 (torchdiffeq rk4), "
                         "rk4_classical, midpoint, euler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(_THREADS),
                    help="threads for torch and for numpy's BLAS (default 2)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure peak memory in a fresh subprocess per runner and batch")
    ap.add_argument("--count-ops", action=argparse.BooleanOptionalAction, default=True,
                    help="count framework operations in one iteration")
    ap.add_argument("--mallopt", action="store_true",
                    help="tune glibc malloc (no mmap below 32 MiB, no trimming) for the whole "
                         "process, so iterations reuse mapped pages (see tune_malloc)")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    ap.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_mpi-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mallopt and not tune_malloc():
        print("# --mallopt: mallopt failed (not glibc?); going on without it", file=sys.stderr)
    if args._mpi_child:
        solver, batch, count, seed = args._mpi_child
        return _mpi_child(solver, int(batch), int(count), int(seed))
    if args._memory_child:
        spec, batch, iters, seed = args._memory_child
        print(json.dumps(_memory_child(spec, int(batch), int(iters), int(seed), args.threads)))
        return 0

    blas_before = get_blas_threads()
    try:
        return _run(args)
    finally:  # leave the caller's BLAS thread count as it was (tests import this module)
        if blas_before is not None:
            set_blas_threads(blas_before)


def _run(args):
    blas_threads = set_blas_threads(args.threads)
    specs = available_runners(args.runners)
    if not specs:
        print("no runner available", file=sys.stderr)
        return 1
    env = dict(python=platform.python_version(), numpy=np.__version__,
               machine=platform.machine(), cpus=os.cpu_count(),
               threads={v: os.environ.get(v) for v in ("OMP_NUM_THREADS",
                                                        "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS")},
               blas_threads=blas_threads, mallopt=bool(args.mallopt),
               loadavg_start=os.getloadavg(),
               command=" ".join([sys.argv[0]] + sys.argv[1:]))
    if any(s.startswith("torch") for s in specs):
        import torch
        import torchdiffeq
        torch.set_num_threads(args.threads)
        env.update(torch=torch.__version__, torchdiffeq=torchdiffeq.__version__,
                   torch_threads=torch.get_num_threads())
    print(f"# {json.dumps(env)}")
    results = dict(env=env, model=dict(MODEL, layer="concatsquash", activation="tanh",
                                       trace="exact", dtype="float32", lr=LR,
                                       weight_decay=WEIGHT_DECAY),
                   settings=dict(iters=args.iters, warmup=args.warmup, block=args.block),
                   batches={})
    for batch in args.batch:
        batches = make_batches(batch, args.warmup + args.iters + 2, args.seed)
        runners = [make_runner(s, batches, args.seed, args.threads) for s in specs]
        res = time_interleaved(runners, args.iters, args.warmup, args.block)
        entry = {}
        for r in runners:
            rec = res[r.name]
            e = dict(spec=r.spec, **summarize(rec["times"]),
                     nfe_forward=rec["nfe"][0], nfe_backward=rec["nfe"][1],
                     page_faults_per_iter=rec["faults"] / max(1, len(rec["times"])),
                     loss_first=rec["losses"][0], loss_last=rec["losses"][-1])
            mpi = isinstance(r, MpiRunner)
            if mpi:
                e["ranks"] = r.ranks
                e["allreduce_median"] = float(np.median(r.reduce_seconds[args.warmup:]))
                e["allreduce_fraction"] = e["allreduce_median"] / e["median"]
            if args.count_ops and not mpi:
                try:
                    if r.framework == "torch":
                        n, c = count_torch_ops(r)
                        e["ops_per_iter"] = dict(kind="aten ops dispatched", total=n,
                                                 top=dict(c.most_common(12)),
                                                 profiler_aten_events=count_torch_profiler_ops(r))
                    else:
                        n, c = count_numpy_ops(r)
                        e["ops_per_iter"] = dict(kind="numpy ufunc/function calls", total=n,
                                                 top=dict(c.most_common(12)))
                except Exception as exc:  # noqa: BLE001 - counting is optional
                    e["ops_per_iter"] = dict(error=f"{type(exc).__name__}: {exc}")
            if args.memory and not mpi:
                e["memory"] = measure_memory(e["spec"], batch, args.seed, args.threads,
                                             mallopt=args.mallopt)
            entry[r.name] = e
        for r in runners:             # stop the MPI jobs of this batch
            if isinstance(r, MpiRunner):
                r.close()
        # scaling efficiency of the MPI runners: time on 1 rank / (N × time on N ranks)
        for solver in {e["spec"].split(":")[1] for e in entry.values()}:
            one = [e for e in entry.values() if e["spec"] == f"npflow-mpi1:{solver}"]
            for e in entry.values():
                if one and e.get("ranks", 1) > 1 and e["spec"].endswith(":" + solver):
                    e["scaling_efficiency"] = one[0]["median"] / (e["ranks"] * e["median"])
        torch_med = [e["median"] for e in entry.values() if e["spec"].startswith("torch:rk38")]
        for e in entry.values():
            if torch_med and e["spec"].startswith("npflow"):
                e["ratio_to_torch"] = e["median"] / torch_med[0]
        results["batches"][str(batch)] = entry

        print(f"\nbatch {batch}: ms per training iteration (median, IQR, min) over "
              f"{args.iters} iterations after {args.warmup} warm-up, blocks of {args.block}")
        print(f"{'runner':38s} {'median':>8s} {'q25':>8s} {'q75':>8s} {'min':>8s} "
              f"{'npflow/torch':>12s} {'NFE f+b':>8s} {'ops/it':>7s} {'faults/it':>9s} "
              f"{'peak RSS(+growth) MiB':>21s} "
              f"{'tracemalloc MiB':>15s}")
        for name, e in entry.items():
            ratio = f"{e['ratio_to_torch']:12.3f}" if "ratio_to_torch" in e else f"{'':12s}"
            if "scaling_efficiency" in e:
                name = f"{name} (eff. {e['scaling_efficiency']:.2f})"
            if e.get("ranks", 1) > 1:
                print(f"#   {name}: {1e3 * e['allreduce_median']:.3f} ms per step inside "
                      f"Allreduce on rank 0 (waiting for the other ranks included), "
                      f"{100 * e['allreduce_fraction']:.1f} % of the step")
            ops = e.get("ops_per_iter", {}).get("total", "")
            mem = e.get("memory", {})
            print(f"{name:38s} {fmt_ms(e['median'])} {fmt_ms(e['q25'])} {fmt_ms(e['q75'])} "
                  f"{fmt_ms(e['min'])} {ratio} {e['nfe_forward']:>4}+{e['nfe_backward']:<3} "
                  f"{ops!s:>7s} {e['page_faults_per_iter']:9.0f} "
                  f"{mem.get('peak_rss_mib', float('nan')):11.1f} "
                  f"(+{mem.get('rss_growth_mib', float('nan')):6.1f}) "
                  f"{mem.get('tracemalloc_peak_mib', float('nan')):15.2f}")
        del runners
    results["env"]["loadavg_end"] = os.getloadavg()
    print(f"\n# load average start {env['loadavg_start']}, end {results['env']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
