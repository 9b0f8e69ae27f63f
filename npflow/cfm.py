"""Simulation-free training of npflow's CNFs: conditional flow matching (CFM) and OT-CFM
(docs/cfm.md).

Same networks and conventions as npflow.cnf: data x at t0 = 0, N(0, I) at the end time. With
the blocks of a CNF laid end to end on [0, 𝒯], 𝒯 = Σ_b T_b (eq. 1.1), one draw per sample of

    z ~ N(0, I),  s ~ U[0, 1),  ε ~ N(0, I)                                  (eq. 2.1)
    x_s = (1 − s) x + s z + σ ε             the straight path of width σ       (eq. 2.2)
    u   = (z − x) / 𝒯                       its conditional velocity           (eq. 2.3)
    L   = Σ_i w_i (1/D) ‖f(x_{s_i}, 𝒯 s_i; θ) − u_i‖²,  Σ_i w_i = 1            (eq. 2.4)

(f at global time τ = 𝒯 s is block b's network at local time τ − Σ_{c<b} T_c, eq. 1.2). OT-CFM
pairs the batch's data and noise by an exact optimal assignment on squared distances before
the path is formed (eq. 4.1-4.2). The gradient is the layers' hand-written backward of f with
no tangents (K = 0) applied to f̄_i = 2 w_i (f − u_i) / D (eq. 2.5): no ODE is solved in
training.

The model stays a CNF: ``FlowMatchingCNF.log_prob`` is CNF.log_prob (dopri5, exact or
Hutchinson trace, eq. 3.2 of docs/cnf.md) and ``sample`` is CNF.sample.

Times. Either M >= 1 groups of rows (``time_groups`` = M): group j shares one time
s_j = (j + U_j)/M, U_j ~ U[0, 1) (stratified, eq. 2.6), its n_j rows carry the weight
w_i = 1/(M n_j) (eq. 2.7), so L is an unbiased estimate of the CFM objective for any group
sizes; cost M network calls on about B/M rows each, forward and backward. Or
``time_groups=0``: one time per row, s_i = (π_i + U_i)/B with π a random permutation of
0..B−1 (stratified per row, eq. 2.8), w_i = 1/B, and ONE network call on the whole batch with
the per-row time t (B, 1) of the layers (docs/layers.md eq. 1.22-1.25; one call per block
whose interval holds any of the times).
"""
from __future__ import annotations

import time

import numpy as np  # host-side only: noise draws, the OT assignment (data edge)

from .backend import get_array_module, to_device, to_host
from .cnf import CNF, _block_prefix

__all__ = ["FlowMatchingCNF", "COUPLINGS", "OT_SOLVERS", "check_flow_matching", "ot_pairing",
           "straight_path", "target_velocity", "draw_noise", "cfm_loss_and_grad", "group_cuts"]

COUPLINGS = ("independent", "ot")
OT_SOLVERS = ("scipy", "pot")


def check_flow_matching(coupling, time_groups, model_kwargs: dict, per_row_ok=False) -> None:
    """One-line ValueErrors for the arguments every flow-matching model shares: the coupling,
    the number of time groups (eq. 2.7; 0 = one time per row, eq. 2.8, where ``per_row_ok``:
    the dense models), and the model keyword arguments ``model_kwargs`` (dict)
    that would train something flow matching does not: a trained end time (``train_T``) or any
    training method's setting (npflow.methods: RNODE's state-term weights, ...), since the
    regression (2.4) has no state terms and fixes the end times."""
    from .methods import model_settings
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}: expected one of {COUPLINGS}")
    if int(time_groups) < (0 if per_row_ok else 1):
        raise ValueError(f"time_groups must be >= {0 if per_row_ok else 1}"
                         f"{' (0: one time per row)' if per_row_ok else ''}, got {time_groups}")
    for name in ("train_T",) + tuple(model_settings({})):
        if model_kwargs.get(name):
            raise ValueError(f"flow matching trains no {name}: build the model with "
                             f"{name} left at its default (the end times are fixed and "
                             "there are no state terms)")


# ------------------------------------------------------------------ the pieces (docs/cfm.md)

def ot_pairing(x, z, solver="scipy"):
    """Exact optimal transport between two equal batches with uniform weights (eq. 4.1-4.2).

    x (B, D), z (B, D), host or device arrays. Returns a host integer array perm (B,) such
    that the pairs (x_i, z_perm[i]) minimise Σ_i ‖x_i − z_perm[i]‖² over all permutations:
    for equal batch sizes and uniform weights the OT plan is a permutation matrix divided by B
    (Birkhoff-von Neumann), so scipy's linear_sum_assignment on the (B, B) squared-distance
    matrix is exact. Host-side (the data edge): O(B² D) to form the costs, O(B³) worst case
    for the assignment (measured in docs/cfm.md, section 4).
    solver "pot": POT's network simplex (``ot.emd``, torchcfm's solver, optional package
    POT) on the same costs; its basic optimal plan is a vertex of the assignment polytope, a
    permutation matrix / B (eq. 4.3), read off row by row (checked; anything else raises).
    Both are exact; faster on clustered data (docs/cfm.md §4, §8).
    """
    if solver not in OT_SOLVERS:
        raise ValueError(f"unknown OT solver {solver!r}: expected one of {OT_SOLVERS}")
    from scipy.optimize import linear_sum_assignment
    xh = np.asarray(to_host(x), dtype=np.float64)
    zh = np.asarray(to_host(z), dtype=np.float64)
    if xh.shape != zh.shape or xh.ndim != 2:
        raise ValueError(f"ot_pairing needs x and z of the same shape (B, D), got {xh.shape} "
                         f"and {zh.shape}")
    C = ((xh * xh).sum(1)[:, None] + (zh * zh).sum(1)[None, :] - 2.0 * xh @ zh.T)  # eq. 4.1
    if solver == "pot":
        return _emd_permutation(C)
    rows, cols = linear_sum_assignment(C)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _emd_permutation(C):
    """The permutation of POT's exact OT plan between two uniform batches (eq. 4.3)."""
    import ot
    B = C.shape[0]
    a = np.full(B, 1.0 / B)
    P = ot.emd(a, a, C)
    perm = P.argmax(axis=1)
    if not (np.all(np.abs(P[np.arange(B), perm] * B - 1.0) < 1e-9)
            and np.array_equal(np.sort(perm), np.arange(B))):
        raise RuntimeError("ot.emd did not return a permutation plan (did it stop early? see "
                           "its warnings); use ot_solver='scipy'")
    return perm.astype(np.int64)


def straight_path(x, z, s, eps=None, sigma=0.0):
    """x_s = (1 − s) x + s z + σ ε (eq. 2.2). x, z (n, D); s a float (one group's time) or an
    (n, 1) array of x's module (one time per row, eq. 2.8); eps (n, D) or None (σ = 0).
    Returns (n, D)."""
    xs = (1.0 - s) * x + s * z
    if sigma and eps is not None:
        xs = xs + sigma * eps
    return xs


def target_velocity(x, z, horizon):
    """u = (z − x) / 𝒯 (eq. 2.3), the velocity of eq. 2.2 in the time τ = 𝒯 s. x, z (n, D)."""
    return (z - x) * (1.0 / horizon)


def group_cuts(B, M):
    """Row boundaries of the M time groups of a batch of B rows (eq. 2.6): M + 1 ints; groups
    differ in size by at most one. M is capped at B."""
    M = max(1, min(int(M), int(B)))
    return [B * j // M for j in range(M + 1)]


def draw_noise(rng, B, D, time_groups, sigma):
    """The randomness of one CFM step, drawn from the numpy Generator ``rng`` in a fixed order
    (eq. 2.1, 2.6): z (B, D) ~ N(0, I); s (M,) stratified, s_j = (j + U_j)/M; ε (B, D) ~ N(0, I)
    when σ > 0, else None. Host float64 arrays.
    time_groups = 0: s (B,) one time per row, s_i = (π_i + U_i)/B with π = rng.permutation(B)
    drawn before U (eq. 2.8)."""
    z = rng.standard_normal((B, D))
    if int(time_groups) == 0:
        s = (rng.permutation(B) + rng.uniform(size=B)) / B                       # eq. 2.8
        eps = rng.standard_normal((B, D)) if sigma > 0 else None
        return z, s, eps
    M = len(group_cuts(B, time_groups)) - 1
    s = (np.arange(M) + rng.uniform(size=M)) / M
    eps = rng.standard_normal((B, D)) if sigma > 0 else None
    return z, s, eps


def cfm_loss_and_grad(nets, block_params, Ts, x, z, s, eps=None, sigma=0.0, rows=None,
                      per_row=False):
    """The CFM loss (eq. 2.4) on given noise and its exact gradient (eq. 2.5), no ODE solve.

    nets          one network per block (ODENet interface: forward(params, x, None, t) ->
                  (f, None, cache); backward(fbar, None, cache, need_xdotbar=False))
    block_params  list of the blocks' parameter dicts (no prefix)
    Ts            list of the blocks' end times T_b (floats); 𝒯 = Σ T_b (eq. 1.1)
    x, z          data and its paired noise (B, D), arrays of the parameters' module and dtype
    s             (M,) host floats in [0, 1): the time of each row group (group_cuts(B, M));
                  with per_row=True, (B,) the time of each row (eq. 2.8, weights 1/B)
    eps, sigma    path noise (B, D) or None, and the width σ (eq. 2.2)
    rows          (lo, hi): only the terms of rows lo..hi−1 (default all), with the weights of
                  the whole batch (eq. 2.7), so the results of any split of the rows add up to
                  the whole batch's (docs/parallel.md, eq. 1.2)
    per_row       False: M row groups, one network call each (eq. 2.6-2.7); True: one call per
                  block on all its rows with the per-row time t (B_b, 1) (eq. 2.8)
    Returns (loss: 0-d array, grads: list of dicts like block_params, info dict). Blocks whose
    time interval holds no group time get zero gradients.
    """
    B, D = x.shape
    xp = get_array_module(x)
    if per_row:
        return _cfm_loss_and_grad_rows(nets, block_params, Ts, x, z, s, eps, sigma, rows)
    M = len(s)
    cuts = group_cuts(B, M)
    if len(cuts) - 1 != M:
        raise ValueError(f"{M} group times for a batch of {B} rows: need M <= B")
    horizon = float(sum(Ts))
    offsets = np.concatenate(([0.0], np.cumsum(Ts)))
    prepared = [net.prepare(p) if hasattr(net, "prepare") else p
                for net, p in zip(nets, block_params)]
    grads = [{k: xp.zeros_like(v) for k, v in p.items()} for p in block_params]
    u = target_velocity(x, z, horizon)                                          # eq. 2.3
    r_lo, r_hi = (0, B) if rows is None else rows
    total = xp.zeros((), dtype=x.dtype)
    for j in range(M):
        w = 1.0 / (M * (cuts[j + 1] - cuts[j]) * D)              # row weight / D, eq. 2.7
        lo, hi = max(cuts[j], r_lo), min(cuts[j + 1], r_hi)
        if lo >= hi:
            continue
        tau = float(s[j]) * horizon                                             # eq. 1.2
        b = min(int(np.searchsorted(offsets, tau, side="right")) - 1, len(nets) - 1)
        t_local = tau - float(offsets[b])
        xs = straight_path(x[lo:hi], z[lo:hi], float(s[j]),
                           None if eps is None else eps[lo:hi], sigma)          # eq. 2.2
        f, _, cache = nets[b].forward(prepared[b], xs, None, t_local)
        r = f - u[lo:hi]
        total = total + w * (r * r).sum()
        _, _, pbar, _ = nets[b].backward((2.0 * w) * r, None, cache, need_xdotbar=False)  # eq. 2.5
        g = grads[b]
        for k, v in pbar.items():
            g[k] += v
    return total, grads, {"groups": M, "horizon": horizon}


def _cfm_loss_and_grad_rows(nets, block_params, Ts, x, z, s, eps, sigma, rows):
    """``cfm_loss_and_grad`` with one time per row (eq. 2.8): s (B,) host floats, w_i = 1/B;
    the rows whose global time τ_i = 𝒯 s_i falls in block b (eq. 1.2) go through block b's
    network in one call with the per-row local time τ_i − τ_b (B_b, 1)."""
    B, D = x.shape
    xp = get_array_module(x)
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (B,):
        raise ValueError(f"per-row times: s must have shape (B,) = ({B},), got {s.shape}")
    horizon = float(sum(Ts))
    offsets = np.concatenate(([0.0], np.cumsum(Ts)))
    nb = len(nets)
    w = 1.0 / (B * D)                                        # row weight 1/B, over D (eq. 2.8)
    tau = s * horizon                                                            # eq. 1.2
    blk = np.minimum(np.searchsorted(offsets, tau, side="right") - 1, nb - 1)
    r_lo, r_hi = (0, B) if rows is None else rows
    grads = [{k: xp.zeros_like(v) for k, v in p.items()} for p in block_params]
    total = xp.zeros((), dtype=x.dtype)
    for b in range(nb):
        idx = np.nonzero(blk[r_lo:r_hi] == b)[0] + r_lo
        if len(idx) == 0:
            continue
        if len(idx) == r_hi - r_lo:                       # every row in this block: a view
            sel = slice(r_lo, r_hi)
        else:
            sel = to_device(idx, xp)
        sd = to_device(s[idx][:, None], xp, x.dtype)
        td = to_device((tau[idx] - offsets[b])[:, None], xp, x.dtype)
        xb, zb = x[sel], z[sel]
        xs = straight_path(xb, zb, sd, None if eps is None else eps[sel], sigma)
        f, _, cache = nets[b].forward(block_params[b], xs, None, td)
        r = f - target_velocity(xb, zb, horizon)                                  # eq. 2.3
        total = total + w * (r * r).sum()
        _, _, pbar, _ = nets[b].backward((2.0 * w) * r, None, cache, need_xdotbar=False)
        g = grads[b]
        for k, v in pbar.items():
            g[k] += v
    return total, grads, {"groups": 0, "horizon": horizon}


# ------------------------------------------------------------------ the model

class FlowMatchingCNF(CNF):
    """A CNF (npflow.cnf.CNF: same networks, blocks, log_prob, sample, checkpoints) whose
    ``loss_and_grad`` is the flow-matching objective of docs/cfm.md instead of the maximum
    likelihood loss.

    All CNF arguments (dim, hidden, layer, activation, T, blocks, solver/steps/rtol/atol/trace:
    the defaults of log_prob and sample, never used in training), plus
    sigma        width σ >= 0 of the Gaussian path around the straight line (eq. 2.2)
    coupling     "independent" (CFM: x and z drawn independently) | "ot" (OT-CFM: the batch's
                 x and z paired by exact optimal transport, eq. 4.2)
    time_groups  M, rows sharing one stratified time (eq. 2.6); capped at the batch size;
                 0: one stratified time per row and one network call (eq. 2.8)
    ot_solver    "scipy" (linear_sum_assignment, default) | "pot" (POT's ot.emd, optional
                 package): the exact assignment of OT-CFM (eq. 4.2-4.3)
    train_T, kinetic and jacobian must keep their defaults (they belong to the likelihood loss).
    """

    def __init__(self, dim, sigma=0.0, coupling="independent", time_groups=16,
                 ot_solver="scipy", **cnf_kwargs):
        if not sigma >= 0:
            raise ValueError(f"path width sigma must be >= 0, got {sigma}")
        check_flow_matching(coupling, time_groups, cnf_kwargs, per_row_ok=True)
        if ot_solver not in OT_SOLVERS:
            raise ValueError(f"unknown ot_solver {ot_solver!r}: expected one of {OT_SOLVERS}")
        if ot_solver == "pot":
            try:
                import ot  # noqa: F401
            except ImportError:
                raise ValueError("ot_solver='pot' needs the POT package (pip install POT, or "
                                 "the 'pot' extra); or use ot_solver='scipy'") from None
        super().__init__(dim, **cnf_kwargs)
        self.config.update(sigma=float(sigma), coupling=coupling, time_groups=int(time_groups))
        if ot_solver != "scipy":        # configs of the default stay as they were
            self.config["ot_solver"] = ot_solver

    def draw(self, x, rng):
        """The noise of one step for data x (B, D), drawn from rng (eq. 2.1, 2.6), and for
        OT-CFM the noise reordered by the optimal assignment (eq. 4.2): (z, s, eps, info) with
        z, eps on the model's device and dtype, s host (M,), or (B,) with time_groups = 0."""
        cfg = self.config
        B = x.shape[0]
        z, s, eps = draw_noise(rng, B, self.dim, cfg["time_groups"], cfg["sigma"])
        info = {}
        if cfg["coupling"] == "ot":
            t = time.perf_counter()
            perm = ot_pairing(x, z, cfg.get("ot_solver", "scipy"))
            info["ot_seconds"] = time.perf_counter() - t
            z = z[perm]
        xp, dt = self.xp, self.dtype
        return (to_device(z, xp, dt), s, None if eps is None else to_device(eps, xp, dt), info)

    def loss_and_grad(self, x, rng, params=None, T=None):
        """The CFM / OT-CFM loss (eq. 2.4) on a batch and its exact gradient (eq. 2.5).

        x       data (B, D) (host or device array)
        rng     numpy.random.Generator: z, the times s and ε (eq. 2.1, 2.6 or 2.8)
        params  parameter dict (default self.params); T: not supported (None)
        Returns (loss: float, grads: dict like params, stats: dict with "cfm" (the loss),
        "nfe_forward" = "nfe_backward" = 1 (one evaluation of f on the batch, cut into M row
        groups), "T" (list, one per block), "pair_sq_dist" = mean ‖x_i − z_i‖² of the pairs
        used, and for OT-CFM "ot_seconds", the host time of the assignment).
        """
        part = self.loss_and_grad_part(x, rng, params=params, T=T)
        return self.loss_from_part(part, len(x), params=params, T=T)   # len: lists too

    def loss_and_grad_part(self, x, rng, rows=None, params=None, T=None, allreduce=None):
        """The rows ``(lo, hi)`` (default all) of the batch x (B, D) in the loss of eq. 2.4 and
        its gradient, as a model.Part (docs/parallel.md, eq. 1.2): sums "cfm" (Σ over the rows
        of w_i ‖f − u_i‖²/D) and "pair_sq_dist" (Σ ‖x_i − z_i‖²), the rows' gradient share,
        and same "nfe_forward", "nfe_backward" (1 each) and, for OT-CFM, "ot_seconds". The
        noise, the times and the OT pairing are drawn for the whole batch on every caller (the
        same draws whatever the rows). ``allreduce`` is unused (no solver runs)."""
        from .model import Part, check_rows
        if T is not None:
            raise ValueError("flow matching has no end-time override (STEER); pass T=None")
        params = self.params if params is None else params
        x = self._prepare(x)
        lo, hi = check_rows(rows, x.shape[0])
        Ts = [float(to_host(t)) for t in self.end_times(params)]
        z, s, eps, info = self.draw(x, rng)
        nb = len(self.nets)
        total, gl, _ = cfm_loss_and_grad(self.nets, [self.block_params(b, params)
                                                     for b in range(nb)],
                                         Ts, x, z, s, eps, self.config["sigma"], rows=(lo, hi),
                                         per_row=self.config["time_groups"] == 0)
        grads = {}
        for b in range(nb):
            pre = _block_prefix(b)
            grads.update({pre + k: v for k, v in gl[b].items()})
        d = x[lo:hi] - z[lo:hi]
        same = {"nfe_forward": 1.0, "nfe_backward": 1.0, **info}
        return Part({"cfm": total, "pair_sq_dist": (d * d).sum()}, grads, same)

    def loss_from_part(self, part, B, params=None, T=None):
        """(loss, grads, stats) of loss_and_grad from the sum of the parts of a batch of B
        (one host sync for the loss, one for the pair distance)."""
        loss = float(to_host(part.sums["cfm"]))
        Ts = [float(to_host(t)) for t in self.end_times(params)]
        stats = {"cfm": loss, "nfe_forward": int(round(part.same["nfe_forward"])),
                 "nfe_backward": int(round(part.same["nfe_backward"])),
                 "T": Ts,
                 "pair_sq_dist": float(to_host(part.sums["pair_sq_dist"])) / B,
                 "time_groups": (len(group_cuts(B, self.config["time_groups"])) - 1
                                 if self.config["time_groups"] else 0)}
        if "ot_seconds" in part.same:
            stats["ot_seconds"] = float(part.same["ot_seconds"])
        return loss, dict(part.grads), stats
