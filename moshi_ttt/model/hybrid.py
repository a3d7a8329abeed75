"""Hybrid transformer layer for moshi: gated TTT memory beside attention and feed-forward.

``TTTHybridLayer`` is injected into moshi's temporal transformer through ``lm_kwargs["layer_class"]``
so that ``LMModel``, ``LMGen``, streaming, LoRA and activation checkpointing keep working. Layers
that get a memory carry a ``TTTBlock``; the others behave exactly like moshi's layer (apart from
the chunk-capable KV cache, see ``attention.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer, create_norm_fn

from ..ttt.config import TTTConfig
from ..ttt.layer import TTTMLP
from ..ttt.state import TTTState, fresh_state, select_state
from .attention import chunkable_attention


@dataclass
class TTTBlockState(State):
    """Streaming state of one TTT block: the per-sample memory, and the tensors a reset needs.

    initial: the learned initial fast weights (W1 [H, d, F], b1 [H, 1, F], W2 [H, F, d],
        b2 [H, 1, d]), the block's parameters held by reference (not copies): a reset builds the
        fresh memory from them, so under autograd (training) it keeps its graph to them, and with
        ``state_grad: full`` a reset lane's later chunks reach them exactly as one full-sequence
        forward would; an optimizer step (in place) is seen by the next reset.
    memory: the per-sample memory (``TTTState``, leading dimension B). Its tensors keep their
        addresses across no-grad steps (copied into in place), which ``LMGen``'s CUDA graphs need;
        with autograd on, each step replaces them functionally.
    reset_every: this session's reset schedule (``TTTMLP.forward``): None keeps the memory for the
        whole stream, P resets it every P frames. A setting of the session, not of the model: it is
        taken from ``memory_schedule`` when the session starts, or set by ``set_memory_schedule``
        (``ChunkedLM`` does, from the training or evaluation side that owns the value).
    """

    initial: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    memory: TTTState | None = None
    reset_every: int | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.restart_memory(reset_mask, keep_conv=False)

    def restart_memory(self, mask: torch.Tensor, keep_conv: bool = True) -> None:
        """Samples in ``mask`` [B] bool get the learned initial fast weights (under autograd with
        their graph to them); ``keep_conv`` keeps the convolution's input tail (local context, as
        a periodic reset does), a file reset clears it."""
        assert self.memory is not None
        fresh = fresh_state(self.initial, self.memory)
        if keep_conv:
            fresh.conv = self.memory.conv
        self.store(select_state(mask, fresh, self.memory))

    def store(self, new: TTTState) -> None:
        """Make ``new`` the memory: in place when nothing needs a graph (stable addresses for CUDA
        graphs), by reference otherwise."""
        mem = self.memory
        if new is mem:  # already updated in place
            return
        if torch.is_grad_enabled() or mem is None or mem.W1.requires_grad or new.W1.requires_grad:
            self.memory = new
        else:
            mem.copy_(new)


# The reset schedule of calls outside a streaming session, and of sessions started while it is set:
# moshi's forward offers no route for a per-call argument down to the layers, and a context
# variable carries one through moshi's call stack without storing it on the model.
_RESET_EVERY: ContextVar[int | None] = ContextVar("moshi_ttt_reset_every", default=None)


def _check_period(reset_every: int | None) -> int | None:
    if reset_every is not None and (isinstance(reset_every, bool) or not isinstance(reset_every, int)
                                    or reset_every < 1):
        raise ValueError(f"reset_every={reset_every!r}: must be None (persistent memory) or an integer >= 1")
    return reset_every


@contextmanager
def memory_schedule(reset_every: int | None) -> Iterator[None]:
    """Within this context, the TTT memory of calls outside streaming, and of the streaming sessions
    started inside it, is reset every ``reset_every`` frames (None: kept, the default)."""
    token = _RESET_EVERY.set(_check_period(reset_every))
    try:
        yield
    finally:
        _RESET_EVERY.reset(token)


def set_memory_schedule(blocks: dict[int, TTTBlock], reset_every: int | None) -> None:
    """Set the reset schedule of the live streaming sessions of ``blocks`` (see ``memory_schedule``)."""
    _check_period(reset_every)
    for block in blocks.values():
        if block._streaming_state is None:
            raise RuntimeError("set_memory_schedule: the model is not streaming")
        block._streaming_state.reset_every = reset_every


def reset_memory(blocks: dict[int, TTTBlock], mask: torch.Tensor) -> None:
    """Restart the fast weights of the samples in ``mask`` [B] bool, keeping everything else
    (attention caches, the convolution's input tail, moshi's exec mask): what a periodic reset of
    ``reset_every`` does, at a moment the caller chooses (training's ``memory_dropout``)."""
    for block in blocks.values():
        if block._streaming_state is None:
            raise RuntimeError("reset_memory: the model is not streaming")
        block._streaming_state.restart_memory(mask)


@dataclass
class BlockCall:
    """One streaming call of a TTT block, detached: its input x [B, T, d_model] (before the
    block's norm), the memory at its start and at its end, and the session's reset schedule."""

    x: torch.Tensor
    before: TTTState
    reset_every: int | None = None
    after: TTTState | None = None


@contextmanager
def recorded_calls(blocks: dict[int, TTTBlock]) -> Iterator[dict[int, BlockCall]]:
    """While open, the latest streaming call of each block in ``blocks`` (keyed the same way),
    taken by forward hooks removed on exit: the model carries no recording flag, and what the
    caller does outside the block (e.g. backward's recomputation of checkpointed chunks) is not
    recorded."""
    calls: dict[int, BlockCall] = {}

    def hooks(i: int):
        def pre(module: TTTBlock, args: tuple[torch.Tensor, ...]) -> None:
            st = module._streaming_state
            if st is not None:
                calls[i] = BlockCall(args[0].detach(), st.memory.detach().clone(), st.reset_every)

        def post(module: TTTBlock, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            st = module._streaming_state
            if st is not None and i in calls:
                calls[i].after = st.memory.detach().clone()

        return pre, post

    handles = []
    for i, block in blocks.items():
        pre, post = hooks(i)
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class TTTBlock(StreamingModule[TTTBlockState]):
    """Pre-norm + ``TTTMLP``; returns ``x + tanh(alpha) * TTT(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, norm: str, config: TTTConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.norm = create_norm_fn(norm, d_model, device=device, dtype=dtype)
        self.layer = TTTMLP(d_model, num_heads, config, device=device, dtype=dtype)

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
        return TTTBlockState(batch_size, self.layer.W1.device, initial=self.layer.base_weights(), memory=memory,
                             reset_every=_RESET_EVERY.get())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]."""
        state = self._streaming_state
        h = self.norm(x)
        if state is None:
            update, _ = self.layer(h, reset_every=_RESET_EVERY.get())
        else:
            # No-grad one-frame steps (LMGen) may update the memory in place with the fused kernel.
            update, new = self.layer(h, state.memory, exec_mask=state.exec_mask,
                                     inplace=not state.memory.W1.requires_grad, reset_every=state.reset_every)
            state.store(new)
        return x + update.to(x.dtype)

    @torch.no_grad()
    def inner_loss_before_after(self, call: BlockCall) -> tuple[float, float]:
        """Mean inner reconstruction loss of a recorded call's tokens (``recorded_calls``) under the
        memory at its start and at its end: the memory learned from the call if the second is lower."""
        from ..ttt.diagnostics import inner_loss_at_state

        before, after = call.before, call.after if call.after is not None else call.before
        _, xk, xv, _ = self.layer.project(self.norm(call.x), before.pos, before.conv, call.reset_every)
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
