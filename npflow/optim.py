"""Optimisers and learning-rate schedules over parameter dicts (docs/training.md, sections 1-3).

Parameters are a dict name -> array (NumPy or CuPy); every update takes its array module from
the arrays themselves and never synchronises with the host: learning rates and bias
corrections are Python floats computed with ``math``, the gradient norm stays a 0-d array.

    Adam(params, lr, betas, eps, weight_decay, decoupled, schedule, ema_decay)
        .step(params, grads) -> new params dict (inputs are not mutated)
        .averaged(params) -> params with the owned keys replaced by their EMA (eq. 1.6)
        .state_dict() / .load_state_dict(state)     exact resume
    clip_grad_norm(grads, max_norm) -> (grads, norm)
    Warmup, StepDecay, ReduceOnPlateau, Chain       learning-rate factors

An optimiser owns only the keys it was built with: ``step`` passes every other entry of
``params`` through unchanged, so two optimisers can share one params dict (TO-FLOW: one Adam
on the network weights, another on the end time T).
"""
from __future__ import annotations

import math

from .backend import get_array_module, to_device, to_host

__all__ = ["adam_update", "Adam", "clip_grad_norm", "global_norm", "Warmup", "StepDecay",
           "Cosine", "ReduceOnPlateau", "Chain", "Constant"]


# --------------------------------------------------------------------------------------------
# Adam (eq. 1.1-1.5)

def adam_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=True):
    """One Adam update of a single array; returns (p_new, m_new, v_new). Inputs not mutated.

    p, g, m, v: arrays of one shape; step: the 1-based index t of this update; lr, beta1,
    beta2, eps, weight_decay: Python floats.

        g  <- g + wd·p                  (only if not decoupled: L2 penalty, torch.optim.Adam)
        m_t = β1 m_{t-1} + (1 − β1) g                                           (eq. 1.1)
        v_t = β2 v_{t-1} + (1 − β2) g²                                          (eq. 1.2)
        m̂_t = m_t / (1 − β1^t),  v̂_t = v_t / (1 − β2^t)                        (eq. 1.3)
        p_t = p_{t-1} − lr·m̂_t / (√v̂_t + eps)                                  (eq. 1.4)
        p_t <- p_t − lr·wd·p_{t-1}      (decoupled weight decay, AdamW)          (eq. 1.5)
    """
    xp = get_array_module(p, g)
    if weight_decay and not decoupled:
        g = g + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    # lr·m̂/(√v̂ + eps) with the corrections folded into two scalars (same value as eq. 1.4)
    denom = xp.sqrt(v) * (1.0 / math.sqrt(bc2)) + eps
    new = p - (lr / bc1) * (m / denom)
    if weight_decay and decoupled:
        new = new - (lr * weight_decay) * p
    return new.astype(p.dtype, copy=False), m, v


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction and optional weight decay (eq. 1.1-1.5).

    params: dict name -> array, the entries this optimiser owns (its moments are zeros like
        them). lr: base learning rate; betas: (β1, β2); eps: added to √v̂;
    weight_decay: decay coefficient; decoupled: True -> AdamW (eq. 1.5), False -> L2 added to
        the gradient like torch.optim.Adam's weight_decay (FFJORD's optimiser).
    schedule: optional schedule whose ``factor(step)`` multiplies lr (step = 0-based count of
        updates done so far); None means a constant lr.
    ema_decay: γ in [0, 1) of an exponential moving average of the owned parameters, updated
        after every step (eq. 1.6; 0: none). ``averaged(params)`` gives the averaged parameters
        (what to evaluate and sample with); the average is part of ``state_dict``.
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = True, schedule=None,
                 ema_decay: float = 0.0):
        if not isinstance(params, dict) or not params:
            raise ValueError("Adam needs a non-empty dict name -> array of parameters, got "
                             f"{type(params).__name__} {params!r:.80}")
        b1, b2 = (float(b) for b in betas)
        if not (lr >= 0.0 and 0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0 and eps >= 0.0
                and weight_decay >= 0.0):
            raise ValueError(f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay} (need lr, eps, weight_decay >= 0 "
                             "and 0 <= beta < 1)")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no average), got {ema_decay}")
        self.ema_decay = float(ema_decay)
        # eq. 1.6: the average starts at the initial parameters (a copy: never aliased)
        self.ema = ({k: a.copy() for k, a in params.items()} if self.ema_decay else None)
        self.lr, self.betas, self.eps = float(lr), (b1, b2), float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)
        self.schedule = schedule
        self.keys = tuple(params)
        self.m = {k: get_array_module(a).zeros_like(a) for k, a in params.items()}
        self.v = {k: get_array_module(a).zeros_like(a) for k, a in params.items()}
        self.t = 0  # number of updates done

    def current_lr(self) -> float:
        """The learning rate the next update will use: lr · schedule.factor(t)."""
        if self.schedule is None:
            return self.lr
        return self.lr * self.schedule.factor(self.t)

    def step(self, params: dict, grads: dict) -> dict:
        """Apply one update to the owned keys; return a new dict (other entries passed through).

        params: dict holding at least the owned keys; grads: dict holding the owned keys, arrays
        of the same shapes.
        """
        missing = [k for k in self.keys if k not in params or k not in grads]
        if missing:
            raise KeyError(f"Adam.step: parameters or gradients missing for {missing}; the "
                           f"optimiser owns {list(self.keys)}")
        lr = self.current_lr()
        step = self.t + 1
        b1, b2 = self.betas
        out = dict(params)
        for k in self.keys:
            p, g = params[k], grads[k]
            if getattr(g, "shape", ()) != getattr(p, "shape", ()):
                raise ValueError(f"Adam.step: gradient of {k!r} has shape "
                                 f"{getattr(g, 'shape', ())}, parameter has {p.shape}")
            out[k], self.m[k], self.v[k] = adam_update(
                p, g, self.m[k], self.v[k], step, lr, b1, b2, self.eps,
                self.weight_decay, self.decoupled)
            if self.ema is not None:     # eq. 1.6: p̄_t = γ p̄_{t−1} + (1 − γ) p_t
                g_ = self.ema_decay
                self.ema[k] = (g_ * self.ema[k] + (1.0 - g_) * out[k]).astype(p.dtype,
                                                                               copy=False)
        self.t = step
        return out

    def averaged(self, params: dict) -> dict:
        """A new dict: ``params`` with every owned key replaced by its moving average p̄_t
        (eq. 1.6); the other entries passed through. Without ``ema_decay`` it raises."""
        if self.ema is None:
            raise ValueError("this Adam keeps no parameter average: build it with "
                             "ema_decay > 0")
        out = dict(params)
        out.update({k: a.copy() for k, a in self.ema.items()})
        return out

    # -- state for checkpoints (exact resume) -------------------------------------------------
    def state_dict(self) -> dict:
        """Everything ``load_state_dict`` needs: settings, step count, moments (host arrays)."""
        return {
            "type": "Adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
            "weight_decay": self.weight_decay, "decoupled": self.decoupled, "t": self.t,
            "keys": list(self.keys),
            "m": {k: to_host(a) for k, a in self.m.items()},
            "v": {k: to_host(a) for k, a in self.v.items()},
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            **({} if self.ema is None else {
                "ema_decay": self.ema_decay,
                "ema": {k: to_host(a) for k, a in self.ema.items()}}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore moments, step count and schedule state; the moments keep this optimiser's
        device and dtype. Raises ValueError if the keys or shapes differ."""
        if state.get("type") != "Adam":
            raise ValueError(f"not an Adam state (type {state.get('type')!r})")
        keys = list(state["keys"])
        if sorted(keys) != sorted(self.keys):
            raise ValueError(f"Adam state is for parameters {sorted(keys)}, this optimiser owns "
                             f"{sorted(self.keys)}")
        saved_ema = state.get("ema")
        if (saved_ema is None) != (self.ema is None):
            raise ValueError("the saved Adam state " + ("has" if self.ema is None else "has no")
                             + " parameter average but this optimiser "
                             + ("keeps none" if self.ema is None else "keeps one")
                             + ": build it with the same ema_decay as the saved run")
        for name in ("m", "v") + (("ema",) if saved_ema is not None else ()):
            mine = getattr(self, name)
            for k in self.keys:
                a = state[name][k]
                if tuple(a.shape) != tuple(mine[k].shape):
                    raise ValueError(f"Adam state {name}[{k!r}] has shape {tuple(a.shape)}, "
                                     f"parameter has {tuple(mine[k].shape)}")
                xp = get_array_module(mine[k])
                mine[k] = to_device(a, xp, mine[k].dtype)
        self.lr, self.betas, self.eps = float(state["lr"]), tuple(state["betas"]), state["eps"]
        self.weight_decay, self.decoupled = float(state["weight_decay"]), bool(state["decoupled"])
        self.t = int(state["t"])
        if saved_ema is not None:
            self.ema_decay = float(state["ema_decay"])
        if state.get("schedule") is not None:
            if self.schedule is None:
                raise ValueError("the saved Adam state has a schedule but this optimiser has "
                                 "none; build it with the same schedule")
            self.schedule.load_state_dict(state["schedule"])


# --------------------------------------------------------------------------------------------
# gradient clipping (eq. 2.1-2.2)

def global_norm(grads: dict, keys=None):
    """‖g‖ = sqrt(Σ_k Σ g_k²) over the arrays of ``grads`` (eq. 2.1), as a 0-d array (no sync).

    keys: the entries to include (default all)."""
    keys = list(grads) if keys is None else list(keys)
    if not keys:
        raise ValueError("global_norm of an empty gradient dict")
    xp = get_array_module(*(grads[k] for k in keys))
    total = None
    for k in keys:
        g = grads[k]
        s = xp.sum(g * g)
        total = s if total is None else total + s
    return xp.sqrt(total)


def clip_grad_norm(grads: dict, max_norm, keys=None):
    """Scale the gradients so that their global norm is at most ``max_norm`` (eq. 2.2).

    grads: dict name -> array; max_norm: float, or None / inf for "measure only";
    keys: entries to measure and scale (default all; the others are passed through).
    Returns (new grads dict, norm before clipping as a 0-d array). Like PyTorch's
    clip_grad_norm_: scale = min(1, max_norm / (‖g‖ + 1e-6)), computed on the device.
    """
    keys = list(grads) if keys is None else list(keys)
    norm = global_norm(grads, keys)
    if max_norm is None or math.isinf(max_norm):
        return dict(grads), norm
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    xp = get_array_module(norm)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6))
    out = dict(grads)
    for k in keys:
        out[k] = (grads[k] * scale).astype(grads[k].dtype, copy=False)
    return out, norm


# --------------------------------------------------------------------------------------------
# learning-rate schedules (eq. 3.1-3.5): factor(step) multiplies the base lr

class Constant:
    """factor = 1."""

    def factor(self, step: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {"type": "Constant"}

    def load_state_dict(self, state: dict) -> None:
        pass


class Warmup(Constant):
    """Linear warm-up: factor = min(1, (step + 1) / iters) (eq. 3.1); FFJORD's MNIST uses 1000."""

    def __init__(self, iters: int):
        if iters < 0:
            raise ValueError(f"warm-up length must be >= 0, got {iters}")
        self.iters = int(iters)

    def factor(self, step: int) -> float:
        if self.iters == 0:
            return 1.0
        return min(1.0, (step + 1) / self.iters)

    def state_dict(self) -> dict:
        return {"type": "Warmup", "iters": self.iters}


class StepDecay(Constant):
    """Step decay: factor = gamma^floor(step / every) (eq. 3.2); gamma = 0.5 halves the lr
    (OT-Flow's toy runs halve it every 100 iterations)."""

    def __init__(self, every: int, gamma: float = 0.5):
        if every <= 0 or not gamma > 0:
            raise ValueError(f"StepDecay needs every > 0 and gamma > 0, got {every}, {gamma}")
        self.every, self.gamma = int(every), float(gamma)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.every)

    def state_dict(self) -> dict:
        return {"type": "StepDecay", "every": self.every, "gamma": self.gamma}


class Cosine(Constant):
    """Half-cosine decay over ``total`` updates (eq. 3.5):
    factor = floor + (1 − floor)·½(1 + cos(π·min(step, total)/total)), from 1 at step 0 to
    ``floor`` at step ``total`` and after."""

    def __init__(self, total: int, floor: float = 0.0):
        if total <= 0 or not 0.0 <= floor <= 1.0:
            raise ValueError(f"Cosine needs total > 0 and 0 <= floor <= 1, got {total}, {floor}")
        self.total, self.floor = int(total), float(floor)

    def factor(self, step: int) -> float:
        r = min(step, self.total) / self.total
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * r))

    def state_dict(self) -> dict:
        return {"type": "Cosine", "total": self.total, "floor": self.floor}


class ReduceOnPlateau(Constant):
    """Multiply the lr by ``gamma`` when a monitored (validation) loss has not improved by more
    than ``threshold`` (relative) for ``patience`` consecutive calls of ``update`` (eq. 3.3);
    the factor never goes below ``min_factor``.

    Call ``update(loss)`` once per evaluation (a host float; this is the one place the
    controller decides). Returns True when the lr was just reduced.
    """

    def __init__(self, gamma: float = 0.5, patience: int = 10, threshold: float = 1e-4,
                 min_factor: float = 0.0):
        if not 0.0 < gamma < 1.0 or patience < 0:
            raise ValueError(f"ReduceOnPlateau needs 0 < gamma < 1, patience >= 0; got "
                             f"{gamma}, {patience}")
        self.gamma, self.patience = float(gamma), int(patience)
        self.threshold, self.min_factor = float(threshold), float(min_factor)
        self.best = math.inf
        self.stale = 0
        self.scale = 1.0

    def update(self, loss: float) -> bool:
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"ReduceOnPlateau.update got a non-finite loss {loss}")
        if loss < self.best - self.threshold * abs(self.best) or self.best == math.inf:
            self.best, self.stale = loss, 0
            return False
        self.stale += 1
        if self.stale > self.patience:
            self.scale = max(self.min_factor, self.scale * self.gamma)
            self.stale = 0
            return True
        return False

    def factor(self, step: int) -> float:
        return self.scale

    def state_dict(self) -> dict:
        return {"type": "ReduceOnPlateau", "gamma": self.gamma, "patience": self.patience,
                "threshold": self.threshold, "min_factor": self.min_factor,
                "best": self.best if math.isfinite(self.best) else None,
                "stale": self.stale, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.stale, self.scale = int(state["stale"]), float(state["scale"])


class Chain(Constant):
    """Product of several schedules' factors (eq. 3.4), e.g. Chain(Warmup(1000), StepDecay(...))."""

    def __init__(self, *schedules):
        self.schedules = list(schedules)

    def factor(self, step: int) -> float:
        f = 1.0
        for s in self.schedules:
            f *= s.factor(step)
        return f

    def state_dict(self) -> dict:
        return {"type": "Chain", "parts": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict) -> None:
        parts = state["parts"]
        if len(parts) != len(self.schedules):
            raise ValueError(f"Chain state has {len(parts)} parts, this chain "
                             f"{len(self.schedules)}")
        for s, st in zip(self.schedules, parts):
            s.load_state_dict(st)
