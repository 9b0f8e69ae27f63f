"""A plain dense network (multilayer perceptron) with a hand-written backward (docs/layers.md,
section 1, "A dense network without time", eq. 1.20-1.21): the encoder and decoder of
npflow's autoencoders.

    MLP(sizes, activation="relu", out_activation=None)

maps x (B, n_in) -> y (B, n_out) through L = len(sizes) - 1 affine layers (npflow.layers.Linear,
eq. 1.3) with the activation σ (eq. 1.6) between them and, optionally, ``out_activation`` after
the last one (eq. 1.20). The network has no time input and no tangents: it chains the layers'
stacked rules (eq. 1.1a) with K = 0 tangents, so the backward is the first-order chain rule
(eq. 1.21, eq. 1.5 and eq. 1.7 without their tangent terms).

Parameters are an explicit dict ``{"0.weight", "0.bias", "1.weight", ...}`` ("<layer>.<name>",
layer = index of the affine layer, 0 .. L-1). Caches are values, so one set of parameters may be
evaluated several times (e.g. encoder on two batches) before any backward runs.
"""
from __future__ import annotations

from .layers import ACTIVATIONS, Linear, get_activation, stack_tangents

__all__ = ["MLP"]


class MLP:
    """Dense network y = a_out(W_{L-1} σ(... σ(W_0 x + b_0) ...) + b_{L-1}) (eq. 1.20).

    sizes: (n_in, h_1, ..., n_out), at least two entries, all >= 1.
    activation: name in npflow.layers.ACTIVATIONS ("relu", "tanh", "softplus", "sigmoid",
        "swish", "logcosh") or an Activation instance; applied after every layer but the last.
    out_activation: None (affine output) or such a name/instance (e.g. "sigmoid" for a decoder
        of pixel intensities in [0, 1]).
    bias: whether the affine layers have biases (default True).
    """

    def __init__(self, sizes, activation="relu", out_activation=None, bias: bool = True):
        try:
            sizes = tuple(int(s) for s in sizes)
        except (TypeError, ValueError):
            raise ValueError(f"MLP: sizes must be a sequence of integers (n_in, ..., n_out), "
                             f"got {sizes!r}") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"MLP: sizes must have at least two entries, all >= 1 "
                             f"(n_in, ..., n_out), got {sizes}")
        self.sizes = sizes
        self.n_in, self.n_out = sizes[0], sizes[-1]
        self.linears = [Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:])]
        self.activation = get_activation(activation)
        self.out_activation = None if out_activation is None else get_activation(out_activation)
        self.activation_name = _name(activation)
        self.out_activation_name = None if out_activation is None else _name(out_activation)

    def __repr__(self):
        return (f"MLP({self.sizes}, activation={self.activation_name!r}, "
                f"out_activation={self.out_activation_name!r})")

    @property
    def n_layers(self) -> int:
        """L, the number of affine layers."""
        return len(self.linears)

    def param_names(self):
        return tuple(f"{i}.{n}" for i, lin in enumerate(self.linears) for n in lin.param_names())

    def init_params(self, rng, dtype, xp) -> dict:
        """PyTorch's nn.Linear initialisation per layer (U(±1/sqrt(fan_in)), eq. 1.3).

        rng: numpy.random.Generator (host). Returns {"<i>.weight": (sizes[i+1], sizes[i]),
        "<i>.bias": (sizes[i+1],)} of ``dtype`` in module ``xp``.
        """
        params = {}
        for i, lin in enumerate(self.linears):
            for n, v in lin.init_params(rng, dtype, xp).items():
                params[f"{i}.{n}"] = v
        return params

    def _layer_params(self, params, i):
        pre = f"{i}."
        return {n: params[pre + n] for n in self.linears[i].param_names()}

    def forward(self, params, x):
        """eq. 1.20: x (B, n_in) -> (y (B, n_out), cache). The cache is a tuple (a value)."""
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"MLP: x must have shape (B, {self.n_in}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        missing = [k for k in self.param_names() if k not in params]
        if missing:
            raise ValueError(f"MLP: parameters {missing} missing; make them with init_params")
        h = x[None]                                   # stacked form with K = 0 (eq. 1.1a)
        caches = []
        for i, lin in enumerate(self.linears):
            h, c = lin.forward_stacked(self._layer_params(params, i), h, 0.0)
            caches.append(c)
            act = self.activation if i < self.n_layers - 1 else self.out_activation
            if act is not None:
                h, c = act.forward_stacked({}, h, 0.0)
            else:
                c = None
            caches.append(c)
        return h[0], tuple(caches)

    def jvp(self, params, x, xdot):
        """Tangents through the same layers (eq. 1.1, 1.4, 1.6): x (B, n_in), xdot (K, B, n_in)
        -> (y (B, n_out), ydot (K, B, n_out)), ydot_k = (∂y/∂x) xdot_k. For tests and
        diagnostics (the training path needs only ``forward``/``backward``)."""
        h = stack_tangents(x, xdot, "MLP.jvp")
        for i, lin in enumerate(self.linears):
            h, _ = lin.forward_stacked(self._layer_params(params, i), h, 0.0)
            act = self.activation if i < self.n_layers - 1 else self.out_activation
            if act is not None:
                h, _ = act.forward_stacked({}, h, 0.0)
        return h[0], h[1:]

    def backward(self, params, ybar, cache):
        """eq. 1.21: ybar (B, n_out) -> (xbar (B, n_in), params_bar) with params_bar[k] of
        params[k]'s shape: the gradient of <ybar, y> with respect to x and θ."""
        caches = cache
        if len(caches) != 2 * self.n_layers:
            raise ValueError("MLP.backward: cache does not come from this network's forward")
        if tuple(getattr(ybar, "shape", ())) != (caches[-2][1].shape[1], self.n_out):
            raise ValueError(f"MLP.backward: ybar must have shape (B, {self.n_out}) = "
                             f"{(caches[-2][1].shape[1], self.n_out)}, got "
                             f"{tuple(getattr(ybar, 'shape', ()))}")
        hbar = ybar[None]
        grads = {}
        for i in reversed(range(self.n_layers)):
            c_act = caches[2 * i + 1]
            if c_act is not None:
                act = self.activation if i < self.n_layers - 1 else self.out_activation
                hbar, _, _ = act.backward_stacked(hbar, c_act)
            hbar, g, _ = self.linears[i].backward_stacked(hbar, caches[2 * i])
            for n, v in g.items():
                grads[f"{i}.{n}"] = v
        return hbar[0], grads


def _name(act):
    if isinstance(act, str):
        return act
    for k, cls in ACTIVATIONS.items():
        if type(act) is cls:
            return k
    return type(act).__name__
