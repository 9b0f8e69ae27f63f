"""FFJORD's multiscale CNF for images (docs/images.md, section 3).

For a (1, 28, 28) image and three scales (FFJORD's ODENVP, docs/reference.md section 2):

    (1,28,28) -> 2 blocks -> squeeze -> (4,14,14) -> 2 blocks -> factor out half
    (2,14,14) -> 2 blocks -> squeeze -> (8,7,7)   -> 2 blocks -> factor out half
    (4,7,7)   -> 2 blocks                                         (10 CNF blocks)

Each block is an ODE dz/dt = f_b(z, t) with its own ConvNet (docs/images.md eq. 1.12) and its
own end time T_b (trained under TO-FLOW), solved by npflow.odeint with the CNF dynamics of
npflow.cnf (augmented state z, logdet, and the training methods' state terms, e.g. RNODE's
kinetic / jacobian integrals, npflow/methods.py). Squeeze and factor-out act on z only
(volume preserving, eq. 2.1 and 3.1), so the log-determinants of the blocks simply add, and
the Gaussian base density covers the factored-out parts and the final z together (eq. 3.2):

    log p(y) = Σ_parts log N(z_part; 0, I) + Σ_b ℓ_b(T_b)

The data enter as 8-bit images: dequantized (eq. 4.1) and logit transformed (eq. 4.2-4.3)
inside ``loss_and_grad``, whose loss is bits/dim (eq. 4.4) plus the RNODE regularizers
(eq. 3.3). The gradient is the exact derivative of that loss: the discrete adjoint of every
block, pushed back through factor-out (concatenate the cotangents) and squeeze (unsqueeze the
cotangent), eq. 3.4.
"""
from __future__ import annotations

import math

import numpy as np  # host-side only: seed generator, host statistics

from .backend import to_device, to_host
from .cnf import BlockStack, CNFDynamics, TRACE_KINDS
from .methods import model_settings
from .conv import ConvNet
from .images import (ALPHA, LOG2_256, dequantize, factor_in, factor_out, logit_inverse,
                     logit_transform, squeeze, unsqueeze)
from .model import FlowModel, Part, check_rows
from .solvers import odeint
from .tableau import fixed_grid
from . import trace as trace_mod

__all__ = ["MultiscaleCNF", "multiscale_plan", "default_scales"]



def default_scales(H: int, W: int) -> int:
    """FFJORD's calc_n_scale: the number of halvings while H, W >= 4 (28 -> 3, 32 -> 4)."""
    n = 0
    while H >= 4 and W >= 4:
        n, H, W = n + 1, H // 2, W // 2
    return n


def multiscale_plan(image_shape, scales=None, blocks=2):
    """The list of operations of the multiscale flow (FFJORD's ODENVP, eq. 3.1).

    image_shape (C, H, W); scales (default: default_scales); blocks per stage.
    Returns a list of ("block", shape), ("squeeze", shape_after), ("factor", kept_shape) in
    forward order.
    """
    C, H, W = (int(v) for v in image_shape)
    n = default_scales(H, W) if scales is None else int(scales)
    if n < 1 or blocks < 1:
        raise ValueError(f"need scales >= 1 and blocks >= 1, got scales={scales}, "
                         f"blocks={blocks}")
    plan = []
    for i in range(n):
        last = i == n - 1
        plan += [("block", (C, H, W))] * blocks
        if last:
            break
        if H % 2 or W % 2:
            raise ValueError(f"multiscale: scale {i} has {H}x{W} pixels, not divisible by 2; "
                             f"use fewer scales (got scales={n} for image {tuple(image_shape)})")
        C, H, W = 4 * C, H // 2, W // 2
        plan.append(("squeeze", (C, H, W)))
        plan += [("block", (C, H, W))] * blocks
        C = C // 2
        plan.append(("factor", (C, H, W)))
    return plan


class MultiscaleCNF(BlockStack, FlowModel):
    """FFJORD's multiscale CNF over 8-bit images (docs/images.md section 3).

    image_shape  (C, H, W) of the data, e.g. (1, 28, 28)
    hidden       ConvNet widths (FFJORD: 64, 64, 64); layer "concat" | "concatsquash"
    scales       number of scales (default FFJORD's: 3 for 28×28); blocks per stage (2)
    T            initial end time of every block (t0 = 0); train_T: TO-FLOW ("T0", "T1", ...)
    solver       a name in npflow.tableau.TABLEAUS: fixed grid ("rk4", "rk38", "euler",
                 "midpoint") with ``steps`` per block or ``step_size`` (RNODE: rk4, 0.25), or
                 adaptive ("dopri5", "bosh3") with rtol/atol
    trace        "rademacher" (FFJORD images) | "gaussian"/"hutchinson"; probes K
    zero_last    each block starts as the identity
    alpha        logit margin (eq. 4.2; FFJORD 1e-6)
    store        what the solves keep for the backward: "states" (recompute each step's stages,
                 least memory) or "caches" (keep every stage's layer caches: no recompute,
                 memory ∝ steps × stages × activations; fixed-grid solvers only)
    **method_settings  the training methods' model settings (methods.model_settings), e.g.
                 RNODE's kinetic = λ_K and jacobian = λ_J (eq. 3.3); each off (0) by default
    params: "b{b}.{i}.weight", ... for block b, and "T{b}" when train_T.
    """

    loss_sum = "bpd"                  # BlockStack.loss_from_part: the loss is mean bits/dim

    def __init__(self, image_shape=(1, 28, 28), hidden=(64, 64, 64), layer="concat",
                 scales=None, blocks=2, T=1.0, train_T=False, solver="rk4", steps=4,
                 step_size=None, rtol=1e-5, atol=1e-5, trace="rademacher", probes=1,
                 zero_last=False, alpha=ALPHA, store="states", dtype="float32", device="cpu",
                 seed=0, **method_settings):
        image_shape = tuple(int(v) for v in image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if trace not in TRACE_KINDS or trace == "exact":
            raise ValueError(f"trace must be one of {TRACE_KINDS[1:]} for images (the exact "
                             f"trace would need C·H·W probes), got {trace!r}")
        if not T > 0:
            raise ValueError(f"end time T must be > 0, got {T}")
        settings = model_settings(method_settings, "MultiscaleCNF")
        if store not in ("states", "caches"):
            raise ValueError(f"store must be 'states' or 'caches', got {store!r}")
        plan = multiscale_plan(image_shape, scales, int(blocks))
        config = dict(image_shape=list(image_shape), hidden=[int(h) for h in hidden],
                      layer=layer, scales=None if scales is None else int(scales),
                      blocks=int(blocks), T=float(T), train_T=bool(train_T), solver=solver,
                      steps=int(steps), step_size=None if step_size is None else float(step_size),
                      rtol=float(rtol), atol=float(atol), trace=trace, probes=int(probes),
                      **settings, zero_last=bool(zero_last), alpha=float(alpha), store=store,
                      dtype=str(dtype),
                      device=device, seed=int(seed))
        super().__init__(config, device=device, dtype=dtype)
        self.image_shape = image_shape
        self.D = int(np.prod(image_shape))
        self.plan = plan
        self.nets = [ConvNet(shape, config["hidden"], layer_type=layer, zero_last=zero_last)
                     for op, shape in plan if op == "block"]
        rng = np.random.default_rng(seed)
        self.params = self._init_block_params(rng)

    # ---------------------------------------------------------------- helpers
    @property
    def time_names(self):
        """Names of the trained end times: "T0", "T1", ... one per block."""
        return [f"T{b}" for b in range(len(self.nets))]

    def _solver_kwargs(self, solver=None, steps=None, step_size=None, rtol=None, atol=None):
        cfg = self.config
        solver = cfg["solver"] if solver is None else solver
        kw = dict(method=solver, rtol=cfg["rtol"] if rtol is None else rtol,
                  atol=cfg["atol"] if atol is None else atol)
        if fixed_grid(solver):
            step_size = cfg["step_size"] if step_size is None and steps is None else step_size
            if step_size is not None:
                kw["step_size"] = step_size
            else:
                kw["steps"] = cfg["steps"] if steps is None else steps
        return kw

    def preprocess(self, x, rng):
        """8-bit images x (B, C, H, W) in {0..255} -> (y, logdet_pre (B,)) (eq. 4.1-4.3)."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4 or tuple(shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, self.image_shape))})"
                             f", got {shape}")
        if shape[0] < 1:
            raise ValueError("image batch is empty")
        xh = to_host(x)
        if xh.min() < 0 or xh.max() > 255:
            raise ValueError(f"images must hold 8-bit intensities 0..255, got values in "
                             f"[{xh.min()}, {xh.max()}]")
        xt = dequantize(x, rng, xp=self.xp, dtype=self.dtype)
        return logit_transform(xt, self.config["alpha"])

    def _flow(self, y0, Ts, params, rng, terms, kw, store="states", rows=None):
        """Forward through the plan (eq. 3.1) from the rows lo:hi of y0 (B, C, H, W) (default
        all) with the state terms ``terms``, each block's probes drawn for all B rows and
        sliced: returns (state, parts, tape)."""
        cfg = self.config
        K = cfg["probes"]
        weight = 1.0 / K
        xp = self.xp
        B = y0.shape[0]
        lo, hi = check_rows(rows, B)
        y = self._initial_state(y0[lo:hi], terms)
        parts, tape = [], []
        b = 0
        for op, shape in self.plan:
            if op == "block":
                kind = "gaussian" if cfg["trace"] == "hutchinson" else cfg["trace"]
                eps = trace_mod.probes(kind, K, (B,) + shape, rng, self.dtype, xp)[:, lo:hi]
                dyn = CNFDynamics(self.nets[b], self.block_params(b, params), eps, weight,
                                  terms)
                sol = odeint(dyn, y, 0.0, Ts[b], store=store, **kw)
                tape.append(("block", b, dyn, sol))
                y = sol.y1
                b += 1
            elif op == "squeeze":
                y = y._replace(z=squeeze(y.z))
                tape.append(("squeeze",))
            else:
                kept, out = factor_out(y.z)
                parts.append(out)
                y = y._replace(z=kept)
                tape.append(("factor", len(parts) - 1))
        parts.append(y.z)
        return y, parts, tape

    def _nll(self, parts, logdet):
        """−log p(y) = Σ_parts ½‖z‖² + (D/2) log 2π − Σ_b ℓ_b (eq. 3.2), per sample (B,)."""
        sq = sum((p * p).reshape(p.shape[0], -1).sum(axis=1) for p in parts)
        return 0.5 * sq + 0.5 * self.D * math.log(2 * math.pi) - logdet

    # ---------------------------------------------------------------- training
    def loss_and_grad(self, x, rng, params=None, T=None):
        """Loss = mean bits/dim (eq. 4.4) + λ_K ΣE + λ_J Σn (eq. 3.3) and its exact gradient.

        x (B, C, H, W) 8-bit images (host or device); rng numpy Generator (dequantization
        noise, then the probes of every block); T optional end-time override (STEER).
        Returns (loss, grads like params, stats) with stats "nll" and "bpd" (bits/dim of the
        batch), "nfe_forward", "nfe_backward", "T" (list), and the regularizers / ∂L/∂T.
        Data-parallel training splits the same computation over processes (npflow.parallel,
        docs/parallel.md): loss_and_grad_part on each one's rows, loss_from_part on the sum.
        """
        part = self.loss_and_grad_part(x, rng, params=params, T=T)
        return self.loss_from_part(part, x.shape[0], params=params, T=T)

    def loss_and_grad_part(self, x, rng, rows=None, params=None, T=None, allreduce=None):
        """The part of rows ``(lo, hi)`` of the images x (B, C, H, W) (default: all) in the
        loss and its gradient: a model.Part with the row sums "bpd" (and one per state term,
        e.g. RNODE's "kinetic", "jacobian"), their gradient with the whole batch's cotangent
        (eq. 3.4) and, with trained end times, ∂L/∂T_b. The dequantization noise and every
        block's probes are drawn from rng for the whole batch and the rows keep theirs
        (docs/parallel.md, eq. 1.3); ``allreduce`` as in odeint (adaptive solvers).
        """
        params = self.params if params is None else params
        cfg = self.config
        terms = self.state_terms
        y0, logdet_pre = self.preprocess(x, rng)
        B = y0.shape[0]
        lo, hi = check_rows(rows, B)
        Ts = self.end_times(params, T)
        kw = self._solver_kwargs()
        kw["allreduce"] = allreduce
        store = cfg["store"] if fixed_grid(cfg["solver"]) else "states"
        y, parts, tape = self._flow(y0, Ts, params, rng, terms, kw, store=store,
                                    rows=(lo, hi))
        nll = self._nll(parts, y.logdet)
        scale = 1.0 / (self.D * math.log(2))
        bpd = (nll - logdet_pre[lo:hi]) * scale + LOG2_256                     # eq. 4.4
        sums = {"bpd": bpd.sum(), **self._term_sums(y, terms)}

        # eq. 3.4: cotangents of the final state and of the factored-out parts
        c = scale / B
        part_bars = [p * c for p in parts]

        def other(entry, ybar):                       # squeeze / factor-out, reversed
            if entry[0] == "squeeze":
                return ybar._replace(z=unsqueeze(ybar.z))
            return ybar._replace(z=factor_in(ybar.z, part_bars[entry[1]]))

        ybar = self._terminal_cotangent(y, part_bars[-1], c, B, terms)
        grads, dT_sums, nfe_b = self._reverse(tape, ybar, Ts, other)
        sums.update(dT_sums)
        same = {"nfe_forward": float(sum(e[3].nfe for e in tape if e[0] == "block")),
                "nfe_backward": float(nfe_b)}
        return Part(sums, grads, same)

    # ---------------------------------------------------------------- evaluation
    def bits_per_dim(self, x, rng, params=None, solver=None, steps=None, step_size=None,
                     rtol=None, atol=None, batch_size=200, return_nfe=False):
        """Bits/dim per image (N,) (eq. 4.4) with the model's trace estimator, by default with
        the training solver; dopri5 as FFJORD's test evaluation with solver="dopri5"."""
        params = self.params if params is None else params
        kw = self._solver_kwargs(solver, steps, step_size, rtol, atol)
        Ts = self.end_times(params)
        out, nfes = [], []
        for s in range(0, x.shape[0], batch_size):
            y0, logdet_pre = self.preprocess(x[s:s + batch_size], rng)
            y, parts, tape = self._flow(y0, Ts, params, rng, (), kw)
            nll = self._nll(parts, y.logdet)
            out.append(to_host((nll - logdet_pre) / (self.D * math.log(2)) + LOG2_256))
            nfes.append(sum(e[3].nfe for e in tape if e[0] == "block"))
        bpd = np.concatenate(out)
        return (bpd, float(np.mean(nfes))) if return_nfe else bpd

    def log_prob(self, x, rng, **kwargs):
        """log density of the dequantized images x̃ ∈ [0, 1]^D (nats), (N,) on the host:
        log p(x̃) = −D ln2 (bits/dim − 8) (eq. 4.4)."""
        bpd = self.bits_per_dim(x, rng, **kwargs)
        return -self.D * math.log(2) * (bpd - LOG2_256)

    def part_shapes(self):
        """Shapes (C, H, W) of the factored-out parts and of the final z, in forward order."""
        shape, out = self.image_shape, []
        for op, s in self.plan:
            if op == "squeeze":
                shape = s
            elif op == "factor":
                out.append((shape[0] - s[0],) + s[1:])
                shape = s
        return out + [shape]

    def encode(self, y, params=None, solver=None, steps=None, step_size=None, rtol=None,
               atol=None):
        """Logit-space images y (B, C, H, W) -> latent parts (list, shapes part_shapes())."""
        params = self.params if params is None else params
        kw = self._solver_kwargs(solver, steps, step_size, rtol, atol)
        Ts = self.end_times(params)
        z, parts, b = y, [], 0
        for op, _ in self.plan:
            if op == "block":
                dyn = CNFDynamics(self.nets[b], self.block_params(b, params))
                z = odeint(dyn, z, 0.0, Ts[b], **kw).y1
                b += 1
            elif op == "squeeze":
                z = squeeze(z)
            else:
                z, out = factor_out(z)
                parts.append(out)
        return parts + [z]

    def decode(self, parts, params=None, solver=None, steps=None, step_size=None, rtol=None,
               atol=None):
        """Inverse of encode: latent parts -> logit-space images (B, C, H, W), running the
        plan backwards (blocks from T_b to 0, un-factor, unsqueeze)."""
        params = self.params if params is None else params
        kw = self._solver_kwargs(solver, steps, step_size, rtol, atol)
        Ts = self.end_times(params)
        k, b = len(parts) - 1, len(self.nets)
        z = parts[k]
        for op, _ in reversed(self.plan):
            if op == "block":
                b -= 1
                dyn = CNFDynamics(self.nets[b], self.block_params(b, params))
                z = odeint(dyn, z, Ts[b], 0.0, **kw).y1
            elif op == "squeeze":
                z = unsqueeze(z)
            else:
                k -= 1
                z = factor_in(z, parts[k])
        return z

    def sample(self, n, rng, params=None, **solver_kwargs):
        """n images: latent parts z ~ N(0, I) from rng, decoded, then the inverse logit
        (eq. 4.2). Returns x̃ (n, C, H, W) in [0, 1] on the model's device; solver_kwargs as
        in encode (default: the training solver)."""
        parts = [to_device(rng.standard_normal((int(n),) + s), self.xp, self.dtype)
                 for s in self.part_shapes()]
        y = self.decode(parts, params, **solver_kwargs)
        return logit_inverse(y, self.config["alpha"])
