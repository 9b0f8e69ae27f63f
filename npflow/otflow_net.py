"""OT-Flow's potential network Φ, its gradient, its exact Laplacian, and their reverse
(docs/otflow.md, sections 1-3; Onken et al. 2021, eqs. 9-14).

    Φ(s) = wᵀN(s) + ½ sᵀ(AᵀA)s + cᵀs,     s = (x, t) ∈ R^{d+1}, time last     (eq. 5.1)

with N a ResNet of width m and depth M+1 (an opening layer and M residual layers, h = 1/M):

    a_0 = K_0 s + b_0,      u_0 = σ(a_0)                                       (eq. 5.2)
    a_i = K_i u_{i−1} + b_i, u_i = u_{i−1} + h σ(a_i),  i = 1..M                (eq. 5.3)

σ(a) = log(eᵃ + e⁻ᵃ), σ' = tanh, σ'' = 1 − tanh², σ''' = −2 tanh (1 − tanh²)     (eq. 5.4)

Three pure functions, the rules side by side:

    potential_forward  :: (params, s, d)               -> (Φ, ∇_sΦ, tr ∇ₓ²Φ, cache)
    potential_backward :: (cache, Φ̄, ḡ, τ̄)              -> (s̄, params_bar)
    init_potential     :: (d, width, depth, rank, rng, dtype, xp) -> params

Shapes: s (B, d+1); Φ (B,); ∇_sΦ (B, d+1); tr (B,). Parameters (m = width, M = depth − 1,
r = rank): K0 (m, d+1), b0 (m,), K1..KM (m, m), b1..bM (m,), w (m,), A (r, d+1), c (d+1,).
The constant of Φ (OT-Flow's bias of c) drops out of ∇Φ and of the trace, the only quantities the
flow uses, so it is not a parameter here.

Row convention: a batch of vectors is a (B, n) array, so a_0 = s K_0ᵀ + b_0 in code. The
Jacobians ∂u_i/∂x are stored tangent-first, (d, B, m), so that K_i J is one matrix product over
d·B rows. Nothing loops over the d basis vectors.
"""
from __future__ import annotations

import math

from .backend import get_array_module

__all__ = ["init_potential", "potential_forward", "potential_backward", "potential_value",
           "potential_hvp", "basis_tangent_trace",
           "param_names", "logcosh"]


def param_names(depth: int) -> list:
    """Names of the potential's parameters for a ResNet with ``depth`` K-layers (depth ≥ 2)."""
    M = depth - 1
    names = ["K0", "b0"]
    for i in range(1, M + 1):
        names += [f"K{i}", f"b{i}"]
    return names + ["w", "A", "c"]


def logcosh(a, xp):
    """σ(a) = log(eᵃ + e⁻ᵃ) = |a| + log(1 + e^{−2|a|}), overflow-free (eq. 5.4)."""
    b = xp.abs(a)
    return b + xp.log1p(xp.exp(-2 * b))


def init_potential(d, width, depth, rank, rng, dtype, xp) -> dict:
    """Initial parameters as OT-Flow's reference code chooses them (docs/otflow.md, section 1):
    K_i, b_i uniform on ±1/√fan_in (PyTorch's Linear default), all residual layers starting from
    the *same* draw (the reference deep-copies layer 1), A Xavier-uniform on ±√(6/(r + d + 1)),
    w = 1, c = 0.

    d: dimension of x; width m; depth = number of K layers (≥ 2); rank r (1 ≤ r ≤ d+1);
    rng: numpy.random.Generator (host); returns a dict of ``dtype`` arrays in ``xp``.
    """
    d, m, depth, r = int(d), int(width), int(depth), int(rank)
    if d < 1 or m < 1 or depth < 2 or not 1 <= r <= d + 1:
        raise ValueError(f"potential needs d >= 1, width >= 1, depth >= 2 and 1 <= rank <= d+1; "
                         f"got d={d}, width={m}, depth={depth}, rank={r}")

    def put(a):
        # a fresh copy every time: asarray returns its (float64) input itself, which made the
        # residual layers' K_i / b_i one shared array (an in-place update of one moved all)
        return xp.array(a, dtype=dtype, copy=True)

    bound0 = 1.0 / math.sqrt(d + 1)
    p = {"K0": put(rng.uniform(-bound0, bound0, (m, d + 1))),
         "b0": put(rng.uniform(-bound0, bound0, (m,)))}
    bound1 = 1.0 / math.sqrt(m)
    K1 = rng.uniform(-bound1, bound1, (m, m))
    b1 = rng.uniform(-bound1, bound1, (m,))
    for i in range(1, depth):
        p[f"K{i}"] = put(K1)
        p[f"b{i}"] = put(b1)
    p["w"] = put(rng.uniform(1.0, 1.0, (m,)))
    xb = math.sqrt(6.0 / (r + d + 1))
    p["A"] = put(rng.uniform(-xb, xb, (r, d + 1)))
    p["c"] = put(rng.uniform(0.0, 0.0, (d + 1,)))
    return p


def _depth(params) -> int:
    M = 0
    while f"K{M + 1}" in params:
        M += 1
    return M


def potential_value(params, s):
    """Φ(s) alone (eq. 5.1-5.3), s (B, d+1) -> (B,). For tests and diagnostics."""
    xp = get_array_module(s)
    M = _depth(params)
    h = 1.0 / M
    u = logcosh(s @ params["K0"].T + params["b0"], xp)
    for i in range(1, M + 1):
        u = u + h * logcosh(u @ params[f"K{i}"].T + params[f"b{i}"], xp)
    A = params["A"]
    sA = s @ A.T
    return u @ params["w"] + 0.5 * (sA * sA).sum(axis=1) + s @ params["c"]


def potential_forward(params, s, d, need_trace=True):
    """Φ, ∇_sΦ and tr ∇ₓ²Φ at s (docs/otflow.md eqs. 5.1-5.10).

    Gradient by the reverse sweep (eq. 5.5-5.6):
        z_{M+1} = w,  z_i = z_{i+1} + h K_iᵀ(σ'(a_i) ⊙ z_{i+1}),  z_0 = K_0ᵀ(σ'(a_0) ⊙ z_1),
        ∇_sΦ = z_0 + AᵀA s + c.
    Trace by the OT-Flow recursion (eq. 5.7-5.10), E = first d columns of I_{d+1}:
        J_0 = diag σ'(a_0) K_0E,               t_0 = (σ''(a_0) ⊙ z_1)ᵀ((K_0E)⊙(K_0E))1,
        P_i = K_i J_{i−1},  t_i = (σ''(a_i) ⊙ z_{i+1})ᵀ(P_i ⊙ P_i)1,  J_i = J_{i−1} + h diag σ'(a_i) P_i,
        tr = t_0 + h Σ_{i=1..M} t_i + Σ_{k≤d} (AᵀA)_kk.

    params: dict (see module docstring); s (B, d+1) with time last; d the space dimension.
    Returns phi (B,), grad (B, d+1), trace (B,) (None when need_trace is False), cache.
    """
    xp = get_array_module(s)
    if s.ndim != 2 or s.shape[1] != d + 1:
        raise ValueError(f"potential input s must have shape (B, d+1) = (B, {d + 1}); "
                         f"got {tuple(s.shape)}")
    M = _depth(params)
    h = 1.0 / M
    B = s.shape[0]
    K = [params[f"K{i}"] for i in range(M + 1)]
    m = K[0].shape[0]
    w, A, c = params["w"], params["A"], params["c"]

    # ResNet forward, eqs. 5.2-5.3: keep a_i's σ' = tanh and σ'' = 1 − tanh², and u_i.
    th, d2, u = [], [], []
    a = s @ K[0].T + params["b0"]
    u.append(logcosh(a, xp))
    for i in range(1, M + 1):
        th.append(xp.tanh(a))
        a = u[i - 1] @ K[i].T + params[f"b{i}"]
        u.append(u[i - 1] + h * logcosh(a, xp))
    th.append(xp.tanh(a))
    d2 = [1 - t * t for t in th]

    S = A.T @ A
    sS = s @ S
    phi = u[M] @ w + 0.5 * (sS * s).sum(axis=1) + s @ c

    # Gradient, eq. 5.5-5.6 (z[i] is the adjoint of u_{i−1}; z[M+1] = w).
    z = [None] * (M + 2)
    z[M + 1] = xp.broadcast_to(w, (B, m))
    g = [None] * (M + 1)                       # g_i = σ'(a_i) ⊙ z_{i+1}
    for i in range(M, 0, -1):
        g[i] = th[i] * z[i + 1]
        z[i] = z[i + 1] + h * (g[i] @ K[i])
    g[0] = th[0] * z[1]
    grad = g[0] @ K[0] + sS + c

    trace = None
    Js, Ps = [], []
    if need_trace:
        # Trace, eq. 5.7-5.10: J_i = ∂u_i/∂x as (d, B, m); P_i = ∂a_i/∂x.
        KE_T = xp.ascontiguousarray(K[0][:, :d].T)   # (d, m) = (K_0 E)ᵀ, unit inner stride
        q = (KE_T * KE_T).sum(axis=0)          # (m,)  ((K_0E)⊙(K_0E))1
        trace = (d2[0] * z[1]) @ q             # t_0
        J = th[0][None] * KE_T[:, None, :]     # (d, B, m)
        for i in range(1, M + 1):
            P = (J.reshape(d * B, m) @ K[i].T).reshape(d, B, m)
            Js.append(J)
            Ps.append(P)
            trace = trace + h * ((d2[i] * z[i + 1]) * (P * P).sum(axis=0)).sum(axis=1)
            if i < M:                          # J_M is never used
                J = J + h * (th[i][None] * P)
        trace = trace + xp.trace(S[:d, :d])
    cache = (params, s, d, M, h, u, th, d2, z, g, sS, Js, Ps)
    return phi, grad, trace, cache


def _add(acc, v):
    if v is None:
        return acc
    return v if acc is None else acc + v


def potential_backward(cache, phi_bar, grad_bar, trace_bar):
    """Reverse of (s, θ) -> (Φ, ∇_sΦ, tr ∇ₓ²Φ) (docs/otflow.md eqs. 5.11-5.24).

    phi_bar (B,), grad_bar (B, d+1), trace_bar (B,): cotangents, any may be None (zero).
    Returns s_bar (B, d+1) and params_bar (dict with the keys of params).

    Order (each step only uses adjoints already complete):
      1. reverse of the trace recursion (eqs. 5.11-5.15): adjoints of P_i, J_i, σ'(a_i),
         σ''(a_i), z_{i+1}, K_i, K_0E and of AᵀA;
      2. reverse of the gradient sweep, i = 0..M (eqs. 5.16-5.18): z̄_i is complete when reached;
      3. reverse of Φ and of the ResNet, i = M..0 (eqs. 5.19-5.22), where the adjoints of
         σ(a_i), σ'(a_i) and σ''(a_i) meet: ā_i = σ'σ̄ + σ''σ̄' + σ'''σ̄'' (eq. 5.21);
      4. Ā = A(S̄ + S̄ᵀ) for S = AᵀA (eq. 5.23).
    """
    params, s, d, M, h, u, th, d2, z, g, sS, Js, Ps = cache
    xp = get_array_module(s)
    K = [params[f"K{i}"] for i in range(M + 1)]
    m = K[0].shape[0]
    B, D = s.shape
    w, A = params["w"], params["A"]

    Kb = [xp.zeros_like(k) for k in K]
    th_bar = [None] * (M + 1)
    d2_bar = [None] * (M + 1)
    z_bar = [None] * (M + 2)
    S_bar = xp.zeros((D, D), dtype=s.dtype)
    s_bar = xp.zeros_like(s)
    c_bar = xp.zeros((D,), dtype=s.dtype)
    w_bar = xp.zeros_like(w)

    # 1. Trace (eqs. 5.11-5.15).
    if trace_bar is not None:
        if not Ps:
            raise ValueError("potential_backward got a trace cotangent but the forward ran "
                             "with need_trace=False")
        diag = xp.concatenate([xp.ones((d,), dtype=s.dtype), xp.zeros((1,), dtype=s.dtype)])
        S_bar = S_bar + xp.diag(diag * trace_bar.sum())
        tb = (h * trace_bar)[:, None]          # (B, 1): t̄_i = h τ̄
        J_bar = None                           # adjoint of J_i, starting at J_M (unused: 0)
        for i in range(M, 0, -1):
            P, Jprev = Ps[i - 1], Js[i - 1]
            ci = d2[i] * z[i + 1]
            ci_bar = tb * (P * P).sum(axis=0)                  # eq. 5.11
            P_bar = (2 * tb * ci)[None] * P
            if J_bar is not None:                              # eq. 5.12, J_i = J_{i−1} + h σ' P
                P_bar = P_bar + h * (th[i][None] * J_bar)
                th_bar[i] = _add(th_bar[i], h * (J_bar * P).sum(axis=0))
            d2_bar[i] = _add(d2_bar[i], ci_bar * z[i + 1])
            z_bar[i + 1] = _add(z_bar[i + 1], ci_bar * d2[i])
            Pf = P_bar.reshape(d * B, m)                       # eq. 5.13, P_i = K_i J_{i−1}
            Kb[i] = Kb[i] + Pf.T @ Jprev.reshape(d * B, m)
            J_bar = _add(J_bar, (Pf @ K[i]).reshape(d, B, m))
        KE_T = xp.ascontiguousarray(K[0][:, :d].T)             # eq. 5.14, J_0 = σ'(a_0) K_0E
        th_bar[0] = _add(th_bar[0], (J_bar * KE_T[:, None, :]).sum(axis=0))
        KE_bar = (J_bar * th[0][None]).sum(axis=1).T           # (m, d)
        c0 = d2[0] * z[1]                                      # eq. 5.15, t_0 = c_0ᵀ q
        q = (KE_T * KE_T).sum(axis=0)
        c0_bar = trace_bar[:, None] * q[None, :]
        d2_bar[0] = _add(d2_bar[0], c0_bar * z[1])
        z_bar[1] = _add(z_bar[1], c0_bar * d2[0])
        KE_bar = KE_bar + 2 * (trace_bar @ c0)[:, None] * KE_T.T
        Kb[0] = Kb[0] + xp.concatenate([KE_bar, xp.zeros((m, 1), dtype=s.dtype)], axis=1)

    # 2. Gradient sweep (eqs. 5.16-5.18).
    if grad_bar is not None:
        S = A.T @ A
        s_bar = s_bar + grad_bar @ S                           # eq. 5.16, ∇Φ = z_0 + Ss + c
        S_bar = S_bar + s.T @ grad_bar
        c_bar = c_bar + grad_bar.sum(axis=0)
        g0_bar = grad_bar @ K[0].T                             # eq. 5.17, z_0 = K_0ᵀ g_0
        Kb[0] = Kb[0] + g[0].T @ grad_bar
        th_bar[0] = _add(th_bar[0], g0_bar * z[1])
        z_bar[1] = _add(z_bar[1], g0_bar * th[0])
    for i in range(1, M + 1):                                  # eq. 5.18
        zb = z_bar[i]
        if zb is None:
            continue
        z_bar[i + 1] = _add(z_bar[i + 1], zb)
        gi_bar = h * (zb @ K[i].T)
        Kb[i] = Kb[i] + h * (g[i].T @ zb)
        th_bar[i] = _add(th_bar[i], gi_bar * z[i + 1])
        z_bar[i + 1] = z_bar[i + 1] + gi_bar * th[i]
    if z_bar[M + 1] is not None:
        w_bar = w_bar + z_bar[M + 1].sum(axis=0)

    # 3. Φ and the ResNet (eqs. 5.19-5.22).
    ub = None
    if phi_bar is not None:
        ub = phi_bar[:, None] * w[None, :]                     # eq. 5.19
        w_bar = w_bar + phi_bar @ u[M]
        s_bar = s_bar + phi_bar[:, None] * (sS + params["c"])
        S_bar = S_bar + 0.5 * ((s * phi_bar[:, None]).T @ s)
        c_bar = c_bar + phi_bar @ s
    pb = {}
    for i in range(M, -1, -1):
        a_bar = None                                           # eq. 5.21
        sig_bar = ub if i == 0 or ub is None else h * ub
        if sig_bar is not None:
            a_bar = th[i] * sig_bar
        if th_bar[i] is not None:
            a_bar = _add(a_bar, d2[i] * th_bar[i])
        if d2_bar[i] is not None:
            a_bar = _add(a_bar, (-2 * th[i] * d2[i]) * d2_bar[i])
        if a_bar is None:
            pb[f"b{i}"] = xp.zeros((m,), dtype=s.dtype)
            continue
        pb[f"b{i}"] = a_bar.sum(axis=0)
        if i == 0:                                             # eq. 5.22, a_0 = K_0 s + b_0
            s_bar = s_bar + a_bar @ K[0]
            Kb[0] = Kb[0] + a_bar.T @ s
        else:                                                  # eq. 5.20, a_i = K_i u_{i−1} + b_i
            Kb[i] = Kb[i] + a_bar.T @ u[i - 1]
            ub = _add(ub, a_bar @ K[i])

    for i in range(M + 1):
        pb[f"K{i}"] = Kb[i]
    pb["w"] = w_bar
    pb["A"] = A @ (S_bar + S_bar.T)                            # eq. 5.23
    pb["c"] = c_bar
    return s_bar, pb


def potential_hvp(params, s, V):
    """Hessian-vector products ∇²_sΦ(s) v_k by forward-mode tangents of the gradient sweep
    (docs/otflow.md eq. 5.32-5.33): the tangent rule of s -> ∇_sΦ, for the dot-product test and
    for the exact trace by basis tangents (bench/bench_otflow_trace.py).

        ȧ_0 = K_0 v,  u̇_0 = σ'(a_0) ⊙ ȧ_0,  ȧ_i = K_i u̇_{i−1},  u̇_i = u̇_{i−1} + h σ'(a_i) ⊙ ȧ_i
        ż_{M+1} = 0,  ġ_i = σ''(a_i) ⊙ ȧ_i ⊙ z_{i+1} + σ'(a_i) ⊙ ż_{i+1},
        ż_i = ż_{i+1} + h K_iᵀ ġ_i,  (∇²Φ v) = K_0ᵀ ġ_0 + AᵀA v

    params: the potential's parameters; s (B, D); V (K, B, D) tangents, D = d + 1.
    Returns (grad (B, D), HV (K, B, D)).
    """
    xp = get_array_module(s)
    M = _depth(params)
    h = 1.0 / M
    Kn, B, D = V.shape
    K = [params[f"K{i}"] for i in range(M + 1)]
    m = K[0].shape[0]
    A, w = params["A"], params["w"]
    S = A.T @ A
    KB = Kn * B

    def mm(T, W):                              # (Kn, B, n) @ W as one product over Kn·B rows
        return (T.reshape(KB, T.shape[-1]) @ W).reshape(Kn, B, W.shape[1])

    a = s @ K[0].T + params["b0"]
    ad = mm(V, K[0].T)
    th, d2, ads = [], [], []
    u = logcosh(a, xp)
    for i in range(0, M + 1):
        if i > 0:
            a = u @ K[i].T + params[f"b{i}"]
            ad = mm(ud, K[i].T)
            u = u + h * logcosh(a, xp)
        t_ = xp.tanh(a)
        th.append(t_)
        d2.append(1 - t_ * t_)
        ads.append(ad)
        ud = t_[None] * ad if i == 0 else ud + h * (t_[None] * ad)
    z = xp.broadcast_to(w, (B, m))
    zd = None
    for i in range(M, -1, -1):
        g = th[i] * z
        gd = (d2[i] * z)[None] * ads[i]
        if zd is not None:
            gd = gd + th[i][None] * zd
        if i == 0:
            return g @ K[0] + s @ S + params["c"], mm(gd, K[0]) + mm(V, S)
        z = z + h * (g @ K[i])
        zd = h * mm(gd, K[i]) if zd is None else zd + h * mm(gd, K[i])


def basis_tangent_trace(params, s, d):
    """tr ∇ₓ²Φ by d basis tangents e_1..e_d through potential_hvp (eq. 5.34): the exact trace
    the OT-Flow recursion replaces. s (B, d+1) -> (B,)."""
    xp = get_array_module(s)
    B = s.shape[0]
    E = xp.zeros((d, B, d + 1), dtype=s.dtype)
    idx = xp.arange(d)
    E[idx, :, idx] = 1
    _, HE = potential_hvp(params, s, E)
    return HE[idx, :, idx].sum(axis=0)
