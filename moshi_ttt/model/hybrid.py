"""Hybrid transformer layer for moshi: gated TTT memory beside attention and feed-forward.

``TTTHybridLayer`` is injected into moshi's temporal transformer through ``lm_kwargs["layer_class"]``
so that ``LMModel``, ``LMGen``, streaming, LoRA and activation checkpointing keep working. Layers
that get a memory carry a ``TTTBlock``; the others behave exactly like moshi's layer (apart from
the chunk-capable KV cache, see ``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer, create_norm_fn

from ..ttt.config import TTTConfig
from ..ttt.layer import TTTMLP
from ..ttt.state import TTTState, select_state
from .attention import chunkable_attention


@dataclass
class TTTBlockState(State):
    """Streaming state of one TTT block: the per-sample memory.

    ``memory`` tensors keep their addresses across no-grad steps (copied into in place), which
    ``LMGen``'s CUDA graphs need; with autograd on, each step replaces them functionally.
    """

    block: TTTBlock | None = field(default=None, repr=False)
    memory: TTTState | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        assert self.block is not None and self.memory is not None
        # Under autograd (training) the fresh memory keeps its graph to the learned initial
        # weights, so that with ``state_grad: full`` a reset lane's later chunks reach them
        # exactly as one full-sequence forward would; elsewhere (LMGen) it is copied in place.
        fresh = self.block.fresh_memory(self.batch_size)
        new = select_state(reset_mask, fresh, self.memory)
        self.block.store_memory(self, new)


class TTTBlock(StreamingModule[TTTBlockState]):
    """Pre-norm + ``TTTMLP``; returns ``x + tanh(alpha) * TTT(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, norm: str, config: TTTConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.norm = create_norm_fn(norm, d_model, device=device, dtype=dtype)
        self.layer = TTTMLP(d_model, num_heads, config, device=device, dtype=dtype)
        # Diagnostics (training logs): when True, the next streaming call keeps its input and the
        # memory before/after it in ``probe`` (detached), for ``inner_loss_before_after``.
        self.record_probe = False
        self.probe: tuple[torch.Tensor, TTTState, TTTState] | None = None

    @property
    def state_dtype(self) -> torch.dtype:
        # Fast weights accumulate many small updates: keep them in float32 under bf16/fp16 models.
        dt = self.layer.W1.dtype
        return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt

    def fresh_memory(self, batch_size: int) -> TTTState:
        return self.layer.init_state(batch_size, dtype=self.state_dtype)

    def _init_streaming_state(self, batch_size: int) -> TTTBlockState:
        with torch.no_grad():
            memory = self.fresh_memory(batch_size)
        return TTTBlockState(batch_size, self.layer.W1.device, block=self, memory=memory)

    @staticmethod
    def store_memory(state: TTTBlockState, new: TTTState) -> None:
        mem = state.memory
        if new is mem:  # already updated in place
            return
        if torch.is_grad_enabled() or mem is None or mem.W1.requires_grad or new.W1.requires_grad:
            state.memory = new
        else:
            mem.copy_(new)  # stable addresses for CUDA graphs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]."""
        state = self._streaming_state
        h = self.norm(x)
        if state is None:
            update, _ = self.layer(h)
        else:
            # No-grad one-frame steps (LMGen) may update the memory in place with the fused kernel.
            update, new = self.layer(h, state.memory, exec_mask=state.exec_mask,
                                     inplace=not state.memory.W1.requires_grad)
            if self.record_probe:
                self.probe = (h.detach(), state.memory.detach().clone(), new.detach().clone())
            self.store_memory(state, new)
        return x + update.to(x.dtype)


    @torch.no_grad()
    def inner_loss_before_after(self) -> tuple[float, float] | None:
        """Mean inner reconstruction loss of the probed call's tokens under the memory at its start
        and at its end: the memory learned from the chunk if the second is lower."""
        if self.probe is None:
            return None
        from ..ttt.diagnostics import inner_loss_at_state

        h, before, after = self.probe
        _, xk, xv, _ = self.layer.project(h, before.pos, before.conv)
        dt = before.W1.dtype
        args = (xk.to(dt), xv.to(dt), self.layer.ttt_norm_weight.to(dt), self.layer.ttt_norm_bias.to(dt))
        return (float(inner_loss_at_state(*args, before).mean()), float(inner_loss_at_state(*args, after).mean()))


class TTTHybridLayer(StreamingTransformerLayer):
    """moshi's ``StreamingTransformerLayer`` with an optional TTT block, run by moshi's own
    ``forward`` through the hooks it calls: before the attention (``placement:
    before_attention``, in ``_sa_block``) or between attention and feed-forward
    (``after_attention``, in ``_ff_block``). Built by moshi with the usual kwargs; ``attach_ttt``
    adds the memory."""

    def __init__(self, d_model: int, num_heads: int, *args, **kwargs):
        super().__init__(d_model, num_heads, *args, **kwargs)
        self._d_model, self._num_heads = d_model, num_heads
        self._norm_type: str = kwargs.get("norm", "layer_norm")
        if not self.skip_self_attn:  # same key, same place in the module tree, same parameters
            self.self_attn = chunkable_attention(self.self_attn)
        self.ttt: TTTBlock | None = None

    def attach_ttt(self, config: TTTConfig) -> TTTBlock:
        """Add a TTT block (must happen before the first ``.streaming()`` call of the model)."""
        # Device/dtype of the layer's linears (moshi's f32 norms may differ from the model dtype).
        weight = next(p for n, p in self.named_parameters() if "norm" not in n)
        self.ttt = TTTBlock(self._d_model, self._num_heads, self._norm_type, config,
                            device=weight.device, dtype=weight.dtype)
        return self.ttt

    # moshi's layer forward runs ``_sa_block``, (cross-attention,) ``_ff_block`` and advances the
    # streaming offset; the TTT block hooks into the first or the last of these, per ``placement``.
    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        if self.ttt is not None and self.ttt.config.placement == "before_attention":
            x = self.ttt(x)
        return super()._sa_block(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        if self.ttt is not None and self.ttt.config.placement == "after_attention":
            x = self.ttt(x)
        return super()._ff_block(x)
