"""`moshi-ttt bench cost` against counts made by hand from the tiny preset's architecture numbers.

Nothing here calls the counting code to get an expected value: the expected parameters, bytes and
FLOPs are written out from moshi's layer structure (what each layer holds) and the cost model of
``moshi_ttt/bench/cost.py``'s docstring. The TTT inner FLOP formula is checked against PyTorch's
own FLOP counter running the dual form.
"""

import pytest
import torch

from moshi_ttt import TTTConfig
from moshi_ttt.bench.cost import CostConfig, config_from_train_yaml, format_table, run

# tiny_lm_kwargs(): width 64, 4 layers, 4 heads, context 32, hidden_scale 4.125 (gated SiLU:
# hidden = 4.125 * 64 * 2 / 3 = 176), n_q 4 (dep_q 2), card 64, text_card 64; depformer width 32,
# feed-forward 132 (hidden 88), 2 layers, context 2, weights per step.
DIM, L, CTX, HID, NQ, DEPQ, CARD, TCARD = 64, 4, 32, 176, 4, 2, 64, 64
DD, DHID, DL, DCTX = 32, 88, 2, 2
# TTT: layers 1 and 2, 2 heads of 8 (inner width 16, host width 64), mini-batch 4.
H, d, K, TL = 2, 8, 4, [1, 2]
E, F = H * d, 4 * d
FP32 = 4


def hand_counts():
    emb = NQ * (CARD + 1) * DIM + (TCARD + 1) * DIM                  # audio + text tables
    dep_emb = (DEPQ - 1) * (CARD + 1) * DD + (TCARD + 1) * DD
    layer_lin = 4 * DIM * DIM + 3 * DIM * HID                         # qkv, out; gating in (2x), out
    layer = layer_lin + 2 * DIM                                       # two RMS norms
    dep_layer_lin = DEPQ * (4 * DD * DD + 3 * DD * DHID)              # weights per step
    dep_layer = dep_layer_lin + 2 * DD
    other_lin = DIM * TCARD + DEPQ * DIM * DD + DEPQ * DD * CARD      # text_linear, depformer_in, linears
    stock = emb + dep_emb + L * layer + DL * dep_layer + other_lin + DIM  # + out_norm
    fast = H * d * F + H * F + H * F * d + H * d                      # W1 b1 W2 b2
    ttt_lin = 4 * DIM * E + DIM * H                                   # wq wk wv wo, lr_gate
    ttt_layer = ttt_lin + H + DIM + K + 2 * H * d + fast + 2 * E + DIM  # +bias, norm, tok, ln, post, gate
    n_ttt = len(TL)
    return dict(stock=stock, ttt=stock + n_ttt * ttt_layer, ttt_added=n_ttt * ttt_layer, fast=fast,
                fsdp_sharded=L * layer + DL * dep_layer,
                emb=emb + dep_emb, ttt_lin=ttt_lin, layer_lin=layer_lin, dep_layer_lin=dep_layer_lin,
                other_lin=other_lin)


@pytest.fixture(scope="module")
def report():
    cfg = CostConfig(preset="tiny", ttt=TTTConfig(layers=TL, num_heads=H, head_dim=d, mini_batch_size=K),
                     dtype="fp32", chunk_frames=16, lanes=2, trainable="ttt", gen_batches=(1, 8), gpus=(1, 8))
    return run(cfg)


def test_parameter_counts(report):
    h = hand_counts()
    assert report["stock"]["params_total"] == h["stock"]
    assert report["ttt"]["params_total"] == h["ttt"]
    assert report["ttt"]["params_trainable"] == h["ttt_added"] == report["ttt"]["params_ttt"]
    assert report["stock"]["params_trainable"] == h["stock"]  # stock reference: full fine-tune
    assert report["ratios"]["params_added_fraction"] == pytest.approx(h["ttt_added"] / h["stock"])
    assert report["ttt_width"] == {"num_heads": H, "head_dim": d}


@pytest.mark.parametrize("B", [1, 8])
def test_streaming_step_bytes(report, B):
    h = hand_counts()
    emb_rows = B * (NQ + 1) * DIM + B * DEPQ * DD                    # one row per table per stream
    weights_stock = (h["stock"] - h["emb"]) * FP32 + emb_rows * FP32
    weights_ttt = weights_stock + (h["ttt_added"] - len(TL) * h["fast"]) * FP32  # initial W not read
    kv_read = L * 2 * CTX * DIM * FP32 + DL * DEPQ * 2 * DCTX * DD * FP32
    kv_write = L * 2 * DIM * FP32 + DL * DEPQ * 2 * DD * FP32
    fast_bytes = len(TL) * h["fast"] * FP32
    s, t = report["stock"]["step_bytes"][str(B)], report["ttt"]["step_bytes"][str(B)]
    assert s["weights"] == weights_stock and t["weights"] == weights_ttt
    assert s["kv_read"] == t["kv_read"] == B * kv_read
    assert s["kv_write"] == t["kv_write"] == B * kv_write
    assert s["ttt_state_read"] == 0 and t["ttt_state_read"] == B * 2 * fast_bytes
    assert t["ttt_state_write"] == B * (fast_bytes + fast_bytes // K)
    assert t["total"] == weights_ttt + B * (kv_read + kv_write + 2 * fast_bytes + fast_bytes + fast_bytes // K)
    assert report["ttt"]["state_bytes_per_stream"] == 2 * fast_bytes + 8 * len(TL)


def test_flops_per_frame(report):
    h = hand_counts()
    lin = 2 * (L * h["layer_lin"] + DL * h["dep_layer_lin"] + h["other_lin"])
    attn = L * 4 * DIM * CTX + DL * 4 * DD * (1 + 2)                  # depformer steps see 1, 2 keys
    inner = len(TL) * 2 * H * (9 * d * F + 2 * K * (d + F))
    s, t = report["stock"]["flops_forward_per_frame"], report["ttt"]["flops_forward_per_frame"]
    assert s == {"linear": lin, "attention": attn, "ttt_inner": 0, "total": lin + attn}
    assert t["linear"] == lin + 2 * len(TL) * h["ttt_lin"] and t["ttt_inner"] == inner
    assert report["ttt"]["flops_train_per_frame"] == 3 * t["total"]


def test_ttt_inner_flop_formula_matches_torch_flop_counter():
    """9 d F + 2 K (d + F) multiply-adds per token and head: what the dual form really computes
    over full mini-batches, counted by torch.utils.flop_counter on the plain autograd form (the
    analytic-backward form fuses some products into baddbmm, which the counter sees differently)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moshi_ttt.ttt.ops import init_state, ttt_mlp

    B, T = 2, 3 * K
    x = [torch.randn(B, H, T, d) for _ in range(3)]
    lr = torch.rand(B, H, T)
    W1, b1, W2, b2 = torch.randn(H, d, F), torch.zeros(H, 1, F), torch.randn(H, F, d), torch.zeros(H, 1, d)
    st = init_state(W1, b1, W2, b2, B)
    with FlopCounterMode(display=False) as fc:
        ttt_mlp(*x, lr, torch.ones(H, d), torch.zeros(H, d), st, K, impl="dual_autograd")
    assert fc.get_total_flops() == B * T * 2 * H * (9 * d * F + 2 * K * (d + F))


def test_training_memory_parts(report):
    h = hand_counts()
    W, G = h["ttt"] * FP32, h["ttt_added"] * FP32
    ddp = report["ttt"]["train_memory"]["ddp_8gpu"]
    assert ddp["weights"] == W and ddp["grads"] == 2 * G and ddp["optimizer"] == 2 * G
    assert ddp["kv_cache"] == 2 * 2 * L * (CTX + 16) * DIM * FP32      # 2 lanes, keys and values
    # FSDP shards the temporal layers (TTT blocks excepted) and the depformer; the TTT parameters
    # (all the trainable ones here) and the model-level embeddings and heads stay replicated.
    fsdp = report["ttt"]["train_memory"]["fsdp_8gpu"]
    Ws = h["fsdp_sharded"] * FP32
    biggest_unit = (h["layer_lin"] + 2 * DIM + h["ttt_added"] // len(TL)) * FP32  # a layer with TTT
    assert fsdp["weights"] == pytest.approx(W - Ws + Ws / 8 + 2 * biggest_unit)
    assert fsdp["grads"] == G and fsdp["optimizer"] == 2 * G
    full = report["stock"]["train_memory"]["fsdp_8gpu"]            # stock reference: full fine-tune
    Gs = h["stock"] * FP32
    assert full["grads"] == pytest.approx(Gs - Ws + Ws / 8)
    for key, m in report["ttt"]["train_memory"].items():
        assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total")), key


def test_7b_default_meets_the_budget():
    """The default 7B layout: added parameters <= 2% of Moshi, streaming bytes <= 1.05x at B=1."""
    res = run(config_from_train_yaml(None, "7b"))
    assert res["stock"]["params_total"] == 7_687_729_152  # moshi 0.2.13's 7B config
    assert res["ratios"]["params_added_fraction"] <= 0.02
    assert res["ratios"]["step_bytes_B1"] <= 1.05
    assert "LMGen.step bytes, B=1" in format_table(res)


def test_7b_config_file_is_the_default_layout():
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "moshi7b_finetune.yaml"
    from_file = config_from_train_yaml(str(path), "7b")
    default = config_from_train_yaml(None, "7b")
    assert from_file.ttt.to_dict() == default.ttt.to_dict()
    assert (from_file.chunk_frames, from_file.lanes, from_file.dtype) == (750, 1, "bf16")


@pytest.mark.parametrize("interleave", [True, False])
def test_bench_model_runs_at_another_inner_width(interleave):
    """`bench model` builds its TTT arm with the requested inner width (tiny, seconds), with the
    arms measured in alternation (CPU default) or one after the other."""
    from moshi_ttt.bench.model import ModelBenchConfig, format_table
    from moshi_ttt.bench.model import run as run_model

    res = run_model(ModelBenchConfig(preset="tiny", seq_len=16, train_iters=1, warmup=0, gen_batches=[1],
                                     gen_steps=2, ttt_heads=H, ttt_head_dim=d, ttt_layers=TL,
                                     mini_batch_size=K, interleave=interleave))
    assert res["interleaved"] == interleave
    h = hand_counts()
    assert res["ttt"]["num_heads"] == H and res["ttt"]["head_dim"] == d
    assert res["arms"]["ttt"]["params_m"] * 1e6 == pytest.approx(h["ttt"])
    assert {"train_fwd_bwd_time", "lmgen_step_B1"} <= set(res["ratios"])
    assert f"{H} heads x {d}" in format_table(res)
