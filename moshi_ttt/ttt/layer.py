"""The TTT-MLP layer: projections, inner learning rate, inner norm, gate, learned initial fast
weights. Knows nothing of Moshi: it maps ``x [B, T, dim]`` and a per-sample state to a gated
update ``[B, T, dim]`` and the new state. The host adds the update to its residual stream.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TTTConfig
from .dispatch import ttt_mlp, ttt_step_
from .ops import default_token_idx
from .state import TTTState, carry_state, init_state, reset_state, reset_state_, select_state


def _reset_due(pos: torch.Tensor, reset_every: int, exec_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: the samples whose periodic reset is due before their next token (``pos`` [B]
    tokens since the last reset); with ``exec_mask`` [B], only the samples that execute."""
    due = pos >= reset_every
    return due if exec_mask is None else due & exec_mask.to(due.device)


def _store_tail_(conv: torch.Tensor, tail: torch.Tensor, exec_mask: torch.Tensor | None) -> None:
    """One-frame steps: the convolution's input tail ``conv`` [B, k-1, dim] becomes ``tail`` in place,
    except for samples that do not execute (``exec_mask`` [B] False), which keep theirs exactly."""
    if exec_mask is None:
        conv.copy_(tail)
    else:
        conv.copy_(torch.where(exec_mask.view(-1, 1, 1).to(conv.device), tail, conv))


@dataclasses.dataclass(frozen=True)
class _StreamWeights:
    """``TTTMLP._stream_weights``: fused inference weights and the parameter versions they were built from."""

    key: tuple
    w_in: torch.Tensor       # [3E + H, k dim]: wq, wk, wv (convolution taps folded in), lr gate
    b_in: torch.Tensor       # [3E + H]
    w_out: torch.Tensor      # [dim, E]: tanh(gating_alpha) * wo
    token_idx: torch.Tensor  # [K]


class TTTMLP(nn.Module):
    """Gated TTT-MLP memory.

    Args:
        dim: model (host) width.
        num_heads: host heads; used when ``config.num_heads`` is None.
        config: the TTT configuration.

    Inner width: H heads (``config.num_heads`` or the host's) of d (``config.head_dim``, or
    ``dim / H`` when None), ``E = H d`` channels, F = 4 d. E is independent of ``dim``: a narrow
    memory (E << dim) costs ``4 dim E`` projection weights instead of ``4 dim^2``.

    Parameters -- every one an ``nn.Parameter`` that forward never writes:
        wq, wk, wv: Linear(dim, E); wo: Linear(E, dim);
        lr_gate: Linear(dim, H), the inner learning rate is ``base_lr * sigmoid(.) / d``;
        learnable_token_idx [K]: offset added to ``1/(i+1)`` (clamped >= 0);
        ttt_norm_weight, ttt_norm_bias [H, d]: inner layer norm (prediction and target);
        W1 [H, d, F], b1 [H, 1, F], W2 [H, F, d], b2 [H, 1, d]: learned initial fast weights;
        post_norm: LayerNorm(E) before ``wo``;
        gating_alpha [dim]: per-channel gate ``tanh(alpha)``;
        conv_weight [3, dim, k] (``short_conv`` = k > 1): causal depthwise kernels on the inputs of
            q, k and v (identity at init); its input tail is carried in the state (``conv``).
    """

    def __init__(self, dim: int, num_heads: int, config: TTTConfig, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.config = config
        self.dim = dim
        self.num_heads = config.num_heads or num_heads
        if config.head_dim is not None:
            self.head_dim = config.head_dim
        elif dim % self.num_heads:
            raise ValueError(f"TTT: dim={dim} is not divisible by num_heads={self.num_heads}; "
                             "set ttt.head_dim to choose the inner width")
        else:
            self.head_dim = dim // self.num_heads
        self.inner_dim = self.num_heads * self.head_dim
        if config.rope and self.head_dim % 2:
            raise ValueError(f"TTT: rope needs an even head dim, got {self.head_dim}")
        H, d, K, E = self.num_heads, self.head_dim, config.mini_batch_size, self.inner_dim
        self.wq = nn.Linear(dim, E, bias=False, **fk)
        self.wk = nn.Linear(dim, E, bias=False, **fk)
        self.wv = nn.Linear(dim, E, bias=False, **fk)
        self.wo = nn.Linear(E, dim, bias=False, **fk)
        self.lr_gate = nn.Linear(dim, H, bias=True, **fk)
        self.learnable_token_idx = nn.Parameter(torch.zeros(K, **fk))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, d, **fk))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, d, **fk))
        self.W1 = nn.Parameter(torch.empty(H, d, 4 * d, **fk))
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * d, **fk))
        self.W2 = nn.Parameter(torch.empty(H, 4 * d, d, **fk))
        self.b2 = nn.Parameter(torch.zeros(H, 1, d, **fk))
        self.post_norm = nn.LayerNorm(E, eps=1e-6, **fk)
        self.gating_alpha = nn.Parameter(torch.empty(dim, **fk))
        if config.short_conv > 1:  # depthwise causal kernels for the inputs of q, k and v
            self.conv_weight = nn.Parameter(torch.empty(3, dim, config.short_conv, **fk))
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every TTT parameter; also used after meta-device construction."""
        std1, std2 = self.fast_weight_init_std()
        for lin in (self.wq, self.wk, self.wv, self.wo):
            # 1/sqrt(fan-in): dim for wq/wk/wv, the inner width E for wo (equal when E == dim).
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
        if self.config.bind_init:  # a frame's query matches the key its content wrote (see TTTConfig)
            self.wq.weight.copy_(self.wk.weight)
        nn.init.normal_(self.lr_gate.weight, std=0.02)
        nn.init.zeros_(self.lr_gate.bias)
        nn.init.zeros_(self.learnable_token_idx)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        nn.init.normal_(self.W1, std=std1)
        nn.init.zeros_(self.b1)
        nn.init.normal_(self.W2, std=std2)
        nn.init.zeros_(self.b2)
        self.post_norm.reset_parameters()
        nn.init.constant_(self.gating_alpha, self.config.initial_gating_alpha)
        if self.config.short_conv > 1:  # identity (the current frame only) at init ...
            nn.init.zeros_(self.conv_weight)
            self.conv_weight[..., -1] = 1.0
            if self.config.bind_init:  # ... but the key reads the previous frame: it binds to the next
                self.conv_weight[1, :, -1] = 0.0
                self.conv_weight[1, :, -2] = 1.0

    def fast_weight_init_std(self) -> tuple[float, float]:
        """Init std of W1 and W2: ``config.init_std`` for both, or the fan-in init when None
        (unit-scale pre-activations for the keys the inner model sees; see ``TTTConfig.init_std``)."""
        if self.config.init_std is not None:
            return float(self.config.init_std), float(self.config.init_std)
        key_norm = 1.0 if self.config.qk_l2_norm else math.sqrt(self.head_dim)  # |xk| of unit-variance entries
        return 1.0 / key_norm, 1.0 / math.sqrt(4 * self.head_dim)

    def base_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.W1, self.b1, self.W2, self.b2

    def init_state(self, batch_size: int, dtype: torch.dtype | None = None) -> TTTState:
        """A fresh memory (the learned initial weights) for ``batch_size`` samples.

        ``dtype`` lets the state run in a wider type than the parameters (fp32 state, bf16 model).
        """
        ws = [w.to(dtype) if dtype is not None else w for w in self.base_weights()]
        st = init_state(*ws, batch_size)
        if self.config.short_conv > 1:
            st.conv = self.W1.new_zeros(batch_size, self.config.short_conv - 1, self.dim)
        return st

    def reset(self, state: TTTState, mask: torch.Tensor | None = None) -> TTTState:
        """Samples selected by ``mask`` [B] (all if None) go back to the learned initial weights."""
        return reset_state(state, self.init_state(state.batch_size, dtype=state.W1.dtype), mask)

    def token_idx(self) -> torch.Tensor:
        K = self.config.mini_batch_size
        base = default_token_idx(K, device=self.learnable_token_idx.device,
                                 dtype=self.learnable_token_idx.dtype)
        return (base + self.learnable_token_idx).clamp_min(0.0)

    def gate(self) -> torch.Tensor:
        return torch.tanh(self.gating_alpha)

    # ------------------------------------------------------------------ forward pieces
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H d] -> [B, H, T, d]."""
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]

    def _rope(self, x: torch.Tensor, pos0: torch.Tensor, reset_every: int | None = None) -> torch.Tensor:
        """Rotary embedding with the position inside the mini-batch (ttt-lm-pytorch's choice).
        Positions count from the last reset, also across the periodic resets (``reset_every``)."""
        B, H, T, d = x.shape
        pos = pos0.view(B, 1) + torch.arange(T, device=x.device)              # [B, T]
        if reset_every is not None:
            pos = pos % reset_every  # pos0 <= reset_every: a pending reset wraps to 0
        pos = pos % self.config.mini_batch_size
        inv = self.config.rope_theta ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)
        ang = pos.to(x.dtype).unsqueeze(-1) * inv                              # [B, T, d/2]
        cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)              # [B, 1, T, d/2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def _short_conv(self, x: torch.Tensor, tail: torch.Tensor | None):
        """Causal depthwise convolutions of the inputs of q, k and v (``short_conv`` taps): frame t
        sees frames t-k+1..t, so a key written at t can bind to a value at t+1.
        x [B, T, dim], tail [B, k-1, dim] (the previous call's last inputs) -> three [B, T, dim]."""
        k = self.config.short_conv
        if k <= 1:
            return x, x, x
        if tail is None:
            tail = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        win = torch.cat([tail.to(x.dtype), x], 1).unfold(1, k, 1)               # [B, T, dim, k]
        hq, hk, hv = torch.einsum("btdk,cdk->cbtd", win, self.conv_weight.to(x.dtype)).unbind(0)
        return hq, hk, hv

    def conv_tail(self, x: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor | None:
        """The last ``short_conv - 1`` inputs after ``x`` [B, T, dim] (None without convolution)."""
        k = self.config.short_conv
        if k <= 1:
            return None
        if tail is None:
            tail = x.new_zeros(x.shape[0], k - 1, x.shape[2])
        return torch.cat([tail.to(x.dtype), x], 1)[:, -(k - 1):]

    def project(self, x: torch.Tensor, pos0: torch.Tensor, conv: torch.Tensor | None = None,
                reset_every: int | None = None):
        """x [B, T, dim] (and the convolution's tail ``conv`` [B, k-1, dim]) -> xq, xk, xv
        [B, H, T, d] and lr [B, H, T]. ``pos0`` [B]: tokens since the last reset (``reset_every``:
        the period of the memory's resets, for the rotary positions)."""
        hq, hk, hv = self._short_conv(x, conv)
        xq, xk, xv = self._heads(self.wq(hq)), self._heads(self.wk(hk)), self._heads(self.wv(hv))
        if self.config.qk_l2_norm:
            xq, xk = F.normalize(xq, dim=-1), F.normalize(xk, dim=-1)
        if self.config.rope:
            xq, xk = self._rope(xq, pos0, reset_every), self._rope(xk, pos0, reset_every)
        lr = self.config.base_lr * torch.sigmoid(self.lr_gate(x)) / self.head_dim  # [B, T, H]
        return xq, xk, xv, lr.transpose(1, 2)

    def readout(self, out: torch.Tensor) -> torch.Tensor:
        """Inner outputs [B, H, T, d] -> gated update [B, T, dim] (post-norm over H d, then wo)."""
        B, H, T, d = out.shape
        y = out.transpose(1, 2).reshape(B, T, H * d)
        return self.gate() * self.wo(self.post_norm(y))

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, state: TTTState | None = None, exec_mask: torch.Tensor | None = None,
        impl: str = "auto", inplace: bool = False, reset_every: int | None = None,
    ) -> tuple[torch.Tensor, TTTState]:
        """Run the memory over ``x`` and return ``(update, new_state)``.

        Args:
            x: [B, T, dim] (the host's normalised residual stream).
            state: the memory carried from the previous call; None starts fresh.
            exec_mask: [B] bool; samples with False get outputs but keep ``state`` exactly.
            impl: operator implementation, see ``dispatch.ttt_mlp`` ("auto": ``config.kernels``
                chooses between the PyTorch forms and the Triton kernels).
            inplace: the caller owns ``state`` and allows one-frame no-grad steps to update it in
                place (the fused streaming kernel, allocation-free for CUDA graphs) when available.
            reset_every: the reset schedule, chosen by whoever runs the layer (training: the data's
                chunk length when the memory is not persistent; evaluation: its memory mode). None
                keeps the memory (persistent); P resets it to the learned initial weights every P
                tokens counted since the last reset, so that full-sequence, chunked and
                token-by-token runs reset at the same tokens.
        Returns:
            update [B, T, dim] to add to the residual stream, and the new state.
        """
        B, T, _ = x.shape
        if inplace and T == 1 and state is not None and impl == "auto" and not torch.is_grad_enabled() \
                and x.device.type == "cpu" and not self.config.rope and self.config.kernels != "triton":
            return self._cpu_step(x, state, exec_mask, reset_every), state
        fresh: TTTState | None = None
        if state is None:
            state = fresh = self.init_state(B)
        elif torch.is_grad_enabled():
            # Truncated BPTT with the gradient path of DESIGN.md section 4.
            state = carry_state(state, self.base_weights(), self.config.state_grad)
        old = state
        xq, xk, xv, lr = self.project(x, state.pos, state.conv, reset_every)
        new_tail = self.conv_tail(x, state.conv)
        # The operator's part of the state; the convolution's input tail is carried beside it and
        # is not touched by the periodic resets of non-persistent mode (it is local context, like
        # attention's keys), only by file/conversation resets.
        state = state.core()
        ln_w, ln_b, tok = self.ttt_norm_weight, self.ttt_norm_bias, self.token_idx()
        K, kern = self.config.mini_batch_size, self.config.kernels
        if inplace and T == 1 and impl == "auto" and not torch.is_grad_enabled():
            # Streaming (LMGen): update the caller's state in place, no host sync, no new state.
            if reset_every is not None:  # a sample that does not execute keeps its state exactly
                reset_state_(state, self.base_weights(), _reset_due(state.pos, reset_every, exec_mask))
            out = ttt_step_(xq, xk, xv, lr, ln_w, ln_b, state, K, tok, exec_mask=exec_mask, kernels=kern)
            if new_tail is not None:  # the convolution's tail, in place too
                _store_tail_(old.conv, new_tail, exec_mask)
            return self.readout(out), old

        if reset_every is not None:
            fresh = (fresh if fresh is not None else self.init_state(B, dtype=state.W1.dtype)).core()
        # The call in segments that end where a periodic reset is due (one segment when persistent).
        # A sample that does not execute gets its old state back below, resets included; in a
        # one-frame call its output, too, is computed without its due reset, as in the in-place step.
        outs, t = [], 0
        while t < T:
            n = T - t
            if reset_every is not None:
                state = reset_state(state, fresh, _reset_due(state.pos, reset_every, exec_mask if T == 1 else None))
                if T > 1:  # one-frame calls need no split (and no host sync: CUDA graphs)
                    n = min(n, int((reset_every - state.pos).min()))
            sl = slice(t, t + n)
            o, state = ttt_mlp(xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl],
                               ln_w, ln_b, state, K, tok, impl=impl, kernels=kern)
            outs.append(o)
            t += n
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if new_tail is not None:
            state = dataclasses.replace(state, conv=new_tail)
        if exec_mask is not None:
            # moshi rewrites its exec mask in place between calls; under autograd the selection
            # must keep its own copy (with state_grad: full the graph outlives this call).
            mask = exec_mask.clone() if torch.is_grad_enabled() else exec_mask
            state = select_state(mask, state, old)
        return self.readout(out), state

    # ------------------------------------------------------------------ one-frame step on CPU
    def _stream_weights(self) -> _StreamWeights:
        """The one-frame step's weights, fused (no grad): wq, wk, wv with their convolution taps
        and the lr gate as one matrix over the input window ``[B, k dim]`` (frames oldest first),
        the output gate folded into wo. Rebuilt whenever a parameter changes (its version counter)."""
        conv = self.conv_weight if self.config.short_conv > 1 else None
        params = (self.wq.weight, self.wk.weight, self.wv.weight, self.lr_gate.weight, self.lr_gate.bias,
                  self.wo.weight, self.gating_alpha, self.learnable_token_idx, conv)
        # In-place writes (optimizer steps, load_state_dict) bump the version; .to() moves the data.
        key = tuple((id(p), p.data_ptr(), p._version) for p in params if p is not None)
        cached = self.__dict__.get("_stream_cache")
        if cached is not None and cached.key == key:
            return cached
        with torch.no_grad():
            k, H = max(self.config.short_conv, 1), self.num_heads
            blocks = []
            for c, lin in enumerate((self.wq, self.wk, self.wv)):  # [E, k, dim]: tap j of frame j
                taps = conv[c].t() if conv is not None else lin.weight.new_ones(1, self.dim)
                blocks.append(lin.weight.unsqueeze(1) * taps.unsqueeze(0))
            gate = self.lr_gate.weight.new_zeros(H, k, self.dim)
            gate[:, -1] = self.lr_gate.weight                    # the lr gate reads the current frame
            w_in = torch.cat([*blocks, gate]).flatten(1)         # [3E + H, k dim]
            b_in = torch.cat([self.lr_gate.bias.new_zeros(3 * self.inner_dim), self.lr_gate.bias])
            cached = _StreamWeights(key, w_in, b_in, self.gate().unsqueeze(1) * self.wo.weight,
                                    self.token_idx())
        self.__dict__["_stream_cache"] = cached  # a plain attribute: not a parameter, buffer or state
        return cached

    def _cpu_step(self, x: torch.Tensor, state: TTTState, exec_mask: torch.Tensor | None,
                  reset_every: int | None) -> torch.Tensor:
        """``forward`` for one frame per sample without autograd on CPU, ``state`` (the caller's)
        updated in place: the same math as ``project`` + ``ttt_step_`` + ``readout`` with the
        fused weights of ``_stream_weights``. At streaming sizes each op costs more than its
        arithmetic (a GPU runs the step as one CUDA graph instead). x [B, 1, dim] -> [B, 1, dim]."""
        B = x.shape[0]
        H, d, E = self.num_heads, self.head_dim, self.inner_dim
        sw = self._stream_weights()
        u = x if state.conv is None else torch.cat([state.conv.to(x.dtype), x], 1)   # [B, k, dim]
        proj = F.linear(u.reshape(B, -1), sw.w_in, sw.b_in)                           # [B, 3E + H]
        qk = proj[:, :2 * E].view(B, 2, H, 1, d)
        if self.config.qk_l2_norm:
            qk = F.normalize(qk, dim=-1)
        xv = proj[:, 2 * E:3 * E].view(B, H, 1, d)
        lr = torch.sigmoid(proj[:, 3 * E:]).mul_(self.config.base_lr / d).unsqueeze(-1)  # [B, H, 1]
        core = state.core()
        if reset_every is not None:  # a sample that does not execute keeps its state exactly
            reset_state_(core, self.base_weights(), _reset_due(core.pos, reset_every, exec_mask))
        out = ttt_step_(qk[:, 0], qk[:, 1], xv, lr, self.ttt_norm_weight, self.ttt_norm_bias, core,
                        self.config.mini_batch_size, sw.token_idx, exec_mask=exec_mask, kernels=self.config.kernels)
        if state.conv is not None:  # the convolution's tail, in place
            _store_tail_(state.conv, u[:, 1:], exec_mask)
        y = F.layer_norm(out.reshape(B, 1, E), (E,), self.post_norm.weight, self.post_norm.bias, self.post_norm.eps)
        return F.linear(y, sw.w_out)

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def state_drift(self, state: TTTState) -> torch.Tensor:
        """``|W_state - W_base| / |W_base|`` per sample, W1 and W2 together: [B]."""
        num = sum((s - b).flatten(1).pow(2).sum(1) for s, b in ((state.W1, self.W1), (state.W2, self.W2)))
        den = self.W1.pow(2).sum() + self.W2.pow(2).sum()
        return torch.sqrt(num / den.clamp_min(1e-30))
