"""Flow matching (CFM, OT-CFM) for FFJORD's multiscale image CNF (docs/cfm.md, section 9).

The multiscale map of npflow.multiscale (docs/images.md, section 3) runs ODE blocks between
squeezes and factor-outs. Squeezes permute coordinates and factor-outs split them, so the
coordinates the blocks act on are a fixed rearrangement P of the logit image's pixels, and the
base N(0, I) is on the final coordinates (the factored-out parts, then the last state; eq.
9.1). ``multiscale_layout`` finds P, each block's input coordinates and each coordinate's exit
block e (the block after which it is factored out, or the last block) by pushing an index
image through the model's own squeeze / factor_out, without the ODEs (eq. 9.2).

With y the logit image (data end) and z ~ N(0, I) in final coordinates (eq. 9.3), every
coordinate moves on its straight line from y to z, reaches z at the end of its exit block e
and is factored out there. ``path_schedule`` fixes how far it goes in each block (eq. 9.4):
λ_{k−1} (done before block k) and Δ_k (done during it); by default ("channel") both are
constant over each channel of the block's input, so that a convolution can represent the
speeds (with the constant speed 1/e of eq. 9.4b, the pixels of MNIST's first blocks would need
speeds set by their row and column parity). In block k at local time τ = s T_k, s ∈ [0, 1]:

    y_k(s) = x_k + (λ_{k−1} + s Δ_k) (z_k − x_k)                                    (eq. 9.5)
    u_k    = d y_k / dτ = Δ_k (z_k − x_k) / T_k                                     (eq. 9.6)

(x_k, z_k: the data and noise in block k's arrangement), and the loss is the mean over blocks
of each block's stratified regression (eq. 9.7):

    L = (1/N) Σ_k Σ_j Σ_{i ∈ group j} (1 / (M n_j D_k)) ‖f_k(y_k(s_kj), s_kj T_k) − u_k‖².

Its gradient is each block's network backward, without tangents, applied to 2 w (f − u)
(eq. 9.8, as eq. 2.5); no ODE is solved in training. Couplings (eq. 9.9-9.10): "independent"
(CFM) draws z independently of the data; "ot" (OT-CFM) pairs only the *last* part's noise with
the data by exact minibatch OT on that part's squared distances, and leaves the noise of the
factored-out parts as drawn — pairing the whole vector would make a factored-out part depend
on the coordinates that flow on, and the composed flow would then not end at N(0, I)
(docs/cfm.md §9.4 gives a Gaussian counterexample).

The model stays a MultiscaleCNF: ``bits_per_dim`` (dopri5, Hutchinson) and ``sample`` are
inherited unchanged.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np  # host-side only: the index image, noise draws, the OT assignment

from .backend import get_array_module, to_device, to_host
from .cfm import check_flow_matching, group_cuts, ot_pairing
from .cnf import _block_prefix
from .images import factor_out, squeeze
from .model import Part, check_rows
from .multiscale import MultiscaleCNF

__all__ = ["FlowMatchingMultiscaleCNF", "Layout", "SCHEDULES", "multiscale_layout",
           "path_schedule", "path_state",
           "path_velocity", "draw_multiscale_noise", "multiscale_cfm_loss_and_grad"]


# ------------------------------------------------------------------ the layout (eq. 9.1-9.2)

class Layout(NamedTuple):
    """Where every coordinate of the multiscale map sits (host integer arrays).

    final_index  (D,): P of eq. 9.1; final coordinate j holds pixel final_index[j] (pixels are
                 the flat indices of the (C, H, W) image, final coordinates the flattened
                 factored-out parts in order, then the flattened last state)
    part_sizes   the sizes of those parts (sum D); part_exit: the 1-based block each leaves at
    block_index  per block k, (C_k, H_k, W_k): the pixel at each coordinate of block k's input
    block_final  per block k, (C_k, H_k, W_k): the final coordinate of the same (P⁻¹ ∘ block_index)
    block_exit   per block k, (C_k, H_k, W_k): e, the 1-based exit block of the same (eq. 9.2)
    block_start  per block k, (C_k, H_k, W_k) floats: λ, the fraction of each coordinate's path
                 done when block k starts (eq. 9.4; filled by ``path_schedule``)
    block_rate   per block k, (C_k, H_k, W_k) floats: Δ, the fraction done during block k
    """
    final_index: np.ndarray
    part_sizes: list
    part_exit: list
    block_index: list
    block_final: list
    block_exit: list
    block_start: list = None
    block_rate: list = None


def multiscale_layout(plan, image_shape) -> Layout:
    """The Layout of a multiscale plan (npflow.multiscale.multiscale_plan) for images of
    ``image_shape`` (C, H, W): an index image pushed through the plan's own squeeze and
    factor_out (npflow.images, eq. 2.1 and 3.1 of docs/images.md), the ODE blocks skipped,
    eq. 9.1-9.2."""
    D = int(np.prod(image_shape))
    cur = np.arange(D, dtype=np.int64).reshape((1,) + tuple(image_shape))
    block_index, parts, k = [], [], 0
    for op, _ in plan:
        if op == "block":
            block_index.append(cur[0].copy())
            k += 1
        elif op == "squeeze":
            cur = squeeze(cur)
        else:
            cur, out = factor_out(cur)
            parts.append((out[0].ravel(), k))
    parts.append((cur[0].ravel(), k))
    final_index = np.concatenate([p for p, _ in parts])
    if not np.array_equal(np.sort(final_index), np.arange(D)):
        raise AssertionError("multiscale_layout: the plan's final coordinates are not a "
                             "permutation of the pixels")
    final_of_pixel = np.empty(D, dtype=np.int64)
    final_of_pixel[final_index] = np.arange(D)
    exit_of_pixel = np.empty(D, dtype=np.int64)
    for p, e in parts:
        exit_of_pixel[p] = e
    return Layout(final_index=final_index, part_sizes=[len(p) for p, _ in parts],
                  part_exit=[e for _, e in parts], block_index=block_index,
                  block_final=[final_of_pixel[i] for i in block_index],
                  block_exit=[exit_of_pixel[i] for i in block_index])


SCHEDULES = ("channel", "constant")


def path_schedule(layout, rule="channel") -> Layout:
    """The layout with each block's λ (fraction of the path done at its start) and Δ (done
    during it), eq. 9.4: every coordinate starts at λ = 0 and, in block k (1-based),

        Δ_k = (1 − λ_{k−1}) / (ē_k − k + 1),   λ_k = λ_{k−1} + Δ_k,

    with ē_k = the smallest e in the coordinate's channel of block k's input (rule "channel",
    eq. 9.4a: λ and Δ constant over each channel, which a convolution can represent) or
    ē_k = e (rule "constant", eq. 9.4b: each coordinate at constant speed, Δ = 1/e, λ_{k−1} =
    (k − 1)/e). Either way λ = 1 at the end of the coordinate's exit block e.

    layout: from multiscale_layout; rule: "channel" | "constant". Returns the layout with
    block_start (λ_{k−1}) and block_rate (Δ_k) filled, host float64 arrays (C_k, H_k, W_k)."""
    if rule not in SCHEDULES:
        raise ValueError(f"unknown path schedule {rule!r}: expected one of {SCHEDULES}")
    D = len(layout.final_index)
    lam = np.zeros(D)
    starts, rates = [], []
    for k, (idx, e) in enumerate(zip(layout.block_index, layout.block_exit)):
        e_bar = e.astype(np.float64)
        if rule == "channel":
            e_bar = np.broadcast_to(e.min(axis=(1, 2), keepdims=True),
                                    e.shape).astype(np.float64)
        start = lam[idx]
        rate = (1.0 - start) / (e_bar - k)                  # k 0-based: ē − (k + 1) + 1
        lam[idx] = start + rate
        starts.append(start)
        rates.append(rate)
    return layout._replace(block_start=starts, block_rate=rates)


# ------------------------------------------------------------------ the path (eq. 9.5-9.6)

def path_state(x_k, z_k, lam, delta, s):
    """y_k(s) = x_k + (λ + s Δ)(z_k − x_k) (eq. 9.5). x_k, z_k (n, C_k, H_k, W_k); λ, Δ the
    block's block_start, block_rate (C_k, H_k, W_k) of their dtype; s a float in [0, 1]."""
    return x_k + (lam + s * delta) * (z_k - x_k)


def path_velocity(x_k, z_k, delta, T_k):
    """u_k = Δ (z_k − x_k)/T_k (eq. 9.6), the τ-derivative of path_state (τ = s T_k)."""
    return (z_k - x_k) * (delta * (1.0 / T_k))


def draw_multiscale_noise(rng, B, D, n_blocks, time_groups):
    """The randomness of one step after the dequantization (eq. 9.3, 2.6): z (B, D) ~ N(0, I)
    in final coordinates, then s (n_blocks, M), s_kj = (j + U_kj)/M, a stratified time per
    block and row group. Host float64 arrays."""
    M = len(group_cuts(B, time_groups)) - 1
    z = rng.standard_normal((B, D))
    s = (np.arange(M)[None, :] + rng.uniform(size=(n_blocks, M))) / M
    return z, s


def multiscale_cfm_loss_and_grad(nets, block_params, Ts, layout, y, z, s, rows=None):
    """The loss of eq. 9.7 on given noise and its exact gradient (eq. 9.8), no ODE solve.

    nets          one ConvNet per block (forward(params, x, None, t) -> (f, None, cache);
                  backward(fbar, None, cache, need_xdotbar=False))
    block_params  the blocks' parameter dicts (no prefix); Ts the blocks' end times (floats)
    layout        a scheduled Layout (path_schedule) whose block_index, block_final,
                  block_start and block_rate are arrays of y's module (ints) and dtype
    y             (B, D) the logit images, flattened pixels (data end)
    z             (B, D) the paired noise in final coordinates
    s             (N, M) host floats in [0, 1): block k's row-group times
    rows          (lo, hi): only those rows' terms, with the whole batch's weights (default all)
    Returns (loss: 0-d array, grads: list of dicts like block_params).
    """
    xp = get_array_module(y)
    B = y.shape[0]
    N, M = s.shape
    cuts = group_cuts(B, M)
    if len(cuts) - 1 != M or N != len(nets):
        raise ValueError(f"times s of shape {s.shape} for {len(nets)} blocks and a batch of "
                         f"{B} rows: need one row per block and M <= B groups")
    r_lo, r_hi = (0, B) if rows is None else rows
    yr, zr = y[r_lo:r_hi], z[r_lo:r_hi]
    prepared = [net.prepare(p) if hasattr(net, "prepare") else p
                for net, p in zip(nets, block_params)]
    grads = [{k: xp.zeros_like(v) for k, v in p.items()} for p in block_params]
    total = xp.zeros((), dtype=y.dtype)
    for k, net in enumerate(nets):
        idx, fin = layout.block_index[k], layout.block_final[k]
        lam, delta = layout.block_start[k], layout.block_rate[k]
        x_k = yr[:, idx]                                  # data in block k's arrangement
        z_k = zr[:, fin]                                  # noise in block k's arrangement
        D_k = int(delta.size)
        T_k = float(Ts[k])
        u_k = path_velocity(x_k, z_k, delta, T_k)                                  # eq. 9.6
        for j in range(M):
            lo, hi = max(cuts[j], r_lo) - r_lo, min(cuts[j + 1], r_hi) - r_lo
            if lo >= hi:
                continue
            w = 1.0 / (N * M * (cuts[j + 1] - cuts[j]) * D_k)                    # eq. 9.7
            sj = float(s[k, j])
            state = path_state(x_k[lo:hi], z_k[lo:hi], lam, delta, sj)             # eq. 9.5
            f, _, cache = net.forward(prepared[k], state, None, sj * T_k)
            r = f - u_k[lo:hi]
            total = total + w * (r * r).sum()
            _, _, pbar, _ = net.backward((2.0 * w) * r, None, cache, need_xdotbar=False)
            g = grads[k]                                                           # eq. 9.8
            for name, v in pbar.items():
                g[name] += v
    return total, grads


# ------------------------------------------------------------------ the model

class FlowMatchingMultiscaleCNF(MultiscaleCNF):
    """FFJORD's multiscale CNF (npflow.multiscale.MultiscaleCNF: same ConvNets, plan,
    bits_per_dim, sample, checkpoints) trained by the flow-matching objective of docs/cfm.md,
    section 9, instead of maximum likelihood.

    All MultiscaleCNF arguments (solver/steps/rtol/atol/trace/probes are the defaults of
    bits_per_dim and sample only, never used in training), plus
    coupling     "independent" (CFM) | "ot" (OT-CFM: the last part's noise paired with the data
                 by exact minibatch OT, eq. 9.10)
    time_groups  M, row groups sharing one stratified time per block (eq. 2.6)
    schedule     "channel" (default: every coordinate of a block's input channel moves at one
                 speed, eq. 9.4a) | "constant" (each coordinate at constant speed to its exit
                 block, eq. 9.4b); see ``path_schedule``
    train_T, kinetic and jacobian must keep their defaults (they belong to the likelihood
    loss).
    """

    def __init__(self, image_shape=(1, 28, 28), coupling="independent", time_groups=4,
                 schedule="channel", **kwargs):
        check_flow_matching(coupling, time_groups, kwargs)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown path schedule {schedule!r}: expected one of {SCHEDULES}")
        super().__init__(image_shape, **kwargs)
        self.config.update(coupling=coupling, time_groups=int(time_groups), schedule=schedule)
        self.layout = path_schedule(multiscale_layout(self.plan, self.image_shape), schedule)
        xp, dt = self.xp, self.dtype
        lay = self.layout
        self._device_layout = lay._replace(
            final_index=xp.asarray(lay.final_index),
            block_index=[xp.asarray(i) for i in lay.block_index],
            block_final=[xp.asarray(i) for i in lay.block_final],
            block_start=[to_device(v, xp, dt) for v in lay.block_start],
            block_rate=[to_device(v, xp, dt) for v in lay.block_rate])

    def draw(self, y, rng):
        """The noise of one step for the logit images y (B, C, H, W) (eq. 9.3) and, for OT-CFM,
        the last part's noise reordered by the optimal assignment (eq. 9.10): (z (B, D) final
        coordinates on the model's device, s host (N, M), info dict)."""
        cfg = self.config
        B = y.shape[0]
        z, s = draw_multiscale_noise(rng, B, self.D, len(self.nets), cfg["time_groups"])
        info = {}
        if cfg["coupling"] == "ot":
            t = time.perf_counter()
            last = self.layout.final_index[self.D - self.layout.part_sizes[-1]:]
            x_last = to_host(y).reshape(B, self.D)[:, last]
            z_last = z[:, self.D - len(last):]
            z[:, self.D - len(last):] = z_last[ot_pairing(x_last, z_last)]
            info["ot_seconds"] = time.perf_counter() - t
        return to_device(z, self.xp, self.dtype), s, info

    def loss_and_grad(self, x, rng, params=None, T=None):
        """The loss of eq. 9.7 on the 8-bit images x (B, C, H, W) and its exact gradient.

        rng: numpy Generator (dequantization, then z and the block times, eq. 9.3).
        Returns (loss: float, grads: dict like params, stats: dict with "cfm" (the loss),
        "nfe_forward" = "nfe_backward" = N (each row goes once through each block's network),
        "T", "pair_sq_dist" = mean ‖y_i − z_i‖² in final coordinates, "time_groups" and, for
        OT-CFM, "ot_seconds")."""
        part = self.loss_and_grad_part(x, rng, params=params, T=T)
        return self.loss_from_part(part, x.shape[0], params=params, T=T)

    def loss_and_grad_part(self, x, rng, rows=None, params=None, T=None, allreduce=None):
        """The rows ``(lo, hi)`` (default all) of the batch in eq. 9.7 and its gradient, as a
        model.Part (docs/parallel.md, eq. 1.2): sums "cfm" and "pair_sq_dist", the rows'
        gradient share, same "nfe_forward", "nfe_backward" and "ot_seconds". Dequantization,
        noise, times and pairing are drawn for the whole batch on every caller."""
        if T is not None:
            raise ValueError("flow matching has no end-time override (STEER); pass T=None")
        params = self.params if params is None else params
        y, _ = self.preprocess(x, rng)
        B = y.shape[0]
        lo, hi = check_rows(rows, B)
        z, s, info = self.draw(y, rng)
        Ts = [float(to_host(t)) for t in self.end_times(params)]
        yf = y.reshape(B, self.D)
        N = len(self.nets)
        total, gl = multiscale_cfm_loss_and_grad(
            self.nets, [self.block_params(k, params) for k in range(N)], Ts,
            self._device_layout, yf, z, s, rows=(lo, hi))
        grads = {}
        for k in range(N):
            pre = _block_prefix(k)
            grads.update({pre + name: v for name, v in gl[k].items()})
        d = yf[lo:hi][:, self._device_layout.final_index] - z[lo:hi]     # P y − z (eq. 9.1)
        same = {"nfe_forward": float(N), "nfe_backward": float(N), **info}
        return Part({"cfm": total, "pair_sq_dist": (d * d).sum()}, grads, same)

    def loss_from_part(self, part, B, params=None, T=None):
        """(loss, grads, stats) of loss_and_grad from the sum of the parts of a batch of B."""
        loss = float(to_host(part.sums["cfm"]))
        stats = {"cfm": loss, "nfe_forward": int(round(part.same["nfe_forward"])),
                 "nfe_backward": int(round(part.same["nfe_backward"])),
                 "T": [float(to_host(t)) for t in self.end_times(params)],
                 "pair_sq_dist": float(to_host(part.sums["pair_sq_dist"])) / B,
                 "time_groups": len(group_cuts(B, self.config["time_groups"])) - 1}
        if "ot_seconds" in part.same:
            stats["ot_seconds"] = float(part.same["ot_seconds"])
        return loss, dict(part.grads), stats
