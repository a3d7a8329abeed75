"""The smallest extension of moshi's streaming attention that makes multi-frame streaming calls
exact and trainable.

moshi's ``RingKVCache`` holds exactly ``context`` entries. A streaming call of T > 1 frames writes
T new entries first and then attends, so once the ring has wrapped the first queries of the call
have lost up to T - 1 keys they are entitled to (docs/DESIGN.md section 5). And under autograd the
cache is written in place, so a chunk's backward breaks as soon as the next chunk writes.

``ChunkedRingKVCache`` (a ``RingKVCache`` subclass) fixes both and nothing else:
* its capacity is ``context + T - 1`` for the longest call seen so far (it grows, rarely, when a
  longer call arrives; one-frame calls never allocate, so ``LMGen`` and CUDA graphs are unaffected);
  moshi's attention mask still limits every query to ``context`` frames;
* with autograd on, the keys/values returned for attention are an out-of-place copy in which the
  current call's entries carry their gradient while the cached past is constant (stop-gradient,
  truncated BPTT), so the cache can be overwritten by the next chunk;
* with ``keep_graph`` (``state_grad: full``) that copy is also kept (``live``) and the next call
  writes into it out of place, so the keys/values of earlier chunks of a training span keep their
  graph and a later chunk's loss reaches the layers that produced them; ``cut()`` drops it at a
  span boundary.
"""

from __future__ import annotations

import torch
from moshi.modules.transformer import KVCacheResult, RingKVCache, StreamingMultiheadAttention


class ChunkedRingKVCache(RingKVCache):
    def __init__(self, batch_size: int, num_heads: int, dim_per_head: int, context: int,
                 respect_exec_mask: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(batch_size, num_heads, dim_per_head, context,
                         respect_exec_mask=respect_exec_mask, device=device, dtype=dtype)
        self.context = context
        self.keep_graph = False
        self.live: torch.Tensor | None = None   # [2, B, H, capacity, D] with graph (keep_graph)

    def cut(self) -> None:
        """End of a training span: later calls see the cached past as constants."""
        self.live = None

    def _grow(self, capacity: int) -> None:
        """Re-lay the ring for a larger capacity; entry of absolute position p sits at p % capacity."""
        old, C = self.cache, self.capacity
        new = torch.zeros(*old.shape[:3], capacity, old.shape[4], device=old.device, dtype=old.dtype)
        end = self.end_offset.expand(old.shape[1]) if not self.respect_exec_mask else self.end_offset
        for b, e in enumerate(end.tolist()):
            pos = torch.arange(max(0, e - C), e, device=old.device)
            new[:, b, :, pos % capacity] = old[:, b, :, pos % C]
        self.cache, self.capacity = new, capacity

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        T = k.shape[2]
        if self.context + T - 1 > self.capacity:
            if self.live is not None:
                raise RuntimeError("ChunkedRingKVCache: a longer call inside a training span (cut() first)")
            self._grow(self.context + T - 1)
        if not torch.is_grad_enabled():
            self.live = None
            return super().complete(k, v, exec_mask)
        # Slots the call writes (same formula as moshi), taken before the offsets move.
        idx = (torch.arange(T, device=k.device) + self.end_offset.view(-1, 1)) % self.capacity
        res = super().complete(k.detach(), v.detach(), exec_mask)
        B, H, _, D = k.shape
        idx = idx.expand(B, T).view(B, 1, T, 1).expand(B, H, T, D)
        # ``live`` holds the same values as moshi's cache before this call (moshi writes every
        # lane's slots whatever the exec mask; only the offsets respect it), with their graph.
        live = self.live if self.keep_graph else None
        past_k, past_v = (live[0], live[1]) if live is not None else (res.keys, res.values)
        keys = past_k.scatter(2, idx, k)          # out of place: gradient to this call's keys
        values = past_v.scatter(2, idx, v)
        if self.keep_graph:
            self.live = torch.stack([keys, values])
        return KVCacheResult(keys, values, res.positions)


class ChunkableStreamingMHA(StreamingMultiheadAttention):
    """moshi's attention with a ``ChunkedRingKVCache``; no new parameters or buffers."""

    def _init_streaming_state(self, batch_size: int):
        state = super()._init_streaming_state(batch_size)
        kv = state.kv_cache
        if kv is not None and self.context is not None and not self.weights_per_step:
            state.kv_cache = ChunkedRingKVCache(
                batch_size, kv.cache.shape[2], kv.cache.shape[4], self.context,
                respect_exec_mask=kv.respect_exec_mask, device=kv.cache.device, dtype=kv.cache.dtype)
        return state


def chunkable_attention(attn: StreamingMultiheadAttention) -> ChunkableStreamingMHA:
    """``attn`` as a ``ChunkableStreamingMHA``, for the layer to put in its place.

    ``StreamingTransformerLayer.__init__`` builds its own ``StreamingMultiheadAttention`` and offers
    no hook for the class. The subclass is built through moshi's own constructor with ``attn``'s
    settings, as a shell on the meta device (no memory, no draw from the random generator, so the
    model's initialisation is that of stock moshi), and takes over ``attn``'s projections: the same
    ``Parameter`` objects, hence the same weights and state-dict keys.
    """
    new = ChunkableStreamingMHA(
        embed_dim=attn.embed_dim, num_heads=attn.num_heads, causal=attn.causal, context=attn.context,
        rope=attn.rope, kv_repeat=attn.kv_repeat, weights_per_step=attn.weights_per_step,
        weights_per_step_schedule=attn.weights_per_step_schedule, cross_attention=attn.cross_attention,
        cache_cross_attention=attn.cache_cross_attention, device="meta")
    new.in_projs, new.out_projs = attn.in_projs, attn.out_projs
    return new.train(attn.training)
