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
  layer does not depend on t, else a 0-d array).
- The array module comes from the inputs: ``xp = get_array_module(x)``.

The stacked form (docs/layers.md, eq. 1.1a). The layers of this module (subclasses of
``StackedLayer``) do their work on one array h of shape (K+1, B, n) holding the primal in h[0]
and the K tangents in h[1:]:

    forward_stacked  :: (params, h, t)  -> (h_out, cache)
    backward_stacked :: (hbar, cache)   -> (hbar_in, params_bar, tbar)

so that an affine layer maps primal and tangents with ONE matrix product over (K+1)·B rows
(forward, input cotangent and weight cotangent alike: eq. 1.5 is then hbarᵀ h). ``forward`` /
``backward`` are the public interface above, built on the stacked rules; npflow.odenet.ODENet
chains the stacked rules directly and so stacks only once per network call.
"""
from __future__ import annotations

import math

from .backend import get_array_module

__all__ = ["Layer", "StackedLayer", "Linear", "ConcatLinear", "ConcatSquashLinear",
           "Activation", "Tanh", "Softplus", "Sigmoid", "Swish", "LogCosh", "ReLU",
           "ACTIVATIONS", "get_activation", "stack_tangents", "stack_cotangents",
           "unstack_tangents"]


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


# ---------------------------------------------------------------------------------------------
# The stacked form: h = [x; xdot_1; ...; xdot_K]  (docs/layers.md, eq. 1.1a)
# ---------------------------------------------------------------------------------------------

def _shape_error(where, x, xdot):
    return ValueError(f"{where}: tangents xdot must have shape (K, *x.shape) = (K, "
                      f"{', '.join(map(str, x.shape))}), got xdot {tuple(xdot.shape)} "
                      f"for x {tuple(x.shape)}")


def stack_tangents(x, xdot, where="layer"):
    """h (K+1, B, ...) with h[0] = x, h[1:] = xdot (eq. 1.1a); K = 0 when xdot is None.

    x (B, ...), xdot (K, B, ...) or None. A view (no copy) when xdot is None.
    """
    if xdot is None:
        return x[None]
    if xdot.ndim != x.ndim + 1 or xdot.shape[1:] != x.shape:
        raise _shape_error(where, x, xdot)
    xp = get_array_module(x, xdot)
    return xp.concatenate((x[None], xdot), axis=0)


def stack_cotangents(ybar, ydotbar, shape, K, dtype, xp):
    """hbar (K+1, *shape) with hbar[0] = ybar, hbar[1:] = ydotbar; None -> zeros (eq. 1.1a)."""
    if ydotbar is not None and K > 0:
        if ydotbar.shape != (K,) + tuple(shape):
            raise ValueError(f"cotangent ydotbar must have shape {(K,) + tuple(shape)}, "
                             f"got {tuple(ydotbar.shape)}")
        if ybar is None:
            ybar = xp.zeros(shape, dtype=dtype)
        return xp.concatenate((ybar[None], ydotbar), axis=0)
    hbar = xp.zeros((K + 1,) + tuple(shape), dtype=dtype)
    if ybar is not None:
        hbar[0] = ybar
    return hbar


def unstack_tangents(h, K):
    """(h[0], h[1:]) as views; the tangent part is None when K = 0."""
    return h[0], (h[1:] if K > 0 else None)


def _as_time(t, dtype, xp):
    """t as a Python float, or a 0-d array of the parameters' dtype (so float32 stays float32)."""
    if isinstance(t, (int, float)):
        return float(t)
    return xp.asarray(t, dtype=dtype)


class StackedLayer(Layer):
    """A layer given by its stacked rules; ``forward``/``backward`` follow from them."""

    def forward_stacked(self, params, h, t):
        raise NotImplementedError

    def backward_stacked(self, hbar, cache):
        raise NotImplementedError

    def out_shape(self, in_shape):
        """Shape of y (B, ...) for x of shape ``in_shape`` (B, ...)."""
        raise NotImplementedError

    def _check_input(self, x):
        """Cheap shape check of x (no device synchronisation)."""

    def forward(self, params, x, xdot, t):
        """eq. 1.1: (x, xdot) -> (y, ydot) through the stacked rule."""
        self._check_input(x)
        h = stack_tangents(x, xdot, type(self).__name__)
        K = h.shape[0] - 1
        out, cache = self.forward_stacked(params, h, t)
        y, ydot = unstack_tangents(out, K)
        return y, ydot, (cache, K, x)

    def backward(self, ybar, ydotbar, cache):
        """eq. 1.2: (ybar, ydotbar) -> (xbar, xdotbar, params_bar, tbar)."""
        cache, K, x = cache
        xp = get_array_module(x)
        y_shape = self.out_shape(x.shape)
        if ybar is not None and tuple(ybar.shape) != tuple(y_shape):
            raise ValueError(f"{type(self).__name__}: cotangent ybar must have shape "
                             f"{tuple(y_shape)}, got {tuple(ybar.shape)}")
        hbar = stack_cotangents(ybar, ydotbar, y_shape, K, x.dtype, xp)
        hin, grads, tbar = self.backward_stacked(hbar, cache)
        xbar, xdotbar = unstack_tangents(hin, K)
        return xbar, xdotbar, grads, tbar


def _rows(h):
    """(K+1, B, n) -> ((K+1)·B, n), a view when h is contiguous."""
    return h.reshape(-1, h.shape[-1])


# ---------------------------------------------------------------------------------------------
# Affine layers (eq. 1.3-1.5, 1.9-1.14)
# ---------------------------------------------------------------------------------------------

class _Affine(StackedLayer):
    """Shared description of the affine layers: x (B, n_in) -> y (B, n_out)."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        self.n_in, self.n_out, self.bias = int(n_in), int(n_out), bool(bias)
        if self.n_in < 1 or self.n_out < 1:
            raise ValueError(f"{type(self).__name__}: sizes must be >= 1, got "
                             f"n_in={n_in}, n_out={n_out}")

    def out_shape(self, in_shape):
        return (in_shape[0], self.n_out)

    def _check_input(self, x):
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"{type(self).__name__}: x must have shape (B, {self.n_in}), "
                             f"got {tuple(x.shape)}")

    @staticmethod
    def _uniform(rng, bound, shape, dtype, xp):
        return xp.asarray(rng.uniform(-bound, bound, shape), dtype=dtype)


class Linear(_Affine):
    """Affine map y = x Wᵀ + b (eq. 1.3), x (B, n_in) -> y (B, n_out); t is ignored.

    params: weight W (n_out, n_in), bias b (n_out,).
    """

    def param_names(self):
        return ("weight", "bias") if self.bias else ("weight",)

    def init_params(self, rng, dtype, xp):
        # PyTorch's default: U(-1/sqrt(n_in), 1/sqrt(n_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.n_in)
        p = {"weight": self._uniform(rng, bound, (self.n_out, self.n_in), dtype, xp)}
        if self.bias:
            p["bias"] = self._uniform(rng, bound, (self.n_out,), dtype, xp)
        return p

    def forward_stacked(self, params, h, t):
        """eq. 1.3: y = x Wᵀ + b;  eq. 1.4: ydot_k = xdot_k Wᵀ  (one product: h Wᵀ, then
        b added to the primal row block).  h (K+1, B, n_in) -> (K+1, B, n_out)."""
        W = params["weight"]
        out = (_rows(h) @ W.T).reshape(h.shape[:-1] + (self.n_out,))
        if self.bias:
            out[0] += params["bias"]
        return out, (W, h)

    def backward_stacked(self, hbar, cache):
        """eq. 1.5: xbar = ybar W, xdotbar_k = ydotbar_k W  (hbar W);
        Wbar = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k  (hbarᵀ h), bbar = Σ_b ybar."""
        W, h = cache
        hb = _rows(hbar)
        grads = {"weight": hb.T @ _rows(h)}
        if self.bias:
            grads["bias"] = hbar[0].sum(axis=0)
        return (hb @ W).reshape(h.shape), grads, 0.0


class ConcatLinear(_Affine):
    """t appended as an input column: y = W [x, t] + b = x W_xᵀ + t w_t + b (eq. 1.9).

    x (B, n_in) -> y (B, n_out). params: weight W = [W_x | w_t] (n_out, n_in + 1) (last column
    multiplies t), bias b (n_out,). (FFJORD's ConcatLinear puts t in column 0; here it is last.)
    """

    def param_names(self):
        return ("weight", "bias") if self.bias else ("weight",)

    def init_params(self, rng, dtype, xp):
        bound = 1.0 / math.sqrt(self.n_in + 1)   # nn.Linear(n_in + 1, n_out)
        p = {"weight": self._uniform(rng, bound, (self.n_out, self.n_in + 1), dtype, xp)}
        if self.bias:
            p["bias"] = self._uniform(rng, bound, (self.n_out,), dtype, xp)
        return p

    def forward_stacked(self, params, h, t):
        """eq. 1.9: y = x W_xᵀ + t w_t + b;  eq. 1.10: ydot_k = xdot_k W_xᵀ."""
        W = params["weight"]
        t = _as_time(t, W.dtype, get_array_module(W))
        Wx, wt = W[:, :self.n_in], W[:, self.n_in]
        out = (_rows(h) @ Wx.T).reshape(h.shape[:-1] + (self.n_out,))
        shift = t * wt
        if self.bias:
            shift = shift + params["bias"]
        out[0] += shift
        return out, (W, h, t)

    def backward_stacked(self, hbar, cache):
        """eq. 1.11: xbar = ybar W_x, xdotbar_k = ydotbar_k W_x;
        W̄_x = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k, w̄_t = t Σ_b ybar, b̄ = Σ_b ybar,
        tbar = w_tᵀ Σ_b ybar."""
        W, h, t = cache
        xp = get_array_module(W)
        n = self.n_in
        hb = _rows(hbar)
        s = hbar[0].sum(axis=0)                       # Σ_b ybar   (n_out,)
        Wbar = xp.empty_like(W)
        Wbar[:, :n] = hb.T @ _rows(h)
        Wbar[:, n] = t * s
        grads = {"weight": Wbar}
        if self.bias:
            grads["bias"] = s
        return (hb @ W[:, :n]).reshape(h.shape), grads, s @ W[:, n]


def _sigmoid(a, xp):
    """sigmoid(a) = ½(1 + tanh(a/2)): one transcendental, no overflow for any a."""
    s = xp.tanh(0.5 * a)
    s += 1.0
    s *= 0.5
    return s


class ConcatSquashLinear(_Affine):
    """FFJORD's ConcatSquashLinear (eq. 1.12):

        y = (x Wᵀ + b) ⊙ g + t w_b,   g = sigmoid(t w_g + b_g)   (g, w_b per output unit)

    x (B, n_in) -> y (B, n_out). params: weight W (n_out, n_in), bias b (n_out,),
    gate.weight w_g (n_out,), gate.bias b_g (n_out,), hyper_bias.weight w_b (n_out,) (no bias).
    Since g does not depend on x, y = x W_gᵀ + c with W_g = diag(g) W and c = b ⊙ g + t w_b:
    the gate is folded into the weight once per call (n_out·n_in multiplies, not (K+1)·B·n_out).
    """

    def param_names(self):
        return (("weight", "bias") if self.bias else ("weight",)) + (
            "gate.weight", "gate.bias", "hyper_bias.weight")

    def init_params(self, rng, dtype, xp):
        bound = 1.0 / math.sqrt(self.n_in)
        p = {"weight": self._uniform(rng, bound, (self.n_out, self.n_in), dtype, xp)}
        if self.bias:
            p["bias"] = self._uniform(rng, bound, (self.n_out,), dtype, xp)
        # nn.Linear(1, n_out) default: U(-1, 1) for weight and bias; the hyper bias has no bias.
        p["gate.weight"] = self._uniform(rng, 1.0, (self.n_out,), dtype, xp)
        p["gate.bias"] = self._uniform(rng, 1.0, (self.n_out,), dtype, xp)
        p["hyper_bias.weight"] = self._uniform(rng, 1.0, (self.n_out,), dtype, xp)
        return p

    def forward_stacked(self, params, h, t):
        """eq. 1.12: y = x (diag(g) W)ᵀ + b ⊙ g + t w_b;  eq. 1.13: ydot_k = xdot_k (diag(g) W)ᵀ."""
        W = params["weight"]
        xp = get_array_module(W)
        t = _as_time(t, W.dtype, xp)
        g = _sigmoid(t * params["gate.weight"] + params["gate.bias"], xp)
        Wg = W * g[:, None]
        out = (_rows(h) @ Wg.T).reshape(h.shape[:-1] + (self.n_out,))
        shift = t * params["hyper_bias.weight"]
        if self.bias:
            shift = shift + params["bias"] * g
        out[0] += shift
        return out, (params, Wg, g, h, t)

    def backward_stacked(self, hbar, cache):
        """eq. 1.14, with G = hbarᵀ h = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k (n_out, n_in) and
        s = Σ_b ybar:  xbar = ybar W_g, xdotbar_k = ydotbar_k W_g;  W̄ = diag(g) G;
        ḡ = rowsum(W ⊙ G) + b ⊙ s;  ā = ḡ ⊙ g(1 − g);  b̄ = g ⊙ s;  w̄_g = t ā;  b̄_g = ā;
        w̄_b = t s;  tbar = w_gᵀ ā + w_bᵀ s."""
        params, Wg, g, h, t = cache
        W = params["weight"]
        hb = _rows(hbar)
        G = hb.T @ _rows(h)
        s = hbar[0].sum(axis=0)
        gbar = (W * G).sum(axis=1)
        if self.bias:
            gbar += params["bias"] * s
        abar = gbar * (g * (1.0 - g))
        grads = {"weight": G * g[:, None]}
        if self.bias:
            grads["bias"] = g * s
        grads["gate.weight"] = t * abar
        grads["gate.bias"] = abar
        grads["hyper_bias.weight"] = t * s
        tbar = params["gate.weight"] @ abar + params["hyper_bias.weight"] @ s
        return (hb @ Wg).reshape(h.shape), grads, tbar

    # -- the gated form, for networks that compute the gates of all layers at once ----------

    def forward_gated(self, W, h, g, shift):
        """eq. 1.12-1.13 with the gate g = sigmoid(t w_g + b_g) (n_out,) and the shift
        c = b ⊙ g + t w_b (n_out,) given (npflow.odenet.ODENet computes them for all its
        layers with one set of array operations, eq. 2.4): out = h (diag(g) W)ᵀ, out[0] += c.
        W (n_out, n_in), h (K+1, B, n_in) -> (out (K+1, B, n_out), cache)."""
        Wg = W * g[:, None]
        out = (_rows(h) @ Wg.T).reshape(h.shape[:-1] + (self.n_out,))
        out[0] += shift
        return out, (W, Wg, g, h)

    def backward_gated(self, hbar, cache, s_out, gbar_out, need_tangents=True, ones=None):
        """The per-layer part of eq. 1.14 for ``forward_gated``, with G = hbarᵀ h: writes
        s = Σ_b ybar into ``s_out`` and rowsum(W ⊙ G) into ``gbar_out`` (both (n_out,), views
        of the network's buffers, where the gate terms b ⊙ s, ā, b̄, w̄_g, b̄_g, w̄_b and tbar
        of eq. 1.14 follow for all layers at once, eq. 2.5).
        hbar (K+1, B, n_out) -> (hbar_in = hbar W_g (K+1, B, n_in), W̄ = diag(g) G);
        need_tangents=False: hbar_in is (1, B, n_in), the primal block ybar W_g only.
        ones: optional (B,) ones, so that s = onesᵀ ybar is a matrix-vector product (faster
        than a reduction over the batch axis)."""
        W, Wg, g, h = cache
        hb = _rows(hbar)
        G = hb.T @ _rows(h)
        if ones is None:
            hbar[0].sum(axis=0, out=s_out)
        else:
            get_array_module(W).matmul(ones, hbar[0], out=s_out)
        (W * G).sum(axis=1, out=gbar_out)
        G *= g[:, None]
        if not need_tangents:
            return (hbar[0] @ Wg)[None], G
        return (hb @ Wg).reshape(h.shape), G


# ---------------------------------------------------------------------------------------------
# Elementwise activations (eq. 1.6-1.8, 1.15-1.19)
# ---------------------------------------------------------------------------------------------

class Activation(StackedLayer):
    """Elementwise y = σ(x) (eq. 1.6), any shape x (B, ...). Subclasses give σ and its derivatives.

    Forward:  y = σ(x), ydot_k = σ'(x) ⊙ xdot_k                               (eq. 1.6)
    Backward: xbar = σ'(x) ⊙ ybar + σ''(x) ⊙ Σ_k xdot_k ⊙ ydotbar_k,
              xdotbar_k = σ'(x) ⊙ ydotbar_k                                    (eq. 1.7)

    A subclass implements
      ``_value_d1(x, xp, out)`` -> (σ(x) written into ``out``, σ'(x), aux)  (the forward's work)
      ``_higher(x, y, d1, aux, xp, order)`` -> (σ'', ..., σ^(order)) from the cached values,
    so σ'' is computed only in the backward, and only when there are tangents.
    """

    max_order = 3
    smooth = True      # sigma is infinitely differentiable everywhere (ReLU: False)

    def out_shape(self, in_shape):
        return tuple(in_shape)

    def _value_d1(self, x, xp, out):
        raise NotImplementedError

    def _higher(self, x, y, d1, aux, xp, order):
        raise NotImplementedError

    def derivatives(self, x, xp, order: int = 2):
        """(σ(x), σ'(x), ..., σ^(order)(x)), order 1..max_order (3 for every activation here)."""
        if not 1 <= order <= self.max_order:
            raise ValueError(f"{type(self).__name__}: derivative order must be 1..{self.max_order}"
                             f", got {order}")
        y, d1, aux = self._value_d1(x, xp, xp.empty_like(x))
        if order == 1:
            return y, d1
        return (y, d1) + tuple(self._higher(x, y, d1, aux, xp, order))

    def forward_stacked(self, params, h, t):
        """eq. 1.6 on the stack: out[0] = σ(h[0]), out[1:] = σ'(h[0]) ⊙ h[1:]."""
        xp = get_array_module(h)
        out = xp.empty_like(h)
        x = h[0]
        y, d1, aux = self._value_d1(x, xp, out[0])
        if h.shape[0] > 1:
            xp.multiply(d1, h[1:], out=out[1:])
        return out, (x, y, d1, aux, h)

    def backward_stacked(self, hbar, cache):
        """eq. 1.7 on the stack: hbar_in = σ'(x) ⊙ hbar, then hbar_in[0] += σ''(x) ⊙ Σ_k xdot_k ⊙ ydotbar_k."""
        x, y, d1, aux, h = cache
        xp = get_array_module(hbar)
        hin = d1 * hbar
        if h.shape[0] > 1:
            s = (h[1:] * hbar[1:]).sum(axis=0)
            (d2,) = self._higher(x, y, d1, aux, xp, 2)
            s *= d2
            hin[0] += s
        return hin, {}, 0.0


class Tanh(Activation):
    """σ = tanh, σ' = 1 − σ², σ'' = −2σσ', σ''' = −2σ'(1 − 3σ²) (eq. 1.8)."""

    def _value_d1(self, x, xp, out):
        y = xp.tanh(x, out=out)
        d1 = y * y
        xp.subtract(1.0, d1, out=d1)
        return y, d1, None

    def _higher(self, x, y, d1, aux, xp, order):
        d2 = -2.0 * y * d1
        if order == 2:
            return (d2,)
        return d2, -2.0 * d1 * (1.0 - 3.0 * y * y)

    def backward_stacked(self, hbar, cache, out=None):
        """eq. 1.7 on the stack with σ'' = −2σσ' (eq. 1.8) folded in (eq. 1.7a):
        hbar_in = σ' ⊙ hbar, so hbar_in[k] = xdotbar_k, then
        hbar_in[0] += −2σ ⊙ Σ_k xdot_k ⊙ xdotbar_k   (= σ'' ⊙ Σ_k xdot_k ⊙ ydotbar_k).
        No σ'' array is formed; the sum over k runs block by block (no (K, B, n) temporary):
        2K + 3 array operations, two block-sized temporaries. ``out``: an array of hbar's shape
        to write hbar_in into; it may be hbar itself when the caller owns hbar (ODENet's chain)."""
        x, y, d1, aux, h = cache
        hin = d1 * hbar if out is None else get_array_module(hbar).multiply(d1, hbar, out=out)
        K = h.shape[0] - 1
        if K > 0:
            s = h[1] * hin[1]
            if K > 1:
                xp = get_array_module(s)
                tmp = xp.empty_like(s)
                for k in range(2, K + 1):
                    xp.multiply(h[k], hin[k], out=tmp)
                    s += tmp
            s *= y
            s *= -2.0
            hin[0] += s
        return hin, {}, 0.0


class Sigmoid(Activation):
    """σ = sigmoid = ½(1 + tanh(x/2)), σ' = σ(1 − σ), σ'' = σ'(1 − 2σ),
    σ''' = σ'((1 − 2σ)² − 2σ') (eq. 1.15)."""

    def _value_d1(self, x, xp, out):
        y = xp.tanh(0.5 * x, out=out)
        y += 1.0
        y *= 0.5
        d1 = y * (1.0 - y)
        return y, d1, None

    def _higher(self, x, y, d1, aux, xp, order):
        u = 1.0 - 2.0 * y
        d2 = d1 * u
        if order == 2:
            return (d2,)
        return d2, d1 * (u * u - 2.0 * d1)


class Softplus(Activation):
    """σ = log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}) (stable), σ' = s = sigmoid(x),
    σ'' = s(1 − s), σ''' = s(1 − s)(1 − 2s) (eq. 1.16)."""

    def _value_d1(self, x, xp, out):
        e = xp.abs(x)
        xp.negative(e, out=e)
        xp.exp(e, out=e)
        y = xp.log1p(e, out=out)
        y += xp.maximum(x, 0.0)
        s = _sigmoid(x, xp)
        return y, s, None

    def _higher(self, x, y, s, aux, xp, order):
        d2 = s * (1.0 - s)
        if order == 2:
            return (d2,)
        return d2, d2 * (1.0 - 2.0 * s)


class Swish(Activation):
    """σ = x·s with s = sigmoid(x) (SiLU, fixed β = 1), σ' = s + σ(1 − s),
    σ'' = s(1 − s)(2 + x(1 − 2s)), σ''' = s(1 − s)(3(1 − 2s) + x((1 − 2s)² − 2s(1 − s)))
    (eq. 1.17)."""

    def _value_d1(self, x, xp, out):
        s = _sigmoid(x, xp)
        y = xp.multiply(x, s, out=out)
        d1 = 1.0 - s
        d1 *= y
        d1 += s
        return y, d1, s

    def _higher(self, x, y, d1, s, xp, order):
        p = s * (1.0 - s)
        u = 1.0 - 2.0 * s
        d2 = p * (2.0 + x * u)
        if order == 2:
            return (d2,)
        return d2, p * (3.0 * u + x * (u * u - 2.0 * p))


class LogCosh(Activation):
    """OT-Flow's activation σ(x) = log(eˣ + e⁻ˣ) = |x| + log1p(e^{−2|x|}) (stable; note: this is
    log cosh x + log 2), σ' = tanh x, σ'' = 1 − tanh² x, σ''' = −2 tanh x (1 − tanh² x) (eq. 1.18)."""

    def _value_d1(self, x, xp, out):
        a = xp.abs(x)
        e = -2.0 * a
        xp.exp(e, out=e)
        y = xp.log1p(e, out=out)
        y += a
        return y, xp.tanh(x), None

    def _higher(self, x, y, d1, aux, xp, order):
        d2 = 1.0 - d1 * d1
        if order == 2:
            return (d2,)
        return d2, -2.0 * d1 * d2


class ReLU(Activation):
    """σ = max(x, 0), σ' = step(x) = [x > 0] (σ'(0) = 0, PyTorch's choice), σ'' = σ''' = 0
    (eq. 1.19). Piecewise linear: the rules are exact away from x = 0, where σ is not
    differentiable (``smooth = False``: finite-difference checks must keep off the kink)."""

    smooth = False

    def _value_d1(self, x, xp, out):
        y = xp.maximum(x, 0.0, out=out)
        d1 = (x > 0).astype(x.dtype)
        return y, d1, None

    def _higher(self, x, y, d1, aux, xp, order):
        z = xp.zeros_like(d1)
        return (z,) if order == 2 else (z, z)

    def backward_stacked(self, hbar, cache):
        """eq. 1.7 with σ'' = 0 (eq. 1.19): hbar_in = step(x) ⊙ hbar, no second-order term."""
        x, y, d1, aux, h = cache
        return d1 * hbar, {}, 0.0


ACTIVATIONS = {"tanh": Tanh, "softplus": Softplus, "sigmoid": Sigmoid, "swish": Swish,
               "logcosh": LogCosh, "relu": ReLU}


def get_activation(name) -> Activation:
    """An activation layer by name: "tanh", "softplus", "sigmoid", "swish", "logcosh", "relu"
    (an Activation instance is returned as is)."""
    if isinstance(name, Activation):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "silu":
        key = "swish"
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()
