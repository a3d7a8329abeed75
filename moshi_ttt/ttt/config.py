"""Configuration of the TTT-MLP memory (no Moshi import here)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..records import FieldValueError, dump, load

LayerSpec = str | list[int]

_EVERY_RE = re.compile(r"^every:(\d+)$")


class TTTConfigError(FieldValueError):
    """A TTT configuration value is invalid; the message names the field and the value (exit code 2)."""


@dataclass
class TTTConfig:
    """Everything that defines the TTT-MLP memory inserted into a transformer.

    Attributes:
        enable: master switch; False gives the stock model.
        layers: which layers get a TTT block: "all", "middle" (the middle half), "none",
            "every:K" (layers K-1, 2K-1, ...), or an explicit list of indices.
        base_lr: inner learning rate scale; the per-token rate is
            ``base_lr * sigmoid(x W_lr + b_lr) / head_dim``.
        mini_batch_size: tokens per inner gradient step (TTT mini-batch).
        persistent_states: the training choice: True keeps the memory for a whole file /
            conversation; False resets it every training chunk. The layer does not read it: the
            reset schedule is an argument of the run (``TTTMLP.forward(reset_every=...)``), which
            the trainer derives from this and the data's chunk length (``data.chunk_frames``, the
            one owner of that value), and an evaluation from its memory mode.
        initial_gating_alpha: initial value of the per-channel gate ``tanh(alpha)``.
        state_grad: how the carried state enters a new chunk's graph. "full": the carried state
            keeps its autograd graph across the chunks of one training span (``bptt_chunks`` in
            the training config; the trainer cuts it with the "delta" rule at span boundaries), so
            a read in a later chunk trains the writes of earlier ones (k/v projections, inner lr,
            the layers below); the span's gradient equals the full-sequence gradient. "delta":
            ``W_base + stopgrad(W_state - W_base)`` at every chunk (every chunk's loss reaches the
            learned initial weights, but never the write side of earlier chunks); "detach": plain
            stop-gradient (only chunks right after a reset reach the initial weights).
        num_heads: TTT heads H; None uses the host model's number of heads.
        head_dim: TTT head dim d; the inner width is ``H * d``, independent of the host width
            (projections ``dim -> H d`` and back). None keeps ``d = dim / H`` (inner width = host
            width, the full-width layer).
        qk_l2_norm: L2-normalise the inner keys and queries. Default True, as in ttt-video-dit:
            it bounds the inner gradient (||xk|| = 1), so the inner step size does not depend on the
            activation scale of the pretrained host model, which we do not control. ttt-lm-pytorch
            trains from scratch and does not normalise.
        rope: rotary embedding on inner queries/keys with the position inside the mini-batch (as
            ttt-lm-pytorch does). Default False: the memory should be addressed by content, and
            keys written minutes apart must match regardless of their position.
        rope_theta: RoPE base when ``rope`` is True.
        init_std: std of the normal init of the learned initial fast weights W1 and W2. None (the
            default) is the fan-in init: W1 ~ N(0, 1/|xk|^2) (1 with ``qk_l2_norm``, whose keys
            have unit norm; 1/d without) and W2 ~ N(0, 1/(4 d)), so that the inner MLP starts with
            unit-scale pre-activations. Much smaller weights leave a memory that stores nothing:
            with unit-norm keys and 0.02 (ttt-lm's value, for unnormalised inputs), 8 key -> value
            bindings written 4 times each are retrieved at chance (1/8) at head dims 16 to 128;
            with the fan-in init, 80-100% (``tests/test_ttt_memory.py``).
        short_conv: taps of a causal depthwise convolution on the inputs of the inner queries,
            keys and values (0 or 1: none). With 2 or more, frame t's key can include frame t-1,
            so that a key at t-1 binds to a value at t (ttt-lm's conv_q/conv_k, fla's short conv).
            Exact in the three execution modes: its input tail is carried in the state.
        bind_init: start the memory as a "what follows what" store: ``wq`` starts equal to ``wk``,
            and with ``short_conv >= 2`` the key kernel starts as a one-frame shift (the key of
            frame t is frame t-1) while the query and value kernels start as identity. A frame's
            query then finds, from the first step, the value written the last time the same content
            came one frame before, which is what next-frame prediction needs from a memory; training
            moves all of it. False: independent ``wq``/``wk`` draws and identity kernels.
        placement: where a host layer runs the memory (for the integration; the layer itself does
            not use it). "after_attention": attention, TTT, feed-forward (the design's layer).
            "before_attention": TTT, attention, feed-forward -- the memory reads and writes the
            layer's input rather than a mix of the attention window; on the key -> value ladder
            it is the placement whose memory the outer model learned to use within a CPU budget.
        kernels: how the operator runs (``moshi_ttt.ttt.dispatch``): "torch" (the PyTorch forms;
            the default while the Triton kernels have not run on a GPU), "auto" (the Triton
            kernels for CUDA tensors they support, PyTorch otherwise) or "triton" (the kernels, an
            error naming why where they cannot run). A runtime choice: it changes speed, not results.
    """

    enable: bool = True
    layers: LayerSpec = "middle"
    base_lr: float = 1.0
    mini_batch_size: int = 16
    persistent_states: bool = True
    initial_gating_alpha: float = 0.1
    state_grad: Literal["full", "delta", "detach"] = "delta"
    num_heads: int | None = None
    head_dim: int | None = None
    qk_l2_norm: bool = True
    rope: bool = False
    rope_theta: float = 10000.0
    init_std: float | None = None
    short_conv: int = 0
    bind_init: bool = True
    placement: Literal["after_attention", "before_attention"] = "after_attention"
    kernels: Literal["auto", "torch", "triton"] = "torch"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, msg: str) -> TTTConfigError:
            return TTTConfigError("TTTConfig", name, getattr(self, name), msg)

        if not isinstance(self.enable, bool):
            raise bad("enable", "must be true or false")
        if not isinstance(self.mini_batch_size, int) or isinstance(self.mini_batch_size, bool) \
                or self.mini_batch_size < 1:
            raise bad("mini_batch_size", "must be an integer >= 1")
        if not isinstance(self.base_lr, (int, float)) or self.base_lr < 0:
            raise bad("base_lr", "must be a number >= 0")
        if not isinstance(self.initial_gating_alpha, (int, float)):
            raise bad("initial_gating_alpha", "must be a number")
        if self.state_grad not in ("full", "delta", "detach"):
            raise bad("state_grad", "must be 'full', 'delta' or 'detach'")
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or self.num_heads < 1):
            raise bad("num_heads", "must be null or an integer >= 1")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
                                          or self.head_dim < 1):
            raise bad("head_dim", "must be null or an integer >= 1")
        if not isinstance(self.persistent_states, bool):
            raise bad("persistent_states", "must be true or false")
        if not isinstance(self.short_conv, int) or isinstance(self.short_conv, bool) or self.short_conv < 0:
            raise bad("short_conv", "must be an integer >= 0 (taps; 0 or 1: no convolution)")
        if self.placement not in ("after_attention", "before_attention"):
            raise bad("placement", "must be 'after_attention' or 'before_attention'")
        if not isinstance(self.bind_init, bool):
            raise bad("bind_init", "must be true or false")
        if self.init_std is not None and (not isinstance(self.init_std, (int, float)) or self.init_std < 0):
            raise bad("init_std", "must be null (fan-in init) or a number >= 0")
        if self.kernels not in ("auto", "torch", "triton"):
            raise bad("kernels", "must be 'auto', 'torch' or 'triton'")
        if not _valid_layer_spec(self.layers):
            raise bad("layers", "unknown layer spec; use 'all', 'middle', 'none', 'every:K' (K >= 1) or a list "
                      "of layer indices")

    # ------------------------------------------------------------------ helpers
    def resolve_layers(self, num_layers: int) -> list[int]:
        """The sorted layer indices that get a TTT block in a model of ``num_layers`` layers."""
        if not self.enable:
            return []
        spec = self.layers
        if isinstance(spec, list):
            for i in spec:
                if not 0 <= i < num_layers:
                    raise TTTConfigError("TTTConfig", "layers", spec,
                                         f"index {i} out of range for a model with {num_layers} layers")
            return sorted(set(spec))
        if spec == "all":
            return list(range(num_layers))
        if spec == "none":
            return []
        if spec == "middle":
            # The middle half: for 32 layers, 8..23.
            start = num_layers // 4
            return list(range(start, start + max(1, num_layers // 2)))
        m = _EVERY_RE.match(spec)
        assert m is not None  # validated
        k = int(m.group(1))
        return list(range(k - 1, num_layers, k))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (``records.dump``): what adapters and memory files store."""
        return dump(self)

    # Keys of configs saved by earlier versions, accepted and dropped on load. ``chunk_frames`` was a
    # copy of ``data.chunk_frames`` (the reset period when not persistent); ``generate`` still reads
    # it from the raw adapter config of an adapter written before the trainer recorded
    # ``reset_every`` beside it.
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset({"chunk_frames"})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TTTConfig:
        """Build from a plain dict (YAML/JSON) through ``records.load``: an unknown key, a value of
        the wrong type or out of range is a :class:`TTTConfigError` naming the key and the value."""
        return load(cls, d, error=TTTConfigError)


def _valid_layer_spec(spec: Any) -> bool:
    if isinstance(spec, list):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    m = _EVERY_RE.match(spec) if isinstance(spec, str) else None
    return spec in ("all", "middle", "none") or (m is not None and int(m.group(1)) >= 1)
