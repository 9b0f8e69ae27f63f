"""Decoder likelihoods p(x | z) of the VAE, with hand-written gradients (docs/vae.md, section 2).

Each likelihood maps the decoder's output o (B, n_out) and the data x (B, D) to the per-sample
log-likelihood and back:

    log_prob :: (x, o)            -> (lp (B,), cache)
    backward :: (cache, lp_bar (B,)) -> o_bar (B, n_out)      o_bar = lp_bar[:, None] ∂lp/∂o

    Bernoulli(D)                    o = logits a (B, D)                              eq. 2.1-2.2
    DiscretizedLogistic(D, bins)    o = [μ (B, D) | log s (B, D)], x = bin centres (k+½)/bins,
                                    k = 0..bins−1; bins = 256 for 8-bit pixels      eq. 2.3-2.6
    Joint(parts)                    independent parts on column blocks of x and o   eq. 2.7

``check(x)`` is the bad-input check (one host synchronisation): it raises ValueError naming the
problem before any work is done. Compute code takes its array module from its inputs.
"""
from __future__ import annotations

from .backend import get_array_module, to_host

__all__ = ["Likelihood", "Bernoulli", "DiscretizedLogistic", "Joint", "softplus", "sigmoid"]


def softplus(a, xp=None):
    """log(1 + e^a), computed as max(a, 0) + log1p(e^{−|a|}) (no overflow)."""
    xp = get_array_module(a) if xp is None else xp
    return xp.maximum(a, 0) + xp.log1p(xp.exp(-xp.abs(a)))


def sigmoid(a, xp=None):
    """1 / (1 + e^{−a}) without overflow: e^{min(a,0)} / (1 + e^{−|a|})."""
    xp = get_array_module(a) if xp is None else xp
    e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1.0, e) / (1.0 + e)


class Likelihood:
    """Base: D data columns, n_out decoder outputs."""

    D: int
    n_out: int

    def check(self, x, what="x"):
        raise NotImplementedError

    def log_prob(self, x, o):
        raise NotImplementedError

    def backward(self, cache, lp_bar):
        raise NotImplementedError

    def mean(self, o):
        """A point summary of p(x | o) for pictures (B, D)."""
        raise NotImplementedError

    def sample(self, o, rng):
        """x ~ p(x | o), drawn from the numpy Generator ``rng`` on the host, moved to o's module."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """p(x | a) = Π_d σ(a_d)^{x_d} (1 − σ(a_d))^{1 − x_d}, x_d ∈ {0, 1}, a the logits (B, D).

        log p = Σ_d x_d a_d − softplus(a_d)                                      (eq. 2.1)
        ∂ log p / ∂a_d = x_d − σ(a_d)                                            (eq. 2.2)
    """

    def __init__(self, D: int):
        self.D = int(D)
        self.n_out = self.D

    def check(self, x, what="x"):
        xp = get_array_module(x)
        bad = int(to_host(xp.count_nonzero((x != 0) & (x != 1))))
        if bad:
            raise ValueError(f"{what}: the Bernoulli likelihood needs binary data (0 or 1); "
                             f"{bad} entries are neither: binarize the images first "
                             "(e.g. dynamic binarization x ~ Bernoulli(pixel/255))")

    def log_prob(self, x, o):
        """eq. 2.1: x (B, D) in {0, 1}, o = logits (B, D) -> (lp (B,), cache)."""
        xp = get_array_module(o)
        lp = (x * o - softplus(o, xp)).sum(axis=1)
        return lp, (x, o)

    def backward(self, cache, lp_bar):
        """eq. 2.2: o_bar = lp_bar ⊙ (x − σ(o))."""
        x, o = cache
        return lp_bar[:, None] * (x - sigmoid(o))

    def mean(self, o):
        return sigmoid(o)

    def sample(self, o, rng):
        p = to_host(self.mean(o))
        xp = get_array_module(o)
        return xp.asarray((rng.uniform(size=p.shape) < p).astype(p.dtype))


class DiscretizedLogistic(Likelihood):
    """Discretized logistic on (0, 1) with ``bins`` equal bins (PixelCNN++-style, one component).

    Data: x_d = (k_d + ½)/n, k_d ∈ {0..n−1} (n = bins), the centre of bin [k/n, (k+1)/n].
    Decoder output o = [μ | ℓ] (B, 2D), scale s = exp(max(ℓ, ℓ_min)). With
        a = (k/n − μ)/s,  b = ((k+1)/n − μ)/s,  b − a = 1/(n s)
    the bin probability is σ(b) − σ(a), the outer bins extended to ±∞ (P(k=0) = σ(b),
    P(k=n−1) = 1 − σ(a)), and in a stable form                                  (eq. 2.3)
        log P = −[k<n−1] softplus(−b) − [k>0] softplus(a) + [0<k<n−1] log(−expm1(a − b)).
    Gradients, with f'(δ) = −1/expm1(−δ) the derivative of log(−expm1(δ)) at δ = a − b:
        ∂/∂a = −[k>0] σ(a) + [0<k<n−1] f'(δ),  ∂/∂b = [k<n−1] σ(−b) − [0<k<n−1] f'(δ)  (eq. 2.4)
        μ̄ = −(ā + b̄)/s,   ℓ̄ = −(ā a + b̄ b)   (0 where ℓ < ℓ_min: the clamp)              (eq. 2.5)
    bits/dim of 8-bit images: −log p(x) / (D ln 2)                               (eq. 2.6)
    """

    def __init__(self, D: int, bins: int = 256, log_scale_min: float = -7.0):
        self.D, self.bins = int(D), int(bins)
        if self.bins < 2:
            raise ValueError(f"DiscretizedLogistic: bins must be >= 2, got {bins}")
        self.n_out = 2 * self.D
        self.log_scale_min = float(log_scale_min)

    def index(self, x):
        """Bin index k = round(x n − ½) as the array's dtype (B, D)."""
        xp = get_array_module(x)
        return xp.rint(x * self.bins - 0.5)

    def check(self, x, what="x"):
        xp = get_array_module(x)
        k = x * self.bins - 0.5
        bad = int(to_host(xp.count_nonzero((xp.abs(k - xp.rint(k)) > 1e-3) | (k < -0.5)
                                           | (k > self.bins - 0.5))))
        if bad:
            raise ValueError(f"{what}: the discretized logistic with {self.bins} bins needs "
                             f"bin centres (k + 1/2)/{self.bins}, k = 0..{self.bins - 1}; "
                             f"{bad} entries are not (8-bit pixels p map to (p + 1/2)/256)")

    def log_prob(self, x, o):
        """eq. 2.3: x (B, D) bin centres, o (B, 2D) -> (lp (B,), cache)."""
        xp = get_array_module(o)
        D, n = self.D, self.bins
        mu, ell = o[:, :D], o[:, D:]
        ell_c = xp.maximum(ell, self.log_scale_min)
        inv_s = xp.exp(-ell_c)
        k = self.index(x)
        a = (k / n - mu) * inv_s
        b = ((k + 1) / n - mu) * inv_s
        m_hi = (k < n - 1).astype(o.dtype)
        m_lo = (k > 0).astype(o.dtype)
        m_mid = m_hi * m_lo
        delta = -inv_s / n                                       # a − b, formed exactly
        # log(−expm1(δ)) only where it is used (outer bins: δ is still finite, keep it)
        lp = -m_hi * softplus(-b, xp) - m_lo * softplus(a, xp) + m_mid * xp.log(-xp.expm1(delta))
        return lp.sum(axis=1), (a, b, delta, inv_s, m_hi, m_lo, m_mid, ell)

    def backward(self, cache, lp_bar):
        """eq. 2.4-2.5: o_bar (B, 2D) = lp_bar ⊙ [∂lp/∂μ | ∂lp/∂ℓ]."""
        a, b, delta, inv_s, m_hi, m_lo, m_mid, ell = cache
        xp = get_array_module(a)
        fprime = -1.0 / xp.expm1(-delta)
        abar = -m_lo * sigmoid(a, xp) + m_mid * fprime
        bbar = m_hi * sigmoid(-b, xp) - m_mid * fprime
        w = lp_bar[:, None]
        mu_bar = -(abar + bbar) * inv_s * w
        ell_bar = -(abar * a + bbar * b) * w * (ell >= self.log_scale_min)
        return xp.concatenate([mu_bar, ell_bar], axis=1)

    def bin_log_probs(self, o):
        """log P(k) for every bin k (B, D, n): used to decode a label (small n)."""
        xp = get_array_module(o)
        B, n = o.shape[0], self.bins
        centres = (xp.arange(n, dtype=o.dtype) + 0.5) / n
        out = []
        for k in range(n):
            x = xp.full((B, self.D), centres[k], dtype=o.dtype)
            _, c = self.log_prob(x, o)
            a, b, delta, inv_s, m_hi, m_lo, m_mid, _ = c
            lp = -m_hi * softplus(-b, xp) - m_lo * softplus(a, xp) \
                + m_mid * xp.log(-xp.expm1(delta))
            out.append(lp)
        return xp.stack(out, axis=-1)

    def mean(self, o):
        """The logistic's location μ clipped to [0, 1] (B, D)."""
        xp = get_array_module(o)
        return xp.clip(o[:, :self.D], 0.0, 1.0)

    def mode(self, o):
        """The most probable bin's centre (B, D)."""
        xp = get_array_module(o)
        return (xp.argmax(self.bin_log_probs(o), axis=-1).astype(o.dtype) + 0.5) / self.bins

    def sample(self, o, rng):
        """x = μ + s logit(u), u ~ U(0, 1), then the centre of the bin it falls in."""
        xp = get_array_module(o)
        mu = to_host(o[:, :self.D])
        s = to_host(xp.exp(xp.maximum(o[:, self.D:], self.log_scale_min)))
        u = rng.uniform(1e-6, 1 - 1e-6, size=mu.shape)
        import numpy as np
        v = mu + s * (np.log(u) - np.log1p(-u))
        k = np.clip(np.floor(v * self.bins), 0, self.bins - 1)
        return xp.asarray(((k + 0.5) / self.bins).astype(mu.dtype))


class Joint(Likelihood):
    """Independent likelihoods on consecutive column blocks of x and of o:
        log p(x | o) = Σ_j log p_j(x_j | o_j)                                    (eq. 2.7)
    e.g. an image (Bernoulli, D columns) and its label (DiscretizedLogistic with n_classes
    bins, one column)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.D = sum(p.D for p in self.parts)
        self.n_out = sum(p.n_out for p in self.parts)
        self._xs, self._os = [], []
        i = j = 0
        for p in self.parts:
            self._xs.append(slice(i, i + p.D))
            self._os.append(slice(j, j + p.n_out))
            i += p.D
            j += p.n_out

    def check(self, x, what="x"):
        for p, sl in zip(self.parts, self._xs):
            p.check(x[:, sl], what)

    def log_prob(self, x, o):
        lps, caches = [], []
        for p, xs, os in zip(self.parts, self._xs, self._os):
            lp, c = p.log_prob(x[:, xs], o[:, os])
            lps.append(lp)
            caches.append(c)
        total = lps[0]
        for lp in lps[1:]:
            total = total + lp
        return total, (caches, lps)

    def backward(self, cache, lp_bar):
        caches, _ = cache
        xp = get_array_module(lp_bar)
        return xp.concatenate([p.backward(c, lp_bar) for p, c in zip(self.parts, caches)],
                              axis=1)

    def part_log_probs(self, cache):
        """The per-part log-likelihoods [(B,), ...] of the last log_prob call's cache."""
        return cache[1]

    def split(self, x):
        return [x[:, sl] for sl in self._xs]

    def split_out(self, o):
        return [o[:, sl] for sl in self._os]

    def mean(self, o):
        xp = get_array_module(o)
        return xp.concatenate([p.mean(o[:, os]) for p, os in zip(self.parts, self._os)], axis=1)

    def sample(self, o, rng):
        xp = get_array_module(o)
        return xp.concatenate([p.sample(o[:, os], rng) for p, os in zip(self.parts, self._os)],
                              axis=1)
