"""OT-Flow in PyTorch, written here from the published equations (Onken et al. 2021, and the
poster), for timing npflow's OT-Flow against the framework the reference runs on.

The math (docs/otflow.md has npflow's derivation of the same formulas):

- potential Φ(s) = wᵀN(s) + ½ sᵀ(AᵀA)s + cᵀs, s = (x, t) ∈ R^{d+1}, time last;            (1)
  N a ResNet: u_0 = σ(K_0 s + b_0), u_i = u_{i−1} + h σ(K_i u_{i−1} + b_i), h = 1/(nTh − 1),
  σ(a) = log(eᵃ + e⁻ᵃ), σ' = tanh, σ'' = 1 − tanh²;
- gradient by the reverse sweep z_{M+1} = w, z_i = z_{i+1} + h K_iᵀ(σ'(a_i) ⊙ z_{i+1}),
  ∇_sΦ = K_0ᵀ(σ'(a_0) ⊙ z_1) + AᵀA s + c;                                                 (2)
- exact trace of ∇ₓ²Φ in O(d) products (the paper's formula, E = first d columns of I):
  J_0 = diag σ'(a_0) K_0E, t_0 = (σ''(a_0) ⊙ z_1)ᵀ((K_0E)⊙(K_0E))1,
  t_i = (σ''(a_i) ⊙ z_{i+1})ᵀ((K_i J_{i−1})⊙(K_i J_{i−1}))1, J_i = J_{i−1} + h diag σ'(a_i) K_i J_{i−1},
  tr = t_0 + h Σ t_i + tr(E ᵀAᵀA E);                                                      (3)
- augmented ODE on [0, 1]: ẋ = −∇ₓΦ/α0, ℓ̇ = −tr/α0, L̇ = ½‖ẋ‖², Ṙ = |∂ₜΦ − ‖∇ₓΦ‖²/(2α0)|;  (4)
- loss = α0 mean L + α1 mean C + α2 mean R, C = ½‖x(1)‖² + (d/2) log 2π − ℓ(1);           (5)
- classical RK4 with nt steps; the parameter gradient is autograd through the whole
  computation (formulas (2)-(3) included), as the reference does.

Parameters are taken from an npflow OTFlow's params dict (names K0, b0, K1.., b1.., w, A, c),
so both implementations start from the same numbers and their losses can be compared.
"""
from __future__ import annotations

import math

import torch


def _sigma(a):
    b = a.abs()
    return b + torch.log1p(torch.exp(-2 * b))


class TorchOTFlow:
    """OT-Flow's loss in PyTorch. params: dict of numpy arrays (npflow's names); d; alpha;
    nt RK4 steps; dtype torch.float64 or torch.float32."""

    def __init__(self, params, d, alpha=(1.0, 80.0, 500.0), nt=8, dtype=torch.float64):
        self.d, self.alpha, self.nt = int(d), tuple(float(a) for a in alpha), int(nt)
        self.p = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params.items()}
        self.M = sum(1 for k in params if k.startswith("K")) - 1

    def potential_grad_trace(self, s):
        """∇_sΦ (B, d+1) and tr ∇ₓ²Φ (B,) at s (B, d+1), eq. (2)-(3)."""
        p, d, M = self.p, self.d, self.M
        h = 1.0 / M
        K = [p[f"K{i}"] for i in range(M + 1)]
        a = [s @ K[0].T + p["b0"]]
        u = _sigma(a[0])
        for i in range(1, M + 1):
            a.append(u @ K[i].T + p[f"b{i}"])
            u = u + h * _sigma(a[i])
        th = [torch.tanh(ai) for ai in a]
        z = [None] * (M + 2)
        z[M + 1] = p["w"].expand(s.shape[0], -1)
        for i in range(M, 0, -1):
            z[i] = z[i + 1] + h * ((th[i] * z[i + 1]) @ K[i])
        S = p["A"].T @ p["A"]
        grad = (th[0] * z[1]) @ K[0] + s @ S + p["c"]
        KE = K[0][:, :d]                                        # (m, d)
        tr = ((1 - th[0] ** 2) * z[1]) @ (KE * KE).sum(dim=1)
        J = th[0].unsqueeze(2) * KE.unsqueeze(0)                # (B, m, d)
        for i in range(1, M + 1):
            P = torch.matmul(K[i], J)                           # (B, m, d)
            tr = tr + h * (((1 - th[i] ** 2) * z[i + 1]) * (P * P).sum(dim=2)).sum(dim=1)
            if i < M:
                J = J + h * th[i].unsqueeze(2) * P
        return grad, tr + torch.diagonal(S)[:d].sum()

    def _f(self, t, x):
        a0 = self.alpha[0]
        s = torch.cat([x, torch.full_like(x[:, :1], t)], dim=1)
        grad, tr = self.potential_grad_trace(s)
        gx = grad[:, :self.d]
        v = -gx / a0
        r = (grad[:, self.d] - (gx * gx).sum(dim=1) / (2 * a0)).abs()
        return v, -tr / a0, 0.5 * (v * v).sum(dim=1), r

    def loss(self, x):
        """eq. (5) by classical RK4 with nt steps on [0, 1]: x (B, d) tensor -> (loss, costs)."""
        B = x.shape[0]
        zero = torch.zeros(B, dtype=x.dtype)
        y = (x, zero, zero, zero)
        h = 1.0 / self.nt
        for k in range(self.nt):
            t = k * h
            k1 = self._f(t, y[0])
            k2 = self._f(t + h / 2, y[0] + h / 2 * k1[0])
            k3 = self._f(t + h / 2, y[0] + h / 2 * k2[0])
            k4 = self._f(t + h, y[0] + h * k3[0])
            y = tuple(yj + h / 6 * (a + 2 * b + 2 * c + e)
                      for yj, a, b, c, e in zip(y, k1, k2, k3, k4))
        xT, l, L, R = y
        C = 0.5 * (xT * xT).sum(dim=1) + 0.5 * self.d * math.log(2 * math.pi) - l
        costs = (L.mean(), C.mean(), R.mean())
        return sum(a * c for a, c in zip(self.alpha, costs)), costs

    def loss_and_grad(self, x):
        """loss (float) and gradients (dict of numpy arrays) for x (B, d) numpy."""
        for v in self.p.values():
            v.grad = None
        xt = torch.as_tensor(x, dtype=next(iter(self.p.values())).dtype)
        loss, costs = self.loss(xt)
        loss.backward()
        return float(loss.detach()), {k: v.grad.numpy() for k, v in self.p.items()}
