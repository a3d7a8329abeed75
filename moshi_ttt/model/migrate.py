"""Migrate checkpoints of the earlier attempt (a moshi-finetune fork with a ``moshi_ttt`` package).

Its TTT layers stored the fast weights as parameters ``...W1``, ``...b1``, ``...W2``, ``...b2`` that
forward overwrote (so they hold the state after the last training chunk, the best estimate of a
learned initial memory there is), some versions as ``W1_base`` plus runtime buffers ``W1_state``.
We map them, and the other TTT parameters whose meaning is the same, onto our learned initial
weights ``transformer.layers.{i}.ttt.layer.<name>``; runtime-state buffers are dropped; every
other legacy TTT key is reported as left, never silently ignored. Base-model keys pass through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

OUR_PREFIX = "transformer.layers.{i}.ttt.layer."

# legacy leaf name -> our parameter name (under OUR_PREFIX), with an optional reshape
_DIRECT = {
    "W1": "W1", "b1": "b1", "W2": "W2", "b2": "b2",
    "W1_base": "W1", "b1_base": "b1", "W2_base": "W2", "b2_base": "b2",
    "ttt_norm_weight": "ttt_norm_weight", "ttt_norm_bias": "ttt_norm_bias",
    "learnable_token_idx": "learnable_token_idx", "gating_alpha": "gating_alpha",
    "wq.weight": "wq.weight", "wk.weight": "wk.weight", "wv.weight": "wv.weight", "wo.weight": "wo.weight",
    "q_proj.weight": "wq.weight", "k_proj.weight": "wk.weight", "v_proj.weight": "wv.weight",
    "o_proj.weight": "wo.weight", "post_norm.weight": "post_norm.weight", "post_norm.bias": "post_norm.bias",
    # ttt-lm-pytorch layout: [H, 1, width] and [H, 1, 1]
    "learnable_ttt_lr_weight": "lr_gate.weight", "learnable_ttt_lr_bias": "lr_gate.bias",
}
_RUNTIME = re.compile(r"(_state|_states|_states_per_batch|state_initialized|batch_state_initialized)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A key belongs to the legacy TTT if a path component says so.
_TTT_HINT = re.compile(r"(^|\.)(ttt|hybrid|seq_modeling_block|ttt_layer|ttt_mlp)[^.]*\.|\.(W[12]|b[12])(_base)?$")


@dataclass
class MigrationReport:
    mapped: dict[str, str] = field(default_factory=dict)   # legacy key -> our key
    dropped: list[str] = field(default_factory=list)      # runtime state buffers
    left: dict[str, str] = field(default_factory=dict)    # legacy TTT key -> why it was not used
    passthrough: int = 0                                  # base-model keys kept as they are

    def summary(self) -> str:
        lines = [f"migrated {len(self.mapped)} TTT tensor(s), dropped {len(self.dropped)} runtime "
                 f"buffer(s), left {len(self.left)}, kept {self.passthrough} base key(s)"]
        lines += [f"  mapped  {a} -> {b}" for a, b in self.mapped.items()]
        lines += [f"  dropped {k} (runtime state, not a parameter)" for k in self.dropped]
        lines += [f"  left    {k}: {why}" for k, why in self.left.items()]
        return "\n".join(lines)


def migrate_legacy_state_dict(
    legacy: dict[str, torch.Tensor], target: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], MigrationReport]:
    """Map a legacy state dict onto our key layout.

    Args:
        legacy: the old checkpoint's state dict.
        target: our model's state dict (or any dict of tensors with the right shapes); when given,
            shapes are checked and mismatches are reported as left.
    Returns:
        (new state dict, report). A key that two legacy keys map onto (``W1`` and ``W1_base``) takes
        ``W1_base`` (the learned initial weights of the earlier attempt's proposed fix) and reports the other.
    """
    out: dict[str, torch.Tensor] = {}
    rep = MigrationReport()
    # Prefer the *_base variant when both exist.
    ordered = sorted(legacy, key=lambda k: (0 if k.endswith("_base") else 1, k))
    for key in ordered:
        t = legacy[key]
        m = _LAYER.search(key)
        leaf = next((name for name in sorted(_DIRECT, key=len, reverse=True)
                     if key.endswith("." + name) or key == name), None)
        is_ttt = bool(_TTT_HINT.search(key)) or leaf in ("learnable_token_idx", "ttt_norm_weight")
        if not is_ttt:
            out[key] = t
            rep.passthrough += 1
            continue
        if _RUNTIME.search(key):
            rep.dropped.append(key)
            continue
        if m is None or leaf is None:
            rep.left[key] = "no layer index or unknown TTT parameter name"
            continue
        ours = OUR_PREFIX.format(i=int(m.group(1))) + _DIRECT[leaf]
        if leaf == "learnable_ttt_lr_weight":
            t = t.reshape(t.shape[0], -1)
        elif leaf == "learnable_ttt_lr_bias":
            t = t.reshape(-1)
        if ours in out:
            rep.left[key] = f"{ours} already filled from another legacy key"
            continue
        if target is not None:
            if ours not in target:
                rep.left[key] = f"{ours} does not exist in the model (no TTT in layer {m.group(1)}?)"
                continue
            if tuple(target[ours].shape) != tuple(t.shape):
                rep.left[key] = f"shape {tuple(t.shape)} != model's {tuple(target[ours].shape)} for {ours}"
                continue
        out[ours] = t
        rep.mapped[key] = ours
    return out, rep
