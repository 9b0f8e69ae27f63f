"""What every npflow example script shares: flags, run folders, the lock, signals, exit codes
(docs/training.md, section 9). This docstring is the contract an example author relies on.

A new example in a few lines::

    import common                                    # examples/ is on sys.path (see below)

    def main(argv=None):
        p = common.make_parser("Train X on Y (npflow).", script=__file__)
        common.add_run_arguments(p, niters=1000, save="runs/x", log_every=10)
        common.add_method_arguments(p, methods=("ffjord", "rnode"))
        p.add_argument("--lr", type=float, default=1e-3)
        args = common.parse_args(p, argv)            # deprecated spellings noted here
        methods = common.parse_methods(args.method, ("ffjord", "rnode"))  # fail()s if bad
        ... check every input, build the model; common.fail("--lr must be > 0") on bad ones
        with common.open_run(args, model_keys=("data", "method", "dims")) as run:
            result = npflow.training.train(model, opt, batches, args.niters, rng,
                                           **run.train_kwargs(), hooks=...)
            status = run.finish(result)              # prints; None when the run completed
            if status is not None:
                return status                        # 130 / 143 / 1
            ... final evaluation, run.path("result.json"), append_json(args.log_json, ...)
        return 0

    if __name__ == "__main__":
        common.main_guard(main)

Under MPI (``mpiexec -n N python examples/x.py``, docs/parallel.md): ``comm =
common.init_ranks(args)`` right after parsing (rank 0 alone keeps its stdout), then pass
``comm=comm`` to method_hooks, open_run (rank 0 alone takes the lock and writes args.json; the
others follow its verdict) and train; after ``run.finish`` the ranks other than 0 return 0 and
leave the evaluation to rank 0 (``if not comm.root: return 0``).

Scripts loaded by file path (the tests do that) must put their folder on sys.path first:
``sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))``.

Flags (``add_run_arguments``): --niters N (old spelling --max-iters), --seed S, --save DIR,
--resume, --force, --device cpu|gpu, --dtype float32|float64, --log-json PATH, --data-dir DIR,
--log-every N, --save-every N|Nm. ``add_method_arguments``: --method (a name or a '+'
combination, restricted to what the script's model allows), RNODE's --kinetic / --jacobian,
TO-FLOW's --alpha-T / --eps-T / --lr-T / --T-grad (old spelling --alpha), STEER's --steer-b.
``make_parser`` shows every default once in --help (ArgumentDefaultsHelpFormatter; a help text
that explains its default itself, "default: ...", gets no second one) and turns argparse's
own errors into one line.

Run folder (``open_run``), policy "refuse, don't replace":
  * --save DIR is created if missing. If DIR already holds files, a new run is refused (exit 2)
    unless --resume (continue DIR/checkpoint.h5) or --force (start afresh there: the previous
    run's RUN_FILES are deleted first; other files such as figures are overwritten as the new
    run writes them).
  * A lock: ``DIR/.lock``, held with fcntl.flock for the whole run and holding the PID. A
    second process in the same folder stops at once (exit 1) naming that PID. The kernel drops
    the lock when its process dies, so a stale lock file of a dead process never blocks.
  * DIR/args.json records the run: {"script", "model": settings that define the model,
    "training": the other settings, "runs": [one entry per start or resume: time, pid, argv,
    changed training settings]}. ``--resume`` with a changed MODEL setting (one of
    ``model_keys``) is refused naming each difference; changed TRAINING settings are allowed,
    announced, and appended to "runs" (the original "training" entry is never rewritten).
    Run-control flags (RUN_CONTROL_KEYS: --save, --resume, --force, --log-json, ...) are
    neither.

Signals: npflow.training.train() turns SIGINT / SIGTERM into "finish this iteration, write the
checkpoint, return status 'interrupted'"; ``run.finish(result)`` prints where the checkpoint is
and the exact command to resume, and returns 130 (SIGINT) or 143 (SIGTERM). ``main_guard``
turns a signal outside train() (data loading, final evaluation) into one line and the same
status, and a CheckpointError/DeviceError escaping main into one line and exit 1.

Exit statuses: 0 done; 2 bad arguments or input (``fail(msg)``, one line on stderr, before any
work); 1 runtime failure (``fail(msg, 1)``: diverged or non-finite training, folder locked by
another run); 130 / 143 interrupted by SIGINT / SIGTERM (checkpoint written).
"""
from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import math
import os
import shlex
import signal
import sys
import time

__all__ = ["make_parser", "parse_args", "add_run_arguments", "add_method_arguments",
           "add_deprecated_alias", "parse_methods", "method_hooks", "parse_save_every", "fail",
           "open_run", "Run", "main_guard", "write_result", "warn_constant", "METHODS", "RUN_FILES",
           "RUN_CONTROL_KEYS", "LOCK_NAME"]

METHODS = ("ffjord", "rnode", "toflow", "steer", "otflow")
# files a run writes and --force removes before starting afresh
RUN_FILES = ("checkpoint.h5", "best.h5", "args.json", "result.json")
# flags that steer the run, not the model or the training: never compared on --resume
RUN_CONTROL_KEYS = {"save", "resume", "force", "log_json", "log_every", "save_every",
                    "data_dir", "no_download", "device", "no_figures", "no_tune_malloc",
                    "threads", "processes", "viz", "viz_every", "viz_n", "sample_every",
                    "test_n", "test_batch", "eval_batch", "n_samples", "test_solver"}
LOCK_NAME = ".lock"
EXIT_BAD_ARGS, EXIT_RUNTIME = 2, 1
SIGNAL_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


_PROG = None          # the script's file name, set by make_parser(script=__file__)


def _prog() -> str:
    return _PROG or os.path.basename(sys.argv[0]) or "npflow"


def fail(msg: str, status: int = EXIT_BAD_ARGS):
    """Print ``<script>: error: msg`` as one line on stderr and exit with ``status``
    (2: bad arguments or input, 1: runtime failure)."""
    msg = " ".join(str(msg).split())           # one line, whatever the message held
    print(f"{_prog()}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# --------------------------------------------------------------------------------------------
# parser

class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown once: appended as "(default: X)" unless the help text already
    explains the default (contains "default")."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower():
            return h
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and the defaults formatter."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **k)

    def error(self, message):
        fail(f"{message} (see --help)", EXIT_BAD_ARGS)


def make_parser(description: str, script: str | None = None, **kwargs) -> ArgumentParser:
    """A parser with one-line errors and every default shown once in --help. ``script``: the
    example's ``__file__``; its name prefixes every error line and is recorded in args.json."""
    global _PROG
    if script is not None:
        _PROG = os.path.basename(script)
        kwargs.setdefault("prog", _PROG)
    return ArgumentParser(description=description, **kwargs)


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new flag's dest and notes the new spelling."""

    def __init__(self, option_strings, dest, new=None, convert=None, **kw):
        self.new, self.convert = new, convert
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr, flush=True)
        if self.convert is not None:
            values = self.convert(values)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, type=None, choices=None):
    """Accept ``old`` as a hidden spelling of the flag ``new`` (same dest), printing a
    deprecation note when used."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, convert=type,
                        default=argparse.SUPPRESS, choices=choices)


def parse_args(parser, argv=None, method_defaults=None):
    """parser.parse_args, with ``save_every`` parsed (see parse_save_every). method_defaults:
    {method name: {dest: default}}; when ``--method`` names one of them, those defaults replace
    the parser's and explicit flags still win."""
    args = parser.parse_args(argv)
    method = str(getattr(args, "method", "")).strip().lower()
    if method_defaults and method in method_defaults:
        parser.set_defaults(**method_defaults[method])
        args = parser.parse_args(argv)
    if hasattr(args, "save_every"):
        try:
            args.checkpoint_every, args.checkpoint_seconds = parse_save_every(args.save_every)
        except ValueError as exc:
            fail(str(exc))
    return args


def _int_at_least(lo):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    conv.__name__ = "int"
    return conv


def add_run_arguments(parser, *, niters: int, save: str, log_every: int = 100,
                      seed: int = 0, dtype: str = "float32", data_dir: str | None = "data",
                      devices=("cpu", "gpu")):
    """The shared run flags (module docstring). ``data_dir=None`` leaves --data-dir out
    (scripts that read no files). Adds the deprecated --max-iters spelling of --niters."""
    a = parser.add_argument
    a("--niters", type=_int_at_least(0), default=niters,
      help="training iterations (a resumed run continues up to this total)")
    add_deprecated_alias(parser, "--max-iters", "--niters", type=_int_at_least(0))
    a("--seed", type=int, default=seed, help="seed of every random draw (same seed, same loss)")
    a("--save", default=save,
      help="run folder (checkpoint.h5, args.json, result.json, figures); an existing one is "
           "refused unless --resume or --force")
    a("--resume", action="store_true", help="continue the run in --save from its checkpoint")
    a("--force", action="store_true",
      help="start a new run in an existing --save folder, deleting its previous run's files")
    a("--device", default="cpu", choices=list(devices))
    a("--dtype", default=dtype, choices=["float32", "float64"])
    a("--log-json", default=None, metavar="PATH",
      help="append one JSON object per log line to PATH (the last holds the final evaluation)")
    if data_dir is not None:
        a("--data-dir", default=data_dir, help="folder the data files are read from")
    a("--log-every", type=_int_at_least(1), default=log_every,
      help="iterations per progress line / JSON record")
    a("--save-every", default=None, metavar="N|Nm",
      help="checkpoint every N iterations, or every N minutes with an 'm' suffix (e.g. 10m) "
           "(default: every --log-every iterations); SIGINT/SIGTERM always write one")


def parse_save_every(text):
    """'500' -> (500, None) iterations; '10m' / '2.5m' -> (None, seconds); None -> (None, None).
    ValueError naming the flag otherwise."""
    if text is None:
        return None, None
    s = str(text).strip().lower()
    try:
        if s.endswith("m"):
            minutes = float(s[:-1])
            if not (minutes > 0 and math.isfinite(minutes)):
                raise ValueError
            return None, 60.0 * minutes
        n = int(s)
        if n < 1:
            raise ValueError
        return n, None
    except ValueError:
        raise ValueError(f"--save-every must be a positive number of iterations (500) or of "
                         f"minutes with an 'm' suffix (10m), got {text!r}") from None


# --------------------------------------------------------------------------------------------
# methods

def add_method_arguments(parser, methods=METHODS[:4], default: str = "ffjord",
                         t_grad_default: str = "analytic"):
    """--method (one of ``methods`` or a '+' combination) and the flags of each method among
    ``methods``, added by the method itself (npflow.methods, docs/training.md section 11):
    --kinetic, --jacobian (rnode), --alpha-T, --eps-T, --lr-T, --T-grad (toflow; --alpha is
    the deprecated spelling of --alpha-T), --steer-b (steer). ``t_grad_default``: the
    script's default of --T-grad."""
    from npflow.methods import METHODS as registry
    parser.add_argument("--method", default=default,
                        help=" | ".join(methods) + ", or a '+' combination such as toflow+rnode")
    for name, method in registry.items():
        if name in methods:
            method.add_arguments(parser)
    if "toflow" in methods:
        parser.set_defaults(T_grad=t_grad_default)


def parse_methods(text: str, allowed=METHODS) -> set:
    """The set of methods named by ``text`` (a name or a '+' combination); fail() with exit 2
    listing the valid names, or naming methods that exclude each other, otherwise."""
    from npflow.training import parse_methods as _parse
    try:
        return _parse(text, allowed)
    except ValueError as exc:
        fail(str(exc))


def init_ranks(args):
    """The MPI ranks of this run (npflow.parallel.init; one process without mpiexec), each
    on its GPU with --device gpu. The ranks other than 0 print nothing (stdout to /dev/null;
    errors still reach stderr)."""
    from npflow import parallel
    try:
        comm = parallel.init(getattr(args, "device", "cpu"))
    except parallel.ParallelError as exc:
        fail(str(exc), EXIT_RUNTIME)
    if not comm.root:
        sys.stdout = open(os.devnull, "w")
    return comm


def tune_host(args, mmap_max=None):
    """The host settings every example makes once, before it computes: one BLAS thread unless
    the environment sets a count (npflow.backend.limit_blas_threads; more cores come from MPI
    ranks), and glibc's malloc keeping freed memory (npflow.backend.tune_malloc, with
    ``mmap_max``) unless --no-tune-malloc."""
    import npflow.backend
    npflow.backend.limit_blas_threads(1)
    if not getattr(args, "no_tune_malloc", False):
        npflow.backend.tune_malloc(mmap_max=mmap_max)


def method_hooks(model, methods, args, steer_b=None, comm=None) -> list:
    """The training hooks of the chosen methods (``Method.hooks``, npflow.methods): STEER's
    end-time draw (half-width ``steer_b``, default T0/2) and TO-FLOW's T step (from --lr-T,
    --alpha-T, --eps-T, --T-grad; its ∂L/∂T over the MPI ranks ``comm``)."""
    from npflow.methods import compose
    return compose(methods).hooks(model, args, comm=comm, steer_b=steer_b)


def warn_constant(x, name: str) -> bool:
    """Print a warning (stderr) if the host array ``x`` (N, D) is constant along a feature: a
    density on such data is degenerate there (its NLL falls without bound). True if warned."""
    import numpy as np
    x = np.asarray(x)
    if x.ndim != 2 or len(x) < 2:
        return False
    const = [int(j) for j in np.flatnonzero(np.ptp(x, axis=0) == 0)]
    if const:
        which = "every feature" if len(const) == x.shape[1] else f"features {const}"
        print(f"warning: {name} is constant in {which}: a density there is degenerate (the NLL "
              "falls without bound as the flow contracts it); check the data or drop those "
              "columns", file=sys.stderr, flush=True)
    return bool(const)


# --------------------------------------------------------------------------------------------
# run folders

def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _resume_command(argv=None) -> str:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--force"]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["python", sys.argv[0]] + argv)


class Run:
    """An open run folder (from ``open_run``): holds the lock until closed.

    dir: the folder; resume: continuing a checkpoint; changed: {flag: (old, new)} of the
    training settings changed on resume; path(name): a file in the folder;
    train_kwargs(): save_dir, resume, log_json, log_every, checkpoint_every,
    checkpoint_seconds for npflow.training.train; train(model, optimizer, sample_batch,
    niters, rng, **kw): that call in this folder, with finish; finish(result): report an
    unfinished result (returns the exit status) or None when it completed.
    """

    def __init__(self, args, model_keys, lock_fd, root=True):
        self.args, self.model_keys = args, tuple(model_keys)
        self.root = root            # MPI rank 0 (or one process): the rank that reports
        self.dir = os.fspath(args.save)
        self.resume = bool(getattr(args, "resume", False))
        self.changed = {}
        self._lock_fd = lock_fd
        self._record_before = False      # args.json before this run (None: absent)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def train_kwargs(self) -> dict:
        a = self.args
        return dict(save_dir=self.dir, resume=self.resume, log_json=getattr(a, "log_json", None),
                    log_every=getattr(a, "log_every", 100),
                    checkpoint_every=getattr(a, "checkpoint_every", None),
                    checkpoint_seconds=getattr(a, "checkpoint_seconds", None))

    def train(self, model, optimizer, sample_batch, niters, rng, **kw):
        """npflow.training.train in this run folder (``train_kwargs()``, overridden by ``kw``;
        progress printed and flushed). Returns (result, seconds, status): status is None when
        the run completed (its message printed), else the exit status ``finish`` gives. A
        checkpoint that cannot be resumed stops with one line."""
        import time
        from npflow.checkpoint import CheckpointError
        from npflow.training import train
        kw = {**self.train_kwargs(), "print_fn": lambda m: print(m, flush=True), **kw}
        t0 = time.perf_counter()
        try:
            result = train(model, optimizer, sample_batch, niters, rng, **kw)
        except CheckpointError as exc:
            fail(f"cannot resume: {exc}")
        seconds = time.perf_counter() - t0
        status = self.finish(result)
        if status is None:
            print(result.message, flush=True)
        return result, seconds, status

    def finish(self, result):
        """None if ``result`` (a TrainResult) completed ("done" / "already-done"); otherwise
        print what happened and how to go on, and return the exit status: 130 / 143 for a
        signal (checkpoint written), 1 for a diverged or non-finite run."""
        if result.status in ("done", "already-done"):
            return None
        if not self.root:           # the same status on every MPI rank; rank 0 reports it
            return (SIGNAL_STATUS.get(result.signal, 128 + int(result.signal))
                    if result.status == "interrupted" else EXIT_RUNTIME)
        if result.status == "interrupted":
            name = signal.Signals(result.signal).name
            print(f"{_prog()}: interrupted by {name} after iteration {result.iteration}; the "
                  f"checkpoint {result.checkpoint} holds it. To continue, rerun with --resume: "
                  f"{_resume_command()}", file=sys.stderr, flush=True)
            return SIGNAL_STATUS.get(result.signal, 128 + int(result.signal))
        print(f"{_prog()}: error: {result.message}", file=sys.stderr, flush=True)
        return EXIT_RUNTIME

    def close(self):
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        # a run refused for bad arguments or input (exit 2, e.g. a checkpoint that does not
        # fit) did no work: args.json goes back to what it was, so the folder's record stays
        # the record of the runs that trained in it
        if isinstance(exc, SystemExit) and exc.code == EXIT_BAD_ARGS and self._record_before \
                is not False:
            path = self.path("args.json")
            try:
                if self._record_before is None:
                    os.remove(path)
                else:
                    _write_json_atomic(path, self._record_before)
            except OSError:
                pass
        self.close()
        return False


def _take_lock(folder: str) -> int:
    """Open DIR/.lock and flock it (non-blocking); fail(exit 1) naming the holder's PID."""
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        holder = ""
        for _ in range(20):                   # the holder writes its PID right after locking
            with open(path) as f:
                holder = f.read().strip()
            if holder:
                break
            time.sleep(0.05)
        os.close(fd)
        fail(f"run folder {folder!r} is in use by another run (PID {holder or '?'} holds "
             f"{path}); wait for it to finish, stop it, or choose another --save",
             EXIT_RUNTIME)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def _settings(args, model_keys):
    d = {k: _jsonable(v) for k, v in vars(args).items()
         if k not in RUN_CONTROL_KEYS and not k.startswith("_")
         and k not in ("checkpoint_every", "checkpoint_seconds")}
    model = {k: d[k] for k in model_keys if k in d}
    training = {k: v for k, v in d.items() if k not in model}
    return model, training


def _run_entry(changed=None):
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(), "argv": sys.argv[1:],
            **({"changed": changed} if changed else {})}


def write_result(args, run, final: dict) -> None:
    """The run's final evaluation ``final``: the last --log-json object (DESIGN.md section 7)
    and DIR/result.json, written atomically (a crash mid-write leaves the old file)."""
    from npflow.training import append_json
    append_json(args.log_json, final)
    _write_json_atomic(run.path("result.json"), final)


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_run(args, model_keys=(), extra_model=None, extra_training=None, comm=None) -> Run:
    """Open the run folder ``args.save`` for this run (module docstring): create it, take the
    lock, refuse an existing run without --resume / --force, check and record the settings in
    args.json. Returns a Run (a context manager that releases the lock).

    args: the parsed namespace (needs save, resume, force); model_keys: names in ``args`` that
    define the model (a change of any refuses --resume); extra_model / extra_training: dicts of
    resolved settings (e.g. per-data-set defaults) recorded and compared like the flags.
    Errors: fail() with exit 2 (bad folder, existing run, changed model), 1 (locked).
    comm: the MPI ranks (npflow.parallel.Comm): rank 0 alone does all of this; the others wait
    for its verdict and leave with its exit status when it failed.
    """
    if comm is not None and comm.size > 1:
        if not comm.root:
            status = comm.mpi.bcast(None, root=0)
            if status:
                sys.exit(status)
            return Run(args, model_keys, None, root=False)
        try:
            run = open_run(args, model_keys, extra_model, extra_training)
        except SystemExit as exc:
            comm.mpi.bcast(exc.code if isinstance(exc.code, int) and exc.code else 1, root=0)
            raise
        comm.mpi.bcast(0, root=0)
        return run
    folder = os.fspath(args.save)
    resume, force = bool(getattr(args, "resume", False)), bool(getattr(args, "force", False))
    if resume and force:
        fail("--resume and --force exclude each other: --resume continues the run in --save, "
             "--force replaces it")
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"--save {folder!r} is a file, not a folder; give a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = _take_lock(folder)
    except OSError as exc:
        fail(f"cannot use --save {folder!r} as the run folder: {exc.strerror or exc}; give a "
             "writable folder path")
    run = Run(args, model_keys, fd)
    try:
        _check_and_record(run, args, model_keys, extra_model or {}, extra_training or {},
                          resume, force)
    except BaseException:
        run.close()
        raise
    return run


def _check_and_record(run, args, model_keys, extra_model, extra_training, resume, force):
    folder = run.dir
    present = sorted(n for n in os.listdir(folder) if n != LOCK_NAME)
    record_path = run.path("args.json")
    model, training = _settings(args, model_keys)
    model.update(_jsonable(extra_model))
    training.update(_jsonable(extra_training))
    training = {k: v for k, v in training.items() if k not in model}
    if present and not resume and not force:
        fail(f"--save {folder!r} already holds a run ({', '.join(present[:4])}"
             f"{', ...' if len(present) > 4 else ''}); pass --resume to continue it, --force to "
             "replace it, or choose another --save folder")
    if force:
        from npflow.checkpoint import leftover_temporaries
        for name in RUN_FILES:
            for path in [run.path(name)] + leftover_temporaries(run.path(name)):
                if os.path.exists(path):
                    os.remove(path)
    record = legacy = None
    if os.path.exists(record_path):
        try:
            with open(record_path) as f:
                run._record_before = json.load(f)
        except (OSError, ValueError):
            run._record_before = False           # unreadable: never rewritten from here
    else:
        run._record_before = None
    if resume and os.path.exists(record_path):
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError) as exc:
            fail(f"cannot resume: {record_path} is unreadable ({exc}); restore it or start a "
                 "new run with --force")
        if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
            print(f"note: {record_path} predates recorded settings; model settings are not "
                  "checked against it (it is kept under 'legacy')", flush=True)
            legacy, record = record, None
    if record is not None:
        if record.get("script") not in (None, _prog()):
            fail(f"cannot resume: {folder!r} holds a run of {record['script']}, not of "
                 f"{_prog()}; choose another --save folder")
        old_model = record["model"]
        diff = [k for k in sorted(set(old_model) | set(model)) if old_model.get(k) != model.get(k)]
        if diff:
            txt = "; ".join(f"{_flag(k)} was {old_model.get(k)!r}, now {model.get(k)!r}"
                            for k in diff)
            fail(f"cannot resume: model settings differ from the run in {folder!r}: {txt}. "
                 "Resume with the original values, or start a new run in another --save folder")
        current = dict(record.get("training", {}))
        for entry in record.get("runs", []):
            for k, (_, new) in entry.get("changed", {}).items():
                current[k] = new
        changed = {k: [current.get(k), training.get(k)]
                   for k in sorted(set(current) | set(training))
                   if current.get(k) != training.get(k)}
        if changed:
            print("note: resuming with changed training settings: " + "; ".join(
                f"{_flag(k)} {old!r} -> {new!r}" for k, (old, new) in changed.items()),
                flush=True)
        run.changed = changed
        record.setdefault("runs", []).append(_run_entry(changed))
    else:
        record = {"script": _prog(), "model": model, "training": training,
                  "runs": [_run_entry()]}
        if legacy is not None:
            record["legacy"] = legacy
    _write_json_atomic(record_path, record)


# --------------------------------------------------------------------------------------------
# the whole script

def validation_due(hook, it, stats):
    """For a validation hook with ``every``, ``n_iters`` and ``nfe_total``: add the step's
    forward + backward NFE to ``hook.nfe_total``, and return the number of iterations done when
    a validation is due (every ``every`` iterations and after the last), else None."""
    done = it + 1
    hook.nfe_total += int(stats.get("nfe_forward", 0)) + int(stats.get("nfe_backward", 0))
    return done if done % hook.every == 0 or done == hook.n_iters else None


def main_guard(main, argv=None):
    """sys.exit(main(argv)), with SIGTERM raised as KeyboardInterrupt outside train() and a
    signal or a CheckpointError / DeviceError escaping main turned into one line and the
    matching exit status (130 / 143 / 1)."""
    got = {}

    def on_term(signum, frame):
        got["signal"] = signum
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:      # not the main thread
        pass
    from npflow.parallel import run as run_ranks
    try:
        # under MPI, a rank leaving alone with an error status ends every rank (parallel.run)
        status = run_ranks(main, argv)
    except KeyboardInterrupt:
        signum = got.get("signal", signal.SIGINT)
        print(f"\n{_prog()}: interrupted by {signal.Signals(signum).name}; every completed "
              "checkpoint is kept (continue with --resume)", file=sys.stderr, flush=True)
        status = SIGNAL_STATUS[signum]
    except Exception as exc:  # noqa: BLE001 - library errors meant for users: one line
        from npflow.backend import DeviceError
        from npflow.checkpoint import CheckpointError
        if not isinstance(exc, (CheckpointError, DeviceError)):
            raise
        print(f"{_prog()}: error: {exc}", file=sys.stderr, flush=True)
        status = EXIT_RUNTIME
    sys.exit(status)
