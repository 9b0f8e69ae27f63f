"""Convolutional layers with tangents and adjoints (docs/images.md, section 1).

The layer contract of npflow.layers (npflow.layers.Layer, docs/layers.md section 1): a
stateless description plus

    forward          :: (params, x, xdot, t)   -> (y, ydot, cache)
    backward         :: (ybar, ydotbar, cache) -> (xbar, xdotbar, params_bar, tbar)
    forward_stacked  :: (params, h, t)         -> (h_out, cache)
    backward_stacked :: (hbar, cache, need_xdotbar=True) -> (hbar_in, params_bar, tbar)

with x (B, C, H, W), xdot (K, B, C, H, W) or None, h = [x; xdot] (K+1, B, C, H, W), t a scalar,
and the parameters named as the dense layers name them (weight, bias, gate.weight, gate.bias,
hyper_bias.weight).

A convolution is linear in x, so the tangents go through the same map without the bias
(eq. 1.3). The primal and the K tangents are therefore stacked into one batch of R = (K+1)·B
images (NCHW), padded once, and unfolded (im2col, eq. 1.2: a Python loop over the k² kernel
offsets, never over pixels) block by block of images, each block's columns multiplied by the
weight matrix while they are still in the CPU caches (eq. 1.2a; one block on a GPU). The
backward unfolds the same blocks again for the weight gradient (eq. 1.6), and gets the input
gradient as a correlation of the zero-padded cotangent with the flipped kernel (eq. 1.5a, stride
1), or by the transposed product and a k²-offset fold (col2im, eq. 1.5) for other strides.

ConcatConv2d appends t as a constant input channel (FFJORD's ConcatConv2d: channel 0 is t, zero
in the padding); its tangent channel is zero, and tbar is the sum of the gradient that reaches
that channel (eq. 1.7). ConcatSquashConv2d gates the output with sigmoid(W_g t + b_g) and adds
W_b t (eq. 1.8-1.10).

Only functions that exist in CuPy are used; the array module comes from the inputs.
"""
from __future__ import annotations

import math

from .backend import get_array_module
from .layers import Layer, Softplus, require_scalar_time, squash_gates, squash_gates_backward

__all__ = ["Conv2d", "ConcatConv2d", "ConcatSquashConv2d", "Softplus", "ConvNet", "LAYER_TYPES",
           "conv_output_size"]


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one axis (eq. 1.1): floor((n + 2p − k)/s) + 1."""
    return (n + 2 * padding - kernel) // stride + 1


#: Bytes of unfolded columns per block of images on the host (eq. 1.2a): small enough that a
#: block's columns stay in the CPU caches between the copies that make them and the matrix
#: product that reads them. On a GPU the whole batch is one block.
CHUNK_BYTES = 2 << 20


def _block_rows(R, row_bytes, like):
    """Images per block (eq. 1.2a): all R on a device, else as many as fit CHUNK_BYTES."""
    import numpy
    if not isinstance(like, numpy.ndarray):
        return R
    return max(1, min(R, CHUNK_BYTES // max(1, row_bytes)))


def _unfold(P, k, s, Ho, Wo, out):
    """Unfold padded images P (n, C, Hp, Wp) into out (n, k·k·C, Ho, Wo) (eq. 1.2):
    out[r, (i, j, c), h, w] = P[r, c, s·h + i, s·w + j].

    One strided-slice copy per kernel offset (i, j), k² in all; never a loop over pixels.
    """
    C = P.shape[1]
    he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
    for i in range(k):
        for j in range(k):
            q = (i * k + j) * C
            out[:, q:q + C] = P[:, :, i:i + he:s, j:j + we:s]
    return out


def _fold_add(dcols, dP, k, s, Ho, Wo):
    """Adjoint of _unfold (eq. 1.5): dP (n, C, Hp, Wp) += fold(dcols (n, k·k·C, Ho, Wo))."""
    C = dP.shape[1]
    he, we = s * (Ho - 1) + 1, s * (Wo - 1) + 1
    for i in range(k):
        for j in range(k):
            q = (i * k + j) * C
            dP[:, :, i:i + he:s, j:j + we:s] += dcols[:, q:q + C]
    return dP


def _weight_matrix(W):
    """W (C_out, C, k, k) -> (C_out, k·k·C), columns ordered (i, j, c) as in _unfold."""
    return W.transpose(0, 2, 3, 1).reshape(W.shape[0], -1)


def _flipped_weight_matrix(W):
    """The weight matrix of the adjoint correlation (eq. 1.5a): W̃[c, o, i, j] =
    W[o, c, k−1−i, k−1−j] as (C, k·k·C_out), columns ordered (i, j, o)."""
    return W[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(W.shape[1], -1)


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as PyTorch) y = W ⋆ x + b (eq. 1.1-1.4).

    x (B, C_in, H, W) -> y (B, C_out, Ho, Wo), Ho = floor((H + 2p − k)/s) + 1.
    params: weight (C_out, C_in, k, k), bias (C_out,).
    FFJORD's stride options: stride 1 with kernel 3 padding 1 (default), stride 2 with kernel 4
    padding 1 (halves H and W).
    """

    time_channels = 0  # number of leading input channels filled with t (ConcatConv2d: 1)

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = True):
        self.c_in, self.c_out = int(c_in), int(c_out)
        self.kernel, self.stride, self.padding = int(kernel), int(stride), int(padding)
        self.bias = bool(bias)
        if min(self.c_in, self.c_out, self.kernel, self.stride) < 1 or self.padding < 0:
            raise ValueError(
                f"{type(self).__name__}: need c_in, c_out, kernel, stride >= 1 and padding >= 0, "
                f"got c_in={c_in}, c_out={c_out}, kernel={kernel}, stride={stride}, "
                f"padding={padding}")

    # -- description ---------------------------------------------------------------------------
    def param_names(self):
        return ("weight", "bias") if self.bias else ("weight",)

    def out_shape(self, in_shape):
        """(B, C_in, H, W) -> (B, C_out, Ho, Wo) (eq. 1.1), the layer contract's form."""
        return (in_shape[0],) + self.output_shape(tuple(in_shape[1:]))

    def output_shape(self, in_shape):
        """(C_in, H, W) -> (C_out, Ho, Wo) (eq. 1.1)."""
        C, H, W = in_shape
        if C != self.c_in:
            raise ValueError(f"{type(self).__name__}: expected {self.c_in} input channels, "
                             f"got shape {tuple(in_shape)}")
        Ho = conv_output_size(H, self.kernel, self.stride, self.padding)
        Wo = conv_output_size(W, self.kernel, self.stride, self.padding)
        if Ho < 1 or Wo < 1:
            raise ValueError(f"{type(self).__name__}: input {H}x{W} too small for kernel "
                             f"{self.kernel}, stride {self.stride}, padding {self.padding}")
        return self.c_out, Ho, Wo

    def init_params(self, rng, dtype, xp):
        # PyTorch's default for Conv2d: U(−1/√fan_in, 1/√fan_in), fan_in = (C_in + time)·k².
        cin = self.c_in + self.time_channels
        bound = 1.0 / math.sqrt(cin * self.kernel ** 2)
        p = {"weight": xp.asarray(
            rng.uniform(-bound, bound, (self.c_out, cin, self.kernel, self.kernel)), dtype=dtype)}
        if self.bias:
            p["bias"] = xp.asarray(rng.uniform(-bound, bound, (self.c_out,)), dtype=dtype)
        return p

    def _check(self, x, xdot):
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(f"{type(self).__name__}: x must be (B, {self.c_in}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if xdot is not None and (xdot.ndim != 5 or xdot.shape[1:] != x.shape):
            raise ValueError(f"{type(self).__name__}: xdot must be (K, *x.shape) = "
                             f"(K, {', '.join(map(str, x.shape))}), got {tuple(xdot.shape)}")

    # -- forward ---------------------------------------------------------------------------------
    def _linear_forward(self, W, x, xdot, t):
        """Stacked W ⋆ [x; xdot] without bias: returns (Y (R, C_out, Ho, Wo), cache).
        t: a scalar only (one time per call; per-row times are for the dense layers)."""
        self._check(x, xdot)
        require_scalar_time(t, type(self).__name__)
        xp = get_array_module(x, W)
        B, C, H, Wd = x.shape
        K = 0 if xdot is None else xdot.shape[0]
        p, k, s, nt = self.padding, self.kernel, self.stride, self.time_channels
        _, Ho, Wo = self.output_shape((C, H, Wd))
        R, Cp, O = (K + 1) * B, C + nt, self.c_out
        # one padded buffer (R, C + nt, Hp, Wp) for the primal and all tangents (eq. 1.2); the
        # time channel is t on the interior of the primal rows, 0 in the padding and in the
        # tangent rows (eq. 1.7)
        P = xp.zeros((R, Cp, H + 2 * p, Wd + 2 * p), dtype=x.dtype)
        P[:B, nt:, p:p + H, p:p + Wd] = x
        if K:
            P[B:, nt:, p:p + H, p:p + Wd] = xdot.reshape(K * B, C, H, Wd)
        if nt:
            P[:B, :nt, p:p + H, p:p + Wd] = t
        Wm = _weight_matrix(W)
        KC = k * k * Cp
        Y = xp.empty((R, O, Ho, Wo), dtype=x.dtype)
        n = _block_rows(R, KC * Ho * Wo * x.dtype.itemsize, x)
        buf = xp.empty((n, KC, Ho, Wo), dtype=x.dtype)
        for r0 in range(0, R, n):                                               # eq. 1.2a
            r1 = min(R, r0 + n)
            cols = _unfold(P[r0:r1], k, s, Ho, Wo, buf[:r1 - r0])
            xp.matmul(Wm, cols.reshape(r1 - r0, KC, Ho * Wo),                   # eq. 1.3
                      out=Y[r0:r1].reshape(r1 - r0, O, Ho * Wo))
        return Y, (W, P, B, K, (C, H, Wd, Ho, Wo))

    def forward(self, params, x, xdot, t):
        """eq. 1.3: y = W ⋆ x + b;  eq. 1.4: ydot_k = W ⋆ xdot_k.  Shapes in the class doc."""
        H, cache = self._forward(params, x, xdot, t)
        return H[0], (H[1:] if H.shape[0] > 1 else None), cache

    def forward_stacked(self, params, h, t):
        """eq. 1.3-1.4 on the stack: h (K+1, B, C_in, H, W) = [x; xdot] ->
        H (K+1, B, C_out, Ho, Wo), H[0] = y, H[1:] = ydot (one array, as the activations'
        stacked rules take it: no copy between layers; h is copied once, into the padded
        buffer of eq. 1.2)."""
        return self._forward(params, h[0], h[1:] if h.shape[0] > 1 else None, t)

    def _forward(self, params, x, xdot, t):
        Y, cache = self._linear_forward(params["weight"], x, xdot, t)
        B, K = cache[2], cache[3]
        if self.bias:
            Y[:B] += params["bias"][:, None, None]        # Y is this call's own array
        return Y.reshape((K + 1, B) + Y.shape[1:]), cache

    # -- backward --------------------------------------------------------------------------------
    def _linear_backward(self, ybar, ydotbar, cache, need_xdotbar=True):
        """Adjoint of the stacked linear map (eq. 1.5-1.7), block by block (eq. 1.2a).

        Returns (xbar, xdotbar, Wbar, tbar, stacked); rows whose cotangent is None are skipped.
        stacked: when both cotangents are formed, the one array (K+1, B, C, H, W) that xbar
        (= stacked[0]) and xdotbar (= stacked[1:]) are views of; else None.
        need_xdotbar=False: the tangent rows still give their part of Wbar, but their input
        cotangent is not formed (xdotbar None).
        """
        W, P, B, K, (C, H, Wd, Ho, Wo) = cache
        xp = get_array_module(P)
        p, k, s, nt = self.padding, self.kernel, self.stride, self.time_channels
        use_t = ydotbar is not None and K > 0
        dtype = P.dtype
        if ybar is None and not use_t:
            zero = xp.zeros((), dtype=dtype)
            return None, None, xp.zeros_like(W), zero
        O, Cp = self.c_out, C + nt
        KC, KO = k * k * Cp, k * k * O
        # stride 1 with k − 1 − p >= 0: the input gradient is a correlation of the zero-padded
        # cotangent with the flipped kernel (eq. 1.5a), a product like the forward's; otherwise
        # the transposed product and the fold of eq. 1.5
        q = k - 1 - p
        flip = s == 1 and q >= 0
        Wf = (_flipped_weight_matrix(W) if flip
              else xp.ascontiguousarray(_weight_matrix(W).T))
        if flip:
            # eq. 1.6b: W̄ from the cotangent's unfolding (made for eq. 1.5a anyway) and the
            # interior of P, as (k·k·C_out, C): no second unfolding of P
            Wbar_f = xp.zeros((KO, Cp), dtype=dtype)
            row_bytes = (KO * H * Wd + Cp * H * Wd) * dtype.itemsize
        else:
            Wbar_t = xp.zeros((KC, O), dtype=dtype)   # W̄ as (k·k·C, C_out): colsᵀ-side GEMMs
            row_bytes = KC * Ho * Wo * dtype.itemsize
        n = _block_rows((K + 1) * B, row_bytes, P)
        if flip:
            Gpad = xp.zeros((n, O, Ho + 2 * q, Wo + 2 * q), dtype=dtype)
            gcols_buf = xp.empty((n, KO, H, Wd), dtype=dtype)
            X_buf = xp.empty((n, Cp, H, Wd), dtype=dtype)
        else:
            cols_buf = xp.empty((n, KC, Ho, Wo), dtype=dtype)
            dP = xp.empty((n, Cp, H + 2 * p, Wd + 2 * p), dtype=dtype)
        outs = []
        parts = []
        if ybar is not None:
            parts.append((0, ybar))
        if use_t:
            parts.append((B, ydotbar.reshape(K * B, O, Ho, Wo)))
        # both input cotangents in one array (K+1)·B rows, so that xbar and xdotbar are views
        # of it and the activation below can take them stacked without a copy
        both = ybar is not None and use_t and need_xdotbar
        dX_all = xp.empty(((K + 1) * B, Cp, H, Wd), dtype=dtype) if both else None
        for off, Gs in parts:
            R = Gs.shape[0]
            want_dx = off == 0 or need_xdotbar
            if both:
                dX = dX_all[off:off + R]
            else:
                dX = xp.empty((R, Cp, H, Wd), dtype=dtype) if want_dx else None
            for r0 in range(0, R, n):
                r1 = min(R, r0 + n)
                m = r1 - r0
                if flip:
                    Gpad[:m, :, q:q + Ho, q:q + Wo] = Gs[r0:r1]
                    gcols = _unfold(Gpad[:m], k, 1, H, Wd, gcols_buf[:m]).reshape(m, KO,
                                                                                   H * Wd)
                    X = X_buf[:m]
                    X[...] = P[off + r0:off + r1, :, p:p + H, p:p + Wd]
                    # eq. 1.6b: W̄_f = Σ_r gcols_r X_rᵀ (primal and tangent rows alike)
                    Wbar_f += xp.matmul(gcols, X.reshape(m, Cp, H * Wd).transpose(0, 2, 1)).sum(
                        axis=0)
                    if want_dx:                                                 # eq. 1.5a
                        xp.matmul(Wf, gcols, out=dX[r0:r1].reshape(m, Cp, H * Wd))
                    continue
                G3 = Gs[r0:r1].reshape(m, O, Ho * Wo)
                cols = _unfold(P[off + r0:off + r1], k, s, Ho, Wo, cols_buf[:m])
                # eq. 1.6: Wbarᵀ = Σ_r cols_r G_rᵀ (primal and tangent rows alike; this
                # orientation of the product ran 1.5× faster than G_r cols_rᵀ here)
                Wbar_t += xp.matmul(cols.reshape(m, KC, Ho * Wo), G3.transpose(0, 2, 1)).sum(
                    axis=0)
                if want_dx:                                                     # eq. 1.5
                    dcols = xp.matmul(Wf, G3).reshape(m, KC, Ho, Wo)
                    dPm = dP[:m]
                    dPm[...] = 0
                    _fold_add(dcols, dPm, k, s, Ho, Wo)
                    dX[r0:r1] = dPm[:, :, p:p + H, p:p + Wd]
            outs.append(dX)
        if flip:
            # rows (i', j', o) with i' = k−1−i, j' = k−1−j (eq. 1.6b) -> W̄ (O, C, k, k)
            Wbar = xp.ascontiguousarray(
                Wbar_f.reshape(k, k, O, Cp)[::-1, ::-1].transpose(2, 3, 0, 1))
        else:
            Wbar = xp.ascontiguousarray(Wbar_t.T.reshape(O, k, k, Cp).transpose(0, 3, 1, 2))
        xbar = xdotbar = None
        tbar = xp.zeros((), dtype=dtype)
        if ybar is not None:
            dX = outs.pop(0)
            xbar = dX[:, nt:]
            if nt:
                tbar = dX[:, :nt].sum()                                         # eq. 1.7
        if use_t and need_xdotbar:
            xdotbar = outs.pop(0)[:, nt:].reshape(K, B, C, H, Wd)
        stacked = dX_all[:, nt:].reshape((K + 1, B, C, H, Wd)) if both else None
        return xbar, xdotbar, Wbar, tbar, stacked

    def backward(self, ybar, ydotbar, cache, need_xdotbar=True):
        """eq. 1.5: xbar = Wᵀ ⋆ ybar, xdotbar_k = Wᵀ ⋆ ydotbar_k;
        eq. 1.6: Wbar = ybar ⋆ x + Σ_k ydotbar_k ⋆ xdot_k, bbar = Σ_{b,h,w} ybar;
        eq. 1.7: tbar = Σ (gradient reaching the time channel) (ConcatConv2d only)."""
        return self.backward_parts(ybar, ydotbar, cache, need_xdotbar)[:4]

    def backward_stacked(self, hbar, cache, need_xdotbar=True):
        """backward on the stack: hbar (K+1, B, C_out, Ho, Wo) = [ybar; ydotbar] ->
        (hbar_in (K+1, B, C_in, H, W) = [xbar; xdotbar], params_bar, tbar); need_xdotbar=False:
        hbar_in is (1, B, C_in, H, W), the primal block only."""
        K = hbar.shape[0] - 1
        xbar, xdotbar, grads, tbar, stacked = self.backward_parts(
            hbar[0], hbar[1:] if K else None, cache, need_xdotbar)
        return _stack(xbar, xdotbar, stacked, need_xdotbar), grads, tbar

    def backward_parts(self, ybar, ydotbar, cache, need_xdotbar=True):
        """backward, plus the input cotangents stacked (K+1, B, C, H, W) as one array when both
        were formed (xbar and xdotbar are its views; else None), for ConvNet's activation."""
        xbar, xdotbar, Wbar, tbar, stacked = self._linear_backward(ybar, ydotbar, cache,
                                                                   need_xdotbar)
        grads = {"weight": Wbar}
        if self.bias:
            xp = get_array_module(Wbar)
            grads["bias"] = (ybar.sum(axis=(0, 2, 3)) if ybar is not None
                             else xp.zeros((self.c_out,), dtype=Wbar.dtype))
        return xbar, xdotbar, grads, tbar, stacked


class ConcatConv2d(Conv2d):
    """Conv2d over [t; x]: t enters as a constant input channel 0 (FFJORD's ConcatConv2d).

    x (B, C_in, H, W) -> y (B, C_out, Ho, Wo); params: weight (C_out, C_in + 1, k, k), bias.
    Equations 1.3-1.7 with the time channel; tbar by eq. 1.7.
    """

    time_channels = 1


class ConcatSquashConv2d(Conv2d):
    """y = (W ⋆ x + b) ⊙ g(t) + w_b t, g(t) = sigmoid(w_g t + b_g), per output channel
    (FFJORD's ConcatSquashConv2d; eq. 1.8).

    params (named as ConcatSquashLinear's): weight (C_out, C_in, k, k), bias (C_out,),
    gate.weight w_g (C_out,), gate.bias b_g (C_out,), hyper_bias.weight w_b (C_out,).
    Forward eq. 1.8: with u = W ⋆ x and u̇_k = W ⋆ xdot_k, y = u ⊙ g + c, ydot_k = u̇_k ⊙ g, where
    g and c = b ⊙ g + t w_b come from npflow.layers.squash_gates (the dense layer's routine).
    Backward eq. 1.9-1.10, the gate terms by npflow.layers.squash_gates_backward.
    """

    def param_names(self):
        return super().param_names() + ("gate.weight", "gate.bias", "hyper_bias.weight")

    def init_params(self, rng, dtype, xp):
        p = super().init_params(rng, dtype, xp)
        # torch.nn.Linear(1, C_out) default: U(−1, 1) for weight and bias; hyper_bias no bias.
        p["gate.weight"] = xp.asarray(rng.uniform(-1, 1, (self.c_out,)), dtype=dtype)
        p["gate.bias"] = xp.asarray(rng.uniform(-1, 1, (self.c_out,)), dtype=dtype)
        p["hyper_bias.weight"] = xp.asarray(rng.uniform(-1, 1, (self.c_out,)), dtype=dtype)
        return p

    def _forward(self, params, x, xdot, t):
        """eq. 1.8 with the output stacked: H (K+1, B, C_out, Ho, Wo), H[0] = y, H[1:] = ydot."""
        Y, lin_cache = self._linear_forward(params["weight"], x, xdot, t)
        xp = get_array_module(Y)
        B, K = lin_cache[2], lin_cache[3]
        g, c, t = squash_gates(t, params["gate.weight"], params["gate.bias"],
                               params["hyper_bias.weight"], params.get("bias"))
        u = Y[:B]                                   # u = W ⋆ x (unbiased), for ḡ (eq. 1.10)
        udot = Y[B:].reshape((K,) + u.shape) if K else None
        H = xp.empty((K + 1,) + u.shape, dtype=u.dtype)
        xp.multiply(u, g[:, None, None], out=H[0])
        H[0] += c[:, None, None]
        if K:
            xp.multiply(udot, g[:, None, None], out=H[1:])
        return H, (lin_cache, u, udot, g, t, params)

    def backward_parts(self, ybar, ydotbar, cache, need_xdotbar=True):
        """eq. 1.9: ubar = ybar ⊙ g, u̇bar_k = ydotbar_k ⊙ g through the convolution's adjoint;
        eq. 1.10 per channel: s = Σ ybar, ḡ = Σ ybar ⊙ u + Σ_k ydotbar_k ⊙ u̇_k (+ b ⊙ s inside
        squash_gates_backward, which gives ā, b̄, w̄_g, b̄_g, w̄_b and tbar; the convolution adds
        no t term here: no time channel)."""
        lin_cache, u, udot, g, t, params = cache
        xp = get_array_module(u)
        gb = g[:, None, None]
        ubar = None if ybar is None else ybar * gb
        udotbar = None if (ydotbar is None or udot is None) else ydotbar * gb
        xbar, xdotbar, Wbar, _, stacked = self._linear_backward(ubar, udotbar, lin_cache,
                                                                need_xdotbar)
        gbar = xp.zeros_like(g)
        s = xp.zeros_like(g)
        if ybar is not None:
            s = ybar.sum(axis=(0, 2, 3))
            gbar = gbar + (ybar * u).sum(axis=(0, 2, 3))
        if udotbar is not None:
            gbar = gbar + (ydotbar * udot).sum(axis=(0, 1, 3, 4))
        gate_grads, tbar = squash_gates_backward(t, g, s, gbar, params["gate.weight"],
                                                 params["hyper_bias.weight"], params.get("bias"))
        return xbar, xdotbar, {"weight": Wbar, **gate_grads}, tbar, stacked


def _stack(xbar, xdotbar, stacked, need_xdotbar=True):
    """[xbar; xdotbar] as one (K+1, B, ...) array: ``stacked`` when the backward formed it,
    else stacked here (xbar[None] without tangent cotangents); xbar None means zeros."""
    if stacked is not None:
        return stacked
    if xbar is None:
        xbar = get_array_module(xdotbar).zeros_like(xdotbar[0])
    if xdotbar is None or not need_xdotbar:
        return xbar[None]
    return get_array_module(xbar).concatenate((xbar[None], xdotbar), axis=0)


#: The conv layers by name, for ConvNet(layer_type=...) (the layer contract's registry).
LAYER_TYPES = {"concat": ConcatConv2d, "concatsquash": ConcatSquashConv2d, "ignore": Conv2d}


class ConvNet(Layer):
    """FFJORD's image ODEnet: conv layers of widths hidden_dims with softplus in between
    (eq. 1.12), mapping x (B, C, H, W) -> f (B, C, H, W).

    in_shape (C, H, W); hidden_dims e.g. (64, 64, 64); layer_type "concat" (ConcatConv2d,
    FFJORD's default for images), "concatsquash" or "ignore" (no t); strides: one per layer
    (len(hidden_dims) + 1 entries, each 1 or 2; FFJORD's stride 2 uses kernel 4, padding 1 and
    would change the shape, so the output shape is checked to equal the input shape);
    zero_last: the last layer's weight and bias start at zero (RNODE), so f ≡ 0 at the start.
    params: "{i}.weight", "{i}.bias" (and the squash entries) for conv layer i.
    """

    def __init__(self, in_shape, hidden_dims=(64, 64, 64), layer_type: str = "concat",
                 strides=None, zero_last: bool = False):
        self.in_shape = tuple(int(v) for v in in_shape)
        if len(self.in_shape) != 3:
            raise ValueError(f"ConvNet: in_shape must be (C, H, W), got {in_shape!r}")
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"ConvNet: unknown layer_type {layer_type!r}; "
                             f"expected one of {sorted(LAYER_TYPES)}")
        self.layer_type = layer_type
        n = len(self.hidden_dims) + 1
        self.strides = (1,) * n if strides is None else tuple(int(s) for s in strides)
        if len(self.strides) != n or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"ConvNet: strides must be {n} entries of 1 or 2, got {strides!r}")
        self.zero_last = bool(zero_last)
        cls = LAYER_TYPES[layer_type]
        dims = (self.in_shape[0],) + self.hidden_dims + (self.in_shape[0],)
        self.convs = []
        shape = self.in_shape
        for i, s in enumerate(self.strides):
            k, pad = (3, 1) if s == 1 else (4, 1)
            conv = cls(dims[i], dims[i + 1], kernel=k, stride=s, padding=pad)
            shape = conv.output_shape(shape)
            self.convs.append(conv)
        if shape != self.in_shape:
            raise ValueError(f"ConvNet: strides {self.strides} map {self.in_shape} to {shape}; "
                             "the dynamics must keep the input shape")
        self.act = Softplus()

    @property
    def config(self):
        return {"in_shape": list(self.in_shape), "hidden_dims": list(self.hidden_dims),
                "layer_type": self.layer_type, "strides": list(self.strides),
                "zero_last": self.zero_last}

    def init_params(self, rng, dtype, xp):
        params = {}
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            for name, v in conv.init_params(rng, dtype, xp).items():
                if i == last and self.zero_last and name in ("weight", "bias"):
                    v = xp.zeros_like(v)
                params[f"{i}.{name}"] = v
        return params

    def validate(self, x, xdot=None):
        """Raise ValueError unless x is (B, *in_shape) and xdot is None or (K, *x.shape)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"ConvNet: x must have shape (B, {', '.join(map(str, self.in_shape))})"
                             f", got {tuple(x.shape)}")
        if xdot is not None and (xdot.ndim != 5 or xdot.shape[1:] != x.shape):
            raise ValueError(f"ConvNet: xdot must have shape (K, *x.shape), got "
                             f"{tuple(xdot.shape)} for x {tuple(x.shape)}")

    def _sub(self, params, i):
        prefix = f"{i}."
        return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

    def forward(self, params, x, xdot, t):
        """eq. 1.12: h_0 = x, h_{i+1} = softplus(conv_i(h_i, t)), f = conv_L(h_L, t).
        Each conv layer hands its output to the activation stacked (K+1, B, ...), as one array."""
        self.validate(x, xdot)
        caches = []
        # the first layer reads x and xdot into its padded buffer directly (no stacking copy)
        H, c = self.convs[0]._forward(self._sub(params, 0), x, xdot, t)
        caches.append(c)
        for i, conv in enumerate(self.convs[1:], start=1):
            H, c = self.act.forward_stacked({}, H, t)
            caches.append(c)
            H, c = conv.forward_stacked(self._sub(params, i), H, t)
            caches.append(c)
        return H[0], (H[1:] if H.shape[0] > 1 else None), tuple(caches)

    def backward(self, ybar, ydotbar, cache, need_xdotbar=True):
        """Reverse of eq. 1.12 layer by layer; tbar summed over layers.

        need_xdotbar=False: the tangents' cotangent is returned as None (the CNF's probes are
        constants), and the first layer does not form it."""
        grads = {}
        tbar = 0.0
        hbar, hdotbar = ybar, ydotbar
        ci = len(cache) - 1
        for i in range(len(self.convs) - 1, -1, -1):
            hbar, hdotbar, g, tb, Hbar = self.convs[i].backward_parts(
                hbar, hdotbar, cache[ci], need_xdotbar or i > 0)
            ci -= 1
            tbar = tbar + tb
            for name, v in g.items():
                grads[f"{i}.{name}"] = v
            if i > 0:
                Hbar = _stack(hbar, hdotbar, Hbar)
                # Hbar is this layer's fresh input cotangent: the activation may overwrite it
                Hin, _, _ = self.act.backward_stacked(Hbar, cache[ci], out=Hbar)
                hbar, hdotbar = Hin[0], (Hin[1:] if Hin.shape[0] > 1 else None)
                ci -= 1
        return hbar, (hdotbar if need_xdotbar else None), grads, tbar
