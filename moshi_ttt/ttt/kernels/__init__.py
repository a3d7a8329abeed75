"""Fused Triton kernels for the TTT-MLP operator (sequence, streaming, support, aot, _common helpers), on GPU.

Public API (the kernel modules are imported on first use, so importing this package never
compiles or decorates a kernel):

* ``kernel_available(device, dtype, shapes, state_dtype=torch.float32) -> bool``: whether the
  kernels support a problem; ``shapes = (B, H, T, d, F, K)``.
* ``ttt_mlp_triton(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx=None)
  -> (out, new_state)``: the operator contract of ``moshi_ttt.ttt.ops.ttt_mlp`` (dual-form
  sequence forward kernel, fused analytic backward with checkpoint recomputation).
* ``ttt_step_triton_(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx=None,
  *, out=None, exec_mask=None) -> out``: one streaming token, updating ``state`` in place;
  allocation-free and CUDA-graph safe.
* ``kernel_unavailable_reason(...)``, ``call_unsupported_reason(xq, ..., state, K, step=False)``
  (in ``support``): why the kernels cannot run a problem or a given call, or None.

This package does not know the PyTorch forms (``moshi_ttt.ttt.ops``), nor they it: which one runs
is chosen above both, in ``moshi_ttt.ttt.dispatch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .support import call_unsupported_reason, kernel_available, kernel_unavailable_reason

if TYPE_CHECKING:
    import torch

    from ..state import TTTState

__all__ = ["call_unsupported_reason", "kernel_available", "kernel_unavailable_reason",
           "ttt_mlp_triton", "ttt_step_triton_"]


def ttt_mlp_triton(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
                   ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState,
                   mini_batch_size: int, token_idx: torch.Tensor | None = None,
                   **kw: Any) -> tuple[torch.Tensor, TTTState]:
    """See ``moshi_ttt.ttt.kernels.sequence.ttt_mlp_triton``."""
    from .sequence import ttt_mlp_triton as f

    return f(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx, **kw)


def ttt_step_triton_(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
                     ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState,
                     mini_batch_size: int, token_idx: torch.Tensor | None = None,
                     **kw: Any) -> torch.Tensor:
    """See ``moshi_ttt.ttt.kernels.streaming.ttt_step_triton_``."""
    from .streaming import ttt_step_triton_ as f

    return f(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx, **kw)
