"""When the fused kernels can run, and the hook ``ttt_mlp`` calls to use them.

Nothing here imports Triton or the kernel modules at import time (``ops.py`` may import this
module unconditionally): the kernels are loaded on first use, on a CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..state import TTTState

#: Set to "1" to let ``ttt_mlp(impl="auto")`` dispatch to the kernels on CUDA. Opt-in until the
#: GPU tests (``pytest -m gpu tests/test_kernels.py``) have passed on real hardware: they were
#: written and checked through the Triton interpreter only, so a silent default would risk wrong
#: results on a GPU nobody has run them on.
ENV_ENABLE = "MOSHI_TTT_KERNELS"


def kernels_enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "0") == "1"

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


def try_kernel(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TTTState] | None:
    """The hook for ``ttt_mlp(impl="auto")``: run the fused kernels and return ``(out,
    new_state)``, or return None when they do not apply (then use the torch forms).

    Dispatches only CUDA tensors (never CPU, even under TRITON_INTERPRET: the interpreter is for
    the kernel tests, not for the CPU paths of everyone else), of a supported shape and dtype,
    with a float32 state whose sums share its dtype, when ``MOSHI_TTT_KERNELS=1``.
    """
    if not kernels_enabled() or xq.device.type != "cuda":
        return None
    if any(t.device != xq.device for t in (xk, xv, lr, ln_weight, ln_bias, state.W1, state.pos)):
        return None
    if any(t.dtype != state.W1.dtype for _, t in state.items() if _ != "pos"):
        return None
    if xk.dtype != xq.dtype or xv.dtype != xq.dtype:
        return None
    if kernel_unavailable_reason(xq.device, xq.dtype, problem_shapes(xq, state, mini_batch_size),
                                 state.W1.dtype) is not None:
        return None
    from .sequence import ttt_mlp_triton

    return ttt_mlp_triton(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)


def try_step_(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    token_idx: torch.Tensor | None = None, *, exec_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The hook for the streaming path: one token per sample through the in-place kernel.

    Returns the output ``[B, H, 1, d]`` after updating ``state`` in place (``exec_mask`` False
    samples keep their state; ``pos`` advances by 1, or by ``exec_mask``), or None -- with
    nothing modified -- when the kernel does not apply: not CUDA, autograd recording, T != 1,
    a state that is not contiguous float32 throughout, an unsupported shape or dtype, or
    kernels not enabled (``MOSHI_TTT_KERNELS=1``).
    """
    if not kernels_enabled() or xq.device.type != "cuda":
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xq, xk, xv, lr, state.W1)):
        return None
    if xq.dim() != 4 or xq.shape[2] != 1:
        return None
    if any(t.dtype != state.W1.dtype or not t.is_contiguous() for n, t in state.items() if n != "pos"):
        return None
    if not state.pos.is_contiguous() or state.pos.dtype != torch.long:
        return None
    if xq.stride(-1) != 1 or xq.stride() != xk.stride() or xq.stride() != xv.stride():
        return None
    if kernel_unavailable_reason(xq.device, xq.dtype, problem_shapes(xq, state, mini_batch_size),
                                 state.W1.dtype) is not None:
        return None
    from .streaming import ttt_step_triton_

    return ttt_step_triton_(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                            out=out, exec_mask=exec_mask)
