"""The incumbent for images: FFJORD's multiscale CNF in PyTorch + torchdiffeq, for timing and
cross-checking npflow.multiscale on the CPU (issue 6 item 7).

Written here from the math of FFJORD (Grathwohl et al. 2019) and docs/images.md, not copied;
the same model as npflow.multiscale.MultiscaleCNF:

- dequantize x̃ = (x + u)/256, logit y = logit(α + (1 − 2α)x̃) with its log-det (eq. 4.1-4.3);
- plan: N blocks, squeeze, N blocks, factor out half, ..., N blocks (eq. 3.1);
- block dynamics: ConcatConv2d 3×3 (t as channel 0) with softplus between layers (eq. 1.12);
- Hutchinson trace with one Rademacher probe ε per block and solve, ε ᵀ(∂f/∂z)ε by one
  vector-Jacobian product with create_graph=True (FFJORD's divergence_approx);
- loss = mean bits/dim (eq. 4.4); torchdiffeq ``odeint`` (not the adjoint variant: backprop
  through the solver, discretize-then-optimize as npflow) with method "rk4" and a fixed step,
  which is Kutta's 3/8 rule (npflow's "rk38").

Needs the bench extra: pip install torch==2.13.0 (CPU wheel) then torchdiffeq.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchdiffeq import odeint

__all__ = ["ConcatConv2d", "ConvODEnet", "TorchMultiscaleCNF", "preprocess"]


class ConcatConv2d(nn.Module):
    """conv([t·1; x]) with zero padding (t channel first)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, 1, 1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([tt, x], 1))


class ConvODEnet(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        dims = [channels] + list(hidden) + [channels]
        self.layers = nn.ModuleList(ConcatConv2d(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, t, x):
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.layers) - 1:
                x = F.softplus(x)
        return x


class _Func(nn.Module):
    """Augmented dynamics (z, ℓ): dz/dt = f, dℓ/dt = εᵀ(∂f/∂z)ε (npflow's sign convention)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.eps = None

    def forward(self, t, state):
        z, _ = state
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.requires_grad_(True)
            f = self.net(t, z)
            vjp = torch.autograd.grad(f, z, self.eps, create_graph=True)[0]
        div = (vjp * self.eps).flatten(1).sum(1)
        return f, div


def squeeze(x):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(B, C * 4, H // 2, W // 2)


def plan(image_shape, scales, blocks):
    C, H, W = image_shape
    out = []
    for i in range(scales):
        out += [("block", (C, H, W))] * blocks
        if i == scales - 1:
            break
        C, H, W = 4 * C, H // 2, W // 2
        out.append(("squeeze", (C, H, W)))
        out += [("block", (C, H, W))] * blocks
        C //= 2
        out.append(("factor", (C, H, W)))
    return out


class TorchMultiscaleCNF(nn.Module):
    def __init__(self, image_shape=(1, 28, 28), hidden=(32,), scales=3, blocks=2, T=1.0,
                 steps=4, alpha=1e-6):
        super().__init__()
        self.plan = plan(image_shape, scales, blocks)
        self.funcs = nn.ModuleList(_Func(ConvODEnet(s[0], hidden))
                                   for op, s in self.plan if op == "block")
        self.T, self.steps, self.alpha = T, steps, alpha
        self.D = int(math.prod(image_shape))

    def bits_per_dim(self, y, logdet_pre, generator, probes=None):
        """Bits/dim per image (B,); probes: optional list of one ε per block (else drawn
        from generator, Rademacher)."""
        B = y.shape[0]
        z, ell = y, torch.zeros(B, dtype=y.dtype)
        parts, b = [], 0
        ts = torch.tensor([0.0, self.T], dtype=y.dtype)
        for op, s in self.plan:
            if op == "block":
                fn = self.funcs[b]
                if probes is not None:
                    fn.eps = probes[b].to(z.dtype)
                else:
                    fn.eps = (torch.randint(0, 2, z.shape, generator=generator) * 2 - 1).to(
                        z.dtype)
                zs, ls = odeint(fn, (z, ell), ts, method="rk4",
                                options=dict(step_size=self.T / self.steps))
                z, ell = zs[-1], ls[-1]
                b += 1
            elif op == "squeeze":
                z = squeeze(z)
            else:
                d = z.shape[1] // 2
                parts.append(z[:, d:])
                z = z[:, :d]
        parts.append(z)
        sq = sum((p * p).flatten(1).sum(1) for p in parts)
        nll = 0.5 * sq + 0.5 * self.D * math.log(2 * math.pi) - ell
        return (nll - logdet_pre) / (self.D * math.log(2)) + 8.0


def preprocess(x_uint8, generator, alpha=1e-6, dtype=torch.float32):
    """uint8 (B, C, H, W) -> (y, logdet (B,)) (eq. 4.1-4.3)."""
    x = torch.as_tensor(x_uint8).to(dtype)
    xt = (x + torch.rand(x.shape, generator=generator, dtype=dtype)) / 256
    s = alpha + (1 - 2 * alpha) * xt
    y = torch.log(s) - torch.log1p(-s)
    logdet = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return y, logdet
