"""Explicit Runge-Kutta solvers with discrete adjoints (docs/solvers.md).

    odeint(dynamics, y0, t0, t1, method="rk4", steps=None, rtol=1e-5, atol=1e-5, ...)
        -> Solution(.y1, .nfe, .ts, .grid, .method, .backward(y1_bar) -> Grads)

The dynamics is any object with

    params                              dict name -> array
    forward(t, y)       -> (dydt, cache)        y an array or a tuple / NamedTuple of arrays
    backward(cache, dydt_bar) -> (y_bar, params_bar: dict, t_bar)

(t a Python float; y_bar may hold None for parts that do not influence dydt; t_bar a scalar).

The gradient is the exact derivative of the discrete computation (discretize-then-optimize,
docs/solvers.md section 2): every step y_{n+1} = Ψ(t_n, h_n, y_n) (eq. 2.1) is reversed by
eq. 2.3-2.8, the mesh enters through t_n = t0 + s_n (t1 − t0) with fixed fractions s_n
(eq. 2.9), which gives ∂L/∂t0 and ∂L/∂t1 in the same pass (eq. 2.10). Dopri5's accepted mesh
is kept and treated as fixed (eq. 3.4): the gradient is that of the replayed fixed-mesh solve
``odeint(..., method="dopri5", grid=solution.grid)``.

Memory: ``store="states"`` keeps y_n at accepted steps and recomputes the stages in the
backward; ``store="caches"`` keeps every stage's derivative and dynamics cache (no recompute);
``checkpoint=k`` keeps every k-th state and recomputes segments (section 4).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np  # host side only: the per-step error-norm vector reduced across processes

from .backend import get_array_module, to_host
from .tableau import Tableau, get_tableau

__all__ = ["odeint", "Solution", "Grads", "SolverError", "terminal_time_gradient",
           "initial_time_gradient", "propose_step", "initial_step",
           "SAFETY", "MIN_FACTOR", "MAX_FACTOR"]

# Step-size controller constants (eq. 3.2), torchdiffeq's values (shared/REFERENCE.md).
SAFETY = 0.9        # h_new = h · SAFETY · ρ^(−1/order), before the limits below
MIN_FACTOR = 0.2    # never shrink a rejected step by more than 5×
MAX_FACTOR = 10.0   # never grow a step by more than 10×
UNDERFLOW_ULPS = 10  # |h| below this many ulp(t) is an underflow (t + h would round badly)


class SolverError(RuntimeError):
    """The solver cannot continue: step size underflow, step budget exhausted, non-finite state.

    The message names the time t, the step h and the last error ratio.
    """


class Grads(NamedTuple):
    """Gradients of L(y1) returned by ``Solution.backward`` (eq. 2.10, 2.11).

    y0:  like y0 (array, tuple or the same NamedTuple)    ∂L/∂y0
    params: dict like ``dynamics.params``                 ∂L/∂θ
    t0, t1: float                                         ∂L/∂t0, ∂L/∂t1 (discrete, exact)
    nfe: number of ``dynamics.backward`` calls (vector-Jacobian products)
    nfe_recompute: number of ``dynamics.forward`` calls the backward made to recompute stages
    """
    y0: object
    params: dict
    t0: float
    t1: float
    nfe: int
    nfe_recompute: int


# --------------------------------------------------------------------------- state structure

class _Structure:
    """How a state is split into parts: an array, a tuple, or a NamedTuple (kept via _make)."""

    __slots__ = ("kind", "n")

    def __init__(self, y):
        if isinstance(y, tuple):
            if len(y) == 0:
                raise ValueError("y0 is an empty tuple: the state needs at least one array")
            self.kind = type(y) if hasattr(type(y), "_make") else tuple
            self.n = len(y)
        else:
            self.kind = None
            self.n = 1

    def unpack(self, y, what="state", like=None):
        """y -> tuple of parts (None parts kept). like: parts whose shapes y's must have (the
        state a dynamics output belongs to); a host-side shape check, no synchronisation."""
        if self.kind is None:
            if isinstance(y, tuple):
                raise ValueError(f"{what}: expected a single array like y0, got a tuple of "
                                 f"{len(y)}")
            parts = (y,)
        else:
            if not isinstance(y, tuple) or len(y) != self.n:
                raise ValueError(f"{what}: expected a tuple of {self.n} arrays like y0, "
                                 f"got {type(y).__name__}")
            parts = tuple(y)
        if like is not None:
            for i, (p, q) in enumerate(zip(parts, like)):
                ps, qs = getattr(p, "shape", None), getattr(q, "shape", None)
                if p is not None and q is not None and tuple(ps or ()) != tuple(qs or ()):
                    part = "" if self.kind is None else f" (part {i})"
                    raise ValueError(f"{what} has shape {ps} but the state{part} has shape "
                                     f"{qs}: dynamics.forward(t, y) must return dy/dt of y's "
                                     "shape")
        return parts

    def pack(self, parts):
        if self.kind is None:
            return parts[0]
        if self.kind is tuple:
            return tuple(parts)
        return self.kind._make(parts)


def _combine(base, terms):
    """Parts of base + Σ coef·k over (coef, k) in terms (eq. 1.1); fresh arrays, inputs intact.

    base: tuple of parts or None; each k: tuple of parts; None parts count as zero.
    A part that stays zero is None (so the caller can skip work).
    """
    n = len(base) if base is not None else len(terms[0][1])
    out = []
    for p in range(n):
        acc = None if base is None else base[p]
        own = False
        for coef, k in terms:
            kp = k[p]
            if kp is None:
                continue
            term = kp if coef == 1.0 else coef * kp
            if acc is None:
                acc, own = term, term is not kp
            elif own:
                acc += term
            else:
                acc, own = acc + term, True
        out.append(acc)
    return out


def _vdot_parts(u, v):
    """Σ_parts <u_p, v_p> (None parts skipped); a 0-d array, or 0.0 when all are None."""
    total = 0.0
    for a, b in zip(u, v):
        if a is not None and b is not None:
            total = total + get_array_module(a).vdot(a, b)
    return total


# --------------------------------------------------------------------------- one RK step

def _stages(dynamics, struct, tab, t, h, y, n, k1=None, cache1=None):
    """The first n stages of eq. 1.1 from state parts y: returns (ks, caches, nfe).

    k1, cache1: the first stage when already known (FSAL, or a rejected step retried).
    """
    ks, caches, nfe = [], [], 0
    c, rows = tab.c, tab.a_rows
    for i in range(n):
        if i == 0 and k1 is not None:
            ks.append(k1)
            caches.append(cache1)
            continue
        Y = y if not rows[i] else _combine(y, [(h * a, ks[j]) for j, a in rows[i]])
        dydt, cache = dynamics.forward(t + c[i] * h, struct.pack(Y))
        ks.append(struct.unpack(dydt, "dynamics.forward output", like=Y))
        caches.append(cache)
        nfe += 1
    return ks, caches, nfe


def rk_step(dynamics, struct, tab, t, h, y, k1=None, cache1=None, with_error=False):
    """One explicit RK step (eq. 1.1), the same pure function for every tableau.

    t, h: host floats; y: tuple of state parts; k1, cache1: the first stage when known (FSAL
    or a retried step). with_error: also the local error of eq. 1.2 (embedded pairs), which
    for an FSAL pair evaluates the last stage F(t + h, y_new), the next step's first stage.
    Returns (y_new parts, ks, caches, err parts or None, nfe); ks/caches hold every evaluated
    stage (the first ``tab.n_solution_stages`` are the ones the adjoint reverses).
    """
    nsol, b = tab.n_solution_stages, tab.b
    fsal_extra = with_error and tab.fsal and nsol < tab.stages
    n_eval = tab.stages if (with_error and not fsal_extra) else nsol
    ks, caches, nfe = _stages(dynamics, struct, tab, t, h, y, n_eval, k1, cache1)
    y_new = _combine(y, [(h * b[j], ks[j]) for j in range(nsol) if b[j] != 0.0])
    if not with_error:
        return y_new, ks, caches, None, nfe
    if fsal_extra:                   # Y_s = y_new and c_s = 1 (eq. 1.1 with FSAL)
        f_new, cache_new = dynamics.forward(t + h, struct.pack(y_new))
        ks = ks + [struct.unpack(f_new, "dynamics.forward output")]
        caches = caches + [cache_new]
        nfe += 1
    e = tab.b_err
    err = _combine(None, [(h * e[j], ks[j]) for j in range(tab.stages) if e[j] != 0.0])
    return y_new, ks, caches, err, nfe


def _step_backward(dynamics, struct, tab, h, ybar, ks, caches, pacc, s, ds, times):
    """Reverse one step y_new = y + h Σ b_i k_i (eq. 2.3-2.8).

    ybar: parts of ∂L/∂y_new (None = 0); ks, caches: the recomputed (or stored) stages.
    pacc: dict of parameter-cotangent accumulators, updated in place (owned by the caller).
    s, ds: the step's mesh fraction s_n and Δs_n (eq. 2.9). times: a _TimeCotangents that
    collects the scalars of eq. 2.7-2.8 with their eq. 2.10 weights (summed once at the end).
    Returns (ybar_n, n_backward).
    """
    n = len(ks)
    b, c, cols = tab.b, tab.c, tab.a_cols
    Ybar = [None] * n
    nb = 0
    for j in reversed(range(n)):
        # eq. 2.4: g_j = b_j ȳ + Σ_{i>j} a_ij Ȳ_i,  k̄_j = h g_j
        terms = [(b[j], ybar)] if b[j] != 0.0 else []
        terms += [(a, Ybar[i]) for i, a in cols[j] if i < n and Ybar[i] is not None]
        if not terms:
            continue
        g = _combine(None, terms)
        if all(gp is None for gp in g):
            continue
        kbar = [(h * gp) if gp is not None else _zeros_like(kp) for gp, kp in zip(g, ks[j])]
        yb, pb, tb = dynamics.backward(caches[j], struct.pack(kbar))  # eq. 2.5
        nb += 1
        Ybar[j] = struct.unpack(yb, "dynamics.backward y_bar")
        # eq. 2.7 first sum, ⟨g_j, k_j⟩, enters h̄_n: weights −Δs_n (t0) and Δs_n (t1), eq. 2.10
        times.add(_vdot_parts(g, ks[j]), -ds, ds)
        # τ̄_j enters t̄_n (eq. 2.8) and h̄_n with c_j (eq. 2.7): with eq. 2.10 the weights are
        # 1 − s_n − c_j Δs_n (t0) and s_n + c_j Δs_n (t1)
        if tb is not None:
            times.add(tb, 1.0 - s - c[j] * ds, s + c[j] * ds)
        for name, v in pb.items():
            if v is not None:
                pacc[name] += v                                       # eq. 2.6
    ybar_n = _combine(ybar, [(1.0, Y) for Y in Ybar if Y is not None])  # eq. 2.3
    return ybar_n, nb


class _TimeCotangents:
    """Collects scalars v with weights (w0, w1); total() = (Σ w0 v, Σ w1 v) (eq. 2.10).

    Array scalars are summed by one stacked product at the end (no per-stage scalar
    arithmetic on the device); host floats are summed on the host.
    """

    __slots__ = ("vals", "w0", "w1", "host0", "host1")

    def __init__(self):
        self.vals, self.w0, self.w1 = [], [], []
        self.host0 = self.host1 = 0.0

    def add(self, v, w0, w1):
        if isinstance(v, (int, float)):
            self.host0 += w0 * v
            self.host1 += w1 * v
        else:
            self.vals.append(v)
            self.w0.append(w0)
            self.w1.append(w1)

    def total(self):
        t0, t1 = self.host0, self.host1
        if self.vals:
            xp = get_array_module(*self.vals)
            v = xp.stack(self.vals)
            both = to_host(xp.asarray([self.w0, self.w1], dtype=v.dtype) @ v)  # one host sync
            t0 += float(both[0])
            t1 += float(both[1])
        return t0, t1


def _zeros_like(a):
    return get_array_module(a).zeros_like(a)


# --------------------------------------------------------------------------- controller

def propose_step(h, ratio, order):
    """Next step from the error ratio ρ (eq. 3.2), a pure function of host floats.

        h_new = h · min(MAX_FACTOR, max(SAFETY · ρ^(−1/order), MIN_FACTOR)),

    with the exponent convention −1/order, order = 5 for dopri5 (torchdiffeq's choice), and
    accepted steps (ρ ≤ 1) never shrinking (factor ≥ 1); ρ = 0 grows by MAX_FACTOR.
    """
    if ratio == 0.0:
        return h * MAX_FACTOR
    factor = min(MAX_FACTOR, max(SAFETY * ratio ** (-1.0 / order), MIN_FACTOR))
    if ratio <= 1.0:
        factor = max(factor, 1.0)
    return h * factor


def _rms_ratio(parts, scales, allreduce=None):
    """max over parts of RMS(part / scale) as a 0-d array (eq. 3.1).

    allreduce: None, or a function summing a host float64 vector over the processes that hold
    the other rows of the state (npflow.parallel): each part's Σ (part/scale)² and its element
    count are summed over them before the RMS, so every process gets the RMS of the whole
    state and takes the same steps (docs/parallel.md, eq. 1.4). Returns a host float then."""
    if allreduce is not None:
        return _rms_ratio_allreduced(parts, scales, allreduce)
    r = None
    for e, s in zip(parts, scales):
        if e is None or e.size == 0:
            continue
        xp = get_array_module(e)
        q = e / s
        rp = xp.sqrt(xp.mean(q * q))
        r = rp if r is None else xp.maximum(r, rp)
    return 0.0 if r is None else r


def _rms_ratio_allreduced(parts, scales, allreduce):
    """_rms_ratio over rows spread across processes: one host vector (Σq² per part, then the
    counts) summed by ``allreduce``; a host float."""
    sq, counts = [], []
    for e, s in zip(parts, scales):
        if e is None:
            continue
        xp = get_array_module(e)
        q = e / s
        sq.append((q * q).sum())
        counts.append(float(e.size))
    if not sq:
        return 0.0
    xp = get_array_module(sq[0])
    vec = np.concatenate([np.asarray(to_host(xp.stack(sq)), dtype=np.float64),
                          np.asarray(counts, dtype=np.float64)])
    vec = allreduce(vec)
    n = len(sq)
    r = [math.sqrt(vec[i] / vec[n + i]) if vec[n + i] > 0 else 0.0 for i in range(n)]
    if any(math.isnan(v) for v in r):
        return math.nan
    return max(r)


def _error_ratio(err, y0, y1, rtol, atol, allreduce=None):
    """ρ = max_parts RMS(err / (atol + rtol·max(|y0|, |y1|))) (eq. 3.1); one host float."""
    scales = []
    for a, b in zip(y0, y1):
        xp = get_array_module(a)
        scales.append(atol + rtol * xp.maximum(xp.abs(a), xp.abs(b)))
    return float(_rms_ratio(err, scales, allreduce))


def initial_step(dynamics, struct, t0, y0, f0, direction, order, rtol, atol, allreduce=None):
    """Hairer–Wanner's starting step (Solving ODEs I, §II.4; eq. 3.3), one extra evaluation.

    d0 = ‖y0/sc‖, d1 = ‖f0/sc‖ with sc = atol + rtol|y0|; h0 = 0.01 d0/d1 (1e-6 if either is
    below 1e-5); f1 = F(t0 + h0, y0 + h0 f0); d2 = ‖(f1 − f0)/sc‖ / h0;
    h1 = (0.01/max(d1, d2))^(1/(order+1)) (max(1e-6, 1e-3 h0) if both ≤ 1e-15), with
    order the embedded order q̂ (4 for dopri5, as torchdiffeq passes it);
    returns (min(100 h0, h1) ≥ 0, nfe = 1). Norms are RMS, max over parts (as eq. 3.1), over
    the rows of every process when ``allreduce`` is given (see _rms_ratio).
    """
    scales = []
    for a in y0:
        xp = get_array_module(a)
        scales.append(atol + rtol * xp.abs(a))
    d0 = float(_rms_ratio(y0, scales, allreduce))
    d1 = float(_rms_ratio(f0, scales, allreduce))
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    y_try = _combine(y0, [(direction * h0, f0)])
    f1, _ = dynamics.forward(t0 + direction * h0, struct.pack(y_try))
    f1 = struct.unpack(f1, "dynamics.forward output")
    diff = [b - a for a, b in zip(f0, f1)]
    d2 = float(_rms_ratio(diff, scales, allreduce)) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100.0 * h0, h1), 1


# --------------------------------------------------------------------------- solution

class Solution:
    """The result of ``odeint``: y1 and what the backward pass needs (a tape of values).

    y1:   like y0                          the state at t1
    nfe:  int                              dynamics.forward calls of the forward solve
    ts:   list of float (N+1,)             the accepted times t_0 = t0, ..., t_N = t1
    grid: list of float (N+1,)             the fractions s_n, t_n = t0 + s_n (t1 − t0) (eq. 2.9)
    method: str; n_steps: int (N); n_rejected: int (adaptive only)
    backward(y1_bar) -> Grads              the discrete adjoint (eq. 2.3-2.11)
    """

    def __init__(self, *, y1, nfe, ts, grid, method, n_rejected, tape):
        self.y1 = y1
        self.nfe = nfe
        self.ts = ts
        self.grid = grid
        self.method = method
        self.n_steps = len(ts) - 1
        self.n_rejected = n_rejected
        self._tape = tape

    def __repr__(self):
        return (f"Solution(method={self.method!r}, n_steps={self.n_steps}, nfe={self.nfe}, "
                f"n_rejected={self.n_rejected}, t0={self.ts[0]!r}, t1={self.ts[-1]!r})")

    def backward(self, y1_bar) -> Grads:
        """∂L/∂(y0, θ, t0, t1) given y1_bar = ∂L/∂y1 (like y1; tuple entries may be None).

        Walks the steps in reverse (eq. 2.3-2.8), recomputing stages from stored states
        (store="states"), using the stored ones (store="caches") or recomputing checkpointed
        segments first (checkpoint=k, section 4); accumulates θ̄ (eq. 2.6) and the time
        cotangents (eq. 2.10). Pure: the solution can be differentiated again.
        """
        return _backward(self._tape, y1_bar)


class _Tape(NamedTuple):
    dynamics: object
    struct: _Structure
    tab: Tableau
    t0: float
    t1: float
    ts: list
    grid: list
    states: dict            # n -> parts of y_n (every n, or every k-th)
    stages: list | None     # store="caches": per step (ks, caches)
    checkpoint: int         # 1 unless checkpointing
    y1: tuple


def _backward(tape, y1_bar):
    dyn, struct, tab = tape.dynamics, tape.struct, tape.tab
    ybar = struct.unpack(y1_bar, "y1_bar")
    ybar = [None if v is None else v for v in ybar]
    ref = tape.y1
    for v, r in zip(ybar, ref):
        if v is not None and tuple(v.shape) != tuple(r.shape):
            raise ValueError(f"y1_bar has a part of shape {tuple(v.shape)}, but y1's part has "
                             f"shape {tuple(r.shape)}")
    params = dyn.params
    xp = get_array_module(*[r for r in ref])
    pacc = {k: xp.zeros_like(v) for k, v in params.items()}
    ts, grid = tape.ts, tape.grid
    N = len(ts) - 1
    times = _TimeCotangents()
    nb = 0
    nre = 0
    nsol = tab.n_solution_stages
    if N == 0:
        # t0 == t1: one step of length 0 on the grid [0, 1]; ∂y1/∂t1 = F(t0, y0) (eq. 2.12).
        f, _ = dyn.forward(tape.t0, struct.pack(tape.states[0]))
        nre += 1
        g = _vdot_parts(ybar, struct.unpack(f))
        ybar_n = [None if v is None else v for v in ybar]
        return _finish(struct, ybar_n, pacc, params, -g, g, nb, nre, ref)
    k = tape.checkpoint
    for start in reversed(range(0, N, k)):
        end = min(start + k, N)
        seg = {}
        if tape.stages is None:
            # the segment's states from its checkpoint (section 4; nothing to do when k = 1)
            seg[start] = tape.states[start]
            for n in range(start, end - 1):
                seg[n + 1], _, _, _, nf = rk_step(dyn, struct, tab, ts[n], ts[n + 1] - ts[n],
                                                  seg[n])
                nre += nf
        for n in reversed(range(start, end)):
            h = ts[n + 1] - ts[n]
            if tape.stages is not None:
                ks, caches = tape.stages[n]
            else:
                ks, caches, nf = _stages(dyn, struct, tab, ts[n], h, seg[n], nsol)
                nre += nf
            # eq. 2.9: t_n = t0 + s_n (t1 − t0), h_n = (s_{n+1} − s_n)(t1 − t0)
            ybar, nbs = _step_backward(dyn, struct, tab, h, ybar, ks, caches, pacc,
                                       grid[n], grid[n + 1] - grid[n], times)
            nb += nbs
    t0bar, t1bar = times.total()                                   # eq. 2.10
    return _finish(struct, ybar, pacc, params, t0bar, t1bar, nb, nre, ref)


def _finish(struct, ybar, pacc, params, t0bar, t1bar, nb, nre, ref):
    y0bar = [(_zeros_like(r) if v is None else v) for v, r in zip(ybar, ref)]
    return Grads(y0=struct.pack(y0bar), params=pacc, t0=float(t0bar), t1=float(t1bar),
                 nfe=nb, nfe_recompute=nre)


# --------------------------------------------------------------------------- odeint

def _check_y0(parts):
    xp = get_array_module(*parts)
    for i, p in enumerate(parts):
        if not hasattr(p, "dtype") or not hasattr(p, "shape"):
            raise ValueError(f"y0 part {i} is a {type(p).__name__}, expected an array")
        if p.dtype.kind != "f":
            raise ValueError(f"y0 part {i} has dtype {p.dtype}; expected float32 or float64")
    return xp


def _nonfinite_message(states, ts):
    """Where the first non-finite value appeared (error path only: host syncs are fine)."""
    for n in sorted(states):
        for i, p in enumerate(states[n]):
            xp = get_array_module(p)
            if not bool(xp.isfinite(p).all()):
                return f"first seen in part {i} of the state at t={ts[n]!r} (step {n})"
    return "in the final state"


def odeint(dynamics, y0, t0, t1, method="rk4", steps=None, rtol=1e-5, atol=1e-5,
           first_step=None, max_step=None, min_step=0.0, max_num_steps=10_000,
           checkpoint=None, store="states", step_size=None, grid=None,
           allreduce=None) -> Solution:
    """Solve dy/dt = F(t, y) from t0 to t1 (t1 < t0 allowed) with an explicit RK method.

    dynamics: object with .params, .forward(t, y), .backward(cache, dydt_bar) (module doc)
    y0:     array (any shape) or tuple / NamedTuple of arrays; y1 has the same type
    t0, t1: scalars (float or 0-d array; read once on the host)
    method: "euler" | "midpoint" | "rk4" (classical) | "rk38" (3/8 rule) | "dopri5", or a
            npflow.tableau.Tableau
    Fixed mesh (any method; required for those without error weights), one of:
        steps:     N uniform steps, h = (t1 − t0)/N (eq. 2.9 with s_n = n/N)
        step_size: N = ceil(|t1 − t0| / step_size) uniform steps
        grid:      fractions 0 = s_0 < ... < s_N = 1, t_n = t0 + s_n (t1 − t0) (e.g. the
                   ``solution.grid`` of an adaptive solve, to replay its mesh)
    Adaptive (dopri5 when no mesh is given; section 3):
        rtol, atol  error ratio eq. 3.1; first_step (default: eq. 3.3, one evaluation);
        max_step (|h| cap, None = no cap); min_step (|h| floor: below it, or below 10 ulp(t) so that t + h
        would barely move, SolverError);
        max_num_steps (attempted steps, accepted or rejected, before SolverError);
        allreduce: None, or a function summing a host float64 vector over the processes that
        hold the other rows of the state (npflow.parallel), so that the error norms (eq. 3.1,
        3.3) cover the whole batch and every process takes the same steps.
    Memory for the backward (section 4):
        store="states" (keep y_n, recompute stages) or "caches" (keep every stage's cache);
        checkpoint=k (keep every k-th state, recompute segments; with store="states").
    Returns a Solution (y1, nfe, ts, grid, backward). Raises SolverError (a RuntimeError) on
    step underflow, an exhausted budget, or a non-finite state (fixed mesh: checked once at
    the end; adaptive: the error ratio, one host scalar per step, is checked every step).
    """
    tab = get_tableau(method)
    struct = _Structure(y0)
    y = struct.unpack(y0, "y0")
    _check_y0(y)
    t0 = float(t0)
    t1 = float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"t0={t0!r} and t1={t1!r} must be finite")
    if store not in ("states", "caches"):
        raise ValueError(f"store={store!r}: expected 'states' or 'caches'")
    if checkpoint is not None:
        if store == "caches":
            raise ValueError("checkpoint=k recomputes states; it cannot be combined with "
                             "store='caches'")
        if int(checkpoint) != checkpoint or checkpoint < 1:
            raise ValueError(f"checkpoint={checkpoint!r}: expected a positive integer")
    ckpt = 1 if checkpoint is None else int(checkpoint)
    if sum(x is not None for x in (steps, step_size, grid)) > 1:
        raise ValueError("give at most one of steps, step_size and grid")
    if step_size is not None:
        if not step_size > 0:
            raise ValueError(f"step_size={step_size!r}: expected a positive number")
        steps = max(1, math.ceil(abs(t1 - t0) / step_size - 1e-12))
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps!r}: expected a positive integer")
        steps = int(steps)
        grid = [n / steps for n in range(steps + 1)]
    if grid is not None:
        grid = [float(s) for s in grid]
        if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or any(
                b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError("grid must be increasing fractions from 0.0 to 1.0 with at least "
                             f"two entries; got {grid[:4]}... ({len(grid)} entries)")
        return _solve_fixed(dynamics, struct, tab, y, t0, t1, grid, store, ckpt)
    if not tab.adaptive:
        raise ValueError(f"method {tab.name!r} has a fixed mesh: give steps=N, step_size=h "
                         "or grid=fractions")
    if not (rtol > 0 and atol >= 0):
        raise ValueError(f"rtol={rtol!r} must be > 0 and atol={atol!r} >= 0")
    if max_num_steps < 1:
        raise ValueError(f"max_num_steps={max_num_steps!r}: expected a positive integer")
    max_step = math.inf if max_step is None else float(max_step)
    if not max_step > 0:
        raise ValueError(f"max_step={max_step!r}: expected a positive number or None")
    if first_step is not None and not (math.isfinite(first_step) and first_step != 0):
        raise ValueError(f"first_step={first_step!r}: expected a nonzero finite number or None")
    return _solve_adaptive(dynamics, struct, tab, y, t0, t1, rtol, atol, first_step,
                           max_step, float(min_step), int(max_num_steps), store, ckpt,
                           allreduce)


def _solve_fixed(dyn, struct, tab, y, t0, t1, grid, store, ckpt):
    """Fixed mesh t_n = t0 + s_n (t1 − t0): N steps of eq. 1.1, nfe = n_solution_stages·N."""
    N = len(grid) - 1
    span = t1 - t0
    ts = [t0 + s * span for s in grid[:-1]] + [t1]
    nsol = tab.n_solution_stages
    states = {0: y}
    stages = [] if store == "caches" else None
    nfe = 0
    for n in range(N):
        h = ts[n + 1] - ts[n]
        y, ks, caches, _, nf = rk_step(dyn, struct, tab, ts[n], h, y)
        nfe += nf
        if stages is not None:
            stages.append((ks, caches))
        elif (n + 1) % ckpt == 0 and n + 1 < N:
            states[n + 1] = y
    xp = get_array_module(*y)
    ok = None
    for p in y:
        f = xp.isfinite(p).all()
        ok = f if ok is None else ok & f
    if not bool(ok):
        where = _nonfinite_message(states, ts) if stages is None else "during the solve"
        raise SolverError(f"{tab.name}: non-finite state (NaN or Inf) integrating from "
                          f"t0={t0!r} to t1={t1!r} with {N} steps of h={(t1 - t0) / N!r}; "
                          f"{where}; error ratio n/a (fixed mesh). Try more steps or check "
                          "the dynamics.")
    tape = _Tape(dyn, struct, tab, t0, t1, ts, grid, states, stages, ckpt, tuple(y))
    return Solution(y1=struct.pack(y), nfe=nfe, ts=ts, grid=list(grid), method=tab.name,
                    n_rejected=0, tape=tape)


def _solve_adaptive(dyn, struct, tab, y, t0, t1, rtol, atol, first_step, max_step, min_step,
                    max_num_steps, store, ckpt, allreduce=None):
    """Embedded-pair stepping with error control (section 3): FSAL, eq. 3.1-3.3."""
    nsol = tab.n_solution_stages
    ts = [t0]
    states = {0: y}
    stages = [] if store == "caches" else None
    if t1 == t0:
        tape = _Tape(dyn, struct, tab, t0, t1, ts, [0.0], states, stages, ckpt, tuple(y))
        return Solution(y1=struct.pack(y), nfe=0, ts=ts, grid=[0.0], method=tab.name,
                        n_rejected=0, tape=tape)
    direction = 1.0 if t1 > t0 else -1.0
    f0, cache0 = dyn.forward(t0, struct.pack(y))
    k1 = struct.unpack(f0, "dynamics.forward output", like=y)
    nfe = 1
    if first_step is None:
        # torchdiffeq passes order − 1 (the embedded order, 4 for dopri5): exponent 1/5
        h_abs, nf = initial_step(dyn, struct, t0, y, k1, direction, tab.error_order, rtol,
                                 atol, allreduce)
        nfe += nf
    else:
        h_abs = abs(float(first_step))
    h_abs = min(h_abs, max_step)
    t = t0
    ratio = None
    attempts = rejected = 0
    n = 0
    while direction * (t1 - t) > 0:
        if attempts >= max_num_steps:
            raise SolverError(
                f"{tab.name}: max_num_steps={max_num_steps} exhausted at t={t!r} "
                f"(integrating from {t0!r} to {t1!r}), h={direction * h_abs!r}, last error "
                f"ratio={ratio!r}; {n} accepted, {rejected} rejected steps. The problem may "
                "be stiff: loosen rtol/atol, raise max_num_steps or use a fixed grid.")
        if h_abs < min_step or h_abs < UNDERFLOW_ULPS * math.ulp(t):
            raise SolverError(
                f"{tab.name}: step size underflow at t={t!r} (integrating from {t0!r} to "
                f"{t1!r}): h={direction * h_abs!r} below min_step={min_step!r} or below "
                f"{UNDERFLOW_ULPS} ulp(t) (t + h barely changes t); last error "
                f"ratio={ratio!r}. The solution may blow up or the problem be stiff.")
        h = direction * h_abs
        t_new = t + h
        if direction * (t_new - t1) > 0:
            t_new = t1
        h = t_new - t
        y_new, ks, caches, err, nf = rk_step(dyn, struct, tab, t, h, y, k1, cache0,
                                             with_error=True)
        nfe += nf
        k_new, cache_new = (ks[-1], caches[-1]) if tab.fsal else (None, None)
        ratio = _error_ratio(err, y, y_new, rtol, atol, allreduce)
        attempts += 1
        if not math.isfinite(ratio):
            raise SolverError(
                f"{tab.name}: non-finite state or error (NaN or Inf) at t={t!r}, "
                f"h={h!r}, error ratio={ratio!r} (integrating from {t0!r} to {t1!r}).")
        if ratio <= 1.0:
            if stages is not None:
                stages.append((ks[:nsol], caches[:nsol]))
            n += 1
            t, y = t_new, y_new
            k1, cache0 = k_new, cache_new
            ts.append(t)
            if stages is None and n % ckpt == 0:
                states[n] = y
        else:
            rejected += 1
        h_abs = min(abs(propose_step(h, ratio, tab.order)), max_step)
    ts[-1] = t1
    states.pop(len(ts) - 1, None)   # the final state is y1, not needed by the backward
    span = t1 - t0
    grid = [(tn - t0) / span for tn in ts]
    grid[0], grid[-1] = 0.0, 1.0
    xp = get_array_module(*y)
    ok = None
    for p in y:
        f = xp.isfinite(p).all()
        ok = f if ok is None else ok & f
    if not bool(ok):
        raise SolverError(f"{tab.name}: non-finite final state at t1={t1!r} "
                          f"(last h={h!r}, error ratio={ratio!r}).")
    tape = _Tape(dyn, struct, tab, t0, t1, ts, grid, states, stages, ckpt, tuple(y))
    return Solution(y1=struct.pack(y), nfe=nfe, ts=ts, grid=grid, method=tab.name,
                    n_rejected=rejected, tape=tape)


# --------------------------------------------------------------------------- analytic times

def terminal_time_gradient(dynamics, y1, t1, y1_bar):
    """Analytic ∂L/∂T = λ(T)·F(y(T), T) with λ(T) = y1_bar (eq. 5.1); one forward evaluation.

    y1, y1_bar: like the state (tuple entries of y1_bar may be None); t1: scalar. Returns a
    float. It equals the discrete Grads.t1 up to the method's error, O(h^p) (eq. 5.3).
    """
    return _time_gradient(dynamics, y1, t1, y1_bar, 1.0)


def initial_time_gradient(dynamics, y0, t0, y0_bar):
    """Analytic ∂L/∂t0 = −λ(t0)·F(y(t0), t0) with λ(t0) = y0_bar = ∂L/∂y0 (eq. 5.2).

    y0, y0_bar: like the state; t0: scalar. Returns a float; one forward evaluation.
    """
    return _time_gradient(dynamics, y0, t0, y0_bar, -1.0)


def _time_gradient(dynamics, y, t, ybar, sign):
    struct = _Structure(y)
    f, _ = dynamics.forward(float(t), y)
    g = _vdot_parts(struct.unpack(ybar, "cotangent"), struct.unpack(f))
    return sign * float(g)
