"""Variational autoencoders with flow posteriors (docs/vae.md).

    q(z_0 | x) = N(μ(x), diag σ(x)²),  z_K = f_K ∘ … ∘ f_1(z_0),  p(z) = N(0, I),  p(x | z_K)

The encoder is an MLP trunk h(x) and one affine head that outputs μ, the pre-softplus scale
s (σ = softplus(s)) and every flow's raw per-sample parameters (amortized flows, eq. 1.1).
The flows are npflow.flows (planar; orthogonal, Householder, triangular Sylvester; their
derivations are in docs/flows.md) or the amortized low-rank CNF of npflow.amortized_cnf
(docs/vae.md section 5). The decoder is an MLP whose output parametrises a likelihood of
npflow.likelihoods (Bernoulli, discretized logistic; with labels, a Joint of the image's and
the label's, eq. 2.7).

Training objective, one reparameterized sample per data point (eq. 1.2, 1.6):

    −ELBO_β(x) = −log p(x | z_K) + β [log q_0(z_0 | x) − Σ_k log|det ∂f_k/∂z_{k−1}| − log p(z_K)]

with β from the warm-up schedule (eq. 6.1; β = 1 is the true −ELBO). ``loss_and_grad`` returns
the batch mean and its exact gradient for every parameter (eq. 3.1-3.6), ``log_likelihood`` the
importance-sampled log p(x) with k samples (IWAE, eq. 4.1-4.2).
"""
from __future__ import annotations

import math

import numpy as np  # host side only: the seed generator, noise draws, validation messages

from .backend import get_array_module, to_device, to_host
from .likelihoods import Bernoulli, DiscretizedLogistic, Joint, sigmoid, softplus
from .model import FlowModel
from .nets import MLP

__all__ = ["VAE", "FLOW_KINDS", "LIKELIHOODS", "beta_schedule", "label_to_unit",
           "unit_to_label"]

FLOW_KINDS = ("none", "planar", "orthogonal", "householder", "triangular", "cnf")
LIKELIHOODS = ("bernoulli", "logistic256")
_LOG_2PI = math.log(2.0 * math.pi)


def beta_schedule(it, warmup, start=0.01, end=1.0):
    """β of iteration ``it`` (0-based): linear from ``start`` to ``end`` over ``warmup``
    iterations, then ``end`` (eq. 6.1; warmup 0 gives ``end`` from the start)."""
    if warmup <= 0:
        return float(end)
    return float(min(end, start + (end - start) * it / warmup))


def label_to_unit(labels, n_classes):
    """Class labels 0..n−1 -> the centres (y + ½)/n in (0, 1) (eq. 2.8). ValueError if any
    label is outside 0..n−1."""
    y = np.asarray(labels)
    if y.size and (y.min() < 0 or y.max() > n_classes - 1 or not np.all(y == np.rint(y))):
        raise ValueError(f"labels must be integers in 0..{n_classes - 1}; got values in "
                         f"[{y.min()}, {y.max()}]")
    return (y.astype(np.float64) + 0.5) / n_classes


def unit_to_label(u, n_classes):
    """Inverse of label_to_unit for decoded values: the nearest class (host int array)."""
    u = np.asarray(to_host(u), dtype=np.float64)
    return np.clip(np.rint(u * n_classes - 0.5), 0, n_classes - 1).astype(int)


class VAE(FlowModel):
    """VAE with an amortized flow posterior (docs/vae.md).

    x_dim       D, data columns of the image part (784 for MNIST)
    z_dim       d, latent size
    hidden      encoder trunk widths, e.g. (300, 300); the decoder mirrors them
    flow        "none" | "planar" | "orthogonal" | "householder" | "triangular" | "cnf"
    num_flows   K, number of flows (CNF blocks for "cnf"); must be 0 for "none"
    likelihood  "bernoulli" (x in {0, 1}) | "logistic256" (x = (pixel + ½)/256)
    n_classes   0: no labels; n: data carry extra last column(s), the label as (y + ½)/n,
                encoded and decoded (a discretized logistic with n bins, eq. 2.8)
    label_dims  how many copies of the label column the data carry (1; 784 = a whole image
                channel, as the study feeds the label); decoded as one label (eq. 2.9)
    activation  trunk activation (npflow.nets.MLP): "relu", "tanh", "softplus", ...
    flow_opts   extra keyword arguments of npflow.flows.make_flows (e.g. the number of
                Householder reflections or orthogonal vectors)
    cnf_hidden, cnf_rank, cnf_T, cnf_steps, cnf_solver: the amortized CNF (section 5)

    Data x have shape (B, x_dim + label_dims·[n_classes > 0]).
    """

    def __init__(self, x_dim, z_dim, hidden=(300, 300), flow="none", num_flows=0,
                 likelihood="bernoulli", n_classes=0, label_dims=1, activation="relu",
                 flow_opts=None,
                 cnf_hidden=(64, 64), cnf_rank=1, cnf_T=0.5, cnf_steps=4, cnf_solver="rk4",
                 dtype="float32", device="cpu", seed=0):
        x_dim, z_dim, num_flows, n_classes = int(x_dim), int(z_dim), int(num_flows), int(n_classes)
        hidden = tuple(int(h) for h in hidden)
        if flow not in FLOW_KINDS:
            raise ValueError(f"unknown flow {flow!r}: expected one of {', '.join(FLOW_KINDS)}")
        if flow == "none" and num_flows != 0:
            raise ValueError(f"flow 'none' takes num_flows 0, got {num_flows}")
        if flow != "none" and num_flows < 1:
            raise ValueError(f"flow {flow!r} needs num_flows >= 1, got {num_flows}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}: expected one of "
                             f"{', '.join(LIKELIHOODS)}")
        if x_dim < 1 or z_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"need x_dim, z_dim >= 1 and hidden widths >= 1, got x_dim={x_dim}, "
                             f"z_dim={z_dim}, hidden={hidden}")
        if n_classes < 0 or n_classes == 1:
            raise ValueError(f"n_classes must be 0 (no labels) or >= 2, got {n_classes}")
        label_dims = int(label_dims)
        if label_dims < 1:
            raise ValueError(f"label_dims must be >= 1, got {label_dims}")
        flow_opts = dict(flow_opts or {})
        config = dict(x_dim=x_dim, z_dim=z_dim, hidden=list(hidden), flow=flow,
                      num_flows=num_flows, likelihood=likelihood, n_classes=n_classes,
                      label_dims=label_dims,
                      activation=activation, flow_opts=flow_opts,
                      cnf_hidden=[int(h) for h in cnf_hidden], cnf_rank=int(cnf_rank),
                      cnf_T=float(cnf_T), cnf_steps=int(cnf_steps), cnf_solver=cnf_solver,
                      dtype=str(dtype), device=device, seed=int(seed))
        super().__init__(config, device=device, dtype=dtype)
        self.x_dim, self.z_dim, self.n_classes = x_dim, z_dim, n_classes
        self.label_dims = label_dims if n_classes else 0
        self.x_in = x_dim + self.label_dims

        image = Bernoulli(x_dim) if likelihood == "bernoulli" else DiscretizedLogistic(x_dim, 256)
        self.likelihood = (Joint([image, DiscretizedLogistic(label_dims, n_classes)]) if n_classes
                           else image)

        # the posterior flow
        if flow == "none":
            self.flow = None
        elif flow == "cnf":
            from .amortized_cnf import AmortizedCNF
            self.flow = AmortizedCNF(z_dim, num_flows, hidden=cnf_hidden, rank=cnf_rank,
                                     T=cnf_T, steps=cnf_steps, solver=cnf_solver)
        else:
            from .flows import make_flows
            self.flow = make_flows(flow, z_dim, num_flows, **flow_opts)
        shapes = self.flow.param_shapes() if self.flow is not None else {}
        self._flow_layout = []                        # (name, per-sample shape, start, stop)
        off = 2 * z_dim
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            n = int(math.prod(shape))
            self._flow_layout.append((name, shape, off, off + n))
            off += n
        self.n_head = off

        self.encoder = MLP((self.x_in,) + hidden, activation=activation,
                           out_activation=activation)
        self.head = MLP((hidden[-1], self.n_head))
        self.decoder = MLP((z_dim,) + hidden[::-1] + (self.likelihood.n_out,),
                           activation=activation)
        rng = np.random.default_rng(seed)
        params = {}
        for prefix, net in (("enc.", self.encoder), ("head.", self.head), ("dec.", self.decoder)):
            for k, v in net.init_params(rng, self.dtype, self.xp).items():
                params[prefix + k] = v
        if self.flow is not None and hasattr(self.flow, "init_shared"):
            for k, v in self.flow.init_shared(rng, self.dtype, self.xp).items():
                params["flow." + k] = v
        self.params = params

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _sub(params, prefix):
        n = len(prefix)
        return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}

    def prepare(self, x, check=True):
        """Check a batch (B, x_in) (shape, finiteness, the likelihood's support: one host
        synchronisation) and move it to the model's device and dtype."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] != self.x_in:
            lab = (f" ({self.x_dim} image columns + {self.label_dims} label column(s))"
                   if self.n_classes else "")
            raise ValueError(f"VAE data must have shape (B, {self.x_in}){lab}, got {shape}")
        x = self.prepare_data(x, (self.x_in,))
        if check:
            self.likelihood.check(x, "VAE data x")
        return x

    def noise(self, rng, n):
        """ε ~ N(0, I) of shape (n, d), drawn on the host from ``rng`` and moved once."""
        return to_device(rng.standard_normal((int(n), self.z_dim)), self.xp, self.dtype)

    def _split_head(self, o):
        """Head output (B, n_head) -> μ (B, d), s (B, d), flow params {name: (B, *shape)}."""
        d = self.z_dim
        p = {name: o[:, a:b].reshape((o.shape[0],) + shape)
             for name, shape, a, b in self._flow_layout}
        return o[:, :d], o[:, d:2 * d], p

    def _merge_head_bar(self, mu_bar, s_bar, p_bar):
        xp = get_array_module(mu_bar)
        B = mu_bar.shape[0]
        parts = [mu_bar, s_bar]
        for name, shape, a, b in self._flow_layout:
            g = p_bar.get(name) if p_bar is not None else None
            parts.append(xp.zeros((B, b - a), dtype=mu_bar.dtype) if g is None
                         else g.reshape(B, b - a))
        return xp.concatenate(parts, axis=1)

    def _shared(self, params):
        return self._sub(params, "flow.")

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, x, params=None):
        """q(z_0 | x): x (B, x_in) -> (μ (B, d), σ (B, d), flow params {name: (B, *shape)})
        (eq. 1.1; σ = softplus(s))."""
        params = self.params if params is None else params
        x = self.prepare(x)
        h, _ = self.encoder.forward(self._sub(params, "enc."), x)
        o, _ = self.head.forward(self._sub(params, "head."), h)
        mu, s, p = self._split_head(o)
        return mu, softplus(s), p

    def decode(self, z, params=None):
        """Decoder output o (B, n_out) for latents z (B, d): the likelihood's parameters."""
        params = self.params if params is None else params
        z = to_device(z, self.xp, self.dtype)
        return self.decoder.forward(self._sub(params, "dec."), z)[0]

    def flow_forward(self, z0, p, params=None):
        """z_K and Σ log|det| (B,) of the posterior flow from z_0 (eq. 1.3)."""
        if self.flow is None:
            return z0, self.xp.zeros(z0.shape[0], dtype=z0.dtype), None
        if hasattr(self.flow, "init_shared"):
            params = self.params if params is None else params
            return self.flow.forward(z0, p, self._shared(params))
        return self.flow.forward(z0, p)

    def _flow_backward(self, cache, zK_bar, ld_bar):
        """(z_0 cotangent, per-sample flow-parameter cotangents, shared cotangents)."""
        if self.flow is None:
            return zK_bar, {}, {}
        if hasattr(self.flow, "init_shared"):
            return self.flow.backward(cache, zK_bar, ld_bar)
        z0_bar, p_bar = self.flow.backward(cache, zK_bar, ld_bar)
        return z0_bar, p_bar, {}

    # ------------------------------------------------------------------ the ELBO
    def _terms(self, x, eps, params, rows=None):
        """Forward pass of eq. 1.6 for data x (B, x_in) and noise eps (B, d).

        rows: optional index array repeating x's encoder outputs (IWAE: several ε per x).
        Returns (dict of per-sample terms, caches)."""
        xp = self.xp
        d = self.z_dim
        h, c_enc = self.encoder.forward(self._sub(params, "enc."), x)
        o_head, c_head = self.head.forward(self._sub(params, "head."), h)
        if rows is not None:
            o_head = o_head[rows]
            xr = x[rows]
        else:
            xr = x
        mu, s, p = self._split_head(o_head)
        sigma = softplus(s, xp)
        z0 = mu + sigma * eps                                                    # eq. 1.2
        zK, logdet, c_flow = self.flow_forward(z0, p, params)                     # eq. 1.3
        o_dec, c_dec = self.decoder.forward(self._sub(params, "dec."), zK)
        lpx, c_lik = self.likelihood.log_prob(xr, o_dec)
        log_q0 = -0.5 * (eps * eps).sum(axis=1) - xp.log(sigma).sum(axis=1) - 0.5 * d * _LOG_2PI
        log_pz = -0.5 * (zK * zK).sum(axis=1) - 0.5 * d * _LOG_2PI
        terms = dict(lpx=lpx, log_q0=log_q0, logdet=logdet, log_pz=log_pz)
        caches = (c_enc, c_head, s, sigma, eps, zK, c_flow, c_dec, c_lik)
        return terms, caches

    def loss_and_grad(self, x, rng, params=None, beta=1.0):
        """Mean −ELBO_β over the batch (eq. 1.6) and its exact gradient (eq. 3.1-3.6).

        x       (B, x_in) data (binary for "bernoulli", bin centres for "logistic256"; label
                column (y + ½)/n last when n_classes > 0)
        rng     numpy Generator: ε ~ N(0, I) (B, d) is drawn from it, so the same generator
                state gives the same loss
        beta    KL weight of the warm-up (eq. 6.1); the loss is the true mean −ELBO at β = 1
        Returns (loss: float, grads: dict like params, stats: dict with "nelbo" (the mean
        −ELBO at β = 1), "recon" (mean −log p(x|z_K)), "kl" (mean single-sample KL term),
        "beta", and "label_nll" with labels).
        """
        params = self.params if params is None else params
        xp = self.xp
        x = self.prepare(x)
        B = x.shape[0]
        beta = float(beta)
        eps = self.noise(rng, B)
        t, (c_enc, c_head, s, sigma, eps, zK, c_flow, c_dec, c_lik) = self._terms(x, eps, params)
        kl = t["log_q0"] - t["logdet"] - t["log_pz"]                              # eq. 1.5
        nelbo = -t["lpx"] + kl
        loss = float(to_host((-t["lpx"] + beta * kl).mean()))

        # backward (eq. 3.1-3.6), every cotangent carries the mean's 1/B
        w = 1.0 / B
        lp_bar = xp.full((B,), -w, dtype=self.dtype)
        o_dec_bar = self.likelihood.backward(c_lik, lp_bar)                       # eq. 3.1
        zK_bar, g_dec = self.decoder.backward(self._sub(params, "dec."), o_dec_bar, c_dec)
        zK_bar = zK_bar + (beta * w) * zK                                         # eq. 3.2
        ld_bar = xp.full((B,), -beta * w, dtype=self.dtype)
        z0_bar, p_bar, shared_bar = self._flow_backward(c_flow, zK_bar, ld_bar)   # eq. 3.3
        mu_bar = z0_bar                                                           # eq. 3.4
        sigma_bar = z0_bar * eps - (beta * w) / sigma                             # eq. 3.5
        s_bar = sigma_bar * sigmoid(s, xp)
        head_bar = self._merge_head_bar(mu_bar, s_bar, p_bar)
        h_bar, g_head = self.head.backward(self._sub(params, "head."), head_bar, c_head)
        _, g_enc = self.encoder.backward(self._sub(params, "enc."), h_bar, c_enc)  # eq. 3.6
        grads = {}
        for prefix, g in (("enc.", g_enc), ("head.", g_head), ("dec.", g_dec),
                          ("flow.", shared_bar)):
            for k, v in g.items():
                grads[prefix + k] = v
        for k in params:                     # parameters the graph does not reach: zero
            if k not in grads:
                grads[k] = xp.zeros_like(params[k])

        stats = {"nelbo": float(to_host(nelbo.mean())), "recon": float(to_host(-t["lpx"].mean())),
                 "kl": float(to_host(kl.mean())), "beta": beta,
                 "logdet": float(to_host(t["logdet"].mean())), "nll": float(to_host(nelbo.mean()))}
        if self.n_classes:
            stats["label_nll"] = float(to_host(-self.likelihood.part_log_probs(c_lik)[1].mean()))
        if self.flow is not None and hasattr(self.flow, "last_nfe"):
            stats["nfe_forward"] = self.flow.last_nfe(c_flow)
        return loss, grads, stats

    def nelbo(self, x, rng, params=None, batch_size=1000):
        """Per-sample −ELBO (eq. 1.6 at β = 1) with one ε per data point: (N,) host array."""
        params = self.params if params is None else params
        x = self.prepare(x)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            t, _ = self._terms(xb, self.noise(rng, xb.shape[0]), params)
            out.append(to_host(-t["lpx"] + t["log_q0"] - t["logdet"] - t["log_pz"]))
        return np.concatenate(out)

    # ------------------------------------------------------------------ IWAE
    def log_weights(self, x, rng, k, params=None):
        """log w_i = log p(x, z_K^i) − log q(z_K^i | x), i = 1..k, for x (B, x_in): (B, k)
        (eq. 4.1), all B·k rows in one pass."""
        params = self.params if params is None else params
        x = self.prepare(x)
        B = x.shape[0]
        rows = self.xp.repeat(self.xp.arange(B), int(k))
        t, _ = self._terms(x, self.noise(rng, B * k), params, rows=rows)
        lw = t["lpx"] + t["log_pz"] - t["log_q0"] + t["logdet"]
        return lw.reshape(B, int(k))

    def log_likelihood(self, x, rng, k=5000, params=None, batch_rows=20000):
        """Importance-sampled log p(x) with k samples of q (IWAE bound, eq. 4.2): (B,) host array.

        log p̂(x) = logsumexp_i log w_i − log k, accumulated over chunks of the k samples with
        a running maximum (stable), each chunk at most ``batch_rows`` rows (x rows × samples),
        which bounds memory."""
        params = self.params if params is None else params
        x = self.prepare(x)
        k = int(k)
        if k < 1:
            raise ValueError(f"log_likelihood needs k >= 1 samples, got {k}")
        batch_rows = max(1, int(batch_rows))
        kc = min(k, batch_rows)                     # samples per chunk
        bx = max(1, batch_rows // kc)               # data rows per chunk
        out = []
        for i in range(0, x.shape[0], bx):
            xb = x[i:i + bx]
            m = s = None
            for j in range(0, k, kc):
                lw = to_host(self.log_weights(xb, rng, min(kc, k - j), params)).astype(np.float64)
                cm = lw.max(axis=1)
                if m is None:
                    m, s = cm, np.exp(lw - cm[:, None]).sum(axis=1)
                else:
                    nm = np.maximum(m, cm)
                    s = s * np.exp(m - nm) + np.exp(lw - nm[:, None]).sum(axis=1)
                    m = nm
            out.append(m + np.log(s) - math.log(k))
        return np.concatenate(out)

    # ------------------------------------------------------------------ generation
    def sample(self, n, rng, params=None, mean=True):
        """n draws: z ~ N(0, I) from rng, decoded. mean=True gives the likelihood's mean image
        (probabilities for Bernoulli, μ for the logistic); the label column, when present,
        holds the most probable label's centre (y + ½)/n. mean=False samples x ~ p(x | z).
        Returns (n, x_in) on the model's device."""
        o = self.decode(self.noise(rng, n), params)
        return self.output_to_x(o, rng, mean)

    def output_to_x(self, o, rng=None, mean=True):
        """Decoder output (B, n_out) -> data-like (B, x_in): mean or sample (see sample)."""
        lik = self.likelihood
        if not mean:
            return lik.sample(o, rng)
        if self.n_classes:
            img, lab = lik.parts
            oi, ol = lik.split_out(o)
            return self.xp.concatenate([img.mean(oi), self.decode_label(ol)], axis=1)
        return lik.mean(o)

    def decode_label(self, o_label):
        """The label the model gives: the class maximizing Σ_j log P_n(y | o_j) over the label
        columns j (eq. 2.9; one column: its most probable bin), as its centre (y + ½)/n
        repeated in every label column (B, label_dims)."""
        lab = self.likelihood.parts[1]
        y = self.xp.argmax(lab.bin_log_probs(o_label).sum(axis=1), axis=-1)
        u = (y.astype(o_label.dtype) + 0.5) / self.n_classes
        return self.xp.repeat(u[:, None], self.label_dims, axis=1)

    def reconstruct(self, x, rng, params=None, mean=True):
        """Encode x, draw z_K ~ q(z_K | x) (one sample), decode: (B, x_in)."""
        params = self.params if params is None else params
        x = self.prepare(x)
        mu, sigma, p = self.encode(x, params)
        z0 = mu + sigma * self.noise(rng, x.shape[0])
        zK, _, _ = self.flow_forward(z0, p, params)
        return self.output_to_x(self.decode(zK, params), rng, mean)

    def log_prob(self, x, rng, k=100, **kw):
        """log_likelihood under FlowModel's name (the estimate needs an explicit rng)."""
        return self.log_likelihood(x, rng, k=k, **kw)
