"""Triton device helpers shared by the TTT-MLP kernels: layer norm, gelu and their derivatives,
the addressing of per-(sample, head) slices and hidden tiles, and the first steps of a mini-batch
(its tokens; the target, pass A and the layer-2 inner gradient) that the forward and the
backward's recomputation share.

Every helper works on feature-major tiles ``[D, BK]`` (rows = the head dim ``D``, an exact power
of two so no masking is needed; columns = tokens of one inner mini-batch, padded to ``BK``) and
computes in the dtype of its inputs (float32 on GPU, float64 under the interpreter in tests).
Feature-major is deliberate: with only 16 tokens per mini-batch, making tokens the N dimension of
every matrix product lets the weight tiles be the M dimension (>= 64), which Hopper's wgmma
needs, and keeps the loop-invariant token operands in shared memory instead of replicating them in
every warp's registers (the "swap AB" trick for small-M GEMMs).

Conventions (same as ``moshi_ttt.ttt.ops``): ``LN(x) = w * (x - mu) / sqrt(var + eps) + b`` with
the biased variance; ``gelu`` is the tanh approximation with the exact constant sqrt(2/pi).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LN_EPS = 1e-6
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # exact: the rounded 0.79788456 drifts fp64 checks
GELU_C = 0.044715


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _tanh(x):
    # tl has no portable tanh (libdevice only exists on GPU); exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _gelu_t(x):
    """(tanh(u), u') of gelu's ``u = sqrt(2/pi) (x + 0.044715 x^3)``: what gelu and its derivatives share."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return _tanh(u), 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def _gelu(x):
    """tanh-approximated gelu."""
    t, _ = _gelu_t(x)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _gelu_d1(x):
    """(gelu(x), gelu'(x))."""
    t, du = _gelu_t(x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


@triton.jit
def _gelu_d2(x):
    """(gelu(x), gelu'(x), gelu''(x)); gelu'' = (1 - t^2) (u' - x t u'^2 + x u''/2)."""
    t, du = _gelu_t(x)
    s = 1.0 - t * t
    g2 = s * (du - x * t * du * du + 3.0 * 0.7978845608028654 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * s * du, g2


@triton.jit
def _add_dot(ptr, a, b, PREC: tl.constexpr):
    """``*ptr += a @ b``: the MMA accumulates onto the loaded tile (one tile live; each element is
    read and written by its own program, so no race)."""
    acc = tl.load(ptr)
    tl.store(ptr, tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype))


@triton.jit
def _add_rowsum(ptr, x):
    """``*ptr += x.sum(axis=1)`` (a bias gradient over the tokens of a tile)."""
    tl.store(ptr, tl.load(ptr) + tl.sum(x, axis=1))


@triton.jit
def _store_end(w, s, value, closes, opens):
    """A mini-batch's end value: to the weights ``w`` when it closes, to the sums ``s`` when the call
    ends inside it (``opens``)."""
    tl.store(w, value, mask=closes)
    tl.store(s, value, mask=opens)


@triton.jit
def _ln_norm(x, D: tl.constexpr, EPS: tl.constexpr):
    """Normalise the columns of a feature-major tile x [D, BK]: returns (xhat [D, BK], rstd [BK])."""
    mu = tl.sum(x, axis=0) / D
    xc = x - mu[None, :]
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + EPS)
    return xc * rstd[None, :], rstd


@triton.jit
def _ln_norm_bwd(dxh, xh, rstd, D: tl.constexpr):
    """Backward of ``xhat = normalise(x)`` per column: given d loss / d xhat [D, BK], return
    d loss / d x."""
    m1 = tl.sum(dxh, axis=0) / D
    m2 = tl.sum(dxh * xh, axis=0) / D
    return rstd[None, :] * (dxh - m1[None, :] - xh * m2[None, :])


@triton.jit
def _ln_l2_grad(z, tgt, w, b, D: tl.constexpr, EPS: tl.constexpr):
    """Gradient of ``0.5 || LN(z) - tgt ||^2`` w.r.t. z, per column of [D, BK]; w, b [D].

    Returns (gz, xhat, rstd, gg) where ``gg = (w xhat + b - tgt) w`` is d loss / d xhat; the
    extra outputs are what the vector-Jacobian product ``_ln_l2_grad_vjp`` needs.
    """
    xh, rstd = _ln_norm(z, D, EPS)
    gg = (w[:, None] * xh + b[:, None] - tgt) * w[:, None]
    m1 = tl.sum(gg, axis=0) / D
    c = tl.sum(gg * xh, axis=0) / D
    gz = rstd[None, :] * (gg - m1[None, :] - xh * c[None, :])
    return gz, xh, rstd, gg


@triton.jit
def _ln_l2_grad_vjp(v, gz, xh, rstd, gg, tgt, w, b, D: tl.constexpr):
    """Vector-Jacobian product of ``gz = _ln_l2_grad(z, tgt, w, b)`` with cotangent v [D, BK].

    ``gz = rstd * P gg`` with ``P = I - 11^T/D - xhat xhat^T/D`` (symmetric). Returns
    (dz, dtgt, dw_cols, db_cols); dw_cols/db_cols are per-column terms, summed by the caller.
    """
    wc = w[:, None]
    # d/d gg (through the projection P, symmetric)
    mv = tl.sum(v, axis=0) / D
    mvx = tl.sum(v * xh, axis=0) / D
    dg = rstd[None, :] * (v - mv[None, :] - xh * mvx[None, :])
    # d/d xhat: through gg, and directly through the projection (c = mean(gg xhat))
    c = tl.sum(gg * xh, axis=0) / D
    dxh = wc * wc * dg - rstd[None, :] * (gg * mvx[None, :] + c[None, :] * v)
    # direct dependence on std (the 1/std prefactor): d std / d z = xhat / D
    dstd = -rstd * tl.sum(v * gz, axis=0)
    dz = _ln_norm_bwd(dxh, xh, rstd, D) + dstd[None, :] * xh / D
    dtgt = -wc * dg
    dw_cols = dg * (2.0 * wc * xh + b[:, None] - tgt)
    db_cols = dg * wc
    return dz, dtgt, dw_cols, db_cols


# ----------------------------------------------------------------------------- program layout
# Every kernel runs one program per (sample, head) and addresses per-head slices of [B, H, ...]
# buffers; the helpers below are that addressing, written once.
@triton.jit
def _program(H):
    """(sample b, head h, the program id as int64) of a grid of ``B * H`` programs."""
    pid = tl.program_id(0)
    return pid // H, pid % H, pid.to(tl.int64)


@triton.jit
def _bh_offset(b, h, s_b, s_h):
    """Offset of (sample b, head h) in a tensor of strides (s_b, s_h, ...), in int64."""
    return b.to(tl.int64) * s_b + h.to(tl.int64) * s_h


@triton.jit
def _slot(W1, b1, W2, b2, i, D: tl.constexpr, F: tl.constexpr):
    """Pointers to slot ``i`` (int64) of weight-shaped buffers W1 [., D, F], b1 [., F], W2 [., F, D],
    b2 [., D]: a (sample, head)'s state, or one of its checkpoints."""
    return W1 + i * (D * F), b1 + i * F, W2 + i * (D * F), b2 + i * D


@triton.jit
def _head_ln(lnw_ptr, lnb_ptr, h, D: tl.constexpr, CT: tl.constexpr):
    """Head h's inner layer-norm weight and bias [D] (rows of [H, D]), cast to CT."""
    cd = tl.arange(0, D)
    return tl.load(lnw_ptr + h * D + cd).to(CT), tl.load(lnb_ptr + h * D + cd).to(CT)


@triton.jit
def _ln_affine(x, w, b, D: tl.constexpr, EPS: tl.constexpr):
    """``LN(x)`` per column of a feature-major tile x [D, BK] with affine w, b [D]: returns
    (LN(x) [D, BK], xhat [D, BK], rstd [BK])."""
    xh, rstd = _ln_norm(x, D, EPS)
    return xh * w[:, None] + b[:, None], xh, rstd


@triton.jit
def _tile_offsets(f0, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr):
    """Offsets of the hidden tile [f0, f0 + BF) in one head's row-major W1 [D, F], as the
    transposed tile W1^T [BF, D], and in W2 [F, D] (tile [BF, D])."""
    cd = tl.arange(0, D)
    cf = tl.arange(0, BF)
    return cd[None, :] * F + f0 + cf[:, None], (f0 + cf)[:, None] * D + cd[None, :]


@triton.jit
def _scratch_offsets(f0, BF: tl.constexpr, BK: tl.constexpr):
    """Offsets of the hidden tile [f0, f0 + BF) in a row-major [F, BK] scratch slot."""
    return (f0 + tl.arange(0, BF))[:, None] * BK + tl.arange(0, BK)[None, :]


# ----------------------------------------------------------------------------- mini-batches
@triton.jit
def _mb_constants(tok_ptr, K: tl.constexpr, BK: tl.constexpr, CT: tl.constexpr):
    """Constants of every mini-batch: causal [BK, BK] (``[j, i]``: token i sees j <= i), eta [BK]
    (token_idx per position, 0 on the padding past K) and eta_last = token_idx[K - 1]."""
    rows = tl.arange(0, BK)
    causal = rows[None, :] >= rows[:, None]
    eta = tl.load(tok_ptr + rows, mask=rows < K, other=0.0).to(CT)
    return causal, eta, tl.load(tok_ptr + K - 1).to(CT)


@triton.jit
def _load_tokens(ptr, t, valid, stride_t, D: tl.constexpr, CT: tl.constexpr):
    """Tokens ``t`` [BK] of a [T, D] slab (token stride ``stride_t``) as a feature-major tile
    [D, BK], zero where not valid, cast to CT."""
    cd = tl.arange(0, D)
    x = tl.load(ptr + cd[:, None] + t[None, :] * stride_t, mask=valid[None, :], other=0.0)
    return x.to(CT)


@triton.jit
def _mb_tokens(xq_ptr, xk_ptr, lr_ptr, sx_t, sl_t, m, p0, T,
               K: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, CT: tl.constexpr):
    """Mini-batch ``m`` of a call whose first token sits at offset ``p0`` of its mini-batch:
    its token indices t = m K - p0 + row [BK], which of them the call holds (valid [BK]), and
    xq, xk [D, BK], lr [BK] (zero where not valid; pointers at this (sample, head))."""
    rows = tl.arange(0, BK)
    t = m * K - p0 + rows
    valid = (rows < K) & (t >= 0) & (t < T)
    xq = _load_tokens(xq_ptr, t, valid, sx_t, D, CT)
    xk = _load_tokens(xk_ptr, t, valid, sx_t, D, CT)
    lr = tl.load(lr_ptr + t * sl_t, mask=valid, other=0.0).to(CT)
    return t, valid, xq, xk, lr


@triton.jit
def _mb_inner_grad(xq, xk, xv, lr, causal, lnw, lnb, W1, b1, W2, b2, Z1K,
                   BK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                   EPS: tl.constexpr, PREC: tl.constexpr, KEEP_Z1K: tl.constexpr):
    """What the forward and the backward of one mini-batch both compute first, at the
    mini-batch-start weights W1 [D, F], b1 [F], W2 [F, D], b2 [D] (row-major pointers):

    the target LN(xv - xk) (docs/DESIGN.md section 3: normalise the difference), pass A over the hidden
    tiles ``z2k = W2^T gelu(W1^T xk + b1) + b2`` (the layer-norm gradient needs all of it; with
    KEEP_Z1K the pre-activation z1k goes to the scratch Z1K [F, BK]), the layer-2 inner
    gradient gz2 and ``p2 = lr gz2`` [D, BK], and ``a1[j, i] = causal (xk_j . xq_i + 1)`` [BK, BK].
    Tiles are feature-major: xq, xk, xv [D, BK]; lr [BK]. Returns (z2k, gz2, p2, a1).
    """
    CT = xq.dtype
    tgt, _, _ = _ln_affine(xv - xk, lnw, lnb, D, EPS)
    z2k = tl.zeros([D, BK], dtype=CT)
    cf = tl.arange(0, BF)
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)
        z1k = tl.dot(tl.load(W1 + o1), xk, input_precision=PREC) + tl.load(b1 + f0 + cf)[:, None]  # [BF, BK]
        if KEEP_Z1K:
            tl.store(Z1K + _scratch_offsets(f0, BF, BK), z1k)
        z2k += tl.dot(tl.trans(tl.load(W2 + o2)), _gelu(z1k), input_precision=PREC)
    z2k += tl.load(b2 + tl.arange(0, D))[:, None]
    gz2, _, _, _ = _ln_l2_grad(z2k, tgt, lnw, lnb, D, EPS)
    a1 = tl.where(causal, tl.dot(tl.trans(xk), xq, input_precision=PREC) + 1.0, 0.0)
    return z2k, gz2, lr[None, :] * gz2, a1
