"""Layers with tangents and adjoints (docs/layers.md, section 1).

Every layer is a stateless description (sizes, choices) plus two pure functions over an
explicit parameter dict, the rules side by side as in JAX's custom_jvp/custom_vjp:

    forward  :: (params, x, xdot, t)   -> (y, ydot, cache)
    backward :: (ybar, ydotbar, cache) -> (xbar, xdotbar, params_bar, tbar)

Shapes: x (B, ...) the primal, xdot (K, B, ...) K tangents (directions), t a scalar (Python
float or 0-d array). y = g(x, t; θ) and ydot_k = ∂g/∂x · xdot_k (eq. 1.1). The backward is the
exact reverse of that forward map (x, xdot, θ, t) -> (y, ydot), second-order terms included
(eq. 1.2): xbar collects ∂/∂x of <ybar, y> + <ydotbar, ydot>, which for a nonlinear layer
involves ∂²g/∂x².

Conventions:
- ``xdot`` may be None (no tangents; ``ydot`` is then None); ``ybar``/``ydotbar`` may be None
  (zero cotangent). Caches are values (a tuple), so one network may be evaluated several times
  before any backward runs. Inputs and cotangents are never mutated.
- ``params_bar`` has the same keys as the layer's params; ``tbar`` is a scalar (0.0 when the
  layer does not depend on t).
- The array module comes from the inputs: ``xp = get_array_module(x)``.
"""
from __future__ import annotations

import math

from .backend import get_array_module

__all__ = ["Layer", "Linear", "Activation", "Tanh"]


class Layer:
    """Base class: a layer's description and its parameter initialisation."""

    def init_params(self, rng, dtype, xp) -> dict:
        """Fresh parameters (dict name -> array of ``dtype`` in module ``xp``).

        ``rng`` is a numpy.random.Generator (host); arrays are drawn on the host and moved once.
        """
        return {}

    def forward(self, params, x, xdot, t):
        raise NotImplementedError

    def backward(self, ybar, ydotbar, cache):
        raise NotImplementedError


def _matmul_tangents(v, w_t, xp):
    """v (K, B, n) @ w_t (n, m) -> (K, B, m) as one matrix product over K·B rows."""
    K, B, n = v.shape
    return (v.reshape(K * B, n) @ w_t).reshape(K, B, w_t.shape[1])


class Linear(Layer):
    """Affine map y = x Wᵀ + b (eq. 1.3), x (B, n_in) -> y (B, n_out).

    params: weight W (n_out, n_in), bias b (n_out,).
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        self.n_in, self.n_out, self.bias = int(n_in), int(n_out), bool(bias)

    def init_params(self, rng, dtype, xp):
        # PyTorch's default: U(-1/sqrt(n_in), 1/sqrt(n_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.n_in)
        p = {"weight": xp.asarray(rng.uniform(-bound, bound, (self.n_out, self.n_in)), dtype=dtype)}
        if self.bias:
            p["bias"] = xp.asarray(rng.uniform(-bound, bound, (self.n_out,)), dtype=dtype)
        return p

    def forward(self, params, x, xdot, t):
        """eq. 1.3: y = x Wᵀ + b;  eq. 1.4: ydot_k = xdot_k Wᵀ."""
        xp = get_array_module(x)
        W = params["weight"]
        y = x @ W.T
        if self.bias:
            y = y + params["bias"]
        ydot = None if xdot is None else _matmul_tangents(xdot, W.T, xp)
        return y, ydot, (W, x, xdot)

    def backward(self, ybar, ydotbar, cache):
        """eq. 1.5: xbar = ybar W, xdotbar_k = ydotbar_k W,
        Wbar = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k, bbar = Σ_b ybar."""
        W, x, xdot = cache
        xp = get_array_module(x)
        grads = {}
        xbar = xdotbar = None
        Wbar = None
        if ybar is not None:
            xbar = ybar @ W
            Wbar = ybar.T @ x
        if self.bias:
            grads["bias"] = ybar.sum(axis=0) if ybar is not None else xp.zeros_like(W[:, 0])
        if ydotbar is not None and xdot is not None:
            xdotbar = _matmul_tangents(ydotbar, W, xp)
            K, B, _ = xdot.shape
            gw = ydotbar.reshape(K * B, -1).T @ xdot.reshape(K * B, -1)
            Wbar = gw if Wbar is None else Wbar + gw
        grads["weight"] = Wbar if Wbar is not None else xp.zeros_like(W)
        return xbar, xdotbar, grads, 0.0


class Activation(Layer):
    """Elementwise y = σ(x) (eq. 1.6). Subclasses give σ, σ', σ''.

    Forward:  y = σ(x), ydot_k = σ'(x) ⊙ xdot_k                               (eq. 1.6)
    Backward: xbar = σ'(x) ⊙ ybar + σ''(x) ⊙ Σ_k xdot_k ⊙ ydotbar_k,
              xdotbar_k = σ'(x) ⊙ ydotbar_k                                    (eq. 1.7)
    """

    def derivatives(self, x, xp):
        """Return (σ(x), σ'(x), σ''(x)); σ'' only used by the backward."""
        raise NotImplementedError

    def forward(self, params, x, xdot, t):
        xp = get_array_module(x)
        y, d1, d2 = self.derivatives(x, xp)
        ydot = None if xdot is None else d1 * xdot
        return y, ydot, (d1, d2, xdot)

    def backward(self, ybar, ydotbar, cache):
        d1, d2, xdot = cache
        xbar = None if ybar is None else d1 * ybar
        xdotbar = None
        if ydotbar is not None:
            xdotbar = d1 * ydotbar
            if xdot is not None:
                second = d2 * (xdot * ydotbar).sum(axis=0)
                xbar = second if xbar is None else xbar + second
        return xbar, xdotbar, {}, 0.0


class Tanh(Activation):
    """σ = tanh, σ' = 1 − σ², σ'' = −2σσ' (eq. 1.8)."""

    def derivatives(self, x, xp):
        y = xp.tanh(x)
        d1 = 1 - y * y
        return y, d1, -2 * y * d1
