"""The one place that chooses how the TTT-MLP operator runs: PyTorch forms or Triton kernels.

``ops.py`` (the PyTorch forms), ``reference.py`` (the float64 oracle) and ``kernels/`` (Triton)
are siblings that do not import each other; this module sits above them and picks one from
configuration (``TTTConfig.kernels``, passed here as ``kernels``), never from the environment:

* ``"torch"`` (the default): the PyTorch forms everywhere. The default because the kernels match
  the oracle through Triton's interpreter and compile for sm_90 but have not yet run on a GPU;
  after ``pytest -m gpu tests/test_kernels.py`` passes on one, ``"auto"`` is the intended default.
* ``"auto"``: the kernels for CUDA tensors of a shape, dtype and layout they support, the
  PyTorch forms otherwise (CPU tensors always: the interpreter is for the kernel tests).
* ``"triton"``: the kernels, or a ``KernelsUnavailableError`` that says why they cannot run
  (never a silent fallback to PyTorch).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from . import ops
from .kernels import call_unsupported_reason, ttt_mlp_triton, ttt_step_triton_
from .state import TTTState

Kernels = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernels)

__all__ = ["KERNELS", "Kernels", "KernelsUnavailableError", "choose", "ttt_mlp", "ttt_step_"]


class KernelsUnavailableError(RuntimeError):
    """The Triton kernels were asked for (``kernels="triton"``) and cannot run this call."""


def choose(
    kernels: Kernels, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    *, step: bool = False,
) -> Literal["torch", "triton"]:
    """Which implementation runs this call under the ``kernels`` setting (see the module doc).

    Args: the operator's (xq, xk, xv [B, H, T, d]; lr [B, H, T]; ln_weight, ln_bias [H, d]; the
    state); ``step``: the in-place streaming step rather than the sequence operator.
    Raises:
        KernelsUnavailableError: ``kernels="triton"`` and the kernels cannot run the call.
    """
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        if xq.device.type != "cuda":
            return "torch"
        why = call_unsupported_reason(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, step=step)
        return "torch" if why is not None else "triton"
    if kernels == "triton":
        why = call_unsupported_reason(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, step=step)
        if why is not None:
            what = "streaming step" if step else "operator"
            raise KernelsUnavailableError(f"kernels='triton': the Triton {what} cannot run this call: {why} "
                                          "(use kernels='auto' to fall back to the PyTorch forms)")
        return "triton"
    raise ValueError(f"kernels={kernels!r}: use one of {KERNELS}")


def ttt_mlp(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
            ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
            token_idx: torch.Tensor | None = None, *,
            impl: Literal["auto", "dual", "dual_autograd", "token", "triton"] = "auto",
            kernels: Kernels = "torch",
            ) -> tuple[torch.Tensor, TTTState]:
    """The TTT-MLP operator in any implementation; the contract of ``ops.ttt_mlp``.

    Args:
        xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx: as ``ops.ttt_mlp``
            (xq, xk, xv [B, H, T, d]; lr [B, H, T]; ln_weight, ln_bias [H, d]; token_idx [K]).
        impl: "auto" (``kernels`` decides; the PyTorch choice is ``ops.ttt_mlp``'s "auto"),
            a PyTorch form by name ("dual", "dual_autograd", "token": always PyTorch), or
            "triton" (the fused kernels; the same as ``kernels="triton"``).
        kernels: "torch", "auto" or "triton" (``TTTConfig.kernels``; see the module doc).
    Returns:
        out [B, H, T, d] (dtype of xq) and the new state; the input state is not modified.
    """
    if impl == "triton":
        kernels = "triton"
    elif impl != "auto":
        return ops.ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx, impl=impl)
    if choose(kernels, xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size) == "triton":
        return ttt_mlp_triton(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)
    return ops.ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)


def ttt_step_(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
              ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
              token_idx: torch.Tensor | None = None, *, exec_mask: torch.Tensor | None = None,
              kernels: Kernels = "torch") -> torch.Tensor:
    """One streaming token per sample, no autograd, ``state`` updated in place.

    xq, xk, xv [B, H, 1, d]; lr [B, H, 1]; ln_weight, ln_bias [H, d]; exec_mask [B] (False:
    the sample keeps its state exactly). The fused streaming kernel (``ttt_step_triton_``) or
    its PyTorch twin (``ops.ttt_mlp_step_``), chosen by ``kernels`` as in ``choose``.
    Returns out [B, H, 1, d].
    """
    if choose(kernels, xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, step=True) == "triton":
        return ttt_step_triton_(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                                exec_mask=exec_mask)
    return ops.ttt_mlp_step_(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                             exec_mask=exec_mask)
