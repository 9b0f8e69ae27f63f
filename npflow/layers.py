"""Layers with tangents and adjoints (docs/layers.md, section 1).

The layer contract (docs/layers.md, section 1, "The layer contract"; ``Layer`` below) is one
protocol for the dense layers of this module and the convolutions of npflow.conv: a stateless
description (sizes, choices) plus pure functions over an explicit parameter dict, the rules side
by side as in JAX's custom_jvp/custom_vjp:

    forward          :: (params, x, xdot, t)   -> (y, ydot, cache)                  (eq. 1.1)
    backward         :: (ybar, ydotbar, cache) -> (xbar, xdotbar, params_bar, tbar) (eq. 1.2)
    forward_stacked  :: (params, h, t)         -> (h_out, cache)                    (eq. 1.1a)
    backward_stacked :: (hbar, cache)          -> (hbar_in, params_bar, tbar)       (eq. 1.1a)

Shapes: x (B, ...) the primal, xdot (K, B, ...) K tangents (directions), t a scalar (Python
float or 0-d array) or, for the dense layers and ODENet, one time per row: an array of shape
(B, 1) (docs/layers.md, "Per-row time", eq. 1.22-1.25); the stacked forms take
h = [x; xdot] of shape (K+1, B, ...). y = g(x, t; θ)
and ydot_k = ∂g/∂x · xdot_k (eq. 1.1). The backward is the exact reverse of that forward map
(x, xdot, θ, t) -> (y, ydot), second-order terms included (eq. 1.2): xbar collects ∂/∂x of
<ybar, y> + <ydotbar, ydot>, which for a nonlinear layer involves ∂²g/∂x².

Conventions:
- ``xdot`` may be None (no tangents; ``ydot`` is then None); ``ybar``/``ydotbar`` may be None
  (zero cotangent). Caches are values (a tuple), so one network may be evaluated several times
  before any backward runs. Inputs and cotangents are never mutated (except ``hbar`` when a
  caller that owns it passes ``out=hbar`` to an activation's backward_stacked).
- ``params_bar`` has the same keys as the layer's params; ``tbar`` is a scalar (0.0 when the
  layer does not depend on t, else a 0-d array), or (B, 1) like t for a per-row t (eq. 1.23,
  1.25; the convolutions of npflow.conv take a scalar t only).
- Parameters are named alike in every layer, after PyTorch's sub-modules as FFJORD names them:
  ``weight``, ``bias``, and for the ConcatSquash layers ``gate.weight``, ``gate.bias``,
  ``hyper_bias.weight`` (dense and conv alike; ``upgrade_param_name`` maps the older conv
  names of saved checkpoints).
- The array module comes from the inputs: ``xp = get_array_module(x)``.

With the stacked rules an affine layer maps primal and tangents with ONE matrix product over
(K+1)·B rows (forward, input cotangent and weight cotangent alike: eq. 1.5 is then hbarᵀ h).
``StackedLayer`` builds ``forward``/``backward`` from the stacked rules; npflow.odenet.ODENet
and npflow.conv.ConvNet chain the stacked rules directly and so stack only once per call.
"""
from __future__ import annotations

import math

from .backend import get_array_module

__all__ = ["Layer", "StackedLayer", "Linear", "ConcatLinear", "ConcatSquashLinear",
           "Activation", "Tanh", "Softplus", "Sigmoid", "Swish", "LogCosh", "GELU", "ReLU",
           "ACTIVATIONS", "get_activation", "stack_tangents", "stack_cotangents",
           "unstack_tangents", "as_time", "row_time", "require_scalar_time", "sigmoid",
           "squash_gates", "squash_gates_backward", "upgrade_param_name"]


class Layer:
    """Base class of every layer, dense (this module) and convolutional (npflow.conv).

    The contract (docs/layers.md, section 1, "The layer contract"): a layer is a stateless
    description plus these methods, forward, tangent and adjoint side by side:

      init_params(rng, dtype, xp) -> {name: array}   fresh parameters (names as in the module
                                                     doc: weight, bias, gate.weight, ...)
      param_names()               -> tuple           the keys init_params returns
      out_shape(in_shape)         -> tuple           y's shape (B, ...) for x of ``in_shape``
      forward_stacked(params, h, t) -> (h_out, cache)
          h (K+1, B, ...) = [x; xdot]: h_out[0] = g(x, t; θ), h_out[k] = ∂g/∂x · xdot_k
          (eq. 1.1, 1.1a); t a scalar, or (B, 1) one time per row (dense layers and ODENet:
          row b is g(x_b, t_b; θ), eq. 1.22; conv layers refuse it with a ValueError)
      backward_stacked(hbar, cache, need_xdotbar=True) -> (hbar_in, params_bar, tbar)
          the reverse of forward_stacked, second-order terms included (eq. 1.2):
          hbar (K+1, B, ...) = [ybar; ydotbar] -> hbar_in = [xbar; xdotbar], params_bar
          {name: array like params[name]}, tbar a scalar (0.0 without t), (B, 1) for a
          per-row t (t̄_b = ∂/∂t_b, eq. 1.23, 1.25);
          need_xdotbar=False: hbar_in may hold the primal block only (shape (1, B, ...))
      forward(params, x, xdot, t) / backward(ybar, ydotbar, cache)
          the unstacked interface (None tangents / cotangents allowed); StackedLayer derives
          them from the stacked rules.

    The networks built from layers (npflow.odenet.ODENet, npflow.conv.ConvNet) are Layers with
    the unstacked interface only: they chain their layers' stacked rules inside.

    How to add a layer (docs/layers.md, section 1, "How to add a layer"):

    1. Derive its rules in docs/layers.md (or docs/images.md for a convolution): forward,
       tangent (eq. 1.1) and the adjoint of the pair (eq. 1.2), each a numbered equation.
    2. Subclass ``StackedLayer`` (``Activation`` for an elementwise σ: then only σ and its
       derivatives, see Activation) and write ``init_params``, ``param_names``, ``out_shape``,
       ``forward_stacked`` and ``backward_stacked``, citing the equations; name parameters as
       the existing layers do; take the array module from the inputs.
    3. Register it where networks pick layers by name (``ACTIVATIONS`` below,
       npflow.odenet.LAYER_TYPES, npflow.conv's layer types); the examples' choices follow.
    4. Test it in tests/test_layers.py (or test_conv.py) with ``check_all``: the tangent and
       every cotangent against central differences and the dot-product test, float64,
       hypothesis-drawn sizes (the activations' tests run over every entry of ACTIVATIONS).
    """

    def init_params(self, rng, dtype, xp) -> dict:
        """Fresh parameters (dict name -> array of ``dtype`` in module ``xp``).

        ``rng`` is a numpy.random.Generator (host); arrays are drawn on the host and moved once.
        """
        return {}

    def param_names(self):
        """The keys of ``init_params``' dict."""
        return ()

    def out_shape(self, in_shape):
        """Shape of y (B, ...) for x of shape ``in_shape`` (B, ...)."""
        raise NotImplementedError

    def forward_stacked(self, params, h, t):
        raise NotImplementedError

    def backward_stacked(self, hbar, cache, need_xdotbar=True):
        raise NotImplementedError

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


def as_time(t, dtype, xp):
    """t as a Python float, or an array (0-d, or (B, 1) per row) of the parameters' dtype (so
    float32 stays float32)."""
    if isinstance(t, (int, float)):
        return float(t)
    return xp.asarray(t, dtype=dtype)


def row_time(t, B, where="layer"):
    """True when t holds one time per row (shape (B, 1), eq. 1.22), False for a scalar (Python
    number or 0-d array); any other shape is a ValueError naming it. Shape checks only."""
    if isinstance(t, (int, float)) or getattr(t, "ndim", 0) == 0:
        return False
    if tuple(t.shape) != (B, 1):
        raise ValueError(f"{where}: time t must be a scalar or an array of shape (B, 1) = "
                         f"({B}, 1), one time per row; got shape {tuple(t.shape)}")
    return True


def require_scalar_time(t, where):
    """ValueError unless t is a scalar (layers that take one time per call: the convolutions)."""
    if not (isinstance(t, (int, float)) or getattr(t, "ndim", 0) == 0):
        raise ValueError(f"{where}: time t must be a scalar (one time per call); got an array "
                         f"of shape {tuple(t.shape)} (per-row times are for the dense layers "
                         "and ODENet only)")


class StackedLayer(Layer):
    """A layer given by its stacked rules; ``forward``/``backward`` follow from them."""

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

    def backward_stacked(self, hbar, cache, need_xdotbar=True):
        """eq. 1.5: xbar = ybar W, xdotbar_k = ydotbar_k W  (hbar W);
        Wbar = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k  (hbarᵀ h), bbar = Σ_b ybar."""
        W, h = cache
        hb = _rows(hbar)
        grads = {"weight": hb.T @ _rows(h)}
        if self.bias:
            grads["bias"] = hbar[0].sum(axis=0)
        if not need_xdotbar:
            return (hbar[0] @ W)[None], grads, 0.0
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
        """eq. 1.9: y = x W_xᵀ + t w_t + b;  eq. 1.10: ydot_k = xdot_k W_xᵀ.
        h (K+1, B, n_in); t scalar or (B, 1) (row b uses t_b: t w_t is (B, n_out), eq. 1.22)."""
        W = params["weight"]
        row_time(t, h.shape[1], "ConcatLinear")
        t = as_time(t, W.dtype, get_array_module(W))
        Wx, wt = W[:, :self.n_in], W[:, self.n_in]
        out = (_rows(h) @ Wx.T).reshape(h.shape[:-1] + (self.n_out,))
        shift = t * wt
        if self.bias:
            shift = shift + params["bias"]
        out[0] += shift
        return out, (W, h, t)

    def backward_stacked(self, hbar, cache, need_xdotbar=True):
        """eq. 1.11: xbar = ybar W_x, xdotbar_k = ydotbar_k W_x;
        W̄_x = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k, w̄_t = t Σ_b ybar, b̄ = Σ_b ybar,
        tbar = w_tᵀ Σ_b ybar;  per-row t (B, 1), eq. 1.23: w̄_t = ybarᵀ t,
        tbar = ybar w_t (B, 1)."""
        W, h, t = cache
        xp = get_array_module(W)
        n = self.n_in
        hb = _rows(hbar)
        s = hbar[0].sum(axis=0)                       # Σ_b ybar   (n_out,)
        Wbar = xp.empty_like(W)
        Wbar[:, :n] = hb.T @ _rows(h)
        if getattr(t, "ndim", 0) == 2:                # one time per row (eq. 1.23)
            Wbar[:, n] = t[:, 0] @ hbar[0]
            tbar = (hbar[0] @ W[:, n])[:, None]
        else:
            Wbar[:, n] = t * s
            tbar = s @ W[:, n]
        grads = {"weight": Wbar}
        if self.bias:
            grads["bias"] = s
        if not need_xdotbar:
            return (hbar[0] @ W[:, :n])[None], grads, tbar
        return (hb @ W[:, :n]).reshape(h.shape), grads, tbar


def sigmoid(a, xp, out=None):
    """sigmoid(a) = ½(1 + tanh(a/2)) (eq. 1.15): one transcendental, no overflow for any a.
    ``out``: an array of a's shape to write into (it may be ``a`` itself)."""
    s = xp.tanh(0.5 * a, out=out)
    s += 1.0
    s *= 0.5
    return s


def squash_gates(t, w_g, b_g, w_b, b=None):
    """The gate and shift of ConcatSquash layers (eq. 1.12), dense and conv alike:

        g = sigmoid(t w_g + b_g),   c = t w_b + b ⊙ g    (c = t w_b without a bias)

    w_g, b_g, w_b, b: (n,) vectors, one entry per output unit or channel, of one layer or of
    several layers concatenated (npflow.odenet.ODENet, eq. 2.4); t a scalar, or (B, 1) one
    time per row (dense layers, eq. 1.24: then g and c are (B, n), row b's gate and shift).
    Returns (g (n,) or (B, n), c like g, t) with t cast by ``as_time`` (keep it for the
    backward).
    """
    xp = get_array_module(w_g)
    t = as_time(t, w_g.dtype, xp)
    a = w_g * t
    a += b_g
    g = sigmoid(a, xp, out=a)
    c = w_b * t
    if b is not None:
        c += b * g
    return g, c, t


def squash_gates_backward(t, g, s, gbar, w_g, w_b, b=None):
    """The gate terms of eq. 1.14 for ``squash_gates``' outputs, given s = Σ ybar (n,) (the
    cotangent of the shift c, summed over the batch and pixels) and gbar (n,) the cotangent that
    reaches g through the product with the unbiased layer output (rowsum(W ⊙ G) for a dense
    layer, eq. 1.14; per-channel sums for a convolution, docs/images.md eq. 1.10):

        ḡ = gbar + b ⊙ s,  ā = ḡ ⊙ g(1 − g),  b̄ = g ⊙ s,  w̄_g = t ā,  b̄_g = ā,  w̄_b = t s,
        t̄ = w_gᵀ ā + w_bᵀ s

    Per-row t (B, 1) (eq. 1.25): g, s = ybar and gbar are (B, n), row by row, and the
    parameter terms are sums over the rows weighted by 1 or by t:

        ḡ = gbar + b ⊙ s,  ā = ḡ ⊙ g(1 − g)  (B, n),  b̄ = Σ_b g ⊙ s,  w̄_g = āᵀ t,
        b̄_g = Σ_b ā,  w̄_b = sᵀ t,  t̄ = ā w_g + s w_b  (B, 1)

    Returns ({"bias": b̄ (only when b is given), "gate.weight": w̄_g, "gate.bias": b̄_g,
    "hyper_bias.weight": w̄_b}, t̄), keyed by the layers' parameter names; the inputs are not
    modified.
    """
    if g.ndim == 2:
        return _squash_gates_backward_rows(t, g, s, gbar, w_g, w_b, b)
    grads = {}
    if b is not None:
        gbar = gbar + b * s
        grads["bias"] = g * s
    abar = gbar * (g * (1.0 - g))
    grads["gate.weight"] = t * abar
    grads["gate.bias"] = abar
    grads["hyper_bias.weight"] = t * s
    return grads, w_g @ abar + w_b @ s


def _squash_gates_backward_rows(t, g, s, gbar, w_g, w_b, b=None):
    """eq. 1.25: ``squash_gates_backward`` for a per-row t (B, 1); g, s, gbar (B, n)."""
    xp = get_array_module(g)
    tr = t[:, 0]
    ones = xp.ones(g.shape[0], dtype=g.dtype)          # Σ_b as a matrix-vector product
    grads = {}
    if b is not None:
        gbar = gbar + b * s
        grads["bias"] = ones @ (g * s)
    abar = g * (1.0 - g)
    abar *= gbar
    grads["gate.weight"] = tr @ abar
    grads["gate.bias"] = ones @ abar
    grads["hyper_bias.weight"] = tr @ s
    return grads, (abar @ w_g + s @ w_b)[:, None]


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
        """eq. 1.12: y = x (diag(g) W)ᵀ + b ⊙ g + t w_b;  eq. 1.13: ydot_k = xdot_k (diag(g) W)ᵀ.
        The gate and shift by ``squash_gates``, the product by ``forward_gated``.
        h (K+1, B, n_in); t scalar or (B, 1) (per-row gates g (B, n_out), eq. 1.24)."""
        row_time(t, h.shape[1], "ConcatSquashLinear")
        g, c, t = squash_gates(t, params["gate.weight"], params["gate.bias"],
                               params["hyper_bias.weight"], params.get("bias"))
        out, cache = self.forward_gated(params["weight"], h, g, c)
        return out, (cache, params, t)

    def backward_stacked(self, hbar, cache, need_xdotbar=True):
        """eq. 1.14 with G = hbarᵀ h = ybarᵀ x + Σ_k ydotbar_kᵀ xdot_k (n_out, n_in) and
        s = Σ_b ybar: xbar = ybar W_g, xdotbar_k = ydotbar_k W_g, W̄ = diag(g) G
        (``backward_gated``), and the gate terms ḡ, ā, b̄, w̄_g, b̄_g, w̄_b, tbar by
        ``squash_gates_backward``; per-row t: eq. 1.25."""
        cache, params, t = cache
        g = cache[2]
        s = get_array_module(g).empty_like(g)
        gbar = get_array_module(g).empty_like(g)
        hin, Wbar = self.backward_gated(hbar, cache, s, gbar, need_xdotbar)
        gate_grads, tbar = squash_gates_backward(t, g, s, gbar, params["gate.weight"],
                                                 params["hyper_bias.weight"], params.get("bias"))
        return hin, {"weight": Wbar, **gate_grads}, tbar

    # -- the gated form, for networks that compute the gates of all layers at once ----------

    def forward_gated(self, W, h, g, shift):
        """eq. 1.12-1.13 with the gate g = sigmoid(t w_g + b_g) (n_out,) and the shift
        c = b ⊙ g + t w_b (n_out,) given (npflow.odenet.ODENet computes them for all its
        layers with one set of array operations, eq. 2.4): out = h (diag(g) W)ᵀ, out[0] += c.
        W (n_out, n_in), h (K+1, B, n_in) -> (out (K+1, B, n_out), cache).
        Per-row gates g, c (B, n_out) (eq. 1.24): U = h Wᵀ, out = U ⊙ g (g broadcast over
        the K+1 blocks), out[0] += c; U is kept for ḡ (eq. 1.25)."""
        if g.ndim == 2:
            U = (_rows(h) @ W.T).reshape(h.shape[:-1] + (self.n_out,))
            out = U * g
            out[0] += shift
            return out, (W, None, g, h, U)
        Wg = W * g[:, None]
        out = (_rows(h) @ Wg.T).reshape(h.shape[:-1] + (self.n_out,))
        out[0] += shift
        return out, (W, Wg, g, h, None)

    def backward_gated(self, hbar, cache, s_out, gbar_out, need_tangents=True, ones=None):
        """The per-layer part of eq. 1.14 for ``forward_gated``, with G = hbarᵀ h: writes
        s = Σ_b ybar into ``s_out`` and rowsum(W ⊙ G) into ``gbar_out`` (both (n_out,), views
        of the network's buffers, where the gate terms b ⊙ s, ā, b̄, w̄_g, b̄_g, w̄_b and tbar
        of eq. 1.14 follow for all layers at once, eq. 2.5).
        hbar (K+1, B, n_out) -> (hbar_in = hbar W_g (K+1, B, n_in), W̄ = diag(g) G);
        need_tangents=False: hbar_in is (1, B, n_in), the primal block ybar W_g only.
        ones: optional (B,) ones, so that s = onesᵀ ybar is a matrix-vector product (faster
        than a reduction over the batch axis).
        Per-row gates (g (B, n_out), eq. 1.24-1.25): ``s_out`` and ``gbar_out`` are (B, n_out)
        and receive, row by row, ybar and Σ_k ybar_k ⊙ U_k (U = h Wᵀ); with ū = hbar ⊙ g,
        hbar_in = ū W and W̄ = ūᵀ h (rows of all K+1 blocks)."""
        W, Wg, g, h, U = cache
        if U is not None:
            return self._backward_gated_rows(hbar, W, g, h, U, s_out, gbar_out, need_tangents)
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

    @staticmethod
    def _backward_gated_rows(hbar, W, g, h, U, s_out, gbar_out, need_tangents):
        """eq. 1.25, the per-layer part (see backward_gated)."""
        xp = get_array_module(W)
        s_out[...] = hbar[0]
        xp.multiply(hbar[0], U[0], out=gbar_out)
        K = min(hbar.shape[0], U.shape[0]) - 1
        for k in range(1, K + 1):
            gbar_out += hbar[k] * U[k]
        ubar = hbar * g                                   # ū_k = ybar_k ⊙ g
        Wbar = _rows(ubar).T @ _rows(h)
        if not need_tangents:
            return (ubar[0] @ W)[None], Wbar
        return (_rows(ubar) @ W).reshape(h.shape), Wbar


# ---------------------------------------------------------------------------------------------
# Elementwise activations (eq. 1.6-1.8, 1.15-1.19)
# ---------------------------------------------------------------------------------------------

class Activation(StackedLayer):
    """Elementwise y = σ(x) (eq. 1.6), any shape x (B, ...). Subclasses give σ and its derivatives.

    Forward:  y = σ(x), ydot_k = σ'(x) ⊙ xdot_k                               (eq. 1.6)
    Backward: xbar = σ'(x) ⊙ ybar + σ''(x) ⊙ Σ_k xdot_k ⊙ ydotbar_k,
              xdotbar_k = σ'(x) ⊙ ydotbar_k                                    (eq. 1.7)

    How to add an activation (docs/layers.md, section 1, "How to add a layer", step 2): derive
    σ', σ'' and σ''' in docs/layers.md, then subclass and implement
      ``_value_d1(x, xp, out)`` -> (σ(x) written into ``out``, σ'(x), aux)  (the forward's work)
      ``_higher(x, y, d1, aux, xp, order)`` -> (σ'', ..., σ^(order)) from the cached values,
    so σ'' is computed only in the backward, and only when there are tangents; add the class to
    ``ACTIVATIONS``. Nothing else: the stacked rules, the in-place backward, ODENet, ConvNet,
    the examples' choices and the tests (tests/test_layers.py runs over ACTIVATIONS) follow.
    """

    max_order = 3
    smooth = True      # sigma is infinitely differentiable everywhere (ReLU: False)

    def param_names(self):
        return ()

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

    def backward_stacked(self, hbar, cache, need_xdotbar=True, out=None):
        """eq. 1.7 on the stack: s = Σ_k xdot_k ⊙ ydotbar_k (block by block, no (K, B, ...)
        temporary), hbar_in = σ'(x) ⊙ hbar, then hbar_in[0] += σ''(x) ⊙ s.
        ``out``: an array of hbar's shape to write hbar_in into; it may be hbar itself when the
        caller owns hbar (ODENet's and ConvNet's chains), saving one block-sized allocation."""
        x, y, d1, aux, h = cache
        xp = get_array_module(hbar)
        s = _tangent_pairing(h, hbar, xp)
        hin = xp.multiply(d1, hbar, out=out)
        if s is not None:
            (d2,) = self._higher(x, y, d1, aux, xp, 2)
            s *= d2
            hin[0] += s
        return hin, {}, 0.0


def _tangent_pairing(h, hbar, xp):
    """Σ_k h[k] ⊙ hbar[k] over the tangent blocks k = 1..K (None when K = 0), block by block;
    an hbar of the primal block only (zero tangent cotangents) gives None."""
    K = min(h.shape[0], hbar.shape[0]) - 1
    if K == 0:
        return None
    s = h[1] * hbar[1]
    if K > 1:
        tmp = xp.empty_like(s)
        for k in range(2, K + 1):
            xp.multiply(h[k], hbar[k], out=tmp)
            s += tmp
    return s


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

    def backward_stacked(self, hbar, cache, need_xdotbar=True, out=None):
        """eq. 1.7 on the stack with σ'' = −2σσ' (eq. 1.8) folded in (eq. 1.7a):
        hbar_in = σ' ⊙ hbar, so hbar_in[k] = xdotbar_k, then
        hbar_in[0] += −2σ ⊙ Σ_k xdot_k ⊙ xdotbar_k   (= σ'' ⊙ Σ_k xdot_k ⊙ ydotbar_k).
        No σ'' array is formed: 2K + 3 array operations, two block-sized temporaries."""
        x, y, d1, aux, h = cache
        xp = get_array_module(hbar)
        hin = xp.multiply(d1, hbar, out=out)
        s = _tangent_pairing(h, hin, xp)
        if s is not None:
            s *= y
            s *= -2.0
            hin[0] += s
        return hin, {}, 0.0


class Sigmoid(Activation):
    """σ = sigmoid = ½(1 + tanh(x/2)), σ' = σ(1 − σ), σ'' = σ'(1 − 2σ),
    σ''' = σ'((1 − 2σ)² − 2σ') (eq. 1.15)."""

    def _value_d1(self, x, xp, out):
        y = sigmoid(x, xp, out=out)
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
        s = sigmoid(x, xp)
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
        s = sigmoid(x, xp)
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


class GELU(Activation):
    """GELU in its tanh form (Hendrycks & Gimpel; PyTorch's GELU(approximate="tanh")), written
    with tanh only so that it runs on NumPy and CuPy alike (eq. 1.19):

        σ = ½ x (1 + T),  T = tanh u,  u = k (x + a x³),  k = √(2/π),  a = 0.044715;
        with S = 1 − T², u' = k (1 + 3a x²), u'' = 6 k a x, u''' = 6 k a:
        T' = S u',  T'' = S (u'' − 2 T u'²),  T''' = S (u''' − 6 T u' u'' − 2 u'³ (S − 2T²)),
        σ' = ½ (1 + T) + ½ x T',  σ'' = T' + ½ x T'',  σ''' = (3/2) T'' + ½ x T'''.
    """

    k = math.sqrt(2.0 / math.pi)
    a = 0.044715

    def _value_d1(self, x, xp, out):
        u = x * x
        u1 = u * (3.0 * self.a)          # u' = k (1 + 3a x²)
        u1 += 1.0
        u1 *= self.k
        u *= self.a                      # u = k x (1 + a x²)
        u += 1.0
        u *= x
        u *= self.k
        T = xp.tanh(u, out=u)
        S = T * T
        xp.subtract(1.0, S, out=S)       # S = 1 − T²
        y = xp.add(1.0, T, out=out)
        y *= 0.5
        d1 = x * S
        d1 *= u1
        d1 *= 0.5
        d1 += y                          # σ' = ½(1 + T) + ½ x S u'
        y *= x                           # σ = ½ x (1 + T)
        return y, d1, (T, S, u1)

    def _higher(self, x, y, d1, aux, xp, order):
        T, S, u1 = aux
        u2 = (6.0 * self.k * self.a) * x
        T1 = S * u1
        T2 = S * (u2 - 2.0 * T * u1 * u1)
        d2 = T1 + 0.5 * x * T2
        if order == 2:
            return (d2,)
        u3 = 6.0 * self.k * self.a
        T3 = S * (u3 - 6.0 * T * u1 * u2 - 2.0 * u1 ** 3 * (S - 2.0 * T * T))
        return d2, 1.5 * T2 + 0.5 * x * T3


class ReLU(Activation):
    """σ = max(x, 0), σ' = step(x) = [x > 0] (σ'(0) = 0, PyTorch's choice), σ'' = σ''' = 0
    (eq. 1.19a). Piecewise linear: the rules are exact away from x = 0, where σ is not
    differentiable (``smooth = False``: finite-difference checks must keep off the kink)."""

    smooth = False

    def _value_d1(self, x, xp, out):
        y = xp.maximum(x, 0.0, out=out)
        d1 = (x > 0).astype(x.dtype)
        return y, d1, None

    def _higher(self, x, y, d1, aux, xp, order):
        z = xp.zeros_like(d1)
        return (z,) if order == 2 else (z, z)

    def backward_stacked(self, hbar, cache, need_xdotbar=True, out=None):
        """eq. 1.7 with σ'' = 0 (eq. 1.19a): hbar_in = step(x) ⊙ hbar, no second-order term."""
        x, y, d1, aux, h = cache
        return get_array_module(hbar).multiply(d1, hbar, out=out), {}, 0.0


#: The activations by name: the one registry that ODENet, ConvNet, the models' ``activation=``
#: and the examples' ``--nonlinearity`` choices read (add a new Activation here, and only here).
ACTIVATIONS = {"tanh": Tanh, "softplus": Softplus, "sigmoid": Sigmoid, "swish": Swish,
               "logcosh": LogCosh, "gelu": GELU, "relu": ReLU}


def get_activation(name) -> Activation:
    """An activation layer by its name in ``ACTIVATIONS`` (case, "-" and "_" ignored; "silu" is
    "swish"); an Activation instance is returned as is."""
    if isinstance(name, Activation):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "silu":
        key = "swish"
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


#: Parameter names of older checkpoints (npflow.conv's ConcatSquashConv2d before the dense and
#: conv layers were named alike): old suffix -> the name used now.
_LEGACY_SUFFIXES = {".gate_weight": ".gate.weight", ".gate_bias": ".gate.bias",
                    ".hyper_bias": ".hyper_bias.weight"}


def upgrade_param_name(name: str) -> str:
    """A parameter name as saved by an older npflow -> the name used now (others unchanged):
    "b0.1.gate_weight" -> "b0.1.gate.weight", "...gate_bias" -> "...gate.bias",
    "...hyper_bias" -> "...hyper_bias.weight" (npflow.checkpoint applies it when reading)."""
    for old, new in _LEGACY_SUFFIXES.items():
        if name.endswith(old):
            return name[:-len(old)] + new
    return name
