"""A flow in an autoencoder's latent space: generation, interpolation and latent log-densities
(docs/latent.md, sections 2-5; OT-Flow's "MNIST Synthetic Generation").

With the autoencoder (B, D) of npflow.autoencoder, the standardization c = (b − μ)/(s + ε)
(eq. 2.1) and a flow f (npflow.OTFlow or npflow.CNF) that maps standardized codes c to
z = f(c) ~ N(0, I):

    log p_c(c) = log N(f(c); 0, I) + log|det ∂f/∂c|                   (eq. 3.1)
    log p_b(b) = log p_c(c(b)) − Σ_j log(s_j + ε)                     (eq. 2.4)
    generated image      D(μ + (s + ε) ⊙ f⁻¹(z)),  z ~ N(0, I)        (eq. 4.1)
    interpolation        y(λ) = D(b(f⁻¹(λ f(c(B(x1))) + (1 − λ) f(c(B(x2))))))   (eq. 4.2)

f⁻¹ integrates the flow's ODE from T back to 0 with the same solver (eq. 4.3): RK4 with
``steps`` steps for OT-Flow, dopri5 for a CNF.

Plus ``SoftmaxRegression``: a multinomial logistic regression on pixels, the referee that
labels generated digits (docs/latent.md, section 6).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module, to_host

__all__ = ["LatentFlow", "SoftmaxRegression"]


class LatentFlow:
    """An autoencoder and a flow on its standardized codes (docs/latent.md).

    autoencoder  npflow.autoencoder.Autoencoder with fitted code_mean / code_std
    flow         npflow.OTFlow or npflow.CNF of dimension z_dim, on the same device
    steps        RK4 steps of OT-Flow's f and f⁻¹ here (the reference validates with 16);
                 ignored for a CNF
    rtol, atol   dopri5 tolerances for a CNF's f and f⁻¹
    """

    def __init__(self, autoencoder, flow, steps=16, rtol=1e-5, atol=1e-5):
        if flow.dim != autoencoder.z_dim:
            raise ValueError(f"the flow's dimension {flow.dim} differs from the autoencoder's "
                             f"code dimension {autoencoder.z_dim}")
        self.ae, self.flow = autoencoder, flow
        self.steps, self.rtol, self.atol = int(steps), float(rtol), float(atol)
        self.is_otflow = type(flow).__name__ == "OTFlow"

    # ---------------------------------------------------------------- the maps
    def codes(self, x):
        """Standardized codes c = (B(x) − μ)/(s + ε) (eq. 2.1): x (N, x_dim) -> (N, d)."""
        return self.ae.standardize(self.ae.encode(x))

    def forward(self, c):
        """z = f(c) (eq. 3.1): (N, d) -> (N, d)."""
        if self.is_otflow:
            return self.flow.transform(c, steps=self.steps)
        return self.flow.transform(c, solver="dopri5", rtol=self.rtol, atol=self.atol)

    def inverse(self, z):
        """c = f⁻¹(z), the ODE integrated from T back to 0 (eq. 4.3): (N, d) -> (N, d)."""
        if self.is_otflow:
            return self.flow.transform(z, inverse=True, steps=self.steps)
        return self.flow.transform(z, inverse=True, solver="dopri5", rtol=self.rtol,
                                   atol=self.atol)

    def decode_codes(self, c):
        """Images D(μ + (s + ε) ⊙ c) of standardized codes c (N, d): (N, x_dim)."""
        return self.ae.decode(self.ae.unstandardize(c))

    def generate(self, n, rng):
        """n images D(μ + (s + ε) ⊙ f⁻¹(z)), z ~ N(0, I) drawn from rng (eq. 4.1): (n, x_dim)."""
        z = rng.standard_normal((int(n), self.ae.z_dim))
        return self.decode_codes(self.inverse(z))

    def interpolate(self, x1, x2, lambdas):
        """y(λ) of eq. 4.2 for pairs of images x1, x2 (P, x_dim) and lambdas (L,):
        (P, L, x_dim). λ = 1 gives D(B(x1)) and λ = 0 gives D(B(x2)) up to the error of
        f⁻¹∘f (eq. 4.4)."""
        lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
        z1, z2 = self.forward(self.codes(x1)), self.forward(self.codes(x2))
        P, L = z1.shape[0], lam.shape[0]
        xp = get_array_module(z1)
        lam_d = xp.asarray(lam, dtype=z1.dtype)[None, :, None]
        z = lam_d * z1[:, None, :] + (1.0 - lam_d) * z2[:, None, :]       # (P, L, d)
        y = self.decode_codes(self.inverse(z.reshape(P * L, -1)))
        return y.reshape(P, L, -1)

    def roundtrip_error(self, x):
        """max_i ‖f⁻¹(f(c_i)) − c_i‖_∞ over the codes of x (N, x_dim), and the same for the
        decoded images ‖D(f⁻¹(f(c))) − D(c)‖_∞ (eq. 4.4): a dict of floats."""
        c = self.codes(x)
        c_back = self.inverse(self.forward(c))
        xp = get_array_module(c)
        img, img_back = self.decode_codes(c), self.decode_codes(c_back)
        return {"code_max_abs": float(xp.abs(c_back - c).max()),
                "image_max_abs": float(xp.abs(img_back - img).max())}

    # ---------------------------------------------------------------- densities
    def log_prob_codes(self, c, **kw):
        """log p_c(c) of standardized codes c (N, d) (eq. 3.1), on the model's device.
        OT-Flow: RK4 with ``self.steps``; CNF: keyword arguments of CNF.log_prob."""
        if self.is_otflow:
            return self.flow.log_prob(c, steps=kw.pop("steps", self.steps), **kw)
        kw.setdefault("rtol", self.rtol)
        kw.setdefault("atol", self.atol)
        return self.flow.log_prob(c, **kw)

    def log_prob_code_space(self, b, **kw):
        """log p_b(b) = log p_c(c(b)) − Σ_j log(s_j + ε) of raw codes b (N, d) (eq. 2.4)."""
        c = self.ae.standardize(b)
        return self.log_prob_codes(c, **kw) + self.ae.standardize_log_det()

    def latent_nll(self, x, **kw):
        """Mean latent NLLs of images x (N, x_dim), in nats (eq. 5.1-5.2): a dict with
        nll_c (standardized codes), nll_c_per_dim, nll_b (codes, with the Jacobian of the
        standardization, eq. 2.4), nll_b_per_dim, and n."""
        lp = np.asarray(to_host(self.log_prob_codes(self.codes(x), **kw)), dtype=np.float64)
        d = self.ae.z_dim
        nll_c = float(-lp.mean())
        nll_b = nll_c - self.ae.standardize_log_det()
        return {"nll_c": nll_c, "nll_c_per_dim": nll_c / d, "nll_b": nll_b,
                "nll_b_per_dim": nll_b / d, "nll_c_stderr": float(lp.std() / math.sqrt(len(lp))),
                "n": int(len(lp))}


class SoftmaxRegression:
    """Multinomial logistic regression p(k|x) = softmax(W x + β)_k on host arrays
    (docs/latent.md, eq. 6.1), trained by full-batch gradient descent with momentum on the
    mean cross-entropy plus ½λ‖W‖² (eq. 6.2). A referee for generated digits, not a model of
    npflow: it runs with numpy on the host.

    x_dim, n_classes: sizes; l2: λ.
    """

    def __init__(self, x_dim=784, n_classes=10, l2=1e-4):
        self.W = np.zeros((n_classes, x_dim))
        self.beta = np.zeros(n_classes)
        self.l2 = float(l2)

    def logits(self, x):
        """x (N, x_dim) -> (N, n_classes)."""
        return np.asarray(x, dtype=np.float64) @ self.W.T + self.beta

    def probabilities(self, x):
        a = self.logits(x)
        a -= a.max(axis=1, keepdims=True)
        e = np.exp(a)
        return e / e.sum(axis=1, keepdims=True)

    def loss_and_grad(self, x, y):
        """Mean cross-entropy + ½λ‖W‖² (eq. 6.2) and its gradient (eq. 6.3):
        W̄ = (P − Y)ᵀ x / N + λW, β̄ = Σ (P − Y) / N, with Y the one-hot labels."""
        P = self.probabilities(x)
        N = x.shape[0]
        loss = -np.log(P[np.arange(N), y] + 1e-300).mean() + 0.5 * self.l2 * (self.W ** 2).sum()
        P[np.arange(N), y] -= 1.0
        P /= N
        return loss, P.T @ x + self.l2 * self.W, P.sum(axis=0)

    def fit(self, x, y, iters=300, lr=0.5, momentum=0.9):
        """Gradient descent with (heavy-ball) momentum on all of x (N, x_dim), y (N,) ints.
        Returns the loss history (list of floats)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        vW, vb = np.zeros_like(self.W), np.zeros_like(self.beta)
        hist = []
        for _ in range(int(iters)):
            loss, gW, gb = self.loss_and_grad(x, y)
            vW = momentum * vW - lr * gW
            vb = momentum * vb - lr * gb
            self.W += vW
            self.beta += vb
            hist.append(float(loss))
        return hist

    def predict(self, x):
        """Most probable class of each row of x (N, x_dim): (N,) ints."""
        return self.logits(x).argmax(axis=1)

    def accuracy(self, x, y):
        return float((self.predict(x) == np.asarray(y)).mean())
