"""The incumbent: FFJORD's toy CNF in PyTorch + torchdiffeq, for timing and cross-checking npflow.

Written here from the math of FFJORD's toy set-up (Grathwohl et al. 2019), not copied:

- dynamics f(z, t; θ): an ODEnet of ConcatSquashLinear layers D-64-64-64-D with tanh between
  layers (none after the last), each layer
      y = (W x + b) ⊙ sigmoid(W_g t + b_g) + W_b t                                        (1)
  with W_g (n_out, 1), b_g (n_out,), W_b (n_out, 1) (no bias on the hyper-bias term);
- augmented state (z, ℓ): dz/dt = f(z, t), dℓ/dt = tr ∂f/∂z, z(t0) = x, ℓ(t0) = 0         (2)
  (npflow's sign convention, docs/cnf.md eq. 1.2; FFJORD integrates −tr and subtracts);
- exact trace by D autograd passes, as FFJORD's ``divergence_bf``:
      tr ∂f/∂z = Σ_i [∂(Σ_b f_i)/∂z]_{:, i}                                              (3)
  each pass with create_graph=True so the trace itself can be differentiated;
- loss = mean_b(½‖z_b(T)‖² + (D/2) log 2π − ℓ_b(T))                                       (4)
  (for D = 2 the constant is log 2π);
- fixed-grid solve on [0, T], T = 0.5, by torchdiffeq's ``odeint`` (NOT ``odeint_adjoint``):
  the gradient is backprop through the solver's operations (discretize-then-optimize), as
  npflow's discrete adjoint.

Which Runge-Kutta rule runs: torchdiffeq's method "rk4" with ``options=dict(step_size=h)`` is
Kutta's **3/8 rule** (``rk4_alt_step_func``: c = (0, 1/3, 2/3, 1), b = (1, 3, 3, 1)/8), the
same as npflow's ``"rk38"``. npflow's ``"rk4"`` is the classical rule (c = (0, ½, ½, 1),
b = (1, 2, 2, 1)/6); torchdiffeq has no fixed-grid classical RK4 method, so ``solver="rk4_classical"``
here runs a small hand-written fixed-grid loop over the classical tableau instead of torchdiffeq
(same 4 evaluations per step). ``solver="midpoint"`` / ``"euler"`` use torchdiffeq's.

Optimiser: ``torch.optim.Adam(lr=1e-3, weight_decay=1e-5)`` as FFJORD's train_toy.py (L2 added to
the gradient, "coupled"); ``optimizer="adamw"`` gives decoupled weight decay as npflow's Adam.
The arithmetic cost of either is negligible next to the solve.

Only the bench extra needs torch (``pip install -e .[bench]``; see bench/README.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torchdiffeq import odeint

__all__ = ["ConcatSquashLinear", "ODEnet", "ODEfunc", "TorchCNF", "make_optimizer",
           "load_npflow_params", "npflow_param_names", "grads_as_npflow", "train_step",
           "SOLVERS"]

# solver name here -> (torchdiffeq method or None for the hand-written loop, evaluations/step)
SOLVERS = {"rk38": ("rk4", 4), "rk4_classical": (None, 4), "midpoint": ("midpoint", 2),
           "euler": ("euler", 1)}


class ConcatSquashLinear(nn.Module):
    """eq. (1): y = (W x + b) ⊙ sigmoid(W_g t + b_g) + W_b t; x (B, n_in) -> y (B, n_out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self._layer = nn.Linear(n_in, n_out)
        self._hyper_gate = nn.Linear(1, n_out)
        self._hyper_bias = nn.Linear(1, n_out, bias=False)

    def forward(self, t, x):
        tt = t.view(1, 1)
        return self._layer(x) * torch.sigmoid(self._hyper_gate(tt)) + self._hyper_bias(tt)


class ODEnet(nn.Module):
    """f(z, t): ConcatSquashLinear layers dim-hidden...-dim, tanh between layers (not after the last)."""

    def __init__(self, dim=2, hidden=(64, 64, 64)):
        super().__init__()
        sizes = (dim,) + tuple(hidden) + (dim,)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t, z):
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = torch.tanh(h)
        return h


def divergence_exact(f, z):
    """eq. (3): tr ∂f/∂z by D autograd passes (create_graph so the trace is differentiable).

    f (B, D) computed from z (B, D) -> (B,)."""
    total = 0.0
    for i in range(z.shape[1]):
        g = torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0]
        total = total + g[:, i]
    return total


class ODEfunc(nn.Module):
    """Augmented dynamics eq. (2): (z, ℓ) -> (f(z, t), tr ∂f/∂z); counts evaluations in ``nfe``."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, t, state):
        z = state[0]
        self.nfe += 1
        with torch.enable_grad():
            if not z.requires_grad:  # e.g. at t0 when x is data: the trace needs a graph to z
                z = z.detach().requires_grad_(True)
            t = torch.as_tensor(t, dtype=z.dtype)
            f = self.net(t, z)
            div = divergence_exact(f, z)
        return f, div


# classical RK4 tableau (used only by the hand-written loop; torchdiffeq's "rk4" is the 3/8 rule)
_RK4_C = (0.0, 0.5, 0.5, 1.0)
_RK4_A = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
_RK4_B = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


def _rk4_classical(func, y0, T, steps):
    """Fixed-grid classical RK4 on [0, T] for a tuple state; every op recorded by autograd."""
    h = T / steps
    y = y0
    for n in range(steps):
        t = n * h
        ks = []
        for c, a in zip(_RK4_C, _RK4_A):
            yi = tuple(yj + h * sum(aij * k[j] for aij, k in zip(a, ks) if aij != 0.0)
                       if any(aij != 0.0 for aij in a) else yj
                       for j, yj in enumerate(y))
            ks.append(func(torch.tensor(t + c * h, dtype=y[0].dtype), yi))
        y = tuple(yj + h * sum(b * k[j] for b, k in zip(_RK4_B, ks)) for j, yj in enumerate(y))
    return y


class TorchCNF(nn.Module):
    """The toy CNF of FFJORD in PyTorch: z(T) and ℓ(T) by a fixed-grid solve, loss eq. (4).

    Args:
        dim: data dimension D.  hidden: hidden widths.  T: end time (fixed).
        solver: "rk38" (torchdiffeq "rk4", the 3/8 rule), "rk4_classical", "midpoint", "euler".
        steps: number of fixed steps (step size T/steps).  dtype: torch dtype.
    """

    def __init__(self, dim=2, hidden=(64, 64, 64), T=0.5, solver="rk38", steps=8,
                 dtype=torch.float32, seed=0):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
        torch.manual_seed(seed)
        self.dim, self.T, self.solver, self.steps = int(dim), float(T), solver, int(steps)
        self.odefunc = ODEfunc(ODEnet(dim, hidden))
        self.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        """x (B, D) -> z(T) (B, D), ℓ(T) (B,)."""
        l0 = torch.zeros(x.shape[0], dtype=x.dtype)
        method, _ = SOLVERS[self.solver]
        if method is None:
            zT, lT = _rk4_classical(self.odefunc, (x, l0), self.T, self.steps)
            return zT, lT
        t = torch.tensor([0.0, self.T], dtype=x.dtype)
        zs, ls = odeint(self.odefunc, (x, l0), t, method=method,
                        options=dict(step_size=self.T / self.steps))
        return zs[-1], ls[-1]

    def loss(self, x):
        """eq. (4): mean NLL of x (B, D)."""
        zT, lT = self(x)
        return (0.5 * (zT * zT).sum(1) + 0.5 * self.dim * math.log(2 * math.pi) - lT).mean()


def make_optimizer(model, lr=1e-3, weight_decay=1e-5, kind="adam"):
    """FFJORD's toy optimiser: Adam(lr 1e-3, weight decay 1e-5); kind="adamw" for decoupled decay."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_step(model, opt, x):
    """One training iteration: forward solve, backward through the solver, optimiser step.

    Returns the loss as a Python float (as npflow's loss_and_grad does)."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x)
    loss.backward()
    opt.step()
    return loss.item()


# ---- parameter mapping to npflow's ODENet (npflow/odenet.py: flat names "<layer>.<param>";
#      npflow.CNF prefixes its block: "b0.0.weight", ...) ----

_NAME_MAP = {  # npflow parameter suffix -> (torch submodule, attribute)
    "weight": ("_layer", "weight"),                   # W   (n_out, n_in)
    "bias": ("_layer", "bias"),                       # b   (n_out,)
    "gate.weight": ("_hyper_gate", "weight"),         # W_g npflow (n_out,), torch (n_out, 1)
    "gate.bias": ("_hyper_gate", "bias"),             # b_g (n_out,)
    "hyper_bias.weight": ("_hyper_bias", "weight"),   # W_b npflow (n_out,), torch (n_out, 1)
}


def npflow_param_names(model, prefix="b0."):
    """The torch parameter for each npflow name: dict npflow name -> torch.nn.Parameter.

    prefix: npflow.CNF's block prefix ("b0." for its single block; "" for a bare ODENet)."""
    out = {}
    for i, layer in enumerate(model.odefunc.net.layers):
        for suffix, (sub, attr) in _NAME_MAP.items():
            out[f"{prefix}{i}.{suffix}"] = getattr(getattr(layer, sub), attr)
    return out


def load_npflow_params(model, params, prefix="b0."):
    """Copy npflow parameters (dict name -> array) into the torch model, in place.

    Vectors of shape (n_out,) fill torch's (n_out, 1) hyper-net weights. Raises ValueError
    naming any npflow entry it cannot place, any size mismatch and any torch parameter left
    unset."""
    import numpy as np

    targets = npflow_param_names(model, prefix)
    unset = set(targets)
    with torch.no_grad():
        for name, value in params.items():
            if name not in targets:
                raise ValueError(f"npflow parameter {name!r} has no torch counterpart "
                                 f"(known: {sorted(targets)})")
            p = targets[name]
            a = np.asarray(value)
            if a.size != p.numel():
                raise ValueError(f"{name!r}: npflow shape {a.shape} vs torch {tuple(p.shape)}")
            p.copy_(torch.from_numpy(a.reshape(tuple(p.shape)).copy()).to(p.dtype))
            unset.discard(name)
    if unset:
        raise ValueError(f"torch parameters not set from npflow params: {sorted(unset)}")


def grads_as_npflow(model, prefix="b0."):
    """The torch gradients (after backward) under npflow's names and shapes (numpy arrays)."""
    out = {}
    for name, p in npflow_param_names(model, prefix).items():
        g = p.grad
        out[name] = None if g is None else g.detach().numpy().reshape(-1 if p.shape[1:] == (1,)
                                                                      else p.shape).copy()
    return out
