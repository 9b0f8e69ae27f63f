"""Continuous normalizing flows: FFJORD, RNODE, TO-FLOW and STEER (docs/cnf.md).

The augmented state of one CNF block (eq. 1.1), with z(t0) = x, ℓ(t0) = 0:

    dz/dt = f(z, t; θ)                    z        (B, *event_shape)
    dℓ/dt = tr ∂f/∂z   (exact or Hutchinson, eq. 2.1-2.2)          ℓ        (B,)
    dq/dt = r(f, Jε)   (the training methods' state terms)        q        (B,) each

log p(x) = log N(z(T); 0, I) + ℓ(T)                                (eq. 1.2)
loss     = mean_b [ ½‖z(T)‖² + (D/2) log 2π − ℓ(T) ] + Σ_q λ_q mean q(T)   (eq. 4.1)

The state terms q, their weights λ_q and their adjoints belong to the training methods
(npflow/methods.py, docs/training.md eq. 11.1-11.4): RNODE's kinetic energy E (eq. 3.1) and
Jacobian Frobenius norm n (eq. 3.2). The models ask the registry which terms their settings
switch on (``methods.state_terms``) and integrate them generically.

Every derivative comes from the layers' tangent/adjoint rules (docs/layers.md) and the solver's
discrete adjoint (docs/solvers.md); the end time's gradient comes out of the same pass
(∂L/∂T, eq. 6.1), and the analytic terminal formula of TO-FLOW (eq. 6.2) is reported beside it.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import NamedTuple

import numpy as np  # host-side only: the seed generator and validation messages

from .backend import get_array_module, to_host
from .methods import model_settings, state_terms, sum_features
from .model import FlowModel, Part, check_int, check_rows
from .odenet import ODENet
from .tableau import TABLEAUS, fixed_grid
from .solvers import odeint, terminal_time_gradient
from . import trace as trace_mod

__all__ = ["CNF", "BlockStack", "CNFState", "state_type", "CNFDynamics", "TRACE_KINDS"]

TRACE_KINDS = ("exact", "hutchinson", "gaussian", "rademacher")


class CNFState(NamedTuple):
    """State of a CNF block without regularizers: z (B, ...), logdet ℓ (B,)."""
    z: object
    logdet: object


@functools.lru_cache(maxsize=None)
def state_type(names=()):
    """The NamedTuple of a CNF state with the state terms ``names`` (a tuple of str) after
    z (B, ...) and logdet (B,), each (B,): CNFState when there are none; with RNODE's,
    fields (z, logdet, kinetic, jacobian)."""
    if not names:
        return CNFState
    return collections.namedtuple("CNFState_" + "_".join(names), ("z", "logdet") + names)


class CNFDynamics:
    """The augmented CNF vector field F(y, t) of eq. 1.1 for npflow.odeint.

    Built once per solve with its probes ε fixed (drawn before the solve, reused by every stage
    and by the backward pass); never mutated.

    net     network with the layer interface (ODENet, ConvNet): f = net(z, t); its backward
            takes need_xdotbar=False (the probes' cotangent is not needed)
    params  dict of the network's parameters
    eps     probes (K, B, ...) with the shape of z behind the K axis, or None (no trace:
            the state is z alone, used for sampling)
    weight  trace weight: 1 for the exact basis, 1/K for Hutchinson (eq. 2.1-2.2)
    terms   the methods' state terms carried after z and ℓ (methods.StateTerm, e.g. RNODE's
            kinetic and jacobian, eq. 3.1-3.2), in state order; needs eps
    """

    def __init__(self, net, params, eps=None, weight=1.0, terms=()):
        self.net = net
        self.params = params
        self.eps = eps
        self.weight = weight
        self.terms = tuple(terms)
        self.state = state_type(tuple(t.name for t in self.terms))
        # the parameters are fixed for the solve: let the network precompute what it can
        self._net_params = net.prepare(params) if hasattr(net, "prepare") else params

    def forward(self, t, y):
        """F(y, t) -> (dydt, cache); y a ``self.state`` (z, logdet, terms...), or z alone if
        eps is None. The terms' rates are r(f, Jε) (docs/training.md eq. 11.1)."""
        if self.eps is None:
            f, _, cache = self.net.forward(self._net_params, y, None, t)
            return f, (cache, None, None)
        z = y.z
        f, Jeps, cache = self.net.forward(self._net_params, z, self.eps, t)
        K, B = Jeps.shape[0], Jeps.shape[1]
        xp = get_array_module(Jeps)
        dlogdet = xp.einsum("kbd,kbd->b", self.eps.reshape(K, B, -1),
                            Jeps.reshape(K, B, -1))                                 # eq. 2.1
        if self.weight != 1.0:
            dlogdet *= self.weight
        rates = [t.rate(f, Jeps, self.weight) for t in self.terms]                 # eq. 11.1
        return self.state(f, dlogdet, *rates), (cache, f, Jeps)

    def backward(self, cache, ybar):
        """Adjoint of forward (eq. 5.1): cotangents of dydt -> (y_bar, params_bar, t_bar).

        Each state term adds its rate's adjoint to f̄ and (Jε)‾ (docs/training.md eq. 11.4;
        RNODE's: eq. 5.1b-c). y_bar's ℓ and term parts are None: F does not depend on them
        (zero cotangent)."""
        ncache, f, Jeps = cache
        if self.eps is None:
            zbar, _, pbar, tbar = self.net.backward(ybar, None, ncache)
            return zbar, pbar, tbar
        bshape = (1, -1) + (1,) * (f.ndim - 1)            # (B,) -> broadcast over (K, B, ...)
        fbar = ybar.z
        lbar = ybar.logdet if self.weight == 1.0 else self.weight * ybar.logdet
        Jeps_bar = lbar.reshape(bshape) * self.eps
        for t in self.terms:                                                       # eq. 11.4
            fb, jb = t.rate_backward(getattr(ybar, t.name), f, Jeps, self.weight)
            if fb is not None:
                fbar = fbar + fb
            if jb is not None:
                Jeps_bar = Jeps_bar + jb
        # the probes are constants: their cotangent is not needed
        zbar, _, pbar, tbar = self.net.backward(fbar, Jeps_bar, ncache, need_xdotbar=False)
        # F does not depend on ℓ or the terms: their cotangents are zero, given as None (the
        # solver's convention for a zero part)
        return self.state(zbar, None, *([None] * len(self.terms))), pbar, tbar


def _block_prefix(b):
    return f"b{b}."


class BlockStack:
    """What every stack of CNF blocks shares (CNF, MultiscaleCNF): ``self.nets`` (one network
    per block), block parameters named "b{block}.{name}", one end time per block, trained
    under the names ``self.time_names`` when config["train_T"], the methods' state terms
    (``state_terms``), and the statistics of a loss from its summed part (``loss_from_part``;
    the main per-sample sum is named ``loss_sum``)."""

    loss_sum = "nll"

    @property
    def state_terms(self):
        """The training methods' state terms this model carries (methods.state_terms)."""
        return state_terms(self.config)

    def _initial_state(self, x, terms=()):
        """y(0) = (x, ℓ = 0, q = 0 for every term) for x (B, ...) (eq. 1.1)."""
        zero = self.xp.zeros(x.shape[0], dtype=x.dtype)
        return state_type(tuple(t.name for t in terms))(x, zero, *([zero] * len(terms)))

    def _term_sums(self, y, terms):
        """Σ over the rows of every state term's q(T) (B,): {name: 0-d array}."""
        return {t.name: getattr(y, t.name).sum() for t in terms}

    def _init_block_params(self, rng, **init_kw):
        """Fresh params of every block (drawn in block order from rng) plus the trained T's."""
        params = {}
        for b, net in enumerate(self.nets):
            p = net.init_params(rng, self.dtype, self.xp, **init_kw)
            params.update({_block_prefix(b) + k: v for k, v in p.items()})
        if self.config["train_T"]:
            for name in self.time_names:
                params[name] = self.xp.asarray(float(self.config["T"]), dtype=self.dtype)
        return params

    def end_times(self, params=None, T=None):
        """End time of every block: the override T (STEER), the trained T, or config T."""
        params = self.params if params is None else params
        n = len(self.nets)
        if T is not None:
            Ts = list(T) if isinstance(T, (list, tuple)) else [T] * n
            if len(Ts) != n:
                raise ValueError(f"T override has {len(Ts)} entries for {n} blocks")
            return Ts
        if self.config["train_T"]:
            return [params[name] for name in self.time_names]
        return [self.config["T"]] * n

    def block_params(self, b, params=None):
        """The parameters of block b, without their "b{b}." prefix."""
        params = self.params if params is None else params
        pre = _block_prefix(b)
        return {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}

    # ---- what CNF and MultiscaleCNF share: the final cotangent, the block-reverse loop and
    # ---- the end-time gradients (docs/cnf.md, eq. 5.1-6.2)
    def _terminal_cotangent(self, y, zbar, c, B, terms=()):
        """∂loss/∂y(T) (eq. 5.1a) for the rows of y of a batch of B samples: z̄ = ``zbar``,
        ℓ̄ = −c (c = 1/B, or 1/(B·D ln 2) for bits/dim), q̄ = λ_q/B for every state term q
        (docs/training.md eq. 11.3; RNODE: Ē = λ_K/B, n̄ = λ_J/B)."""
        xp = self.xp
        dt = zbar.dtype
        b = zbar.shape[0]
        lbar = xp.full((b,), -c, dtype=dt)
        qbars = [xp.full((b,), self.config[t.setting] / B, dtype=dt) for t in terms]
        return type(y)(zbar, lbar, *qbars)

    def loss_from_part(self, part, B, params=None, T=None):
        """(loss, grads, stats) of loss_and_grad from the sum of the parts of a batch of B.

        loss = Σ ``loss_sum`` / B + Σ_q λ_q Σ q(T) / B (eq. 4.1, docs/training.md eq. 11.2).
        stats: "nll" (and ``loss_sum``) = the mean main term, "nfe_forward", "nfe_backward",
        "T" = the end time of every block (list of floats), each state term's mean q(T) under
        its name, and with trained end times "dL_dT_discrete" / "dL_dT_analytic" (eq.
        6.1-6.2; a float for a model whose one end time is "T", else a list per block)."""
        cfg = self.config
        sums = {k: float(to_host(v)) for k, v in part.sums.items()}
        mean = sums[self.loss_sum] / B
        loss = mean
        stats = {"nll": mean}
        stats[self.loss_sum] = mean
        stats.update(nfe_forward=int(round(part.same["nfe_forward"])),
                     nfe_backward=int(round(part.same["nfe_backward"])),
                     T=[float(to_host(t)) for t in self.end_times(params, T)])
        terms = self.state_terms
        if terms:
            loss += sum(cfg[t.setting] * sums[t.name] for t in terms) / B       # eq. 11.2
            stats.update({t.name: sums[t.name] / B for t in terms})
        if cfg["train_T"]:
            disc, ana = self._time_stats(part, len(self.nets))
            if self.time_names == ["T"]:
                disc, ana = disc[0], ana[0]
            stats["dL_dT_discrete"], stats["dL_dT_analytic"] = disc, ana
        return float(loss), dict(part.grads), stats

    def _reverse(self, tape, ybar, Ts, other=None):
        """The block-reverse loop (eq. 5.1): walk ``tape`` backwards from the cotangent ybar of
        the final state. A ("block", b, dyn, sol) entry runs block b's discrete adjoint; any
        other entry goes to ``other(entry, ybar) -> ybar`` (squeeze, factor-out). With trained
        end times, grads gets the discrete ∂L/∂T_b (eq. 6.1) under ``time_names[b]`` and sums
        the analytic one (eq. 6.2) under "dL_dT_analytic:b".

        Returns (grads: dict like params, sums: dict, nfe_backward: int)."""
        train_T = self.config["train_T"]
        grads, sums, nfe_b = {}, {}, 0
        for entry in reversed(tape):
            if entry[0] != "block":
                ybar = other(entry, ybar)
                continue
            _, b, dyn, sol = entry
            if train_T:
                sums[f"dL_dT_analytic:{b}"] = terminal_time_gradient(dyn, sol.y1, Ts[b], ybar)
            g = sol.backward(ybar)
            nfe_b += g.nfe
            pre = _block_prefix(b)
            for k, v in g.params.items():
                grads[pre + k] = v
            if train_T:
                grads[self.time_names[b]] = self.xp.asarray(g.t1, dtype=self.dtype)
            ybar = g.y0
        return grads, sums, int(nfe_b)

    def _time_stats(self, part, n):
        """The discrete and analytic ∂L/∂T_b of the n blocks (lists of floats) of a summed part."""
        disc = [float(to_host(part.grads[name])) for name in self.time_names]
        ana = [float(to_host(part.sums[f"dL_dT_analytic:{b}"])) for b in range(n)]
        return disc, ana

    def time_gradient(self, x, rng, params=None, kind="analytic", rows=None, allreduce=None):
        """∂L/∂T_b of every block for the current params (TO-FLOW's T step, Algorithm 1), the
        share of ``rows`` (lo, hi) of the batch x when given (docs/parallel.md; the shares of
        a split batch add up); ``allreduce`` as in odeint.

        kind "analytic": the terminal formula λ(T)·F(y(T), T) (eq. 6.2); "discrete": the exact
        derivative of the discrete loss (eq. 6.1). Returns a list of floats, one per block.
        """
        if kind not in ("analytic", "discrete"):
            raise ValueError(f"unknown time-gradient kind {kind!r}: 'analytic' or 'discrete'")
        if not self.config["train_T"]:
            raise ValueError("time_gradient needs a model built with train_T=True")
        fast = self._analytic_time_gradient(x, rng, params, rows, allreduce) if (
            kind == "analytic") else None
        if fast is not None:
            return fast
        # λ at an inner block's end needs the later blocks' adjoint: the full pass, which gives
        # the analytic formula of every block beside the discrete one
        part = self.loss_and_grad_part(x, rng, rows=rows, params=params, allreduce=allreduce)
        disc, ana = self._time_stats(part, len(self.nets))
        return disc if kind == "discrete" else ana

    def _analytic_time_gradient(self, x, rng, params, rows, allreduce):
        """A cheaper analytic ∂L/∂T (one forward solve, no backward) where the model has one,
        else None."""
        return None


class CNF(BlockStack, FlowModel):
    """A stack of CNF blocks (FFJORD), each an ODE with its own end time T_b (docs/cnf.md).

    dim         D, the data dimension; data x has shape (B, D)
    hidden      widths of the ODENet's hidden layers
    layer       "concatsquash" | "concat" | "linear" (ODENet layer type)
    activation  a name in npflow.layers.ACTIVATIONS ("tanh", "softplus", "gelu", ...)
    T           initial end time of every block (t0 = 0)
    train_T     train the end times (TO-FLOW): params gains "T" (one block) or "T0", "T1", ...
    solver      a name in npflow.tableau.TABLEAUS: fixed grid ("rk4", "rk38", "euler",
                "midpoint"; `steps` steps) or adaptive ("dopri5", "bosh3")
    trace       "exact" (basis probes) | "hutchinson"/"gaussian" | "rademacher"
    probes      K, the number of Hutchinson probes (ignored for "exact")
    zero_last   zero the last layer of every block so the flow starts as the identity (RNODE)
    **method_settings  the training methods' model settings (methods.model_settings), e.g.
                RNODE's kinetic = λ_K and jacobian = λ_J (eq. 4.1); each off (0) by default
    """

    def __init__(self, dim, hidden=(64, 64, 64), layer="concatsquash", activation="tanh",
                 T=0.5, train_T=False, solver="rk4", steps=8, rtol=1e-5, atol=1e-5,
                 trace="exact", probes=1, blocks=1, zero_last=False, dtype="float32",
                 device="cpu", seed=0, **method_settings):
        dim, blocks, steps, probes = (check_int(n, v) for n, v in (
            ("dim", dim), ("blocks", blocks), ("steps", steps), ("probes", probes)))
        hidden = [check_int("hidden widths", h) for h in hidden]
        if solver not in TABLEAUS:
            raise ValueError(f"unknown solver {solver!r}: expected one of {sorted(TABLEAUS)}")
        if not (float(rtol) > 0 and float(atol) >= 0 and math.isfinite(float(rtol))
                and math.isfinite(float(atol))):
            raise ValueError(f"tolerances need rtol > 0 and atol >= 0 (finite), got rtol={rtol}, "
                             f"atol={atol}")
        if trace not in TRACE_KINDS:
            raise ValueError(f"unknown trace {trace!r}: expected one of {TRACE_KINDS}")
        if not T > 0:
            raise ValueError(f"end time T must be > 0, got {T}")
        settings = model_settings(method_settings, "CNF")
        config = dict(dim=dim, hidden=[int(h) for h in hidden], layer=layer,
                      activation=activation, T=float(T), train_T=bool(train_T), solver=solver,
                      steps=steps, rtol=float(rtol), atol=float(atol), trace=trace,
                      probes=probes, **settings, blocks=blocks, zero_last=bool(zero_last),
                      dtype=str(dtype), device=device, seed=int(seed))
        super().__init__(config, device=device, dtype=dtype)
        self.dim = dim
        self.nets = [ODENet(dim, config["hidden"], dim, layer=layer, activation=activation)
                     for _ in range(blocks)]
        rng = np.random.default_rng(seed)
        self.params = self._init_block_params(rng, zero_last=zero_last)

    # ---------------------------------------------------------------- helpers
    @property
    def time_names(self):
        """Names of the trained end times in params: "T" for one block, else "T0", "T1", ..."""
        n = len(self.nets)
        return ["T"] if n == 1 else [f"T{b}" for b in range(n)]

    def _prepare(self, x):
        """Validate data (B, D) and move it to the model's device and dtype (one host check)."""
        return self.prepare_data(x, (self.dim,))

    def _probes(self, kind, rng, B):
        """Probes (K, B, D) and their trace weight (eq. 2.1-2.2)."""
        kind = "gaussian" if kind == "hutchinson" else kind
        K = self.dim if kind == "exact" else self.config["probes"]
        eps = trace_mod.probes(kind, K, (B, self.dim), rng, self.dtype, self.xp)
        return eps, trace_mod.probe_weight(kind, K)

    def _solver_kwargs(self, solver, steps, rtol, atol):
        kw = dict(method=solver, rtol=rtol, atol=atol)
        if fixed_grid(solver):
            kw["steps"] = steps
        return kw

    def _flow(self, x, rng, params, Ts, trace, kw):
        """Solve every block forward from x (B, D) with fresh probes per block (eq. 1.1), no
        state terms (evaluation).

        Returns (y(T) of the last block, the solutions, the dynamics), one per block."""
        y = self._initial_state(x)
        sols, dyns = [], []
        for b, net in enumerate(self.nets):
            eps, weight = self._probes(trace, rng, x.shape[0])
            dyn = CNFDynamics(net, self.block_params(b, params), eps, weight)
            sol = odeint(dyn, y, 0.0, Ts[b], **kw)
            sols.append(sol)
            dyns.append(dyn)
            y = sol.y1
        return y, sols, dyns

    def _nll(self, z, logdet):
        """Per-sample −log p(x) = ½‖z‖² + (D/2) log 2π − ℓ (eq. 1.2)."""
        return 0.5 * sum_features(z * z) + 0.5 * self.dim * math.log(2 * math.pi) - logdet

    # ---------------------------------------------------------------- training
    def loss_and_grad(self, x, rng, params=None, T=None):
        """Loss of eq. 4.1 on a batch and its exact gradient (discrete adjoint).

        x       data (B, D) (host or device array)
        rng     numpy.random.Generator for the Hutchinson probes
        params  parameter dict (default self.params)
        T       optional end-time override (STEER, a float or one per block)
        Returns (loss: float, grads: dict like params, stats: dict). When T is trained, grads
        holds the discrete ∂L/∂T (eq. 6.1) and stats both it and the analytic one (eq. 6.2).
        Data-parallel training splits the same computation over processes (npflow.parallel,
        docs/parallel.md): loss_and_grad_part on each one's rows, loss_from_part on the sum.
        """
        part = self.loss_and_grad_part(x, rng, params=params, T=T)
        return self.loss_from_part(part, len(x), params=params, T=T)   # len: lists too

    def loss_and_grad_part(self, x, rng, rows=None, params=None, T=None, allreduce=None):
        """The part of rows ``(lo, hi)`` of the batch x (B, D) (default: all) in the loss of
        eq. 4.1 and its gradient: a model.Part with sums "nll" (and one per state term, e.g.
        RNODE's "kinetic", "jacobian") of per-sample terms over the rows, their gradient with
        the whole batch's cotangent (eq. 5.1a, 1/B per row) and, with trained end times,
        ∂L/∂T (eq. 6.1-6.2).

        The probes are drawn from rng for the whole batch (the same draws whatever the rows)
        and the rows keep theirs (docs/parallel.md, eq. 1.3); ``allreduce`` (see odeint) makes an
        adaptive solver's error norm cover the rows of every process, so the parts of any split
        of the batch add up to the part of the whole batch.
        """
        store = "caches" if fixed_grid(self.config["solver"]) else "states"
        B, Ts, terms, y, tape = self._solve_rows(x, rng, rows, params, T, allreduce, store)
        sums = {"nll": self._nll(y.z, y.logdet).sum(), **self._term_sums(y, terms)}
        ybar = self._terminal_cotangent(y, y.z / B, 1.0 / B, B, terms)          # eq. 5.1a
        grads, dT_sums, nfe_b = self._reverse(tape, ybar, Ts)
        sums.update(dT_sums)
        same = {"nfe_forward": float(sum(e[3].nfe for e in tape)), "nfe_backward": float(nfe_b)}
        return Part(sums, grads, same)

    def _solve_rows(self, x, rng, rows, params, T, allreduce, store=None):
        """The training forward pass of rows ``(lo, hi)`` (default all) of the batch x (B, D)
        with the training solver and the methods' state terms: returns (B, the end times Ts,
        the terms, y(T) of the last block, the tape); ``store`` as in odeint (None: its
        default)."""
        params = self.params if params is None else params
        cfg = self.config
        x = self._prepare(x)
        B = x.shape[0]
        lo, hi = check_rows(rows, B)
        terms = self.state_terms
        Ts = self.end_times(params, T)
        kw = self._solver_kwargs(cfg["solver"], cfg["steps"], cfg["rtol"], cfg["atol"])
        if store is not None:
            kw["store"] = store
        kw["allreduce"] = allreduce
        y, tape = self._flow_rows(x, rng, (lo, hi), params, Ts, terms, kw)
        return B, Ts, terms, y, tape

    def _flow_rows(self, x, rng, rows, params, Ts, terms, kw):
        """Solve every block forward from the rows lo:hi of x (B, D), the probes drawn for all
        B rows and sliced (eq. 1.1): returns (y(T) of the last block, the tape
        [("block", b, dyn, sol), ...])."""
        lo, hi = rows
        xr = x[lo:hi]
        y = self._initial_state(xr, terms)
        tape = []
        for b, net in enumerate(self.nets):
            eps, weight = self._probes(self.config["trace"], rng, x.shape[0])
            dyn = CNFDynamics(net, self.block_params(b, params), eps[:, lo:hi], weight, terms)
            sol = odeint(dyn, y, 0.0, Ts[b], **kw)
            tape.append(("block", b, dyn, sol))
            y = sol.y1
        return y, tape

    def _analytic_time_gradient(self, x, rng, params, rows, allreduce):
        """One block: one forward solve and the terminal formula (eq. 6.2), no backward."""
        if len(self.nets) > 1:
            return None
        B, Ts, terms, y1, tape = self._solve_rows(x, rng, rows, params, None, allreduce)
        ybar = self._terminal_cotangent(y1, y1.z / B, 1.0 / B, B, terms)
        return [float(to_host(terminal_time_gradient(tape[0][2], y1, Ts[0], ybar)))]

    # ---------------------------------------------------------------- evaluation
    def log_prob(self, x, params=None, solver="dopri5", steps=None, rtol=1e-5, atol=1e-5,
                 trace="exact", rng=None, batch_size=10000, return_nfe=False):
        """log p(x) (eq. 1.2) for x (N, D), by default with dopri5 and the exact trace.

        Returns an array (N,) on the model's device (and the mean NFE per batch if asked).
        """
        params = self.params if params is None else params
        if trace not in TRACE_KINDS:
            raise ValueError(f"unknown trace {trace!r}: expected one of {TRACE_KINDS}")
        if trace != "exact" and rng is None:
            raise ValueError("a Hutchinson trace needs an explicit rng")
        x = self._prepare(x)
        Ts = self.end_times(params)
        kw = self._solver_kwargs(solver, steps if steps is not None else self.config["steps"],
                                 rtol, atol)
        out, nfes = [], []
        for start in range(0, x.shape[0], batch_size):
            y, sols, _ = self._flow(x[start:start + batch_size], rng, params, Ts, trace, kw)
            out.append(-self._nll(y.z, y.logdet))
            nfes.append(sum(sol.nfe for sol in sols))
        lp = self.xp.concatenate(out)
        if return_nfe:
            return lp, float(np.mean(nfes))
        return lp

    def transform(self, x, params=None, inverse=False, solver="dopri5", steps=None,
                  rtol=1e-5, atol=1e-5):
        """x -> z(T) (or z -> x with inverse=True), without the log-determinant."""
        params = self.params if params is None else params
        x = self._prepare(x)
        Ts = self.end_times(params)
        kw = self._solver_kwargs(solver, steps if steps is not None else self.config["steps"],
                                 rtol, atol)
        order = range(len(self.nets) - 1, -1, -1) if inverse else range(len(self.nets))
        y = x
        for b in order:
            dyn = CNFDynamics(self.nets[b], self.block_params(b, params))
            t0, t1 = (Ts[b], 0.0) if inverse else (0.0, Ts[b])
            y = odeint(dyn, y, t0, t1, **kw).y1
        return y

    def sample(self, n, rng, params=None, solver="dopri5", steps=None, rtol=1e-5, atol=1e-5):
        """n samples: z ~ N(0, I) drawn from rng, integrated backwards from T to 0. (n, D)."""
        z = rng.standard_normal((check_int("the number of samples n", n), self.dim))
        return self.transform(z, params, inverse=True, solver=solver, steps=steps,
                              rtol=rtol, atol=atol)
