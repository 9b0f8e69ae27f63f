"""OT-Flow: a continuous normalizing flow driven by a potential (docs/otflow.md, section 4;
Onken et al. 2021).

The velocity is v = −∇ₓΦ/α0 with Φ the potential network of npflow/otflow_net.py, and the
augmented state (x, ℓ, L, R) of eq. 4.1 is integrated by npflow.odeint with classical RK4 on
[0, T], data at t = 0 flowing to z(T) ~ N(0, I):

    ẋ = −∇ₓΦ(x, t)/α0                                  x          (B, d)
    ℓ̇ = −tr ∇ₓ²Φ(x, t)/α0        (= tr ∂ẋ/∂x)           logdet     (B,)
    L̇ = ½‖ẋ‖²                     (transport cost)      transport  (B,)
    Ṙ = |∂ₜΦ − ‖∇ₓΦ‖²/(2α0)|      (HJB penalty)         hjb        (B,)

log p(x) = log N(z(T); 0, I) + ℓ(T)                                                (eq. 4.2)
loss = α0·mean L(T) + α1·mean C + α2·mean R(T),  C = ½‖z(T)‖² + (d/2) log 2π − ℓ(T) (eq. 4.3)

The sign of the HJB residual follows OT-Flow (its odefun: dr = |−∂ₜΦ + α0·½‖ẋ‖²|): with
v = −∇Φ/α0 the optimal potential satisfies −∂ₜΦ + ‖∇Φ‖²/(2α0) = 0 (docs/otflow.md, eq. 4.1).
All derivatives are hand-written (otflow_net.potential_backward, OTFlowDynamics.backward) and
the time integration is differentiated by the solver's discrete adjoint.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np  # host side only: the seed generator and the sampling noise

from .backend import get_array_module, to_host
from .model import FlowModel, Part, check_int, check_rows
from .otflow_net import init_potential, param_names, potential_backward, potential_forward
from .solvers import SolverError, odeint, terminal_time_gradient

__all__ = ["OTFlow", "OTFlowState", "OTFlowDynamics"]


class OTFlowState(NamedTuple):
    """Augmented OT-Flow state: x (B, d), logdet ℓ (B,), transport L (B,), hjb R (B,)."""
    x: object
    logdet: object
    transport: object
    hjb: object


class OTFlowDynamics:
    """The OT-Flow vector field F(y, t) of eq. 4.1 for npflow.odeint.

    params  the potential's parameters (otflow_net.param_names), no "T"
    dim     d, the dimension of x
    alpha0  α0, the weight of the transport cost (the velocity is −∇ₓΦ/α0)
    augmented  True: the state is an OTFlowState; False: the state is x alone (B, d) and only
               the velocity is computed (sampling, transforms; no trace)
    """

    def __init__(self, params, dim, alpha0=1.0, augmented=True):
        self.params = params
        self.dim = int(dim)
        self.alpha0 = float(alpha0)
        self.augmented = augmented

    def forward(self, t, y):
        """F(y, t) -> (dydt, cache) (eq. 4.1). y an OTFlowState, or x (B, d) if not augmented."""
        d, a0 = self.dim, self.alpha0
        x = y.x if self.augmented else y
        s = _concat(x, x[:, :1] * 0 + t)
        _, grad, tr, ncache = potential_forward(self.params, s, d, need_trace=self.augmented)
        gx = grad[:, :d]
        v = gx * (-1.0 / a0)
        if not self.augmented:
            return v, (ncache, None, None, None)
        r = grad[:, d] - (gx * gx).sum(axis=1) * (0.5 / a0)
        out = OTFlowState(v, tr * (-1.0 / a0), 0.5 * (v * v).sum(axis=1),
                          get_array_module(r).abs(r))
        return out, (ncache, v, gx, r)

    def backward(self, cache, ybar):
        """Adjoint of forward (eq. 4.4): cotangents of dydt -> (y_bar, params_bar, t_bar)."""
        ncache, v, gx, r = cache
        d, a0 = self.dim, self.alpha0
        if not self.augmented:
            grad_bar = _concat(ybar * (-1.0 / a0), ybar[:, :1] * 0)
            s_bar, pb = potential_backward(ncache, None, grad_bar, None)
            return s_bar[:, :d], pb, s_bar[:, d].sum()
        xb, lb, Lb, Rb = ybar
        vb = xb if xb is not None else v * 0
        if Lb is not None:                                        # L̇ = ½‖v‖²
            vb = vb + Lb[:, None] * v
        gx_bar = vb * (-1.0 / a0)                                 # v = −∇ₓΦ/α0
        if Rb is not None:                                        # Ṙ = |∂ₜΦ − ‖∇ₓΦ‖²/(2α0)|
            rb = Rb * get_array_module(r).sign(r)
            gx_bar = gx_bar - (rb * (1.0 / a0))[:, None] * gx
            gt_bar = rb
        else:
            gt_bar = r * 0
        tr_bar = None if lb is None else lb * (-1.0 / a0)         # ℓ̇ = −tr/α0
        grad_bar = _concat(gx_bar, gt_bar[:, None])
        s_bar, pb = potential_backward(ncache, None, grad_bar, tr_bar)
        zero = r * 0
        return OTFlowState(s_bar[:, :d], zero, zero, zero), pb, s_bar[:, d].sum()


def _concat(a, b):
    return get_array_module(a).concatenate([a, b], axis=1)


class OTFlow(FlowModel):
    """OT-Flow (Onken et al. 2021): potential flow with exact O(d) trace (docs/otflow.md).

    dim      d, the data dimension; data x has shape (B, d)
    width    m, the ResNet width (OT-Flow's m)
    depth    number of K layers (OT-Flow's nTh ≥ 2): an opening layer and depth−1 residual ones
    rank     r of A ∈ R^{r×(d+1)}; default min(10, d + 1)
    alpha    (α0, α1, α2): weights of transport L, NLL C and HJB penalty R (eq. 4.3)
    steps    RK4 steps on [0, T] used by loss_and_grad (log_prob/sample may use more)
    T        end time (t0 = 0); with train_T it starts there and params gains "T" (0-d)
    dtype, device, seed   precision, "cpu"/"gpu", seed of the initial parameters
    """

    def __init__(self, dim, width=32, depth=2, rank=None, alpha=(1.0, 100.0, 5.0), steps=8,
                 T=1.0, train_T=False, dtype="float32", device="cpu", seed=0):
        dim, width, depth, steps = (check_int(n, v, lo) for n, v, lo in (
            ("dim", dim, 1), ("width", width, 1), ("depth", depth, 1), ("steps", steps, 1)))
        rank = min(10, dim + 1) if rank is None else check_int("rank", rank)
        alpha = [float(a) for a in alpha]
        if dim < 1 or width < 1 or depth < 2:
            raise ValueError(f"OTFlow needs dim >= 1, width >= 1 and depth >= 2; got dim={dim}, "
                             f"width={width}, depth={depth}")
        if not 1 <= rank <= dim + 1:
            raise ValueError(f"OTFlow rank must be in [1, dim+1] = [1, {dim + 1}], got {rank}")
        if len(alpha) != 3 or alpha[0] <= 0 or min(alpha) < 0 or not all(map(math.isfinite,
                                                                               alpha)):
            raise ValueError(f"alpha must be three finite weights (α0 > 0, α1, α2 >= 0) of "
                             f"transport, NLL and HJB terms; got {alpha}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not (math.isfinite(float(T)) and float(T) > 0):
            raise ValueError(f"end time T must be a positive number, got {T}")
        config = dict(dim=dim, width=width, depth=depth, rank=rank, alpha=alpha, steps=steps,
                      T=float(T), train_T=bool(train_T), dtype=str(np.dtype(dtype)),
                      device=device, seed=int(seed))
        super().__init__(config, device, dtype)
        self.dim = dim
        rng = np.random.default_rng(seed)
        params = init_potential(dim, width, depth, rank, rng, self.dtype, self.xp)
        if train_T:
            params["T"] = self.xp.asarray(float(T), dtype=self.dtype)
        self.params = params

    # ---------------------------------------------------------------- helpers
    @property
    def time_names(self):
        """Names of the trained end times in params (["T"] when train_T, else [])."""
        return ["T"] if self.config["train_T"] else []

    def end_time(self, params=None):
        """The end time: params["T"] when trained, else config T."""
        params = self.params if params is None else params
        return params["T"] if self.config["train_T"] else self.config["T"]

    def potential_params(self, params=None):
        """The potential's parameters (params without "T")."""
        params = self.params if params is None else params
        return {k: params[k] for k in param_names(self.config["depth"])}

    def _prepare(self, x):
        """Validate data (B, d) and move it to the model's device and dtype (one host check)."""
        return self.prepare_data(x, (self.dim,))

    def _dynamics(self, params, augmented=True):
        return OTFlowDynamics(self.potential_params(params), self.dim, self.config["alpha"][0],
                              augmented)

    def _initial_state(self, x):
        zero = self.xp.zeros(x.shape[0], dtype=x.dtype)
        return OTFlowState(x, zero, zero, zero)

    def _nll(self, z, logdet):
        """Per-sample C = −log p(x) = ½‖z‖² + (d/2) log 2π − ℓ (eq. 4.2)."""
        return 0.5 * (z * z).sum(axis=1) + 0.5 * self.dim * math.log(2 * math.pi) - logdet

    def _check_steps(self, steps):
        steps = self.config["steps"] if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    # ---------------------------------------------------------------- training
    def loss_and_grad(self, x, rng=None, params=None):
        """Loss of eq. 4.3 on a batch and its exact gradient (discrete adjoint of RK4).

        x       data (B, d) (host or device array)
        rng     unused (OT-Flow's loss is deterministic); accepted for the common interface
        params  parameter dict (default self.params)
        Raises FloatingPointError when the state becomes NaN/Inf (the solver's SolverError),
        which npflow.training treats as a non-finite loss.
        Returns (loss: float, grads: dict like params, stats: dict with nll, transport, hjb,
        nfe_forward, nfe_backward, T (a list of one float, as every model's stats) and, when
        T is trained, dL_dT_discrete (= grads["T"], docs/solvers.md, eq. 2.10) and
        dL_dT_analytic (the terminal formula λ(T)·F(y(T), T), eq. 4.6)).
        Data-parallel training splits the same computation over processes (npflow.parallel,
        docs/parallel.md): loss_and_grad_part on each one's rows, loss_from_part on the sum.
        """
        part = self.loss_and_grad_part(x, rng, params=params)
        return self.loss_from_part(part, len(x), params=params)   # len: lists too

    def loss_and_grad_part(self, x, rng=None, rows=None, params=None, allreduce=None):
        """The part of rows ``(lo, hi)`` of the batch x (B, d) (default: all) in the loss of
        eq. 4.3 and its gradient: a model.Part with the row sums "nll", "transport", "hjb",
        their gradient with the whole batch's cotangent (eq. 4.5, 1/B per row) and, with a
        trained T, ∂L/∂T (docs/solvers.md eq. 2.10; eq. 4.6). rng and allreduce are unused (no
        randomness, fixed RK4 grid); accepted for the common interface."""
        params = self.params if params is None else params
        a0, a1, a2 = self.config["alpha"]
        x = self._prepare(x)
        B = x.shape[0]
        lo, hi = check_rows(rows, B)
        x = x[lo:hi]
        b = hi - lo
        xp = self.xp
        T = self.end_time(params)
        dyn = self._dynamics(params)
        try:
            sol = odeint(dyn, self._initial_state(x), 0.0, T, method="rk4",
                         steps=self.config["steps"], store="caches")
        except SolverError as exc:   # a NaN/Inf state: the training loop's non-finite stop
            raise FloatingPointError(f"OTFlow loss: {exc}") from exc
        y = sol.y1
        sums = {"nll": self._nll(y.x, y.logdet).sum(), "transport": y.transport.sum(),
                "hjb": y.hjb.sum()}
        dt = x.dtype
        ybar = OTFlowState(y.x * (a1 / B), xp.full((b,), -a1 / B, dtype=dt),   # eq. 4.5
                           xp.full((b,), a0 / B, dtype=dt), xp.full((b,), a2 / B, dtype=dt))
        g = sol.backward(ybar)
        grads = dict(g.params)
        if self.config["train_T"]:
            grads["T"] = xp.asarray(g.t1, dtype=dt).reshape(())
            sums["dL_dT_analytic"] = terminal_time_gradient(dyn, y, T, ybar)
        return Part(sums, grads, {"nfe_forward": float(sol.nfe), "nfe_backward": float(g.nfe)})

    def loss_from_part(self, part, B, params=None):
        """(loss, grads, stats) of loss_and_grad from the sum of the parts of a batch of B."""
        a0, a1, a2 = self.config["alpha"]
        m = {k: float(to_host(v)) / B for k, v in part.sums.items()
             if k in ("nll", "transport", "hjb")}
        loss = a0 * m["transport"] + a1 * m["nll"] + a2 * m["hjb"]
        stats = {"loss": loss, "nll": m["nll"], "transport": m["transport"], "hjb": m["hjb"],
                 "nfe_forward": int(round(part.same["nfe_forward"])),
                 "nfe_backward": int(round(part.same["nfe_backward"])),
                 "T": [float(to_host(self.end_time(params)))]}
        if self.config["train_T"]:
            stats["dL_dT_discrete"] = float(to_host(part.grads["T"]))
            stats["dL_dT_analytic"] = float(to_host(part.sums["dL_dT_analytic"]))
        return float(loss), dict(part.grads), stats

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, x, params=None, steps=None, batch_size=10000):
        """Mean costs on x (N, d) with `steps` RK4 steps (default: the training steps):
        dict of loss, nll, transport, hjb (eq. 4.3), floats."""
        params = self.params if params is None else params
        steps = self._check_steps(steps)
        a0, a1, a2 = self.config["alpha"]
        x = self._prepare(x)
        T = self.end_time(params)
        dyn = self._dynamics(params)
        tot = {"nll": 0.0, "transport": 0.0, "hjb": 0.0}
        for start in range(0, x.shape[0], batch_size):
            y = odeint(dyn, self._initial_state(x[start:start + batch_size]), 0.0, T,
                       method="rk4", steps=steps).y1
            tot["nll"] += float(self._nll(y.x, y.logdet).sum())
            tot["transport"] += float(y.transport.sum())
            tot["hjb"] += float(y.hjb.sum())
        out = {k: v / x.shape[0] for k, v in tot.items()}
        out["loss"] = a0 * out["transport"] + a1 * out["nll"] + a2 * out["hjb"]
        return out

    def log_prob(self, x, params=None, steps=None, batch_size=10000):
        """log p(x) (eq. 4.2) for x (N, d) with `steps` RK4 steps (default: the training
        steps; evaluation usually takes more). Returns (N,) on the model's device."""
        params = self.params if params is None else params
        steps = self._check_steps(steps)
        x = self._prepare(x)
        T = self.end_time(params)
        dyn = self._dynamics(params)
        out = []
        for start in range(0, x.shape[0], batch_size):
            y = odeint(dyn, self._initial_state(x[start:start + batch_size]), 0.0, T,
                       method="rk4", steps=steps).y1
            out.append(-self._nll(y.x, y.logdet))
        return self.xp.concatenate(out)

    def transform(self, x, params=None, inverse=False, steps=None):
        """x -> z(T) (or z -> x(0) with inverse=True) by RK4, without the log-determinant.
        x (N, d) -> (N, d)."""
        params = self.params if params is None else params
        steps = self._check_steps(steps)
        x = self._prepare(x)
        T = self.end_time(params)
        t0, t1 = (T, 0.0) if inverse else (0.0, T)
        return odeint(self._dynamics(params, augmented=False), x, t0, t1, method="rk4",
                      steps=steps).y1

    def sample(self, n, rng, params=None, steps=None):
        """n samples: z ~ N(0, I) drawn from rng (host), integrated from T back to 0. (n, d)."""
        z = rng.standard_normal((check_int("the number of samples n", n), self.dim))
        return self.transform(z, params, inverse=True, steps=steps)
