"""FFJORD's MLP dynamics network f(x, t; θ) built from npflow.layers (docs/layers.md, section 2).

    h_0 = x,  h_{i+1} = σ(L_i(h_i, t))  (i < L−1),  f = L_{L−1}(h_{L−1}, t)          (eq. 2.1)

with L_i a ConcatSquashLinear (default), ConcatLinear or Linear (t ignored) and σ one activation
between layers (none after the last). The forward carries K tangents and the backward is the
exact reverse, second-order terms included (eq. 2.2-2.3), by chaining the layers' stacked rules
(docs/layers.md, eq. 1.1a): the primal and the K tangents travel as one (K+1, B, n) array, so
each layer costs one matrix product forward and two backward.

Parameters are one flat dict: layer i's entries are prefixed "i.", e.g. "0.weight", "0.bias",
"0.gate.weight", "0.gate.bias", "0.hyper_bias.weight" (i counts the affine layers).
"""
from __future__ import annotations

import math

from .backend import check_finite, get_array_module, resolve_dtype
from .layers import (ConcatLinear, ConcatSquashLinear, Layer, Linear, get_activation,
                     row_time, squash_gates, squash_gates_backward, stack_cotangents,
                     stack_tangents, unstack_tangents)

__all__ = ["ODENet", "LAYER_TYPES"]

LAYER_TYPES = {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear, "linear": Linear}


class _PreparedParams(dict):
    """A parameter dict plus ODENet's concatenated gate vectors (ODENet.prepare)."""

    __slots__ = ("gated",)


class ODENet(Layer):
    """MLP dynamics f: (B, n_in) × t -> (B, n_out) (eq. 2.1), FFJORD's ODEnet for vectors.

    n_in, n_out  input and output features (n_out = n_in for CNF dynamics)
    hidden       widths of the hidden layers, e.g. (64, 64, 64); () gives one affine layer
    layer        "concatsquash" (default) | "concat" (t as an extra input column) |
                 "linear" (t ignored)
    activation   a name in npflow.layers.ACTIVATIONS ("tanh", the default, "softplus",
                 "sigmoid", "swish", "logcosh", "gelu", ...)
    """

    def __init__(self, n_in: int, hidden=(64, 64, 64), n_out: int | None = None,
                 layer: str = "concatsquash", activation: str = "tanh"):
        self.n_in = int(n_in)
        self.n_out = self.n_in if n_out is None else int(n_out)
        self.hidden = tuple(int(w) for w in hidden)
        if layer not in LAYER_TYPES:
            raise ValueError(f"ODENet: unknown layer type {layer!r}: expected one of "
                             f"{sorted(LAYER_TYPES)}")
        if self.n_in < 1 or self.n_out < 1 or any(w < 1 for w in self.hidden):
            raise ValueError(f"ODENet: sizes must be >= 1, got n_in={n_in}, hidden={hidden}, "
                             f"n_out={n_out}")
        self.layer_type = layer
        self.activation_name = str(activation)
        self.activation = get_activation(activation)
        dims = (self.n_in,) + self.hidden + (self.n_out,)
        cls = LAYER_TYPES[layer]
        self.layers = [cls(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
        self._keys = [tuple((n, f"{i}.{n}") for n in lay.param_names())
                      for i, lay in enumerate(self.layers)]
        self._flat = [dict(keys) for keys in self._keys]    # local name -> flat name
        # ConcatSquash layers: the gates and shifts of all layers in one pass (eq. 2.4-2.5)
        self._gated = layer == "concatsquash" and all(lay.bias for lay in self.layers)
        if self._gated:
            n = len(self.layers)
            self._gate_keys = tuple(tuple(f"{i}.{name}" for i in range(n)) for name in (
                "gate.weight", "gate.bias", "hyper_bias.weight", "bias"))
            self._weight_keys = tuple(f"{i}.weight" for i in range(n))
            offs = [0]
            for lay in self.layers:
                offs.append(offs[-1] + lay.n_out)
            self._slices = tuple(slice(offs[i], offs[i + 1]) for i in range(n))

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments."""
        return {"n_in": self.n_in, "hidden": list(self.hidden), "n_out": self.n_out,
                "layer": self.layer_type, "activation": self.activation_name}

    # -- parameters -------------------------------------------------------------------------

    def init_params(self, rng, dtype="float32", xp=None, zero_last: bool = False) -> dict:
        """Fresh parameters {"i.name": array}, drawn from the numpy Generator ``rng`` on the host
        (PyTorch's default initialisation per layer, as in FFJORD) and moved once to ``xp``.

        zero_last: the last layer's weight, bias and hyper bias start at zero, so f ≡ 0 and the
        flow starts as the identity (RNODE); its gate stays random so gradients reach W.
        """
        import numpy
        xp = numpy if xp is None else xp
        dtype = resolve_dtype(dtype)
        params = {}
        last = len(self.layers) - 1
        for i, lay in enumerate(self.layers):
            for name, v in lay.init_params(rng, dtype, xp).items():
                if zero_last and i == last and not name.startswith("gate."):
                    v = xp.zeros_like(v)
                params[f"{i}.{name}"] = v
        return params

    def _layer_params(self, params, i):
        try:
            return {local: params[flat] for local, flat in self._keys[i]}
        except KeyError as exc:
            raise ValueError(f"ODENet: params has no entry {exc.args[0]!r}; expected the keys "
                             f"{self.param_names()}") from None

    def param_names(self):
        """The flat parameter names, in layer order."""
        return [flat for keys in self._keys for _, flat in keys]

    # -- input checks -----------------------------------------------------------------------

    def check_shapes(self, x, xdot=None):
        """Raise ValueError naming the shapes unless x is (B, n_in) and xdot None or (K, B, n_in).

        Shape comparisons only (no device synchronisation): cheap enough for every call.
        """
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"ODENet: x must have shape (B, {self.n_in}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if xdot is not None and (xdot.ndim != 3 or tuple(xdot.shape[1:]) != tuple(x.shape)):
            raise ValueError(f"ODENet: tangents xdot must have shape (K, B, {self.n_in}) = "
                             f"(K, {x.shape[0]}, {self.n_in}) to match x {tuple(x.shape)}, got "
                             f"{tuple(xdot.shape)}")

    def validate(self, x, xdot=None, t=None):
        """Entry-point check: shapes (ValueError naming them) and finiteness of x, xdot and t
        (ValueError naming which input holds NaN/Inf). One host synchronisation per array: call
        it where data enters a model, not inside the solver's loop."""
        self.check_shapes(x, xdot)
        check_finite(x, "ODENet input x")
        if xdot is not None:
            check_finite(xdot, "ODENet tangents xdot")
        if t is not None:
            if isinstance(t, (int, float)):
                if not math.isfinite(t):
                    raise ValueError(f"ODENet time t is not finite: {t!r}")
            else:
                check_finite(get_array_module(t).asarray(t), "ODENet time t")

    # -- forward and backward ---------------------------------------------------------------

    def forward(self, params, x, xdot, t):
        """eq. 2.1 with tangents (eq. 2.2): x (B, n_in), xdot (K, B, n_in) or None, t a scalar
        or (B, 1), one time per row (row b is f(x_b, t_b), docs/layers.md eq. 1.22 and 2.6)
        -> (y (B, n_out), ydot (K, B, n_out) or None, cache)."""
        self.check_shapes(x, xdot)
        rows = row_time(t, x.shape[0], "ODENet")
        if not isinstance(t, (int, float)):
            t = get_array_module(x).asarray(t, dtype=x.dtype)
        h = stack_tangents(x, xdot, "ODENet")
        K = h.shape[0] - 1
        if self._gated:
            return self._forward_gated(params, h, K, x, t)
        caches = []
        act = self.activation
        last = len(self.layers) - 1
        for i, lay in enumerate(self.layers):
            h, c = lay.forward_stacked(self._layer_params(params, i), h, t)
            caches.append(c)
            if i < last:
                h, c = act.forward_stacked(None, h, t)
                caches.append(c)
        y, ydot = unstack_tangents(h, K)
        return y, ydot, (tuple(caches), K, x, None, (x.shape[0], 1) if rows else ())

    def prepare(self, params):
        """``params`` for many calls with the same parameters (one ODE solve): a dict equal to
        ``params`` that also carries the concatenated gate vectors of eq. 2.4, so forward does
        not concatenate them on every call. The arrays must not be changed while it is in use.
        Without ConcatSquash layers, ``params`` itself."""
        if not self._gated:
            return params
        prepared = _PreparedParams(params)
        Ws, gates = self._gate_params(params)
        xp = get_array_module(Ws[0])
        prepared.gated = (Ws, tuple(xp.concatenate(v) for v in gates))
        return prepared

    def _gate_params(self, params):
        try:
            return ([params[k] for k in self._weight_keys],
                    [[params[k] for k in keys] for keys in self._gate_keys])
        except KeyError as exc:
            raise ValueError(f"ODENet: params has no entry {exc.args[0]!r}; expected the keys "
                             f"{self.param_names()}") from None

    def _forward_gated(self, params, h, K, x, t):
        """eq. 2.1-2.2 for ConcatSquash layers with the gates of all L layers at once (eq. 2.4):
        with w_g, b_g, w_b, b the layers' vectors concatenated (Σ n_out,),
        g = sigmoid(t w_g + b_g), c = t w_b + b ⊙ g (npflow.layers.squash_gates, the routine
        the layer itself uses); layer i uses the slices g_i, c_i. A per-row t (B, 1) gives
        per-row gates g, c (B, Σ n_out) and layer i the column slices g[:, sl] (eq. 2.6)."""
        xp = get_array_module(h)
        if type(params) is _PreparedParams:
            Ws, (GW, GB, HW, BB) = params.gated
        else:
            Ws, (gw, gb, hw, bb) = self._gate_params(params)
            GW, GB, HW, BB = (xp.concatenate(v) for v in (gw, gb, hw, bb))
        g, c, t = squash_gates(t, GW, GB, HW, BB)
        caches = []
        act = self.activation
        last = len(self.layers) - 1
        for i, lay in enumerate(self.layers):
            sl = self._slices[i]
            h, cc = lay.forward_gated(Ws[i], h, g[..., sl], c[..., sl])
            caches.append(cc)
            if i < last:
                h, cc = act.forward_stacked(None, h, t)
                caches.append(cc)
        y, ydot = unstack_tangents(h, K)
        return y, ydot, (tuple(caches), K, x, (g, t, GW, HW, BB), None)

    def backward(self, ybar, ydotbar, cache, need_xdotbar=True):
        """eq. 2.3: reverse of forward. ybar (B, n_out) or None, ydotbar (K, B, n_out) or None
        -> (xbar (B, n_in), xdotbar (K, B, n_in) or None, params_bar {"i.name": array},
        tbar 0-d array, or (B, 1) for a per-row t, eq. 2.6). need_xdotbar=False: xdotbar is
        returned as None and not computed (the first layer's input cotangent is formed for the
        primal block only), for callers
        whose input tangents are constants (CNF probes)."""
        caches, K, x, gated, t_shape = cache
        xp, dtype = get_array_module(x), x.dtype
        y_shape = (x.shape[0], self.n_out)
        if ybar is not None and tuple(ybar.shape) != y_shape:
            raise ValueError(f"ODENet: cotangent ybar must have shape {y_shape}, "
                             f"got {tuple(ybar.shape)}")
        hbar = stack_cotangents(ybar, ydotbar, y_shape, K, dtype, xp)
        if gated is not None:
            return self._backward_gated(hbar, caches, K, gated, xp, need_xdotbar)
        grads = {}
        tbar = xp.zeros(t_shape, dtype=dtype)              # () or (B, 1), like t
        ci = len(caches) - 1
        act = self.activation
        for i in range(len(self.layers) - 1, -1, -1):
            hbar, g, tb = self.layers[i].backward_stacked(hbar, caches[ci],
                                                          need_xdotbar or i > 0)
            ci -= 1
            tbar = tbar + tb
            flat = self._flat[i]
            for name, v in g.items():
                grads[flat[name]] = v
            if i > 0:   # hbar is the fresh hbar_in of layer i: the activation may overwrite it
                hbar, _, _ = act.backward_stacked(hbar, caches[ci], out=hbar)
                ci -= 1
        if not need_xdotbar:
            return hbar[0], None, grads, tbar
        xbar, xdotbar = unstack_tangents(hbar, K)
        return xbar, xdotbar, grads, tbar

    def _backward_gated(self, hbar, caches, K, gated, xp, need_xdotbar=True):
        """eq. 2.3 for ConcatSquash layers with the gate terms of eq. 1.14 for all layers at
        once (eq. 2.5): the layers write s_i = Σ_b ybar_i and rowsum(W_i ⊙ G_i) into slices of
        s and ḡ (Σ n_out,), then npflow.layers.squash_gates_backward (the routine the layer
        itself uses) gives ḡ += b ⊙ s, ā = ḡ ⊙ g(1 − g), b̄ = g ⊙ s, w̄_g = t ā, b̄_g = ā,
        w̄_b = t s and tbar = w_gᵀ ā + w_bᵀ s (the sum of the layers' terms). Per-row t
        (eq. 2.6): S and ḡ are (B, Σ n_out), row by row, and squash_gates_backward sums them
        over the rows (docs/layers.md eq. 1.25)."""
        g, t, GW, HW, BB = gated
        S = xp.empty(g.shape, dtype=GW.dtype)
        Gbar = xp.empty(g.shape, dtype=GW.dtype)
        ones = xp.ones(hbar.shape[1], dtype=hbar.dtype)     # s_i = onesᵀ ybar_i (a GEMV)
        grads = {}
        ci = len(caches) - 1
        act = self.activation
        for i in range(len(self.layers) - 1, -1, -1):
            sl = self._slices[i]
            hbar, Wbar = self.layers[i].backward_gated(hbar, caches[ci], S[..., sl], Gbar[..., sl],
                                                       need_xdotbar or i > 0, ones)
            ci -= 1
            grads[self._weight_keys[i]] = Wbar
            if i > 0:   # hbar is the fresh hbar_in of layer i: the activation may overwrite it
                hbar, _, _ = act.backward_stacked(hbar, caches[ci], out=hbar)
                ci -= 1
        gate_grads, tbar = squash_gates_backward(t, g, S, Gbar, GW, HW, BB)
        for i, sl in enumerate(self._slices):
            flat = self._flat[i]
            for name, v in gate_grads.items():
                grads[flat[name]] = v[sl]
        if not need_xdotbar:
            return hbar[0], None, grads, tbar
        xbar, xdotbar = unstack_tangents(hbar, K)
        return xbar, xdotbar, grads, tbar

    def __call__(self, params, x, t):
        """f(x, t) without tangents: (B, n_in) -> (B, n_out)."""
        return self.forward(params, x, None, t)[0]
