"""What the fused kernels can run: problem sizes, dtypes, devices and tensor layouts.

Knowledge of the kernels only, no policy: whether to use them is chosen above, by
``moshi_ttt.ttt.dispatch`` from ``TTTConfig.kernels``. Nothing here imports Triton or the kernel
modules at import time: this module is cheap to import on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..state import TTTState

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_MINI_BATCH = 64  # rows of a mini-batch tile live in registers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def kernel_unavailable_reason(
    device: torch.device | str, dtype: torch.dtype, shapes: Sequence[int],
    state_dtype: torch.dtype = torch.float32,
) -> str | None:
    """Why the kernels cannot run this problem, or None if they can.

    Args:
        device: where the tensors live.
        dtype: dtype of xq/xk/xv.
        shapes: ``(B, H, T, d, F, K)`` -- batch, heads, tokens, head dim, hidden dim (4d),
            mini-batch size.
        state_dtype: dtype of the fast-weight state (the compute dtype).
    """
    device = torch.device(device)
    B, H, T, d, F, K = (int(s) for s in shapes)
    interp = _interpreting()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "needs a GPU of compute capability >= 8.0 (tf32 tensor cores)"
    elif not interp:
        return f"device {device.type}: the kernels run on CUDA (or under TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    exact = (torch.float64,) if interp else ()
    if state_dtype not in (torch.float32, *exact):
        return f"state dtype {state_dtype}: the kernels accumulate in a float32 state"
    if dtype not in (*_INPUT_DTYPES, *exact):
        return f"input dtype {dtype} is not supported"
    if not (_pow2(d) and 16 <= d <= 256):
        return f"head dim {d} must be a power of two in [16, 256]"
    if not (_pow2(F) and F >= 16):
        return f"hidden dim {F} must be a power of two >= 16"
    if not 1 <= K <= MAX_MINI_BATCH:
        return f"mini-batch size {K} must be in [1, {MAX_MINI_BATCH}]"
    if min(B, H, T) < 1:
        return "empty problem"
    return None


def kernel_available(
    device: torch.device | str, dtype: torch.dtype, shapes: Sequence[int],
    state_dtype: torch.dtype = torch.float32,
) -> bool:
    """True if ``ttt_mlp_triton`` supports the problem; see ``kernel_unavailable_reason``."""
    return kernel_unavailable_reason(device, dtype, shapes, state_dtype) is None


def problem_shapes(xq: torch.Tensor, state: TTTState, mini_batch_size: int) -> tuple[int, ...]:
    """``(B, H, T, d, F, K)`` of an operator call."""
    B, H, T, d = xq.shape
    return (B, H, T, d, state.W1.shape[-1], int(mini_batch_size))


def call_unsupported_reason(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    *, step: bool = False,
) -> str | None:
    """Why the kernels cannot run this operator call, or None if they can.

    Args: the operator's (xq, xk, xv [B, H, T, d]; lr [B, H, T]; ln_weight, ln_bias [H, d]; the
    state). ``step``: the in-place streaming kernel (``ttt_step_triton_``, one token, no autograd,
    writes the state where it lies) rather than the sequence kernel (``ttt_mlp_triton``).
    """
    if any(t.device != xq.device for t in (xk, xv, lr, ln_weight, ln_bias, state.W1, state.pos)):
        return "the inputs and the state are not all on one device"
    if xk.dtype != xq.dtype or xv.dtype != xq.dtype:
        return f"xq, xk, xv have different dtypes ({xq.dtype}, {xk.dtype}, {xv.dtype})"
    state = state.core()  # the convolution's tail is the layer's, not the kernels'
    if any(t.dtype != state.W1.dtype for n, t in state.items() if n != "pos"):
        return "the state's weights and running sums do not share one dtype"
    if step:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (xq, xk, xv, lr, state.W1)):
            return "the streaming kernel has no backward (autograd is recording)"
        if xq.dim() != 4 or xq.shape[2] != 1:
            return f"the streaming kernel takes one token, got xq of shape {tuple(xq.shape)}"
        if not all(t.is_contiguous() for _, t in state.items()) or state.pos.dtype != torch.long:
            return "the streaming kernel updates the state in place: it must be contiguous (pos int64)"
        if xq.stride(-1) != 1 or xq.stride() != xk.stride() or xq.stride() != xv.stride():
            return "the streaming kernel needs xq, xk, xv with one stride set and a contiguous last dim"
    return kernel_unavailable_reason(xq.device, xq.dtype, problem_shapes(xq, state, mini_batch_size),
                                     state.W1.dtype)
