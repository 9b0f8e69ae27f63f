"""The generic training loop of the example scripts (docs/training.md, sections 5-7).

    train(model, optimizer, sample_batch, n_iters, rng, ...) -> TrainResult

One iteration (eq. 5.1):
    x            = sample_batch(rng, it)                       host or device batch
    kw           = union of hook.loss_kwargs(model, rng, it)   e.g. STEER's T' (eq. 6.1)
    loss, g, st  = model.loss_and_grad(x, rng, **kw)
    g, ‖g‖       = clip_grad_norm(g, grad_clip, optimizer.keys)
    stop if loss or ‖g‖ is NaN/Inf (the params are left as they were)
    params       = optimizer.step(params, g)
    hook.after_step(model, x, rng, it, st)                     e.g. TO-FLOW's T step (eq. 6.2-6.5)

Hooks are small explicit objects (``TrainHook``): ``SteerHook`` and ``TimeOptimizer`` are the
two the toy example uses. Their state goes into the checkpoint with the optimizer's, the
generator's and the loss history, so ``resume=True`` continues exactly (section 7).

Host synchronisation: one float per iteration for the loss (the model returns it) and one for
the gradient norm (the non-finite check must decide); nothing else per step, apart from one
finiteness check of all parameters per log line and per checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy

from .backend import get_array_module, to_host
from .checkpoint import CheckpointError, load_training_state, read_header, read_params
from .model import params_mismatch
from .methods import METHODS as _METHOD_REGISTRY, compose, method_names, term_names
from .optim import Adam, clip_grad_norm
from . import parallel
from .solvers import SolverError

__all__ = ["train", "TrainResult", "TrainHook", "SteerHook", "TimeOptimizer", "ClampHook",
           "append_json",
           "format_seconds", "parse_methods", "HISTORY_KEYS", "history_keys", "METHODS"]


def history_keys() -> tuple:
    """The per-iteration history of train(): the loop's keys, each registered state term's
    stats key (RNODE's "kinetic", "jacobian"; npflow.methods) and "seconds"."""
    return (("iteration", "loss", "nll", "nfe_forward", "nfe_backward", "T", "grad_norm")
            + term_names() + ("seconds",))


#: history_keys() of the methods registered when npflow.training is imported
HISTORY_KEYS = history_keys()


# --------------------------------------------------------------------------------------------
# hooks

class TrainHook:
    """A training-loop extension. Override what you need; every method has a no-op default.

    loss_kwargs(model, rng, it) -> dict      extra keyword arguments of loss_and_grad
    after_step(model, x, rng, it, stats) -> dict   runs after the weight step; may replace
                                             model.params; returns values to log (e.g. "T")
    state_dict() / load_state_dict(state)    what exact resume needs (JSON values and arrays)
    """

    name = "hook"

    def loss_kwargs(self, model, rng, it) -> dict:
        return {}

    def after_step(self, model, x, rng, it, stats) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _current_T(model) -> list:
    """End time(s) the model integrates to now, as host floats (one per block)."""
    cfg = model.config
    names = list(getattr(model, "time_names", ["T"]))
    if cfg.get("train_T"):
        return [float(to_host(model.params[n])) for n in names]
    return [float(cfg["T"])] * len(names)


class SteerHook(TrainHook):
    """STEER (Ghosh et al. 2020): integrate each training step to T' ~ U[T − b, T + b] (eq. 6.1).

    b: half-width, 0 < b < T (so T' > 0). One draw per block per step from the loop's rng, so
    the draws are part of the reproducible random stream. T is the model's current end time
    (its trained value under TO-FLOW, else config["T"]).
    """

    name = "steer"

    def __init__(self, b: float):
        if not b > 0:
            raise ValueError(f"STEER half-width b must be > 0, got {b}")
        self.b = float(b)

    def loss_kwargs(self, model, rng, it) -> dict:
        Ts = _current_T(model)
        if min(Ts) <= self.b:
            raise ValueError(f"STEER needs b < T so that T − b > 0; got b={self.b}, T={Ts}")
        draws = [float(rng.uniform(T - self.b, T + self.b)) for T in Ts]
        return {"T": draws[0] if len(draws) == 1 else draws}


class ClampHook(TrainHook):
    """OT-Flow's box constraint (docs/otflow.md, section 4): every weight clamped to [−c, c]
    after each step; trained end times are left alone. ``clamp(model)`` applies it once (to
    the initial weights, so that every gradient is taken at clamped weights, as the
    reference's clamp before each step does)."""

    name = "clamp"

    def __init__(self, c: float):
        if not c > 0:
            raise ValueError(f"the clamp bound must be > 0, got {c}")
        self.c = float(c)

    def clamp(self, model) -> None:
        xp = model.xp
        skip = set(model.time_names) if model.config.get("train_T") else set()
        model.params = {k: v if k in skip else xp.clip(v, -self.c, self.c).astype(
            v.dtype, copy=False) for k, v in model.params.items()}

    def after_step(self, model, x, rng, it, stats):
        self.clamp(model)
        return {}


class TimeOptimizer(TrainHook):
    """TO-FLOW's end-time step (Du et al., Algorithm 1 and eq. 12-17), run after each weight
    step: with the updated weights θ̃,

        g_b = ∂L(θ̃, T)/∂T_b + α·sign(T_b)          (eq. 6.2, temporal regularization α|T|)
        T_b <- Adam_T(T_b, g_b)                      (eq. 6.3, lr 1e-2)
        T_b <- clip(T_b, t0 + ε, 2T0 − t0 − ε)       (eq. 6.4, TO-FLOW eq. 17)

    model: a model with train_T=True, ``time_names`` and ``time_gradient(x, rng, kind)``;
    kind: "analytic" (terminal formula, one extra forward solve at θ̃), "discrete" (exact
    derivative of the discrete loss, forward and backward at θ̃), or "stale" (the analytic
    value the weight step already computed at the old θ, no extra solve; an approximation).
    """

    name = "toflow"

    def __init__(self, model, lr: float = 1e-2, alpha: float = 0.1, eps: float = 0.1,
                 t0: float = 0.0, kind: str = "analytic", betas=(0.9, 0.999), comm=None):
        if not model.config.get("train_T"):
            raise ValueError("TO-FLOW's T step needs a model built with train_T=True")
        if kind not in ("analytic", "discrete", "stale"):
            raise ValueError(f"unknown T-gradient kind {kind!r}: 'analytic', 'discrete' or "
                             "'stale'")
        if alpha < 0:
            raise ValueError(f"temporal regularization alpha must be >= 0, got {alpha}")
        T0 = float(model.config["T"])
        self.lo, self.hi = t0 + eps, 2 * T0 - t0 - eps
        if not self.lo < self.hi:
            raise ValueError(f"TO-FLOW clipping interval [t0 + eps, 2T0 − t0 − eps] = "
                             f"[{self.lo}, {self.hi}] is empty (T0={T0}, t0={t0}, eps={eps})")
        self.alpha, self.kind, self.comm = float(alpha), kind, comm
        self.names = list(model.time_names)
        self.adam = Adam({n: model.params[n] for n in self.names}, lr=lr, betas=betas)

    def after_step(self, model, x, rng, it, stats) -> dict:
        if self.kind == "stale":
            g = stats["dL_dT_analytic"]
            g = list(g) if isinstance(g, (list, tuple)) else [g]
        else:
            g = parallel.time_gradient(model, x, rng, self.comm, kind=self.kind)
        if not all(math.isfinite(v) for v in g):
            raise FloatingPointError(f"TO-FLOW: non-finite ∂L/∂T {g}")
        xp = model.xp
        grads = {}
        for n, gb in zip(self.names, g):
            T = model.params[n]
            sign = 1.0 if float(to_host(T)) > 0 else -1.0
            grads[n] = xp.asarray(gb + self.alpha * sign, dtype=T.dtype)      # eq. 6.2
        new = self.adam.step(model.params, grads)                            # eq. 6.3
        for n in self.names:
            new[n] = xp.clip(new[n], self.lo, self.hi).astype(model.params[n].dtype)  # eq. 6.4
        model.params = new
        Ts = [float(to_host(new[n])) for n in self.names]
        return {"T": Ts, "dL_dT": g[0] if len(g) == 1 else g}

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])


# --------------------------------------------------------------------------------------------
# methods

#: every registered method name (npflow.methods, docs/training.md section 11)
METHODS = method_names()
#: simulation-free methods (npflow.cfm, docs/cfm.md): another loss, so they combine with nothing
FLOW_MATCHING = tuple(n for n, m in _METHOD_REGISTRY.items() if m.model == "cfm")


def parse_methods(text: str, allowed=METHODS) -> set:
    """The set of training methods named by ``text``: one of ``allowed`` or a '+' combination
    such as "toflow+rnode"; ValueError listing the valid names otherwise, or when two of them
    exclude each other (cfm / otcfm / otflow combine with nothing). npflow.methods.compose
    gives the methods themselves."""
    return set(compose(text, allowed).names)


# --------------------------------------------------------------------------------------------
# logging helpers

def append_json(path, record: dict) -> None:
    """Append one JSON object as a line to ``path`` (creating folders as needed)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, numpy.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def format_seconds(s: float) -> str:
    """'1h02m', '5m10s', '42s'."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _scalar(v):
    """A float for logging: the mean if v is a list (several blocks), NaN if missing."""
    if v is None:
        return math.nan
    if isinstance(v, (list, tuple)):
        return float(numpy.mean(v))
    return float(v)


# --------------------------------------------------------------------------------------------
# the loop

@dataclass
class TrainResult:
    """What ``train`` returns.

    status: "done"; "already-done" (nothing to train: n_iters = 0, or resume found a
    checkpoint at or past n_iters); "interrupted" (SIGINT/SIGTERM: the iteration in progress
    was finished and checkpointed; ``signal`` holds the signal number); "nonfinite" (stopped on
    a NaN/Inf loss, gradient or parameter); "diverged" (the loss exploded, see ``train``).
    iteration: completed iterations; history: dict name -> numpy array (one entry per
    iteration, history_keys()); message: what happened; checkpoint: path of the last good
    checkpoint (or None).
    """
    status: str
    iteration: int
    history: dict
    message: str = ""
    checkpoint: str | None = None
    records: list = field(default_factory=list)
    signal: int | None = None


def _all_finite(params) -> bool:
    """True if every parameter array is finite: one host synchronisation for all of them."""
    arrays = list(params.values())
    if not arrays:
        return True
    xp = get_array_module(arrays[0])
    return bool(xp.stack([xp.isfinite(a).all() for a in arrays]).all())


def _restore(model, optimizer, rng, hooks, path, print_fn):
    """Load params, optimizer, hook and RNG state from ``path`` in place; return (iteration,
    history dict of lists). Every mismatch is a one-line CheckpointError."""
    header = read_header(path)
    if header["model_class"] != type(model).__name__:
        raise CheckpointError(f"cannot resume a {type(model).__name__} from {path!r}: it holds "
                              f"a {header['model_class']}; resume with the script and settings "
                              "that wrote it, or start a new run")
    old, new = header["config"], model.config
    diff = sorted(k for k in set(old) | set(new)
                  if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str))
    diff_txt = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    params = read_params(path)
    problems = params_mismatch(model.params, params)
    if problems:
        first = problems if isinstance(problems, str) else "; ".join(map(str, problems))
        first = " ".join(first.split())
        if len(first) > 200:
            first = first[:200] + " ..."
        raise CheckpointError(f"cannot resume from {path!r}: its parameters do not fit this "
                              f"model ({first})" + (f"; the model settings differ in {diff_txt}"
                                                     if diff else "")
                              + "; resume with the settings that wrote it")
    if diff:
        print_fn(f"note: resuming with a model config that differs from the checkpoint's in "
                 f"{diff_txt}")
    state = load_training_state(path)
    if state["optimizer"] is None or state["rng_state"] is None or state["iteration"] is None:
        raise CheckpointError(f"{path!r} holds a model but no training state (optimizer, RNG, "
                              "iteration); it cannot be resumed")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume from {path!r}: its optimizer state does not fit "
                              f"this run's ({exc}); resume with the settings that wrote it") \
            from exc
    extra = state["extra"] or {}
    hook_states = extra.get("hooks", {})
    for h in hooks:
        if h.name in hook_states:
            try:
                h.load_state_dict(hook_states[h.name])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot resume from {path!r}: the state of the training "
                                      f"hook {h.name!r} does not fit ({exc})") from exc
        elif h.state_dict():
            raise CheckpointError(f"cannot resume from {path!r}: it has no state for the "
                                  f"training hook {h.name!r} (it was written by another method "
                                  f"or script: hooks {sorted(hook_states)}); resume with the "
                                  "settings that wrote it")
    saved = state["rng_state"]
    if saved["bit_generator"] != type(rng.bit_generator).__name__:
        raise CheckpointError(f"the checkpoint's generator is {saved['bit_generator']}, the "
                              f"given rng is {type(rng.bit_generator).__name__}")
    xp = model.xp
    model.params = {k: xp.asarray(a) for k, a in params.items()}
    rng.bit_generator.state = saved                       # in place: callers' closures follow
    hist = {k: [float(v) for v in numpy.asarray(a).ravel()]
            for k, a in extra.get("history", {}).items()}
    return state["iteration"], hist


class _Signals:
    """SIGINT / SIGTERM -> a flag the loop reads after each iteration (docs/training.md,
    section 7.1). A second signal raises KeyboardInterrupt at once. Installed only in the main
    thread; the previous handlers come back on exit."""

    def __init__(self, print_fn):
        self.print_fn, self.got, self.old = print_fn, None, {}

    def _handler(self, signum, frame):
        if self.got is not None:
            raise KeyboardInterrupt
        self.got = signum
        self.print_fn(f"\n{signal.Signals(signum).name} received: finishing this iteration and "
                      "writing a checkpoint (send it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def train(model, optimizer, sample_batch, n_iters: int, rng, *, log_every: int = 100,
          save_dir=None, checkpoint_name: str = "checkpoint.h5", resume: bool = False,
          log_json=None, grad_clip=None, hooks=(), on_log=(), checkpoint_every=None,
          checkpoint_seconds=None, explode: float = 100.0, print_fn=print,
          comm=None) -> TrainResult:
    """Train ``model`` for ``n_iters`` iterations (eq. 5.1); see the module docstring.

    model: a FlowModel; optimizer: an Adam over the weights (its ``keys`` are the entries it
    updates and the ones whose gradient norm is clipped and checked); sample_batch(rng, it):
    returns the batch of iteration ``it`` (e.g. (B, D) array), drawing from ``rng`` only;
    n_iters: total iterations (a resumed run continues up to it); rng: numpy Generator, the
    only randomness source (restored in place on resume); log_every: iterations per progress
    line / JSON record; save_dir: folder for ``checkpoint_name`` (None: no checkpoints);
    resume: continue from ``save_dir/checkpoint_name`` if it exists; log_json: path to append
    one JSON object per log line; grad_clip: max global gradient norm (None: no clipping);
    hooks: TrainHook objects (STEER, TO-FLOW); on_log: callables receiving each log record;
    checkpoint_every: iterations between checkpoints (default log_every); checkpoint_seconds:
    also checkpoint when this many seconds passed since the last one (None: off);
    explode: divergence threshold of eq. 5.2 (stop with status "diverged" when
    loss − min loss > explode·(|first loss| + 1); None: off); print_fn: where progress lines go.

    SIGINT / SIGTERM (section 7.1): the iteration in progress finishes, a checkpoint is written
    and the result has status "interrupted" and ``signal`` set; no exception, no exit.

    comm: the MPI ranks that share every batch (npflow.parallel.Comm; None: this process
    alone). Each rank computes its rows, one Allreduce combines them and every rank takes the
    same step (docs/parallel.md); rank 0 alone prints, logs, calls on_log and writes
    checkpoints. The loop's own decisions that depend on one rank's view (a signal received,
    the checkpoint clock) are agreed by a second, two-number Allreduce per iteration, so all
    ranks stop and checkpoint together.
    """
    if n_iters < 0 or log_every < 1:
        raise ValueError(f"need n_iters >= 0 and log_every >= 1, got {n_iters}, {log_every}")
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"hook names must be distinct, got {names}")
    checkpoint_every = log_every if checkpoint_every is None else int(checkpoint_every)
    if checkpoint_every < 1 or (checkpoint_seconds is not None and not checkpoint_seconds > 0):
        raise ValueError(f"need checkpoint_every >= 1 and checkpoint_seconds > 0, got "
                         f"{checkpoint_every}, {checkpoint_seconds}")
    ckpt = None if save_dir is None else os.path.join(os.fspath(save_dir), checkpoint_name)
    if comm is not None and not comm.root:       # rank 0 alone prints, logs and writes
        print_fn, log_json, on_log = (lambda *a, **k: None), None, ()
    root = comm is None or comm.root

    start = 0
    keys, terms = history_keys(), term_names()
    hist = {k: [] for k in keys}
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs save_dir (where the checkpoint is)")
        if os.path.exists(ckpt):
            start, saved = _restore(model, optimizer, rng, hooks, ckpt, print_fn)
            for k in keys:
                hist[k] = saved.get(k, [math.nan] * start)[:start]
            print_fn(f"resumed from {ckpt} at iteration {start}")
        else:
            print_fn(f"no checkpoint at {ckpt}; starting from scratch")
    last_good = ckpt if (ckpt and os.path.exists(ckpt)) else None
    last_good_it = start if last_good else None
    if start >= n_iters:
        msg = (f"nothing to train: the checkpoint is already at iteration {start} >= "
               f"{n_iters} iterations (raise the iteration count to continue)" if start else
               "nothing to train: 0 iterations asked")
        print_fn(msg)
        return TrainResult("already-done", start, _as_arrays(hist), msg, last_good)

    def save(iteration):
        nonlocal last_good, last_good_it, t_saved
        if ckpt is None:
            return
        if not _all_finite(model.params):
            raise FloatingPointError("parameters contain NaN/Inf")
        parallel.check_same(model.params, comm)
        extra = {"history": _as_arrays(hist), "n_iters": int(n_iters),
                 "hooks": {h.name: h.state_dict() for h in hooks}}
        if root:
            model.save(ckpt, optimizer=optimizer, rng=rng, iteration=iteration, extra=extra)
        last_good, last_good_it = ckpt, iteration
        t_saved = time.perf_counter()

    def stop(status, done, msg):
        print_fn(msg)
        rec = {"iteration": done, "error": msg}
        append_json(log_json, rec)
        records.append(rec)
        return TrainResult(status, done, _as_arrays(hist), msg, last_good, records)

    def kept():
        return (f"the last good checkpoint {last_good} (iteration {last_good_it}) is kept"
                if last_good else "no checkpoint had been written yet")

    records = []
    window = []      # rows since the last log line
    first_loss = hist["loss"][0] if hist["loss"] else None
    min_loss = min(hist["loss"]) if hist["loss"] else math.inf
    t_run = t_saved = time.perf_counter()
    with _Signals(print_fn) as sig:
        for it in range(start, n_iters):
            t_it = time.perf_counter()
            failure = None
            try:
                x = sample_batch(rng, it)
                kw = {}
                for h in hooks:
                    kw.update(h.loss_kwargs(model, rng, it))
                loss, grads, stats = parallel.loss_and_grad(model, x, rng, comm, **kw)
                if not math.isfinite(loss):
                    failure = f"the loss is {loss}"
                else:
                    grads, gnorm = clip_grad_norm(grads, grad_clip, keys=optimizer.keys)
                    gnorm = float(to_host(gnorm))
                    if not math.isfinite(gnorm):
                        failure = f"the gradient norm is {gnorm} (loss {loss:.6g})"
            except FloatingPointError as exc:
                failure = f"a non-finite value appeared ({exc})"
            except SolverError as exc:
                failure = f"the ODE solver failed ({exc})"
            if failure is None:
                before = model.params
                model.params = optimizer.step(model.params, grads)
                try:
                    logged = {}
                    for h in hooks:
                        logged.update(h.after_step(model, x, rng, it, stats) or {})
                except (FloatingPointError, SolverError) as exc:
                    model.params = before
                    failure = f"a training hook met a non-finite value or a solver failure ({exc})"
            if failure is not None:
                return stop("nonfinite", it, f"stopped at iteration {it + 1}: {failure}; "
                            f"{kept()}")

            seconds = time.perf_counter() - t_it
            T = logged.get("T", stats.get("T"))
            row = {"iteration": it + 1, "loss": loss, "nll": stats.get("nll", loss),
                   "nfe_forward": stats.get("nfe_forward", 0), "nfe_backward":
                   stats.get("nfe_backward", 0), "T": _scalar(T), "grad_norm": gnorm,
                   **{k: _scalar(stats.get(k)) for k in terms}, "seconds": seconds}
            for k in keys:
                hist[k].append(float(row[k]))
            window.append(row)
            done = it + 1

            if first_loss is None:
                first_loss = loss
            min_loss = min(min_loss, loss)
            if explode is not None and loss - min_loss > explode * (abs(first_loss) + 1.0):
                return stop("diverged", done, (
                    f"diverged at iteration {done}: the loss {loss:.6g} exploded (first "
                    f"{first_loss:.6g}, lowest {min_loss:.6g}); lower the learning rate; "
                    f"{kept()}"))

            if done % log_every == 0 or done == n_iters:
                if not _all_finite(model.params):
                    return stop("nonfinite", done, f"stopped at iteration {done}: the "
                                f"parameters contain NaN/Inf; {kept()}")
                rec = _log_record(window, row, T, optimizer, n_iters, done, logged, hist, terms)
                print_fn(_progress_line(rec, n_iters, terms))
                append_json(log_json, rec)
                records.append(rec)
                for cb in on_log:
                    cb(rec)
                window = []
            clock = (checkpoint_seconds is not None and
                     time.perf_counter() - t_saved >= checkpoint_seconds)
            if comm is not None and comm.size > 1:   # one rank's signal or clock: all agree
                sig.got, clock = parallel.agree(sig.got, clock, comm)
            due = (done % checkpoint_every == 0 or done == n_iters or sig.got is not None or
                   clock)
            if ckpt is not None and due:
                try:
                    save(done)
                except FloatingPointError as exc:
                    return stop("nonfinite", done, f"stopped at iteration {done}: {exc}; "
                                f"{kept()}")
            if sig.got is not None:
                name = signal.Signals(sig.got).name
                where = f"checkpoint {ckpt} written" if ckpt else "no save folder: nothing saved"
                msg = f"interrupted by {name} after iteration {done}; {where}"
                print_fn(msg)
                res = TrainResult("interrupted", done, _as_arrays(hist), msg,
                                  ckpt if ckpt else None, records, signal=int(sig.got))
                append_json(log_json, {"iteration": done, "interrupted": name})
                return res

    total = time.perf_counter() - t_run
    msg = f"trained {n_iters - start} iterations in {format_seconds(total)}"
    return TrainResult("done", n_iters, _as_arrays(hist), msg, last_good, records)


def _as_arrays(hist: dict) -> dict:
    return {k: numpy.asarray(v, dtype=numpy.float64) for k, v in hist.items()}


def time_left(seconds, nfe, remaining: int, recent: int = 50) -> float:
    """Seconds left (section 5, eq. 5.3): the mean time of the last ``recent`` iterations, scaled by
    the NFE trend. With s̄ the recent seconds per iteration, n̄ the recent NFE per iteration
    and g ≥ 0 the least-squares slope of NFE per iteration over the last ``4·recent``
    iterations, the remaining R iterations are estimated to take
        s̄ · Σ_{j=1..R} (n̄ + g·j)/n̄ = s̄ · R · (1 + g·(R + 1)/(2 n̄))          (eq. 5.3)
    seconds, nfe: per-iteration sequences (oldest first)."""
    if remaining <= 0 or not len(seconds):
        return 0.0
    s_bar = float(numpy.mean(seconds[-recent:]))
    n = numpy.asarray(nfe[-4 * recent:], dtype=numpy.float64)
    n_bar = float(n[-recent:].mean()) if len(n) else 0.0
    g = 0.0
    if len(n) >= 3 and n_bar > 0:
        j = numpy.arange(len(n), dtype=numpy.float64)
        g = max(0.0, float(numpy.polyfit(j, n, 1)[0]))
    return s_bar * remaining * (1.0 + (g * (remaining + 1) / (2.0 * n_bar) if n_bar > 0 else 0.0))


def _log_record(window, row, T, optimizer, n_iters, done, logged, hist, terms=()):
    sec = float(numpy.mean([w["seconds"] for w in window]))
    nfe = [f + b for f, b in zip(hist["nfe_forward"][-200:], hist["nfe_backward"][-200:])]
    rec = {
        "iteration": done,
        "loss": row["loss"],
        "loss_avg": float(numpy.mean([w["loss"] for w in window])),
        "nll": row["nll"],
        "nfe_forward": float(numpy.mean([w["nfe_forward"] for w in window])),
        "nfe_backward": float(numpy.mean([w["nfe_backward"] for w in window])),
        "T": T,
        "grad_norm": row["grad_norm"],
        "lr": optimizer.current_lr(),
        "sec_per_iter": sec,
        "time_left_s": time_left(hist["seconds"][-200:], nfe, n_iters - done),
    }
    for k in terms:                     # the methods' state terms (RNODE's kinetic, jacobian)
        if math.isfinite(row[k]):
            rec[k] = row[k]
    if "dL_dT" in logged:
        rec["dL_dT"] = logged["dL_dT"]
    return rec


def _T_text(T) -> str:
    """The end times of a progress line: each of up to three blocks, else their range."""
    if T is None:
        return "-"
    T = list(T) if isinstance(T, (list, tuple)) else [T]
    if len(T) <= 3:
        return ", ".join(f"{t:.4f}" for t in T)
    return f"{min(T):.4f}..{max(T):.4f} ({len(T)} blocks)"


def _progress_line(rec, n_iters, terms=None):
    T_txt = _T_text(rec["T"])
    terms = term_names() if terms is None else terms
    reg = "".join(f" | {k[:3]} {rec[k]:.4g}" for k in terms if k in rec)
    return (f"iter {rec['iteration']:>6d}/{n_iters} | loss {rec['loss']:.4f} "
            f"(avg {rec['loss_avg']:.4f}) | nfe fwd {rec['nfe_forward']:.0f} bwd "
            f"{rec['nfe_backward']:.0f} | T {T_txt} | grad {rec['grad_norm']:.3g}{reg} | "
            f"{rec['sec_per_iter']:.3f} s/it | left {format_seconds(rec['time_left_s'])}")
