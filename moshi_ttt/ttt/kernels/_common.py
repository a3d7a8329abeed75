"""Triton device helpers shared by the TTT-MLP kernels (layer norm, gelu and their derivatives).

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
def _gelu(x):
    """tanh-approximated gelu."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + _tanh(u))


@triton.jit
def _gelu_d1(x):
    """(gelu(x), gelu'(x))."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    t = _tanh(u)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


@triton.jit
def _gelu_d2(x):
    """(gelu(x), gelu'(x), gelu''(x)); gelu'' = (1 - t^2) (u' - x t u'^2 + x u''/2)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    t = _tanh(u)
    s = 1.0 - t * t
    g = 0.5 * x * (1.0 + t)
    g1 = 0.5 * (1.0 + t) + 0.5 * x * s * du
    g2 = s * (du - x * t * du * du + 3.0 * 0.7978845608028654 * 0.044715 * x * x)
    return g, g1, g2


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
