"""Computed cost of a TTT configuration against stock Moshi, with no weights and no GPU.

``moshi-ttt bench cost --preset 7b [CONFIG] [--json]`` builds the stock and the TTT model on
PyTorch's meta device (shapes only: seconds on a CPU) and prints, side by side with ratios:

* parameters, total and trainable;
* bytes moved by one ``LMGen.step`` (one frame) at batch 1 and 8: weights, KV cache, TTT state;
* FLOPs per training frame;
* fast-weight state bytes per stream;
* estimated training memory per GPU for DDP and FSDP on 1 and 8 GPUs for one chunk length.

It is how a user picks a configuration before renting a GPU. The model behind every figure:

Streaming step (the step is bandwidth bound at small batch, so bytes are its cost):
    weights: every parameter is read once per frame (the depformer's per-step weights too: each
        of its dep_q steps reads its own slice), except embedding tables, of which only the looked-up
        rows are read (B rows per table), and the TTT layers' learned initial fast weights
        W1, b1, W2, b2, read only at a reset;
    KV cache: each attention layer reads its whole ring (moshi attends over the full capacity with
        a mask: ``context`` entries for the temporal transformer, ``depformer_context`` for each of
        the dep_q depformer steps) and writes one key and value, per stream;
    TTT state: the fused streaming step reads the mini-batch-start fast weights W0 and the running
        gradient sums G, writes G, and writes W every ``mini_batch_size`` frames (DESIGN.md s. 8);
        state in float32 under a bf16 model, per stream.
FLOPs per frame (2 per multiply-add, matrix products only):
    every linear weight once per frame (as above; depformer weights shared across steps count
    dep_q times); attention 4 * dim * keys per layer with ``context`` keys per query in the
    temporal transformer and k keys at depformer step k; the TTT dual form per token and head:
    9 d F + 2 K (d + F) multiply-adds (three products with each of W1, W2 and their running sums,
    the two inner gradients, and the causal K x K products inside a mini-batch of K).
    Training = 3 x forward (the backward's two products per forward product; an upper bound when
    only TTT is trained).
Training memory per GPU (an estimate, +-30%: allocator slack, temporary buffers and CUDA context
are not counted):
    weights in the model dtype; gradients of the trainable parameters in the same dtype (DDP keeps
    a second copy in its reducer buckets); AdamW's two states per trainable parameter in the
    parameter dtype (torch.optim.AdamW); FSDP (train/fsdp.py's plan) shards all three for the
    temporal layers and the depformer over the GPUs, keeps the TTT/LoRA parameters, float32 norm
    scales and model-level embeddings and heads replicated, and holds two unsharded units at a time
    (all-gather and prefetch; the depformer is one unit);
    activations per lane: the layers autograd saves (all of them when the base is trained, else
    from the first TTT layer up): per frame 8 dim + 3 hidden values per layer (norm inputs, q, k,
    v, attention output, the gated feed-forward's two products), for a TTT layer also
    2 dim + 12 E (model dtype) + 5 H F (fp32 inner activations) values and the four fast-weight
    tensors the dual form saves per mini-batch (fp32); the depformer's dep_q tokens per frame;
    text and audio logits (model dtype and the fp32 copy of the loss); the carried KV cache
    (context + chunk frames).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.build import build_lm, ttt_blocks
from ..model.presets import mid_lm_kwargs, moshi_7b_lm_kwargs, moshi_7b_ttt_kwargs, tiny_lm_kwargs
from ..records import dump
from ..ttt.config import TTTConfig

PRESETS = {"tiny": tiny_lm_kwargs, "mid": mid_lm_kwargs, "7b": moshi_7b_lm_kwargs}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class CostConfig:
    """What the estimate is for (a train config's relevant fields)."""

    preset: str = "7b"
    ttt: TTTConfig = field(default_factory=lambda: TTTConfig(**moshi_7b_ttt_kwargs()))
    dtype: str = "bf16"
    chunk_frames: int = 750
    lanes: int = 1               # streams (batch) per GPU in training
    trainable: str = "ttt"       # "ttt" or "full"
    gen_batches: tuple[int, ...] = (1, 8)
    gpus: tuple[int, ...] = (1, 8)


# ----------------------------------------------------------------------------- model inspection
def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ttt_base_names(model: nn.Module) -> set[str]:
    """Names of the learned initial fast weights (read only when a memory is reset)."""
    out = set()
    for i in ttt_blocks(model):
        out |= {f"transformer.layers.{i}.ttt.layer.{n}" for n in ("W1", "b1", "W2", "b2")}
    return out


def _state_dtype(model: nn.Module) -> torch.dtype:
    blocks = ttt_blocks(model)
    return next(iter(blocks.values())).state_dtype if blocks else torch.float32


def ttt_state_numel(model: nn.Module) -> tuple[int, int]:
    """(fast-weight elements W1+b1+W2+b2 per stream, summed over TTT layers; TTT layers)."""
    n = 0
    for b in ttt_blocks(model).values():
        n += sum(w.numel() for w in b.layer.base_weights())
    return n, len(ttt_blocks(model))


def _attn_modules(model: nn.Module):
    """(temporal attention modules, depformer attention modules)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    temporal = [m for m in model.transformer.modules() if isinstance(m, StreamingMultiheadAttention)]
    dep = [m for m in model.depformer.modules() if isinstance(m, StreamingMultiheadAttention)] \
        if getattr(model, "depformer", None) is not None else []
    return temporal, dep


def _capacity(m) -> int:
    """Entries of an attention module's streaming KV ring (moshi: ``context``, or the number of
    weight steps when the depformer has no context)."""
    return m.context if m.context is not None else m.weights_per_step


def step_bytes(model: nn.Module, B: int) -> dict[str, int]:
    """Bytes read and written by one streaming step (one frame) at batch ``B``."""
    base = _ttt_base_names(model)
    emb_names = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    weights = 0
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if name in base:
            continue
        if owner in emb_names:  # B looked-up rows
            weights += B * p.shape[1] * p.element_size()
        else:
            weights += _bytes(p)
    esize = next(p for n, p in model.named_parameters() if n.endswith("in_projs.0.weight")).element_size()
    temporal, dep = _attn_modules(model)
    kv_read = kv_write = 0
    for m in temporal:
        kv_read += 2 * m.context * m.embed_dim * esize
        kv_write += 2 * m.embed_dim * esize
    dep_q = model.dep_q
    for m in dep:  # the depformer runs dep_q steps per frame, each over its whole ring
        kv_read += dep_q * 2 * _capacity(m) * m.embed_dim * esize
        kv_write += dep_q * 2 * m.embed_dim * esize
    w_numel, _ = ttt_state_numel(model)
    sb = torch.empty((), dtype=_state_dtype(model)).element_size()
    K = model.ttt_config.mini_batch_size if ttt_blocks(model) else 1
    state_read = 2 * w_numel * sb                       # W0 and the running sums G
    state_write = w_numel * sb + (w_numel * sb) // K    # G every frame, W every K frames
    return {"weights": weights, "kv_read": B * kv_read, "kv_write": B * kv_write,
            "ttt_state_read": B * state_read, "ttt_state_write": B * state_write,
            "total": weights + B * (kv_read + kv_write + state_read + state_write)}


def ttt_inner_macs_per_token(H: int, d: int, K: int) -> int:
    """Multiply-adds of the TTT dual form per token and layer (see the module docstring)."""
    F = 4 * d
    return H * (9 * d * F + 2 * K * (d + F))


def forward_flops_per_frame(model: nn.Module) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add, matrix products only) for one frame of one stream."""
    dep_q = model.dep_q
    linear = 0
    temporal, dep = _attn_modules(model)
    dep_shared = bool(dep) and not dep[0].weights_per_step
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            mult = dep_q if (dep_shared and name.startswith("depformer.")) else 1
            linear += 2 * m.weight.numel() * mult
    attn = sum(4 * m.embed_dim * m.context for m in temporal)
    attn += sum(4 * m.embed_dim * min(k, _capacity(m)) for m in dep for k in range(1, dep_q + 1))
    inner = 0
    for b in ttt_blocks(model).values():
        lay = b.layer
        inner += 2 * ttt_inner_macs_per_token(lay.num_heads, lay.head_dim, lay.config.mini_batch_size)
    return {"linear": linear, "attention": attn, "ttt_inner": inner, "total": linear + attn + inner}


def train_memory(model: nn.Module, cfg: CostConfig, gpus: int, mode: str,
                 trainable_set: str | None = None) -> dict[str, float]:
    """Estimated training memory per GPU in bytes (see the module docstring for the model)."""
    from ..model.weights import trainable_names

    which = trainable_set or cfg.trainable
    params = dict(model.named_parameters())
    trainable = set(trainable_names(model, which))
    W = sum(_bytes(p) for p in params.values())
    G = sum(_bytes(params[n]) for n in trainable)
    opt = 2 * G
    esize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    C, lanes = cfg.chunk_frames, cfg.lanes
    layers = model.transformer.layers
    dim = model.dim
    hidden = layers[0].gating.linear_out.weight.shape[1] if getattr(layers[0], "gating", None) is not None \
        else 4 * dim
    blocks = ttt_blocks(model)
    first = 0 if which == "full" else (min(blocks) if blocks else len(layers))
    per_frame = 0.0
    for i in range(first, len(layers)):
        per_frame += (8 * dim + 3 * hidden) * esize
        if i in blocks:
            lay = blocks[i].layer
            H, d, K = lay.num_heads, lay.head_dim, lay.config.mini_batch_size
            E, F = H * d, 4 * d
            per_frame += (2 * dim + 12 * E) * esize + 5 * H * F * 4
            per_frame += 4 * H * d * F * 4 / K     # W1, W2, gW1, gW2 saved per mini-batch (fp32)
    dep_layers = len(model.depformer.layers) if getattr(model, "depformer", None) is not None else 0
    if dep_layers:
        dd = model.depformer.layers[0].self_attn.embed_dim
        per_frame += model.dep_q * dep_layers * (8 * dd + 3 * 4 * dd) * esize
    logits = (model.text_card + model.dep_q * model.card) * (esize + 4)
    act = lanes * C * (per_frame + logits)
    kv = lanes * 2 * len(layers) * (layers[0].self_attn.context + C) * dim * esize
    out: dict[str, float] = {"activations": act, "kv_cache": kv}
    if mode == "ddp":
        out.update(weights=W, grads=2 * G, optimizer=opt)
    else:
        # The plan of train/fsdp.py: layers and depformer sharded; TTT, LoRA, odd-dtype and
        # model-level parameters (embeddings, output heads) replicated.
        from ..train.fsdp import fsdp_units, sharded_parameter_names

        sharded = sharded_parameter_names(model)
        Ws = sum(_bytes(p) for n, p in params.items() if n in sharded)
        Gs = sum(_bytes(params[n]) for n in trainable if n in sharded)
        unit = max(sum(_bytes(p) for p in u.parameters()) for u in fsdp_units(model))
        out.update(weights=(W - Ws) + Ws / gpus + 2 * unit, grads=(G - Gs) + Gs / gpus,
                   optimizer=2 * (G - Gs) + 2 * Gs / gpus)
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- report
def build_pair(cfg: CostConfig) -> tuple[nn.Module, nn.Module]:
    """Stock and TTT models on the meta device (no memory, no weights)."""
    kw = PRESETS[cfg.preset]()
    dtype = DTYPES[cfg.dtype]
    stock = build_lm(kw, TTTConfig(layers="none"), device="meta", dtype=dtype)
    ttt = build_lm(kw, cfg.ttt, device="meta", dtype=dtype)
    return stock, ttt


def analyse(model: nn.Module, cfg: CostConfig, trainable_set: str) -> dict[str, Any]:
    from ..model.weights import trainable_names

    params = dict(model.named_parameters())
    w_numel, n_layers = ttt_state_numel(model)
    sb = torch.empty((), dtype=_state_dtype(model)).element_size()
    fwd = forward_flops_per_frame(model)
    res: dict[str, Any] = {
        "ttt_layers": sorted(ttt_blocks(model)),
        "params_total": sum(p.numel() for p in params.values()),
        "trainable_set": trainable_set,
        "params_trainable": sum(params[n].numel() for n in trainable_names(model, trainable_set)),
        "params_ttt": sum(p.numel() for n, p in params.items() if ".ttt." in n),
        "step_bytes": {str(B): step_bytes(model, B) for B in cfg.gen_batches},
        "flops_forward_per_frame": fwd,
        "flops_train_per_frame": 3 * fwd["total"],
        # W and the running sums (same shapes) plus the int64 position, per layer.
        "state_bytes_per_stream": 2 * w_numel * sb + 8 * n_layers,
        "train_memory": {f"{mode}_{n}gpu": train_memory(model, cfg, n, mode, trainable_set)
                         for mode in ("ddp", "fsdp") for n in cfg.gpus},
    }
    return res


def run(cfg: CostConfig) -> dict[str, Any]:
    stock, ttt = build_pair(cfg)
    # Stock Moshi has no TTT to train: when only TTT is trained, its reference is moshi-finetune's
    # full fine-tune (the alternative a user weighs).
    s = analyse(stock, cfg, "full" if cfg.trainable == "ttt" else cfg.trainable)
    t = analyse(ttt, cfg, cfg.trainable)
    ttt_block = next(iter(ttt_blocks(ttt).values()), None)
    width = ({"num_heads": ttt_block.layer.num_heads, "head_dim": ttt_block.layer.head_dim}
             if ttt_block is not None else None)
    ratios = {
        "params_added_fraction": t["params_ttt"] / s["params_total"],
        **{f"step_bytes_B{B}": t["step_bytes"][str(B)]["total"] / s["step_bytes"][str(B)]["total"]
           for B in cfg.gen_batches},
        "flops_train_per_frame": t["flops_train_per_frame"] / s["flops_train_per_frame"],
    }
    return {"config": dump(cfg), "ttt_width": width, "stock": s, "ttt": t, "ratios": ratios}


def _fmt_n(x: float) -> str:
    for unit, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= k:
            return f"{x / k:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_b(x: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= k:
            return f"{x / k:.3g} {unit}"
    return f"{x:.0f} B"


def format_table(res: dict[str, Any]) -> str:
    c, s, t = res["config"], res["stock"], res["ttt"]
    w = res["ttt_width"]
    lines = [
        f"moshi-ttt cost (computed on the meta device): preset {c['preset']}, {c['dtype']}, "
        f"TTT in layers {t['ttt_layers']}"
        + (f", {w['num_heads']} heads x {w['head_dim']} (inner width {w['num_heads'] * w['head_dim']})"
           if w else ""),
        f"training: chunk {c['chunk_frames']} frames, {c['lanes']} lane(s) per GPU, trainable: "
        f"stock {s['trainable_set']}, moshi-ttt {t['trainable_set']}",
        f"{'measure':44s}{'stock':>12s}{'moshi-ttt':>12s}{'ratio':>9s}",
    ]

    def row(name, a, b, fmt=_fmt_n):
        ratio = f"{b / a:8.3f}x" if a else "      n/a"
        lines.append(f"{name:44s}{fmt(a):>12s}{fmt(b):>12s}{ratio}")

    row("parameters, total", s["params_total"], t["params_total"])
    row("parameters, trainable", s["params_trainable"], t["params_trainable"])
    lines.append(f"{'  TTT parameters added':44s}{'':>12s}{_fmt_n(t['params_ttt']):>12s}"
                 f"{100 * res['ratios']['params_added_fraction']:8.2f}% of stock")
    for B, sb in s["step_bytes"].items():
        tb = t["step_bytes"][B]
        row(f"LMGen.step bytes, B={B}: total", sb["total"], tb["total"], _fmt_b)
        row("  weights read", sb["weights"], tb["weights"], _fmt_b)
        row("  KV cache read + written", sb["kv_read"] + sb["kv_write"], tb["kv_read"] + tb["kv_write"], _fmt_b)
        lines.append(f"{'  TTT state read / written':44s}{'0':>12s}"
                     f"{_fmt_b(tb['ttt_state_read']) + ' / ' + _fmt_b(tb['ttt_state_write']):>21s}")
    row("FLOPs per training frame (3 x fwd)", s["flops_train_per_frame"], t["flops_train_per_frame"])
    lines.append(f"{'fast-weight state per stream':44s}{'0':>12s}{_fmt_b(t['state_bytes_per_stream']):>12s}")
    for key, st in s["train_memory"].items():
        mode, n = key.split("_")
        row(f"train memory per GPU, {mode.upper()} {n.replace('gpu', '')} GPU(s)", st["total"],
            t["train_memory"][key]["total"], _fmt_b)
    tm = t["train_memory"]["ddp_1gpu"]
    lines.append("  (moshi-ttt, DDP 1 GPU: " + ", ".join(f"{k} {_fmt_b(v)}" for k, v in tm.items()
                                                          if k != "total") + ")")
    return "\n".join(lines)


def _preset_defaults(preset: str) -> dict[str, Any]:
    """The train-config fields the cost depends on, at their defaults for ``preset``."""
    if preset == "7b":
        return {"ttt": moshi_7b_ttt_kwargs(), "model": {"dtype": "bf16"},
                "data": {"chunk_frames": 750, "lanes": 1}, "trainable": "ttt"}
    return {"ttt": {"layers": "middle"}, "model": {"dtype": "fp32"},
            "data": {"chunk_frames": 64, "lanes": 1}, "trainable": "ttt"}


def config_from_train_yaml(path: str | None, preset: str, overrides: list[str] | None = None) -> CostConfig:
    """A ``CostConfig`` from a train config (its ttt section, chunk, lanes, dtype, trainable); the
    architecture comes from ``preset`` (a local config.json is not read: the cost is for a shape).
    Without a config: the preset's defaults (7B: ``moshi_7b_ttt_kwargs``), then ``overrides``."""
    from ..records import load
    from ..train.config import ConfigError, TrainConfig, apply_overrides, read_yaml

    data = read_yaml(path) if path is not None else _preset_defaults(preset)
    tc = load(TrainConfig, apply_overrides(data, overrides or []), error=ConfigError)
    if tc.trainable not in ("ttt", "full"):
        raise ValueError(f"bench cost: trainable={tc.trainable!r} is not modelled (use 'ttt' or 'full')")
    return CostConfig(preset=preset, ttt=tc.ttt, dtype=tc.model.dtype, chunk_frames=tc.data.chunk_frames,
                      lanes=tc.data.lanes, trainable=tc.trainable)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="a train config YAML (its ttt, data, model.dtype, "
                   "trainable); default: the preset's default TTT layout")
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b", help="architecture (default 7b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def main_args(args: argparse.Namespace) -> int:
    res = run(config_from_train_yaml(args.config, args.preset, args.set))
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0
