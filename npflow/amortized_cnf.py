"""FFJORD's amortized low-rank CNF posterior for the VAE (docs/vae.md, section 5).

One block b integrates, for every sample n of the batch with its own parameters (U, V, c)_n
from the encoder,

    dz/dt = f_n(z, t),   dℓ/dt = tr ∂f_n/∂z   (exact: the d basis tangents)     (eq. 5.1)

on [0, T] with z(0) = z_0 and ℓ(0) = 0, so log q(z(T)) = log q(z_0) − ℓ(T). The network f_n
is an MLP h_0 = z, h_{i+1} = tanh(L_i(h_i)), f = L_{last}(h_last) whose affine layers are a
shared ConcatLinear layer plus a per-sample rank-r correction and bias:

    L_i(h) = W_i h + t w_i + b_i + U_{n,i} (V_{n,i}ᵀ h) + c_{n,i}                   (eq. 5.2)

(W_i (n_out, n_in), w_i, b_i (n_out,) shared; U_{n,i} (n_out, r), V_{n,i} (n_in, r),
c_{n,i} (n_out,) per sample: FFJORD's ``cnf_rank`` amortization, written from its
description). The tangents ḣ_k (exact trace) pass through the linear part only
(L_i(ḣ) without t, b, c), and the backward is the exact reverse, eq. 5.3; activations use
npflow.layers' stacked rules (second-order terms included). Integration and gradient come
from npflow.odeint and its discrete adjoint, through npflow.cnf.CNFDynamics.
"""
from __future__ import annotations

import math

from .backend import get_array_module, resolve_dtype
from .cnf import CNFDynamics, CNFState
from .layers import get_activation, stack_cotangents, stack_tangents, unstack_tangents
from .solvers import odeint
from . import trace as trace_mod

__all__ = ["LowRankODENet", "AmortizedCNF"]


class LowRankODENet:
    """f_n(z, t) of eq. 5.2 with per-sample low-rank corrections; the layer interface of
    npflow.layers (forward with K tangents, backward with need_xdotbar), so CNFDynamics can
    drive it.

    params (one flat dict): shared "i.weight" (n_out, n_in), "i.tweight" (n_out,),
    "i.bias" (n_out,); per sample "i.U" (B, n_out, r), "i.V" (B, n_in, r), "i.c" (B, n_out).
    """

    def __init__(self, dims, rank=1, activation="tanh"):
        self.dims = tuple(int(d) for d in dims)
        self.rank = int(rank)
        self.activation = get_activation(activation)
        self.n_layers = len(self.dims) - 1

    def shared_shapes(self):
        return {**{f"{i}.weight": (self.dims[i + 1], self.dims[i]) for i in range(self.n_layers)},
                **{f"{i}.tweight": (self.dims[i + 1],) for i in range(self.n_layers)},
                **{f"{i}.bias": (self.dims[i + 1],) for i in range(self.n_layers)}}

    def sample_shapes(self):
        """Per-sample parameter shapes (without the batch axis)."""
        out = {}
        for i in range(self.n_layers):
            n_in, n_out = self.dims[i], self.dims[i + 1]
            out[f"{i}.U"] = (n_out, self.rank)
            out[f"{i}.V"] = (n_in, self.rank)
            out[f"{i}.c"] = (n_out,)
        return out

    def init_shared(self, rng, dtype, xp):
        """PyTorch's ConcatLinear initialisation U(±1/√(n_in + 1)), drawn on the host."""
        p = {}
        for i in range(self.n_layers):
            n_in, n_out = self.dims[i], self.dims[i + 1]
            bound = 1.0 / math.sqrt(n_in + 1)
            W = rng.uniform(-bound, bound, (n_out, n_in + 1))
            p[f"{i}.weight"] = xp.asarray(W[:, :n_in], dtype=dtype)
            p[f"{i}.tweight"] = xp.asarray(W[:, n_in], dtype=dtype)
            p[f"{i}.bias"] = xp.asarray(rng.uniform(-bound, bound, n_out), dtype=dtype)
        return p

    # eq. 5.2 on the stack h (K+1, B, n_in): row 0 the primal, rows 1.. the tangents
    def _layer_forward(self, params, i, h, t):
        xp = get_array_module(h)
        W, U, V = params[f"{i}.weight"], params[f"{i}.U"], params[f"{i}.V"]
        K1, B, n_in = h.shape
        y = (h.reshape(K1 * B, n_in) @ W.T).reshape(K1, B, W.shape[0])
        a = xp.einsum("kbi,bir->kbr", h, V)
        y += xp.einsum("kbr,bor->kbo", a, U)
        y[0] += t * params[f"{i}.tweight"] + params[f"{i}.bias"] + params[f"{i}.c"]
        return y, (h, a)

    def _layer_backward(self, params, i, ybar, cache, t):
        """eq. 5.3: W̄ = Σ_{k,n} ȳ_k h_kᵀ, w̄ = t Σ_n ȳ_0, b̄ = Σ_n ȳ_0, c̄_n = ȳ_{0,n},
        ā = Uᵀȳ, Ū_n = Σ_k ȳ_k a_kᵀ, V̄_n = Σ_k h_k ā_kᵀ, h̄ = Wᵀȳ + V ā, t̄ = wᵀ Σ_n ȳ_0."""
        xp = get_array_module(ybar)
        h, a = cache
        W, U, V = params[f"{i}.weight"], params[f"{i}.U"], params[f"{i}.V"]
        K1, B, n_out = ybar.shape
        n_in = h.shape[2]
        yb = ybar.reshape(K1 * B, n_out)
        g = {f"{i}.weight": yb.T @ h.reshape(K1 * B, n_in)}
        s0 = ybar[0].sum(axis=0)
        g[f"{i}.bias"] = s0
        g[f"{i}.tweight"] = t * s0
        g[f"{i}.c"] = ybar[0]
        abar = xp.einsum("bor,kbo->kbr", U, ybar)
        g[f"{i}.U"] = xp.einsum("kbo,kbr->bor", ybar, a)
        g[f"{i}.V"] = xp.einsum("kbi,kbr->bir", h, abar)
        hbar = (yb @ W).reshape(K1, B, n_in) + xp.einsum("bir,kbr->kbi", V, abar)
        tbar = params[f"{i}.tweight"] @ s0
        return hbar, g, tbar

    def forward(self, params, x, xdot, t):
        """x (B, d), xdot (K, B, d) or None, t a float -> (f (B, d), ḟ (K, B, d) or None, cache)."""
        h = stack_tangents(x, xdot, "LowRankODENet")
        K = h.shape[0] - 1
        caches = []
        for i in range(self.n_layers):
            h, c = self._layer_forward(params, i, h, t)
            caches.append(c)
            if i < self.n_layers - 1:
                h, c = self.activation.forward_stacked(None, h, t)
                caches.append(c)
        y, ydot = unstack_tangents(h, K)
        return y, ydot, (caches, K, x, t, params)

    def backward(self, ybar, ydotbar, cache, need_xdotbar=True):
        """Reverse of forward: -> (x̄ (B, d), ẋ̄ or None, params_bar, t̄)."""
        caches, K, x, t, params = cache
        xp = get_array_module(x)
        hbar = stack_cotangents(ybar, ydotbar, (x.shape[0], self.dims[-1]), K, x.dtype, xp)
        grads = {}
        tbar = xp.zeros((), dtype=x.dtype)
        ci = len(caches) - 1
        for i in range(self.n_layers - 1, -1, -1):
            hbar, g, tb = self._layer_backward(params, i, hbar, caches[ci], t)
            ci -= 1
            grads.update(g)
            tbar = tbar + tb
            if i > 0:
                hbar, _, _ = self.activation.backward_stacked(hbar, caches[ci])
                ci -= 1
        xbar, xdotbar = unstack_tangents(hbar, K)
        return xbar, (xdotbar if need_xdotbar else None), grads, tbar


class AmortizedCNF:
    """``num_blocks`` amortized CNF blocks (eq. 5.1-5.2) as a VAE posterior flow.

    D       latent size d;  hidden: widths of each block's network;  rank: r
    T       end time of every block (t0 = 0);  solver, steps: npflow.odeint's fixed grid
            ("rk4", "euler", "midpoint", ...) or "dopri5" (steps unused)

    Interface used by npflow.vae.VAE:
      param_shapes() -> {"b{b}.{i}.U": (n_out, r), ...}   per-sample raw parameters
      init_shared(rng, dtype, xp) -> {"b{b}.{i}.weight": ...}   shared parameters
      forward(z, p, shared) -> (z_T (B, d), logdet ℓ(T) (B,), cache)
      backward(cache, z_bar, logdet_bar) -> (z0_bar, p_bar, shared_bar)
    """

    def __init__(self, D, num_blocks=1, hidden=(64, 64), rank=1, T=0.5, steps=4,
                 solver="rk4", activation="tanh"):
        self.D, self.num_blocks = int(D), int(num_blocks)
        if self.num_blocks < 1 or int(rank) < 1 or not T > 0 or int(steps) < 1:
            raise ValueError(f"AmortizedCNF: need num_blocks, rank, steps >= 1 and T > 0, got "
                             f"{num_blocks}, {rank}, {steps}, {T}")
        self.net = LowRankODENet((self.D,) + tuple(int(h) for h in hidden) + (self.D,),
                                 rank=rank, activation=activation)
        self.T, self.steps, self.solver = float(T), int(steps), solver

    def param_shapes(self):
        return {f"b{b}.{k}": s for b in range(self.num_blocks)
                for k, s in self.net.sample_shapes().items()}

    def init_shared(self, rng, dtype, xp):
        dtype = resolve_dtype(dtype)
        return {f"b{b}.{k}": v for b in range(self.num_blocks)
                for k, v in self.net.init_shared(rng, dtype, xp).items()}

    def _block_params(self, b, p, shared):
        pre = f"b{b}."
        n = len(pre)
        out = {k[n:]: v for k, v in shared.items() if k.startswith(pre)}
        out.update({k[n:]: v for k, v in p.items() if k.startswith(pre)})
        return out

    def _kw(self):
        if self.solver == "dopri5":
            return dict(method="dopri5")
        return dict(method=self.solver, steps=self.steps)

    def forward(self, z, p, shared):
        """eq. 5.1 for every block: z (B, d) -> (z(T), Σ_b ℓ_b(T) (B,), cache)."""
        xp = get_array_module(z)
        B = z.shape[0]
        eps = trace_mod.probes("exact", None, (B, self.D), dtype=z.dtype, xp=xp)
        y = CNFState(z, xp.zeros(B, dtype=z.dtype))
        sols = []
        for b in range(self.num_blocks):
            dyn = CNFDynamics(self.net, self._block_params(b, p, shared), eps, 1.0)
            sol = odeint(dyn, y, 0.0, self.T, **self._kw())
            sols.append(sol)
            y = sol.y1
        return y.z, y.logdet, sols

    def backward(self, cache, z_bar, logdet_bar):
        """Discrete adjoint of forward: -> (z0_bar, per-sample p_bar, shared_bar)."""
        sols = cache
        ybar = CNFState(z_bar, logdet_bar)
        p_bar, shared_bar = {}, {}
        per_sample = set(self.net.sample_shapes())
        for b in reversed(range(self.num_blocks)):
            g = sols[b].backward(ybar)
            for k, v in g.params.items():
                (p_bar if k in per_sample else shared_bar)[f"b{b}.{k}"] = v
            lb = g.y0.logdet if g.y0.logdet is not None else logdet_bar
            ybar = CNFState(g.y0.z, lb)
        return ybar.z, p_bar, shared_bar

    def last_nfe(self, cache):
        return int(sum(s.nfe for s in cache))
