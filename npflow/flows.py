"""Discrete normalizing flows with hand-written backward passes: planar and the three Sylvester
flows (orthogonal, Householder, triangular) of van den Berg et al. 2018, and their composition.

Every equation number below refers to docs/flows.md. The flows are *amortized*: each flow
parameter arrives per sample (an encoder's raw, unconstrained output), and the flow maps the raw
values to its constrained parameters itself (û of eq. 1.2, R and R̃ of eq. 2.2, Q of eqs. 3.1-3.2
and 4.1) and differentiates that map too. Arrays are batch-first: z (B, D), every raw parameter
(B, *shape) with shape from ``param_shapes()``. h = tanh throughout.
"""
from __future__ import annotations

import warnings

from npflow.backend import get_array_module

__all__ = ["Flow", "Planar", "Orthogonal", "Householder", "Triangular", "FlowSequence",
           "make_flows", "orthogonalize", "orthogonalize_backward", "householder_product",
           "householder_product_backward", "FLOW_KINDS"]

FLOW_KINDS = ("planar", "orthogonal", "householder", "triangular")


# ----------------------------------------------------------------------------- helpers

def _bmv(A, x):
    """Batched matrix-vector product: A (B, m, n), x (B, n) -> (B, m)."""
    return (A @ x[..., None])[..., 0]


def _bmtv(A, x):
    """Batched transposed product Aᵀx: A (B, m, n), x (B, m) -> (B, n)."""
    return (x[..., None, :] @ A)[..., 0, :]


def _outer(x, y):
    """Batched outer product x yᵀ: x (B, m), y (B, n) -> (B, m, n)."""
    return x[:, :, None] * y[:, None, :]


def _swap(A):
    """Batched transpose of the last two axes."""
    return A.swapaxes(-1, -2)


def _softplus(a, xp):
    """softplus(a) = log(1 + eᵃ), stable for any a."""
    return xp.logaddexp(0.0, a)


def _sigmoid(a, xp):
    """sigmoid(a) = ½(1 + tanh(a/2)), the derivative of softplus."""
    return 0.5 * (1.0 + xp.tanh(0.5 * a))


def _diag(A, xp):
    """Batched diagonal: A (B, M, M) -> (B, M)."""
    return xp.diagonal(A, axis1=-2, axis2=-1)


def _check_int(name, value, low, high=None, what=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        rng = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{what}{name} must be an integer with {rng}, got {value!r}")


# ----------------------------------------------------------------------------- the contract

class Flow:
    """One invertible map z -> z' with its log-determinant and hand-written backward.

    Contract (every flow, and FlowSequence):

    ``param_shapes() -> dict``: name -> per-sample shape tuple of the RAW (unconstrained)
    parameters. A batch of parameters is a dict ``p`` with ``p[name]`` of shape (B, *shape).

    ``forward(z, p) -> (z_new, logdet, cache)``: z (B, D), z_new (B, D),
    logdet (B,) = log|det ∂z_new/∂z| per sample; cache is a value for ``backward`` (never
    stored on the object).

    ``backward(cache, z_new_bar, logdet_bar) -> (z_bar, p_bar)``: the adjoint of the map
    (z, p) -> (z_new, logdet). z_new_bar (B, D) or None (zero), logdet_bar (B,) or None (zero);
    z_bar (B, D); p_bar a dict with the keys and shapes of p. Inputs are never mutated.

    Arrays come from one array module (NumPy or CuPy), taken from z; the dtype of z is kept.
    """

    D: int

    def param_shapes(self) -> dict:
        raise NotImplementedError

    def forward(self, z, p):
        raise NotImplementedError

    def backward(self, cache, z_new_bar, logdet_bar):
        raise NotImplementedError

    # -- conveniences shared by every flow (not part of the math)

    def num_params(self) -> int:
        """Total number of raw parameters per sample (the encoder's output width)."""
        n = 0
        for shape in self.param_shapes().values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n

    def split_params(self, theta):
        """theta (B, num_params()) -> dict name -> (B, *shape) views, in param_shapes() order."""
        if theta.ndim != 2 or theta.shape[1] != self.num_params():
            raise ValueError(f"split_params: theta must have shape (B, {self.num_params()}), "
                             f"got {tuple(theta.shape)}")
        out, i = {}, 0
        for name, shape in self.param_shapes().items():
            k = 1
            for s in shape:
                k *= s
            out[name] = theta[:, i:i + k].reshape((theta.shape[0],) + tuple(shape))
            i += k
        return out

    def join_params(self, p):
        """The inverse of split_params: dict name -> (B, *shape) -> (B, num_params())."""
        xp = get_array_module(*p.values())
        B = next(iter(p.values())).shape[0]
        return xp.concatenate([p[name].reshape(B, -1) for name in self.param_shapes()], axis=1)

    def _validate(self, z, p):
        """One-line errors for bad shapes, before any work."""
        name = type(self).__name__
        if getattr(z, "ndim", None) != 2 or z.shape[1] != self.D:
            raise ValueError(f"{name}.forward: z must have shape (B, {self.D}), "
                             f"got {tuple(getattr(z, 'shape', ()))}")
        shapes = self.param_shapes()
        if set(p) != set(shapes):
            raise ValueError(f"{name}.forward: parameters must be exactly {sorted(shapes)}, "
                             f"got {sorted(p)}")
        B = z.shape[0]
        for key, shape in shapes.items():
            want = (B,) + tuple(shape)
            if tuple(p[key].shape) != want:
                raise ValueError(f"{name}.forward: parameter {key!r} must have shape {want} "
                                 f"(batch first), got {tuple(p[key].shape)}")
            if p[key].dtype != z.dtype:
                raise ValueError(f"{name}.forward: parameter {key!r} has dtype {p[key].dtype} "
                                 f"but z has {z.dtype}; cast both to one dtype")


# ----------------------------------------------------------------------------- 1. planar

class Planar(Flow):
    """Planar flow (docs/flows.md section 1), amortized:

        f(z) = z + û h(wᵀz + b),   h = tanh                                         (eq. 1.1)
        û = u + (m(wᵀu) − wᵀu) w/‖w‖²,   m(α) = −1 + softplus(α)                    (eq. 1.2)
        ûᵀw = m(wᵀu) > −1                                                           (eq. 1.3)
        log|det ∂f/∂z| = log|1 + h'(wᵀz + b) m(wᵀu)|                                (eq. 1.4)

    Raw parameters per sample: u (D,), w (D,), b (1,). w must be nonzero (‖w‖² divides).
    Backward: eqs. 1.5-1.7 (through û, eq. 1.6-1.7).
    """

    def __init__(self, D: int):
        _check_int("D", D, 1, what="Planar: ")
        self.D = D

    def param_shapes(self):
        return {"u": (self.D,), "w": (self.D,), "b": (1,)}

    def forward(self, z, p):
        """z (B, D), p {u (B, D), w (B, D), b (B, 1)} -> z_new (B, D), logdet (B,), cache."""
        self._validate(z, p)
        xp = get_array_module(z)
        u, w, b = p["u"], p["w"], p["b"]
        alpha = (w * u).sum(axis=1)                               # wᵀu      (B,)
        n = (w * w).sum(axis=1)                                   # ‖w‖²     (B,)
        m = _softplus(alpha, xp) - 1.0                            # m(α)     eq. 1.2
        k = (_softplus(-alpha, xp) - 1.0) / n                     # (m − α)/‖w‖², stable form
        u_hat = u + k[:, None] * w                                # eq. 1.2
        a = (w * z).sum(axis=1) + b[:, 0]                         # wᵀz + b  (B,)
        s = xp.tanh(a)
        z_new = z + u_hat * s[:, None]                            # eq. 1.1
        hp = 1.0 - s * s                                          # h'(a)
        g = 1.0 + hp * m
        logdet = xp.log(xp.abs(g))                                # eq. 1.4
        cache = (z, u, w, alpha, n, m, k, u_hat, s, hp, g)
        return z_new, logdet, cache

    def backward(self, cache, z_new_bar, logdet_bar):
        """eqs. 1.5-1.7. z_new_bar (B, D) or None, logdet_bar (B,) or None ->
        z_bar (B, D), p_bar {u (B, D), w (B, D), b (B, 1)}."""
        z, u, w, alpha, n, m, k, u_hat, s, hp, g = cache
        xp = get_array_module(z)
        a_bar = xp.zeros_like(s)
        m_bar = xp.zeros_like(s)
        u_hat_bar = xp.zeros_like(z)
        if z_new_bar is not None:
            a_bar = (z_new_bar * u_hat).sum(axis=1) * hp          # eq. 1.5
            u_hat_bar = z_new_bar * s[:, None]
        if logdet_bar is not None:
            a_bar = a_bar + logdet_bar * (-2.0 * s * hp) * m / g  # h'' = −2 h h'
            m_bar = logdet_bar * hp / g
        z_bar = a_bar[:, None] * w if z_new_bar is None else z_new_bar + a_bar[:, None] * w
        w_bar = a_bar[:, None] * z + k[:, None] * u_hat_bar       # eq. 1.5, 1.6
        b_bar = a_bar[:, None]
        k_bar = (u_hat_bar * w).sum(axis=1)                       # eq. 1.6
        m_bar = m_bar + k_bar / n
        n_bar = -k_bar * k / n
        alpha_bar = m_bar * _sigmoid(alpha, xp) - k_bar / n       # eq. 1.7
        u_bar = u_hat_bar + alpha_bar[:, None] * w
        w_bar = w_bar + alpha_bar[:, None] * u + (2.0 * n_bar)[:, None] * w
        return z_bar, {"u": u_bar, "w": w_bar, "b": b_bar}


# ----------------------------------------------------------------------------- composition

class FlowSequence(Flow):
    """z_K = f_K ∘ … ∘ f_1 (z_0), logdet = Σ_k log|det ∂z_k/∂z_{k−1}| (docs/flows.md eq. 6.1).

    Parameter names are "k.name" for flow k (0-based); backward is eq. 6.2: the log-det
    cotangent reaches every flow unchanged, the z cotangent is chained in reverse.
    """

    def __init__(self, flows):
        flows = list(flows)
        if not flows:
            raise ValueError("FlowSequence needs at least one flow")
        D = flows[0].D
        for k, f in enumerate(flows):
            if not isinstance(f, Flow):
                raise ValueError(f"FlowSequence: item {k} is a {type(f).__name__}, not a Flow")
            if f.D != D:
                raise ValueError(f"FlowSequence: flow {k} has D = {f.D} but flow 0 has D = {D}")
        self.flows = flows
        self.D = D

    def __len__(self):
        return len(self.flows)

    def param_shapes(self):
        return {f"{k}.{name}": shape for k, f in enumerate(self.flows)
                for name, shape in f.param_shapes().items()}

    def _split(self, p, k):
        prefix = f"{k}."
        return {name[len(prefix):]: v for name, v in p.items() if name.startswith(prefix)}

    def forward(self, z, p):
        """eq. 6.1. z (B, D), p {"k.name": (B, *shape)} -> z_K (B, D), logdet (B,), cache."""
        self._validate(z, p)
        caches = []
        logdet = None
        for k, f in enumerate(self.flows):
            z, ld, c = f.forward(z, self._split(p, k))
            logdet = ld if logdet is None else logdet + ld
            caches.append(c)
        return z, logdet, caches

    def backward(self, cache, z_new_bar, logdet_bar):
        """eq. 6.2. z_new_bar (B, D) or None, logdet_bar (B,) or None -> z_bar, p_bar."""
        p_bar = {}
        z_bar = z_new_bar
        for k in range(len(self.flows) - 1, -1, -1):
            z_bar, pk = self.flows[k].backward(cache[k], z_bar, logdet_bar)
            for name, v in pk.items():
                p_bar[f"{k}.{name}"] = v
        return z_bar, {name: p_bar[name] for name in self.param_shapes()}


def make_flows(kind: str, D: int, num_flows: int, **opts) -> FlowSequence:
    """A FlowSequence of ``num_flows`` flows of one kind on R^D.

    kind: "planar" (no options), "orthogonal" (M = number of orthonormal columns, default
    max(1, D // 2); tol, max_iter of the orthogonalization, section 3), "householder" (H =
    number of reflections, default 8), "triangular" (no options; flows alternate Q = I and
    Q = reversal, starting with I). Raises ValueError for an unknown kind, num_flows < 1,
    bad sizes or options the kind does not take.
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"make_flows: unknown flow kind {kind!r}; choose one of {FLOW_KINDS}")
    _check_int("D", D, 1, what="make_flows: ")
    _check_int("num_flows", num_flows, 1, what="make_flows: ")
    allowed = {"planar": (), "orthogonal": ("M", "tol", "max_iter"), "householder": ("H",),
               "triangular": ()}[kind]
    extra = sorted(set(opts) - set(allowed))
    if extra:
        raise ValueError(f"make_flows: kind {kind!r} takes options {list(allowed)}, "
                         f"not {extra}")
    if kind == "planar":
        flows = [Planar(D) for _ in range(num_flows)]
    elif kind == "orthogonal":
        M = opts.get("M", max(1, D // 2))
        flows = [Orthogonal(D, M, tol=opts.get("tol"), max_iter=opts.get("max_iter", 100))
                 for _ in range(num_flows)]
    elif kind == "householder":
        flows = [Householder(D, opts.get("H", 8)) for _ in range(num_flows)]
    else:
        flows = [Triangular(D, reverse=(k % 2 == 1)) for k in range(num_flows)]
    return FlowSequence(flows)
