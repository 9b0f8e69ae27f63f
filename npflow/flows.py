"""Discrete normalizing flows with hand-written backward passes: planar and the three Sylvester
flows (orthogonal, Householder, triangular) of van den Berg et al. 2018, and their composition.

Every equation number below refers to docs/flows.md. The flows are *amortized*: each flow
parameter arrives per sample (an encoder's raw, unconstrained output), and the flow maps the raw
values to its constrained parameters itself (û of eq. 1.2, R and R̃ of eq. 2.2, Q of eqs. 3.1-3.2
and 4.1) and differentiates that map too. Arrays are batch-first: z (B, D), every raw parameter
(B, *shape) with shape from ``param_shapes()``. h = tanh throughout.
"""
from __future__ import annotations

import numbers
import warnings

from npflow.backend import get_array_module

__all__ = ["Flow", "Planar", "Orthogonal", "Householder", "Triangular", "FlowSequence",
           "make_flows", "planar_reparameterize", "orthogonalize", "orthogonalize_backward", "householder_product",
           "triangular_factors", "triangular_factors_backward", "eta_forward", "eta_backward",
           "FLOW_KINDS"]

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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
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

def planar_reparameterize(u, w):
    """eq. 1.2: û = u + (m(α) − α) w/‖w‖², α = wᵀu, m(α) = −1 + softplus(α), so ûᵀw = m(α) > −1
    (eq. 1.3). u, w (B, D), w nonzero -> û (B, D) and α, ‖w‖², m, k = (m − α)/‖w‖²,
    softplus(α) (each (B,)). m − α is computed as softplus(−α) − 1 (no cancellation)."""
    xp = get_array_module(u)
    alpha = (w * u).sum(axis=1)                                   # wᵀu      (B,)
    n = (w * w).sum(axis=1)                                       # ‖w‖²     (B,)
    sp = _softplus(alpha, xp)
    m = sp - 1.0                                                  # m(α)
    k = (_softplus(-alpha, xp) - 1.0) / n                         # (m − α)/‖w‖²
    return u + k[:, None] * w, alpha, n, m, k, sp


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
        self.D = int(D)

    def param_shapes(self):
        return {"u": (self.D,), "w": (self.D,), "b": (1,)}

    def forward(self, z, p):
        """z (B, D), p {u (B, D), w (B, D), b (B, 1)} -> z_new (B, D), logdet (B,), cache."""
        self._validate(z, p)
        xp = get_array_module(z)
        u, w, b = p["u"], p["w"], p["b"]
        u_hat, alpha, n, m, k, sp = planar_reparameterize(u, w)   # eq. 1.2
        a = (w * z).sum(axis=1) + b[:, 0]                         # wᵀz + b  (B,)
        s = xp.tanh(a)
        z_new = z + u_hat * s[:, None]                            # eq. 1.1
        hp = 1.0 - s * s                                          # h'(a)
        g = s * s + hp * sp                                       # 1 + h' m, eq. 1.4a
        logdet = xp.log(g)                                        # eq. 1.4
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


# ----------------------------------------------------------------------------- 2. Sylvester

def _sylvester_r_shapes(M):
    """Raw per-sample shapes of R, R̃ and b (eq. 2.2), the paper's packing: one full (M, M)
    matrix for both strict triangles and one raw vector per diagonal."""
    return {"R_full": (M, M), "diag_R": (M,), "diag_R_tilde": (M,), "b": (M,)}


def _strict_upper_mask(M, dtype, xp):
    """The (M, M) mask of the strict upper triangle (1 above the diagonal, else 0)."""
    return xp.triu(xp.ones((M, M), dtype=dtype), 1)


def triangular_factors(R_full, diag_R, diag_R_tilde):
    """eq. 2.2: R = triu₁(F) + diag(tanh d), R̃ = triu₁(Fᵀ) + diag(tanh d̃), from the raw
    F (B, M, M), d (B, M), d̃ (B, M). Returns R, R̃ (B, M, M) and r = tanh d, r̃ = tanh d̃ (B, M)."""
    xp = get_array_module(R_full)
    M = R_full.shape[-1]
    eye = xp.eye(M, dtype=R_full.dtype)
    upper = _strict_upper_mask(M, R_full.dtype, xp)
    r, rt = xp.tanh(diag_R), xp.tanh(diag_R_tilde)
    R = R_full * upper + r[:, :, None] * eye
    Rt = _swap(R_full) * upper + rt[:, :, None] * eye
    return R, Rt, r, rt


def triangular_factors_backward(R_bar, Rt_bar, r, rt):
    """eq. 2.10: cotangents of R, R̃ (B, M, M) -> of the raw F (B, M, M), d, d̃ (B, M)."""
    xp = get_array_module(R_bar)
    upper = _strict_upper_mask(R_bar.shape[-1], R_bar.dtype, xp)
    F_bar = R_bar * upper + _swap(Rt_bar * upper)
    d_bar = _diag(R_bar, xp) * (1.0 - r * r)
    dt_bar = _diag(Rt_bar, xp) * (1.0 - rt * rt)
    return F_bar, d_bar, dt_bar


def eta_forward(q, R, Rt, r, rt, b):
    """The inner map in Q's coordinates and the log-det by the Sylvester identity:

        c = η(q) = R h(R̃ q + b)                                                     (eq. 2.1)
        log|det ∂z'/∂z| = Σ_i log|1 + h'(a_i) r̃_ii r_ii|,  a = R̃ q + b            (eq. 2.4)

    q (B, M); R, R̃ (B, M, M) upper triangular with diagonals r, r̃ (B, M); b (B, M).
    Returns c (B, M), logdet (B,), cache.
    """
    xp = get_array_module(q)
    a = _bmv(Rt, q) + b                                           # R̃ q + b   (B, M)
    s = xp.tanh(a)                                                # h(a)
    c = _bmv(R, s)                                                # eq. 2.1
    hp = 1.0 - s * s                                              # h'(a)
    dd = r * rt                                                   # r_ii r̃_ii
    g = s * s + hp * (1.0 + dd)                                   # 1 + h' r r̃, eq. 2.4a
    logdet = xp.log(g).sum(axis=1)                                # eq. 2.4
    return c, logdet, (q, R, Rt, r, rt, s, hp, dd, g)


def eta_backward(cache, c_bar, logdet_bar):
    """eqs. 2.7-2.9: the adjoint of (q, R, R̃, b) -> (c, logdet) of eta_forward.

    c_bar (B, M) or None, logdet_bar (B,) or None -> q_bar (B, M), R_bar, Rt_bar (B, M, M)
    (full matrices, masked by triangular_factors_backward, eq. 2.10), b_bar (B, M). The
    diagonals of R_bar, Rt_bar include the log-det's dependence on r_ii, r̃_ii (eq. 2.9).
    """
    q, R, Rt, r, rt, s, hp, dd, g = cache
    xp = get_array_module(q)
    eye = xp.eye(s.shape[1], dtype=s.dtype)
    a_bar = xp.zeros_like(s)
    R_bar = xp.zeros_like(R)
    Rt_bar = xp.zeros_like(Rt)
    if c_bar is not None:
        R_bar = _outer(c_bar, s)                                  # eq. 2.7
        a_bar = _bmtv(R, c_bar) * hp
    if logdet_bar is not None:
        lb = logdet_bar[:, None]
        a_bar = a_bar + lb * (-2.0 * s * hp) * dd / g             # eq. 2.8, h'' = −2 h h'
        d_bar = lb * hp / g                                       # eq. 2.9
        R_bar = R_bar + (d_bar * rt)[:, :, None] * eye
        Rt_bar = Rt_bar + (d_bar * r)[:, :, None] * eye
    Rt_bar = Rt_bar + _outer(a_bar, q)                            # eq. 2.8
    q_bar = _bmtv(Rt, a_bar)
    return q_bar, R_bar, Rt_bar, a_bar


def _add(x, y):
    """x + y with None for a zero x."""
    return y if x is None else x + y


class _Sylvester(Flow):
    """Shared parts of the Sylvester flows z' = z + Q η(Qᵀz) (eq. 2.1): the subclass supplies
    Q through _Q_forward (raw Q parameters -> a value), _apply_Qt, _apply_Q and their adjoints
    (eq. 2.6)."""

    M: int

    def forward(self, z, p):
        """eq. 2.1, 2.4. z (B, D), p raw parameters (param_shapes()) -> z_new (B, D),
        logdet (B,), cache."""
        self._validate(z, p)
        Qv = self._Q_forward(p)
        R, Rt, r, rt = triangular_factors(p["R_full"], p["diag_R"], p["diag_R_tilde"])
        q, qt_cache = self._apply_Qt(Qv, z)                      # Qᵀz
        c, logdet, eta_cache = eta_forward(q, R, Rt, r, rt, p["b"])
        y, q_cache = self._apply_Q(Qv, c)                        # Q η(Qᵀz)
        return z + y, logdet, (Qv, qt_cache, eta_cache, q_cache)

    def backward(self, cache, z_new_bar, logdet_bar):
        """eqs. 2.6-2.10 with the Q rules of the subclass. z_new_bar (B, D) or None,
        logdet_bar (B,) or None -> z_bar (B, D), p_bar (dict like p)."""
        Qv, qt_cache, eta_cache, q_cache = cache
        p_bar = {}
        c_bar = None
        if z_new_bar is not None:
            c_bar = self._apply_Q_backward(Qv, q_cache, z_new_bar, p_bar)
        q_bar, R_bar, Rt_bar, b_bar = eta_backward(eta_cache, c_bar, logdet_bar)
        z_bar = _add(z_new_bar, self._apply_Qt_backward(Qv, qt_cache, q_bar, p_bar))
        r, rt = eta_cache[3], eta_cache[4]
        F_bar, d_bar, dt_bar = triangular_factors_backward(R_bar, Rt_bar, r, rt)
        self._Q_backward(Qv, p_bar)
        p_bar.update({"R_full": F_bar, "diag_R": d_bar, "diag_R_tilde": dt_bar, "b": b_bar})
        return z_bar, {name: p_bar[name] for name in self.param_shapes()}


# ----------------------------------------------------------------------------- 3. orthogonal

def _default_tol(dtype):
    """Stopping tolerance on max_ij |QᵀQ − I|_ij (eq. 3.4): 1e-12 in float64, 1e-5 in float32;
    the iteration's round-off floor is well below both at M <= 64 (docs/flows.md §3)."""
    return 1e-12 if str(dtype) == "float64" else 1e-5


def orthogonalize(X, tol=None, max_iter=100):
    """Q with orthonormal columns from a raw X (B, D, M) (M <= D) by eqs. 3.1-3.4:

        Q₀ = X / ‖X‖_F,   Q_{k+1} = Q_k (I + ½(I − Q_kᵀQ_k))

    stopped at the first k with max_ij |Q_kᵀQ_k − I|_ij <= tol (default: 1e-12 float64, 1e-5
    float32) or at k = max_iter (then a RuntimeWarning says so and Q is not orthonormal). One
    scalar goes to the host per iteration (the convergence test). Q tends to the polar factor
    of X (eq. 3.3); X must have full column rank. Differentiated through the UNROLLED
    iterations (orthogonalize_backward, eqs. 3.5-3.6), so the derivative is exact for the Q
    returned, converged or not. Returns Q (B, D, M) and a cache.
    """
    xp = get_array_module(X)
    tol = _default_tol(X.dtype) if tol is None else tol
    eye = xp.eye(X.shape[-1], dtype=X.dtype)
    nrm = xp.sqrt((X * X).sum(axis=(1, 2)))                       # ‖X‖_F  (B,)
    Q = X / nrm[:, None, None]                                    # eq. 3.1
    iterates = []
    while True:
        G = _swap(Q) @ Q                                          # QᵀQ   (B, M, M)
        err = float(xp.abs(G - eye).max()) if G.size else 0.0     # eq. 3.4 (one host sync)
        if err <= tol or len(iterates) == max_iter:
            break
        iterates.append((Q, G))
        Q = Q @ (1.5 * eye - 0.5 * G)                             # eq. 3.2
    if not err <= tol:
        warnings.warn(f"orthogonalize: max |QᵀQ - I| = {err:.3g} > tol = {tol:.3g} after "
                      f"max_iter = {max_iter} iterations; Q is not orthonormal and the "
                      "Sylvester log-det is not exact (is a raw Q rank-deficient or zero?)",
                      RuntimeWarning, stacklevel=2)
    return Q, (nrm, X, iterates)


def orthogonalize_backward(cache, Q_bar):
    """eqs. 3.5-3.6: Q_bar (B, D, M) -> X_bar (B, D, M), back through every iteration run:

        Q̄_k = Q̄_{k+1}(I + ½(I − G_k)) − ½ Q_k (Q̄_{k+1}ᵀQ_k + Q_kᵀQ̄_{k+1}),  G_k = Q_kᵀQ_k
        X̄ = (Q̄₀ − Q₀ ⟨Q₀, Q̄₀⟩) / ‖X‖_F
    """
    nrm, X, iterates = cache
    xp = get_array_module(X)
    eye = xp.eye(X.shape[-1], dtype=X.dtype)
    for Q, G in reversed(iterates):
        S = _swap(Q_bar) @ Q                                      # eq. 3.5
        Q_bar = Q_bar @ (1.5 * eye - 0.5 * G) - 0.5 * (Q @ (S + _swap(S)))
    Q0 = X / nrm[:, None, None]
    inner = (Q0 * Q_bar).sum(axis=(1, 2))                         # eq. 3.6
    return (Q_bar - Q0 * inner[:, None, None]) / nrm[:, None, None]


class Orthogonal(_Sylvester):
    """Orthogonal Sylvester flow (docs/flows.md sections 2-3), amortized:

        z' = z + Q R h(R̃ Qᵀ z + b)                                                  (eq. 2.1)

    Raw parameters per sample: "Q" (D, M), made orthonormal by eqs. 3.1-3.4 (stopped at
    max |QᵀQ − I| <= tol, default 1e-12 float64 / 1e-5 float32, at most max_iter = 100
    iterations; one host sync per iteration) and differentiated through the UNROLLED
    iterations (eqs. 3.5-3.6); "R_full" (M, M) (strict upper triangle -> R, strict lower
    triangle transposed -> R̃), "diag_R", "diag_R_tilde" (M,) (diagonals through tanh, so
    |r_ii r̃_ii| < 1 and the flow is invertible, eq. 2.5), "b" (M,) (eq. 2.2).
    log-det eq. 2.4; backward eqs. 2.6-2.10 and 3.5-3.6. The raw Q needs full column rank.
    """

    def __init__(self, D: int, M: int, tol=None, max_iter: int = 100):
        _check_int("D", D, 1, what="Orthogonal: ")
        _check_int("M", M, 1, D, what="Orthogonal: ")
        _check_int("max_iter", max_iter, 1, what="Orthogonal: ")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                                or not tol > 0):
            raise ValueError(f"Orthogonal: tol must be a positive number, got {tol!r}")
        self.D, self.M, self.tol, self.max_iter = int(D), int(M), tol, int(max_iter)

    def param_shapes(self):
        return {"Q": (self.D, self.M), **_sylvester_r_shapes(self.M)}

    def _Q_forward(self, p):
        return orthogonalize(p["Q"], self.tol, self.max_iter)

    def _apply_Qt(self, Qv, z):
        return _bmtv(Qv[0], z), z

    def _apply_Q(self, Qv, c):
        return _bmv(Qv[0], c), c

    def _apply_Q_backward(self, Qv, c, y_bar, p_bar):
        """eq. 2.6: y = Q c -> c̄ = Qᵀȳ, Q̄ += ȳ cᵀ."""
        p_bar["_Q"] = _outer(y_bar, c)
        return _bmtv(Qv[0], y_bar)

    def _apply_Qt_backward(self, Qv, z, q_bar, p_bar):
        """eq. 2.6: q = Qᵀz -> z̄ += Q q̄, Q̄ += z q̄ᵀ."""
        p_bar["_Q"] = _add(p_bar.get("_Q"), _outer(z, q_bar))
        return _bmv(Qv[0], q_bar)

    def _Q_backward(self, Qv, p_bar):
        p_bar["Q"] = orthogonalize_backward(Qv[1], p_bar.pop("_Q"))


# ----------------------------------------------------------------------------- 4. Householder

def householder_product(v):
    """Q = H_1 H_2 ⋯ H_H with H_k = I − 2 v_k v_kᵀ/‖v_k‖² (eq. 4.1), as a dense matrix.
    v (B, H, D), every v_k nonzero -> Q (B, D, D), orthogonal. The flow itself never forms Q
    (it applies the reflections, eqs. 4.2-4.4); this is the definition, for checks."""
    xp = get_array_module(v)
    B, H, D = v.shape
    Q = xp.broadcast_to(xp.eye(D, dtype=v.dtype), (B, D, D))
    for k in range(H):
        vk = v[:, k, :]
        Q = Q - _outer(_bmv(Q, vk) * (2.0 / (vk * vk).sum(axis=1, keepdims=True)), vk)
    return Q


def _reflect(x, v, n):
    """H x = x − 2 v (vᵀx)/n, n = ‖v‖² (eq. 4.2). x, v (B, D), n (B, 1)."""
    return x - v * ((2.0 / n) * (v * x).sum(axis=1, keepdims=True))


def _reflect_backward(x, v, n, y_bar):
    """eq. 4.3: the adjoint of y = H x: x̄ = H ȳ and
    v̄ = −(2/n)((vᵀx) ȳ + (vᵀȳ) x) + (4/n²)(vᵀx)(vᵀȳ) v."""
    vx = (v * x).sum(axis=1, keepdims=True)
    vy = (v * y_bar).sum(axis=1, keepdims=True)
    v_bar = -(2.0 / n) * (vx * y_bar + vy * x) + (4.0 / (n * n)) * (vx * vy) * v
    return y_bar - (2.0 / n) * vy * v, v_bar


class Householder(_Sylvester):
    """Householder Sylvester flow (docs/flows.md sections 2 and 4), amortized: eq. 2.1 with
    M = D and Q = H_1 ⋯ H_H, H_k = I − 2 v_k v_kᵀ/‖v_k‖² (eq. 4.1), from the raw "v" (H, D)
    (every v_k nonzero). Q is never formed: Qᵀz = H_H ⋯ H_1 z and Q c = H_1 ⋯ H_H c are
    applied reflection by reflection (eq. 4.2, O(H D) per sample), and differentiated the
    same way (eqs. 4.3-4.4). R, R̃, b as in Orthogonal (eq. 2.2, raw "R_full" (D, D),
    "diag_R", "diag_R_tilde", "b" (D,)). log-det eq. 2.4; backward eqs. 2.6-2.10, 4.3-4.4.
    """

    def __init__(self, D: int, H: int):
        _check_int("D", D, 1, what="Householder: ")
        _check_int("H", H, 1, what="Householder: ")
        self.D, self.M, self.H = int(D), int(D), int(H)

    def param_shapes(self):
        return {"v": (self.H, self.D), **_sylvester_r_shapes(self.D)}

    def _Q_forward(self, p):
        v = p["v"]
        return v, (v * v).sum(axis=2, keepdims=True)              # v (B, H, D), n (B, H, 1)

    def _chain(self, Qv, x, order):
        v, n = Qv
        inputs = []
        for k in order:
            inputs.append(x)
            x = _reflect(x, v[:, k], n[:, k])
        return x, inputs

    def _chain_backward(self, Qv, inputs, order, y_bar, p_bar):
        v, n = Qv
        xp = get_array_module(v)
        v_bar = p_bar.setdefault("v", xp.zeros_like(v))
        for x, k in zip(reversed(inputs), reversed(order)):
            y_bar, vb = _reflect_backward(x, v[:, k], n[:, k], y_bar)
            v_bar[:, k] += vb                                     # eq. 4.4
        return y_bar

    def _apply_Qt(self, Qv, z):
        return self._chain(Qv, z, range(self.H))                  # H_H ⋯ H_1 z

    def _apply_Q(self, Qv, c):
        return self._chain(Qv, c, range(self.H - 1, -1, -1))      # H_1 ⋯ H_H c

    def _apply_Qt_backward(self, Qv, inputs, q_bar, p_bar):
        return self._chain_backward(Qv, inputs, range(self.H), q_bar, p_bar)

    def _apply_Q_backward(self, Qv, inputs, y_bar, p_bar):
        return self._chain_backward(Qv, inputs, range(self.H - 1, -1, -1), y_bar, p_bar)

    def _Q_backward(self, Qv, p_bar):
        if "v" not in p_bar:                                      # z_new_bar and q_bar zero
            p_bar["v"] = get_array_module(Qv[0]).zeros_like(Qv[0])


# ----------------------------------------------------------------------------- 5. triangular

class Triangular(_Sylvester):
    """Triangular Sylvester flow (docs/flows.md sections 2 and 5), amortized: eq. 2.1 with
    M = D and Q = I (reverse=False) or Q = P, the reversal permutation (reverse=True):

        z' = z + P R h(R̃ Pᵀ z + b),   (Pᵀz)_i = z_{D+1−i}                              (eq. 5.1)

    P is applied as an index reversal, never as a matrix. Raw "R_full" (D, D), "diag_R",
    "diag_R_tilde", "b" (D,) as in eq. 2.2. log-det eq. 2.4 (eq. 5.2); backward eq. 5.3 with
    eqs. 2.7-2.10.
    """

    def __init__(self, D: int, reverse: bool = False):
        _check_int("D", D, 1, what="Triangular: ")
        if not isinstance(reverse, bool):
            raise ValueError(f"Triangular: reverse must be True or False, got {reverse!r}")
        self.D, self.M, self.reverse = int(D), int(D), reverse

    def param_shapes(self):
        return _sylvester_r_shapes(self.D)

    def _Q_forward(self, p):
        return None

    def _flip(self, x):
        return x[:, ::-1] if self.reverse else x                  # Pᵀx = Px (eq. 5.3)

    def _apply_Qt(self, Qv, z):
        return self._flip(z), None

    def _apply_Q(self, Qv, c):
        return self._flip(c), None

    def _apply_Qt_backward(self, Qv, cache, q_bar, p_bar):
        return self._flip(q_bar)

    def _apply_Q_backward(self, Qv, cache, y_bar, p_bar):
        return self._flip(y_bar)

    def _Q_backward(self, Qv, p_bar):
        pass


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
