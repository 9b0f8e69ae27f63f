"""Discrete flows (docs/flows.md) against finite differences, dense Jacobians and each other.

For every kind (planar, orthogonal, Householder, triangular) and for a FlowSequence of all four,
in float64 over random batch (1-3), dimension D (1-5), sizes M, H, seeds:
- eqs. 1.4 / 2.4: logdet equals log|det| of a dense central-difference Jacobian of forward;
- eqs. 1.5-1.7, 2.6-2.10, 3.5-3.6, 4.3-4.4, 5.3, 6.2: backward equals central differences of
  F = <a, z_new> + <c, logdet> along random directions, for z and every RAW parameter;
- the dot-product test <J v, w> = <v, Jᵀ w> for the whole map (z, p) -> (z_new, logdet), with
  a joint direction v over z and all parameters (J v by a central difference: the flows have
  no tangent rule);
- the constructions: ûᵀw = m(wᵀu) > −1 (eq. 1.3), QᵀQ = I and Q = polar factor (eq. 3.3),
  Householder Q orthogonal (eq. 4.1), the forward equals the dense formula of eq. 2.1, the
  triangular flow's Jacobian is triangular (eq. 5.2), and every flow is inverted by back
  substitution (eq. 2.5), i.e. is a bijection at the sampled points.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npflow import flows as F

RTOL = 1e-6      # bound on the relative error of every gradient check
ATOL = 1e-9      # absolute floor, for derivatives that are zero (or nearly) by construction
KINDS = ("planar", "orthogonal", "householder", "triangular", "sequence")


# ----------------------------------------------------------------------------- checking tools

def central_difference(fn, h=1e-4):
    """d/ds fn(s) at s = 0 by the fourth-order central difference (error O(h⁴) + O(ε/h))."""
    return (-fn(2 * h) + 8 * fn(h) - 8 * fn(-h) + fn(-2 * h)) / (12 * h)


def assert_rel_close(got, want, rtol=RTOL, atol=ATOL, what=""):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    err = np.linalg.norm(got - want)
    scale = max(np.linalg.norm(got), np.linalg.norm(want))
    assert err <= rtol * scale + atol, f"{what}: |got - want| = {err:.3e}, scale {scale:.3e}"


def build(kind, D, rng):
    """A flow of the given kind with sizes drawn from rng. Orthogonal uses tol = 1e-14 so that
    a change of the iteration count between stencil points moves Q by far less than the
    finite-difference error."""
    if kind == "planar":
        return F.Planar(D)
    if kind == "orthogonal":
        return F.Orthogonal(D, int(rng.integers(1, D + 1)), tol=1e-14)
    if kind == "householder":
        return F.Householder(D, int(rng.integers(1, 4)))
    if kind == "triangular":
        return F.Triangular(D, reverse=bool(rng.integers(2)))
    return F.FlowSequence([F.Planar(D), F.Orthogonal(D, max(1, D - 1), tol=1e-14),
                           F.Householder(D, 2), F.Triangular(D, reverse=True),
                           F.Triangular(D, reverse=False)])


def raw_params(flow, B, rng, scale=1.0):
    return {name: scale * rng.standard_normal((B,) + shape)
            for name, shape in flow.param_shapes().items()}


def case(kind, D, B, seed):
    rng = np.random.default_rng(seed)
    flow = build(kind, D, rng)
    return flow, rng.standard_normal((B, D)), raw_params(flow, B, rng), rng


def dense_jacobian(flow, z, p):
    """∂z_new/∂z per sample (B, D, D) by central differences, column by column."""
    D = z.shape[1]
    cols = [central_difference(lambda s: flow.forward(z + s * np.eye(D)[j], p)[0])
            for j in range(D)]
    return np.stack(cols, axis=-1)


def dense_Q(flow, p):
    """The Q of eq. 2.1 as a dense (B, D, M) matrix, from the definitions (eqs. 3.1-3.4, 4.1,
    5.1)."""
    B = next(iter(p.values())).shape[0]
    if isinstance(flow, F.Orthogonal):
        return F.orthogonalize(p["Q"], tol=1e-14)[0]
    if isinstance(flow, F.Householder):
        return F.householder_product(p["v"])
    P = np.eye(flow.D)[::-1] if flow.reverse else np.eye(flow.D)
    return np.broadcast_to(P, (B, flow.D, flow.D))


kinds = st.sampled_from(KINDS)
dims = st.integers(1, 5)
batches = st.integers(1, 3)
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------- log-determinants

@given(kind=kinds, D=dims, B=batches, seed=seeds)
def test_logdet_equals_log_abs_det_of_dense_jacobian(kind, D, B, seed):
    flow, z, p, _ = case(kind, D, B, seed)
    z_new, logdet, _ = flow.forward(z, p)
    assert z_new.shape == (B, D) and logdet.shape == (B,)
    sign, want = np.linalg.slogdet(dense_jacobian(flow, z, p))
    assert np.all(sign > 0)          # orientation preserving (1 + h' m > 0, 1 + h' r r̃ > 0)
    assert_rel_close(logdet, want, rtol=1e-8, atol=1e-8, what="logdet")


@given(kind=st.sampled_from(("orthogonal", "householder", "triangular")), D=dims, B=batches,
       seed=seeds)
def test_sylvester_forward_equals_dense_formula(kind, D, B, seed):
    """eq. 2.1 with the dense Q, R, R̃ of eqs. 2.2, 3.1-3.4, 4.1, 5.1, and eq. 2.3 as the
    dense determinant det(I_M + diag h'(a) R̃ R)."""
    flow, z, p, _ = case(kind, D, B, seed)
    z_new, logdet, _ = flow.forward(z, p)
    Q = dense_Q(flow, p)
    mask = np.triu(np.ones((flow.M, flow.M)), 1)
    R = p["R_full"] * mask + np.tanh(p["diag_R"])[:, :, None] * np.eye(flow.M)
    Rt = (np.swapaxes(p["R_full"], 1, 2) * mask
          + np.tanh(p["diag_R_tilde"])[:, :, None] * np.eye(flow.M))
    a = np.einsum("bij,bkj,bk->bi", Rt, Q, z) + p["b"]
    want = z + np.einsum("bij,bjk,bk->bi", Q, R, np.tanh(a))
    assert_rel_close(z_new, want, rtol=1e-12, atol=1e-13, what="z_new")
    hp = 1 - np.tanh(a) ** 2
    _, ld = np.linalg.slogdet(np.eye(flow.M) + hp[:, :, None] * (Rt @ R))
    assert_rel_close(logdet, ld, rtol=1e-12, atol=1e-13, what="logdet")


# ----------------------------------------------------------------------------- backward

@given(kind=kinds, D=dims, B=batches, seed=seeds)
def test_backward_matches_central_differences(kind, D, B, seed):
    flow, z, p, rng = case(kind, D, B, seed)
    z_new, logdet, cache = flow.forward(z, p)
    a, c = rng.standard_normal(z_new.shape), rng.standard_normal(logdet.shape)
    z0, p0 = z.copy(), {k: v.copy() for k, v in p.items()}
    z_bar, p_bar = flow.backward(cache, a.copy(), c.copy())

    def loss(z_=z, p_=p):
        zn, ld, _ = flow.forward(z_, p_)
        return np.vdot(a, zn) + np.vdot(c, ld)

    v = rng.standard_normal(z.shape)
    assert_rel_close(np.vdot(z_bar, v), central_difference(lambda s: loss(z_=z + s * v)),
                     what="z_bar")
    assert list(p_bar) == list(flow.param_shapes())
    for name in p:
        assert p_bar[name].shape == p[name].shape, name
        v = rng.standard_normal(p[name].shape)
        fd = central_difference(lambda s: loss(p_={**p, name: p[name] + s * v}))
        assert_rel_close(np.vdot(p_bar[name], v), fd, what=f"p_bar[{name!r}]")
    # inputs are never mutated
    assert np.array_equal(z, z0) and all(np.array_equal(p[k], p0[k]) for k in p)


@given(kind=kinds, D=dims, B=batches, seed=seeds)
def test_vjp_is_adjoint_of_jvp(kind, D, B, seed):
    """<J v, w> = <v, Jᵀ w> for (z, p) -> (z_new, logdet), v a joint direction over z and every
    raw parameter, w = (w_z, w_logdet); J v by a central difference along v."""
    flow, z, p, rng = case(kind, D, B, seed)
    vz = rng.standard_normal(z.shape)
    vp = {k: rng.standard_normal(x.shape) for k, x in p.items()}
    wz, wl = rng.standard_normal(z.shape), rng.standard_normal(B)

    def along(s):
        zn, ld, _ = flow.forward(z + s * vz, {k: p[k] + s * vp[k] for k in p})
        return np.concatenate([zn.ravel(), ld])

    Jv = central_difference(along)
    lhs = np.vdot(Jv, np.concatenate([wz.ravel(), wl]))
    _, _, cache = flow.forward(z, p)
    z_bar, p_bar = flow.backward(cache, wz, wl)
    rhs = np.vdot(vz, z_bar) + sum(np.vdot(vp[k], p_bar[k]) for k in p)
    assert abs(lhs - rhs) <= RTOL * (abs(lhs) + abs(rhs)) + ATOL, (lhs, rhs)


@given(kind=kinds, D=dims, B=batches, seed=seeds)
def test_none_cotangent_equals_zero_cotangent(kind, D, B, seed):
    flow, z, p, rng = case(kind, D, B, seed)
    z_new, logdet, cache = flow.forward(z, p)
    a, c = rng.standard_normal(z_new.shape), rng.standard_normal(logdet.shape)
    for (x, y), (x0, y0) in (((None, c), (np.zeros_like(a), c)),
                             ((a, None), (a, np.zeros_like(c)))):
        zb, pb = flow.backward(cache, x, y)
        zb0, pb0 = flow.backward(cache, x0, y0)
        assert_rel_close(zb, zb0, rtol=1e-14, atol=1e-300, what="z_bar")
        for k in pb0:
            assert pb[k].shape == pb0[k].shape
            assert_rel_close(pb[k], pb0[k], rtol=1e-14, atol=1e-300, what=k)


# ----------------------------------------------------------------------------- planar (eq. 1.3)

finite = st.floats(-1e3, 1e3, allow_nan=False)


@given(u=st.lists(finite, min_size=3, max_size=3), w=st.lists(finite, min_size=3, max_size=3))
def test_planar_reparameterization_keeps_uhat_dot_w_above_minus_one(u, w):
    """eq. 1.3: ûᵀw = m(wᵀu) = −1 + softplus(wᵀu) > −1 for any raw u and nonzero w."""
    u, w = np.array([u]), np.array([w])
    if not (w * w).sum() > 1e-150:      # the contract: ‖w‖² > 0 (it divides, eq. 1.2)
        w = w + 1.0
    u_hat, alpha, n, m, _, sp = F.planar_reparameterize(u, w)
    # m = −1 + softplus(α) rounds to −1 once softplus(α) < ε/2; softplus(α) itself stays > 0
    # (down to α ≈ −745), which is what the log-det uses (eq. 1.4a)
    assert m[0] >= -1 and (sp[0] > 0 or alpha[0] < -745)
    got = float(u_hat[0] @ w[0])
    assert got >= -1 - 1e-12 * (1 + abs(alpha[0]))      # round-off of α + (m − α)
    assert abs(got - m[0]) <= 1e-12 * (1 + abs(alpha[0]) + abs(m[0]))
    # and the log-det of eq. 1.4 is finite for any z, while softplus(α) does not underflow
    # (with softplus(α) = 0 and a = 0 exactly, 1 + h' m rounds to 0: docs/flows.md eq. 1.4a)
    if alpha[0] < -745:
        return
    z = np.linspace(-3, 3, 7)[:, None] * w / np.sqrt(n[0])
    B = z.shape[0]
    p = {"u": np.repeat(u, B, 0), "w": np.repeat(w, B, 0), "b": np.zeros((B, 1))}
    assert np.all(np.isfinite(F.Planar(3).forward(z, p)[1]))


# ----------------------------------------------------------------------------- orthogonal (§3)

@given(D=dims, B=batches, seed=seeds)
def test_orthogonalized_Q_has_orthonormal_columns_and_is_the_polar_factor(D, B, seed):
    """eqs. 3.3-3.4: QᵀQ = I to the tolerance, and Q = U Vᵀ for the SVD X = U Σ Vᵀ."""
    rng = np.random.default_rng(seed)
    M = int(rng.integers(1, D + 1))
    X = rng.standard_normal((B, D, M))
    Q, _ = F.orthogonalize(X)
    assert np.abs(np.swapaxes(Q, 1, 2) @ Q - np.eye(M)).max() <= 1e-12
    U, _, Vt = np.linalg.svd(X, full_matrices=False)
    assert_rel_close(Q, U @ Vt, rtol=1e-10, what="polar factor")


@given(D=dims, B=batches, seed=seeds)
def test_orthogonalization_backward_matches_central_differences(D, B, seed):
    """eqs. 3.5-3.6 against d/ds <C, Q(X + s V)>."""
    rng = np.random.default_rng(seed)
    M = int(rng.integers(1, D + 1))
    X = rng.standard_normal((B, D, M))
    C, V = rng.standard_normal((B, D, M)), rng.standard_normal((B, D, M))
    Q, cache = F.orthogonalize(X, tol=1e-14)
    X_bar = F.orthogonalize_backward(cache, C.copy())
    fd = central_difference(lambda s: np.vdot(C, F.orthogonalize(X + s * V, tol=1e-14)[0]))
    assert_rel_close(np.vdot(X_bar, V), fd, what="X_bar")


@given(D=dims, B=batches, seed=seeds)
def test_unrolled_derivative_equals_polar_factor_derivative(D, B, seed):
    """eq. 3.7: run to convergence, the derivative through the unrolled iterations equals the
    derivative of the limit U Vᵀ, δP = U Ã Vᵀ + (I − UUᵀ) δX V Σ⁻¹ Vᵀ,
    Ã_ij = (K − Kᵀ)_ij / (σ_i + σ_j), K = Uᵀ δX V."""
    rng = np.random.default_rng(seed)
    M = int(rng.integers(1, D + 1))
    X, dX, C = (rng.standard_normal((B, D, M)) for _ in range(3))
    _, cache = F.orthogonalize(X, tol=1e-14)
    X_bar = F.orthogonalize_backward(cache, C)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    V = np.swapaxes(Vt, 1, 2)
    K = np.swapaxes(U, 1, 2) @ dX @ V
    A = (K - np.swapaxes(K, 1, 2)) / (S[:, :, None] + S[:, None, :])
    dP = U @ A @ Vt + (dX - U @ (np.swapaxes(U, 1, 2) @ dX)) @ V @ (Vt / S[:, :, None])
    assert_rel_close(np.vdot(X_bar, dX), np.vdot(C, dP), rtol=1e-8, what="<X_bar, dX>")


def test_orthogonalization_reaches_its_float32_tolerance_at_D_64():
    """The float32 default tolerance (1e-5 on max |QᵀQ − I|) is reached, with no warning, for
    the paper's sizes M = 32 and the square worst case M = D = 64."""
    rng = np.random.default_rng(0)
    for M in (32, 64):
        X = rng.standard_normal((8, 64, M)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Q, cache = F.orthogonalize(X)
        assert Q.dtype == np.float32
        assert np.abs(np.swapaxes(Q, 1, 2) @ Q - np.eye(M, dtype=np.float32)).max() <= 1e-5
        assert len(cache[2]) < 100


def test_orthogonalization_warns_when_not_converged():
    X = np.random.default_rng(1).standard_normal((2, 4, 3))
    with pytest.warns(RuntimeWarning, match="max_iter = 2"):
        F.orthogonalize(X, max_iter=2)


# ----------------------------------------------------------------------------- Householder (§4)

@given(D=dims, B=batches, seed=seeds)
def test_householder_Q_is_orthogonal(D, B, seed):
    rng = np.random.default_rng(seed)
    H = int(rng.integers(1, 6))
    Q = F.householder_product(rng.standard_normal((B, H, D)))
    assert np.abs(np.swapaxes(Q, 1, 2) @ Q - np.eye(D)).max() <= 1e-13
    assert np.abs(Q @ np.swapaxes(Q, 1, 2) - np.eye(D)).max() <= 1e-13
    # a product of H reflections has determinant (−1)^H
    assert np.allclose(np.linalg.det(Q), (-1.0) ** H)


# ----------------------------------------------------------------------------- triangular (§5)

@given(D=dims, B=batches, seed=seeds)
def test_triangular_jacobian_is_upper_triangular_or_reversed(D, B, seed):
    """eq. 5.2: Q = I gives ∂z'/∂z = I + R diag(h') R̃, upper triangular; Q = P gives its
    reversal P(·)P, lower triangular."""
    rng = np.random.default_rng(seed)
    for reverse in (False, True):
        flow = F.Triangular(D, reverse=reverse)
        z, p = rng.standard_normal((B, D)), raw_params(flow, B, rng)
        J = dense_jacobian(flow, z, p)
        off = np.tril(J, -1) if not reverse else np.triu(J, 1)
        assert np.abs(off).max(initial=0.0) <= 1e-9


# ----------------------------------------------------------------------------- invertibility

def _bisect(fn, lo, hi, iters=200):
    """The root of an increasing fn on [lo, hi] (arrays, elementwise)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = fn(mid) > 0
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    return 0.5 * (lo + hi)


def invert(flow, z_new, p):
    """z from z_new by back substitution (eq. 2.5): planar through the scalar a = wᵀz + b;
    Sylvester through y = Qᵀz, solving y + R h(R̃ y + b) = Qᵀz_new from y_M down to y_1, each a
    strictly increasing scalar equation."""
    if isinstance(flow, F.Planar):
        u_hat, _, _, m, _, _ = F.planar_reparameterize(p["u"], p["w"])
        t = (p["w"] * z_new).sum(1) + p["b"][:, 0]            # = a + m h(a)
        a = _bisect(lambda a: a + m * np.tanh(a) - t, t - abs(m) - 1, t + abs(m) + 1)
        return z_new - u_hat * np.tanh(a)[:, None]
    Q = dense_Q(flow, p)
    M = flow.M
    mask = np.triu(np.ones((M, M)), 1)
    R = p["R_full"] * mask + np.tanh(p["diag_R"])[:, :, None] * np.eye(M)
    Rt = (np.swapaxes(p["R_full"], 1, 2) * mask
          + np.tanh(p["diag_R_tilde"])[:, :, None] * np.eye(M))
    t = np.einsum("bdm,bd->bm", Q, z_new)
    y = np.zeros_like(t)
    for i in range(M - 1, -1, -1):
        def resid(yi, i=i):
            yy = y.copy()
            yy[:, i] = yi
            s = np.tanh(np.einsum("bjl,bl->bj", Rt[:, i:, i:], yy[:, i:]) + p["b"][:, i:])
            return yi + np.einsum("bj,bj->b", R[:, i, i:], s) - t[:, i]
        bound = np.abs(R[:, i, :]).sum(1) + 1
        y[:, i] = _bisect(resid, t[:, i] - bound, t[:, i] + bound)
    return z_new - np.einsum("bdm,bm->bd", Q, np.einsum("bij,bj->bi", R, np.tanh(
        np.einsum("bij,bj->bi", Rt, y) + p["b"])))


@given(kind=st.sampled_from(("planar", "orthogonal", "householder", "triangular")), D=dims,
       B=batches, seed=seeds)
def test_flow_is_inverted_by_back_substitution(kind, D, B, seed):
    """The inverse exists and is found by monotone scalar solves (eq. 2.5 / 1.3), so the flow is
    a bijection; applying it to two different points never gives the same image."""
    flow, z, p, rng = case(kind, D, B, seed)
    p = {k: 2.0 * v for k, v in p.items()}                   # larger raw values: stronger maps
    z_new, logdet, _ = flow.forward(z, p)
    assert np.all(np.isfinite(logdet))
    assert_rel_close(invert(flow, z_new, p), z, rtol=1e-9, atol=1e-9, what="inverse")


def test_logdet_is_finite_for_saturated_float32_parameters():
    """r_ii r̃_ii rounds to −1 in float32 when the raw diagonals are ±20; the log-det stays
    finite (eq. 2.4a), and so does planar's with wᵀu ≪ 0 (eq. 1.4a)."""
    rng = np.random.default_rng(3)
    for flow in (F.Triangular(6), F.Householder(6, 2), F.Orthogonal(6, 3), F.Planar(6)):
        p = raw_params(flow, 50, rng)
        if "diag_R" in p:
            p["diag_R"], p["diag_R_tilde"] = 20.0 + 0 * p["diag_R"], -20.0 + 0 * p["diag_R"]
        else:
            p["u"] = -30.0 * p["w"]
        p = {k: v.astype(np.float32) for k, v in p.items()}
        z = rng.standard_normal((50, 6)).astype(np.float32)
        _, logdet, _ = flow.forward(z, p)
        assert logdet.dtype == np.float32 and np.all(np.isfinite(logdet)), type(flow).__name__


# ----------------------------------------------------------------------------- composition (§6)

def test_sequence_logdet_is_sum_and_names_are_prefixed():
    rng = np.random.default_rng(4)
    seq = F.make_flows("triangular", 4, 3)
    assert [f.reverse for f in seq.flows] == [False, True, False]
    assert list(seq.param_shapes())[:4] == ["0.R_full", "0.diag_R", "0.diag_R_tilde", "0.b"]
    z, p = rng.standard_normal((2, 4)), raw_params(seq, 2, rng)
    z_new, logdet, _ = seq.forward(z, p)
    zk, total = z, 0.0
    for k, f in enumerate(seq.flows):
        zk, ld, _ = f.forward(zk, {n: p[f"{k}.{n}"] for n in f.param_shapes()})
        total = total + ld
    assert np.array_equal(zk, z_new) and np.allclose(total, logdet, rtol=1e-15)
    theta = seq.join_params(p)
    assert theta.shape == (2, seq.num_params())
    assert all(np.array_equal(v, p[k]) for k, v in seq.split_params(theta).items())


@pytest.mark.parametrize("kind", ["planar", "orthogonal", "householder", "triangular"])
def test_float32_stays_float32(kind):
    rng = np.random.default_rng(5)
    seq = F.make_flows(kind, 5, 2)
    z = rng.standard_normal((3, 5)).astype(np.float32)
    p = {k: v.astype(np.float32) for k, v in raw_params(seq, 3, rng).items()}
    z_new, logdet, cache = seq.forward(z, p)
    z_bar, p_bar = seq.backward(cache, np.ones_like(z_new), np.ones_like(logdet))
    assert {z_new.dtype, logdet.dtype, z_bar.dtype} | {v.dtype for v in p_bar.values()} == {
        np.dtype(np.float32)}


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda: F.make_flows("radial", 4, 2), "unknown flow kind 'radial'"),
    (lambda: F.make_flows("planar", 4, 0), "num_flows"),
    (lambda: F.make_flows("planar", 0, 2), "D must be"),
    (lambda: F.make_flows("orthogonal", 4, 2, M=5), "M must be"),
    (lambda: F.make_flows("householder", 4, 2, H=0), "H must be"),
    (lambda: F.make_flows("planar", 4, 2, M=2), "takes options"),
    (lambda: F.Orthogonal(4, 2, tol=-1.0), "tol must be"),
    (lambda: F.Triangular(4, reverse=1), "reverse must be"),
    (lambda: F.FlowSequence([F.Planar(3), F.Planar(4)]), "D = 4"),
    (lambda: F.FlowSequence([]), "at least one"),
])
def test_bad_construction_raises_one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["planar", "orthogonal", "householder", "triangular"])
def test_bad_shapes_raise_before_any_work(kind):
    rng = np.random.default_rng(6)
    seq = F.make_flows(kind, 4, 2)
    z, p = rng.standard_normal((3, 4)), raw_params(seq, 3, rng)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4\)"):
        seq.forward(z[:, :3], p)
    with pytest.raises(ValueError, match="parameters must be exactly"):
        seq.forward(z, {k: v for k, v in list(p.items())[1:]})
    name = next(iter(p))
    with pytest.raises(ValueError, match=f"parameter '{name}' must have shape"):
        seq.forward(z, {**p, name: p[name][:2]})
    with pytest.raises(ValueError, match="dtype"):
        seq.forward(z, {**p, name: p[name].astype(np.float32)})
