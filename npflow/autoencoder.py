"""The autoencoder of OT-Flow's MNIST experiment, with the code standardization
(docs/latent.md, sections 1-2).

    b = B(x)     encoder,  x (N, n_x) in [0, 1]  -> code b (N, d)               (eq. 1.1)
    x̂ = D(b)     decoder,  b (N, d)              -> x̂ (N, n_x) in (0, 1)         (eq. 1.1)
    loss = (1/(N n_x)) Σ (x̂ − x)²                 mean-squared error             (eq. 1.2)
    c = (b − μ) / (s + ε)                         standardized code              (eq. 2.1)

Both maps are npflow.nets.MLP (docs/layers.md, eq. 1.20-1.21). The reference shape (the default)
is one layer each way: B = ReLU(W_B x + β_B) (784 -> 128), D = sigmoid(W_D b + β_D)
(128 -> 784). ``hidden`` inserts hidden ReLU layers (encoder n_x -> h_1 -> ... -> d, the
decoder mirrored). The encoder's output keeps the activation, as in the reference (codes are
non-negative).

μ and s (the training codes' mean and standard deviation, eq. 2.2) are stored in ``params``
under "code_mean" and "code_std", so they are saved and loaded with the model; the optimiser
owns only ``network_names()``. ε = 1e-6 as in the reference.
"""
from __future__ import annotations

import numpy as np  # host side only: the seed generator

from .backend import to_device
from .model import FlowModel
from .nets import MLP

__all__ = ["Autoencoder"]

STATS = ("code_mean", "code_std")


class Autoencoder(FlowModel):
    """MLP encoder/decoder pair trained by mean-squared error (docs/latent.md, section 1).

    x_dim   n_x, the data dimension (784 for MNIST)
    z_dim   d, the code dimension (128 in the reference)
    hidden  widths of hidden layers of the encoder (the decoder mirrors them); () = reference
    activation  activation of the hidden layers and of the encoder's output ("relu")
    eps     ε of the standardization (eq. 2.1)
    dtype, device, seed   precision, "cpu"/"gpu", seed of the initial parameters
    """

    def __init__(self, x_dim=784, z_dim=128, hidden=(), activation="relu", eps=1e-6,
                 dtype="float64", device="cpu", seed=0):
        x_dim, z_dim = int(x_dim), int(z_dim)
        hidden = [int(h) for h in hidden]
        if x_dim < 1 or z_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"Autoencoder sizes must be >= 1, got x_dim={x_dim}, "
                             f"z_dim={z_dim}, hidden={hidden}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        config = dict(x_dim=x_dim, z_dim=z_dim, hidden=hidden, activation=str(activation),
                      eps=float(eps), dtype=str(np.dtype(dtype)), device=device,
                      seed=int(seed))
        super().__init__(config, device, dtype)
        self.x_dim, self.z_dim, self.eps = x_dim, z_dim, float(eps)
        self.encoder = MLP((x_dim, *hidden, z_dim), activation, out_activation=activation)
        self.decoder = MLP((z_dim, *reversed(hidden), x_dim), activation,
                           out_activation="sigmoid")
        rng = np.random.default_rng(seed)
        params = {"encoder." + k: v for k, v in
                  self.encoder.init_params(rng, self.dtype, self.xp).items()}
        params.update({"decoder." + k: v for k, v in
                       self.decoder.init_params(rng, self.dtype, self.xp).items()})
        params["code_mean"] = self.xp.zeros((z_dim,), dtype=self.dtype)
        params["code_std"] = self.xp.ones((z_dim,), dtype=self.dtype)
        self.params = params

    # ---------------------------------------------------------------- parameters
    def network_names(self):
        """The trained parameters (encoder and decoder weights); not the code statistics."""
        return [k for k in self.params if k not in STATS]

    @staticmethod
    def _part(params, prefix):
        n = len(prefix)
        return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}

    # ---------------------------------------------------------------- maps
    def _prepare_x(self, x):
        return self.prepare_data(x, (self.x_dim,))

    def _prepare_code(self, b, what="code"):
        shape = getattr(b, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] != self.z_dim:
            raise ValueError(f"{what} must have shape (N, {self.z_dim}), got {shape}")
        return to_device(b, self.xp, self.dtype)

    def encode(self, x, params=None, batch_size=10000):
        """b = B(x) (eq. 1.1): x (N, x_dim) -> (N, z_dim), on the model's device."""
        params = self.params if params is None else params
        x = self._prepare_x(x)
        enc = self._part(params, "encoder.")
        return self.xp.concatenate([self.encoder.forward(enc, x[i:i + batch_size])[0]
                                    for i in range(0, x.shape[0], batch_size)])

    def decode(self, b, params=None, batch_size=10000):
        """x̂ = D(b) (eq. 1.1): b (N, z_dim) -> (N, x_dim) in (0, 1)."""
        params = self.params if params is None else params
        b = self._prepare_code(b)
        dec = self._part(params, "decoder.")
        return self.xp.concatenate([self.decoder.forward(dec, b[i:i + batch_size])[0]
                                    for i in range(0, b.shape[0], batch_size)])

    def standardize(self, b, params=None):
        """c = (b − μ)/(s + ε) (eq. 2.1): b (N, d) -> (N, d)."""
        params = self.params if params is None else params
        b = self._prepare_code(b)
        return (b - params["code_mean"]) / (params["code_std"] + self.eps)

    def unstandardize(self, c, params=None):
        """b = μ + (s + ε) ⊙ c, the inverse of eq. 2.1: c (N, d) -> (N, d)."""
        params = self.params if params is None else params
        c = self._prepare_code(c, "standardized code")
        return c * (params["code_std"] + self.eps) + params["code_mean"]

    def standardize_log_det(self, params=None) -> float:
        """log |det ∂c/∂b| = −Σ_j log(s_j + ε) (eq. 2.3), a float."""
        params = self.params if params is None else params
        return -float(self.xp.log(params["code_std"] + self.eps).sum())

    def fit_standardization(self, x, batch_size=10000):
        """Set μ and s to the mean and (population) standard deviation of the codes of x
        (N, x_dim) (eq. 2.2). Returns (μ, s) on the model's device."""
        b = self.encode(x, batch_size=batch_size)
        mu = b.mean(axis=0)
        s = self.xp.sqrt(((b - mu) ** 2).mean(axis=0))
        self.params = {**self.params, "code_mean": mu, "code_std": s}
        return mu, s

    # ---------------------------------------------------------------- training
    def loss_and_grad(self, x, rng=None, params=None):
        """Mean-squared reconstruction error (eq. 1.2) and its gradient (eq. 1.3).

        x (B, x_dim); rng unused (the loss is deterministic). Returns (loss: float, grads: dict
        like params, stats: {"mse"}). The gradient: x̂̄ = 2(x̂ − x)/(B n_x) pushed back through
        the decoder (b̄ = Dᵀ x̂̄) and the encoder (eq. 1.21 of docs/layers.md); the code
        statistics do not enter the loss, their entries are zeros.
        """
        params = self.params if params is None else params
        x = self._prepare_x(x)
        enc, dec = self._part(params, "encoder."), self._part(params, "decoder.")
        b, c_enc = self.encoder.forward(enc, x)
        y, c_dec = self.decoder.forward(dec, b)
        r = y - x
        loss = (r * r).mean()
        ybar = r * (2.0 / r.size)
        bbar, g_dec = self.decoder.backward(dec, ybar, c_dec)
        _, g_enc = self.encoder.backward(enc, bbar, c_enc)
        grads = {"encoder." + k: v for k, v in g_enc.items()}
        grads.update({"decoder." + k: v for k, v in g_dec.items()})
        for k in STATS:
            grads[k] = self.xp.zeros_like(params[k])
        loss = float(loss)
        return loss, grads, {"mse": loss, "nll": loss}

    def reconstruction_error(self, x, params=None, batch_size=10000) -> float:
        """Mean-squared error of D(B(x)) over x (N, x_dim) (eq. 1.2), a float."""
        params = self.params if params is None else params
        x = self._prepare_x(x)
        tot = 0.0
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            r = self.decode(self.encode(xb, params), params) - xb
            tot += float((r * r).sum())
        return tot / x.size

    def log_prob(self, x, **kwargs):
        raise NotImplementedError("an autoencoder has no density; see npflow.latent")

    def sample(self, n, rng, **kwargs):
        raise NotImplementedError("an autoencoder does not sample; see npflow.latent")
