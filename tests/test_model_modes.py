"""Moshi with TTT: one function in three execution modes (DESIGN.md section 5), per-sample
streaming state, LMGen, gradients of the chunked mode."""

import pytest
import torch
from model_helpers import D, random_codes, stream_text, tiny_ttt_model
from moshi.models import LMGen, loaders
from moshi.modules.transformer import StreamingTransformerLayer

from moshi_ttt import TTTConfig, build_lm, tiny_lm_kwargs
from moshi_ttt.model.build import ttt_blocks
from moshi_ttt.model.hybrid import memory_schedule
from moshi_ttt.model.weights import load_state_into

# TTT inner width: the host's (4 heads of 16 = 64) and a narrow one (2 heads of 8 = 16) that
# differs from the host width 64.
WIDTHS = [{}, {"num_heads": 2, "head_dim": 8}]
WIDTH_IDS = ["host", "narrow16"]


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("short_conv,placement", [(0, "after_attention"), (3, "after_attention"),
                                                  (3, "before_attention")])
def test_full_chunked_and_frame_by_frame_agree(persistent, width, short_conv, placement):
    model = tiny_ttt_model(context=8, short_conv=short_conv, placement=placement, **width)
    if width:
        assert ttt_blocks(model)[0].layer.wq.weight.shape == (16, 64)
    seq = random_codes(2, 45, model)
    with memory_schedule(None if persistent else 10):  # the reset schedule of every call and session
        full, full_logits = model.forward_text(seq)
        chunked = stream_text(model, seq, (7, 13, 1, 19, 5))  # > context, inside TTT mini-batches
        frames = stream_text(model, seq, [1] * 45)              # the ring (8) wraps 5 times
    assert (chunked - full).abs().max() < 1e-9
    assert (frames - full).abs().max() < 1e-9
    # Under autograd (the training path) the values are the same.
    with torch.enable_grad(), memory_schedule(None if persistent else 10):
        model.train()
        chunked_grad = stream_text(model, seq, (7, 13, 1, 19, 5))
    assert (chunked_grad - full).abs().max() < 1e-9


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_memory_matters_in_the_parity_check(width):
    """Guard against a vacuous parity test: the TTT blocks change the outputs."""
    model = tiny_ttt_model(context=8, **width)
    seq = random_codes(2, 30, model)
    with_ttt, _ = model.forward_text(seq)
    for block in ttt_blocks(model).values():
        torch.nn.init.zeros_(block.layer.gating_alpha)
    without, _ = model.forward_text(seq)
    assert (with_ttt - without).abs().max() > 1e-3


def test_zero_gate_equals_stock_moshi():
    kw = tiny_lm_kwargs(context=8)
    torch.manual_seed(0)
    stock = loaders.get_moshi_lm(None, lm_kwargs=kw, device="cpu", dtype=D).eval()
    model = build_lm(kw, TTTConfig(layers="all", initial_gating_alpha=0.0), dtype=D).eval()
    load_state_into(model, stock.state_dict(), "stock")
    codes = random_codes(2, 20, model)
    a, b = stock(codes), model(codes)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())
    assert torch.equal(stream_text(stock, codes, [1] * 20), stream_text(model, codes, [1] * 20))


@pytest.mark.parametrize("cfg", [TTTConfig(layers="none"), TTTConfig(enable=False)])
def test_no_ttt_layer_is_stock_moshi(cfg):
    model = build_lm(tiny_lm_kwargs(), cfg)
    assert all(type(layer) is StreamingTransformerLayer for layer in model.transformer.layers)
    assert not any(".ttt." in n for n, _ in model.named_parameters())


def test_layer_selection():
    model = build_lm(tiny_lm_kwargs(num_layers=8), TTTConfig(layers="middle"))
    assert sorted(ttt_blocks(model)) == [2, 3, 4, 5]


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("short_conv", [0, 3])
def test_reset_streaming_mask_is_per_sample(width, short_conv):
    model = tiny_ttt_model(short_conv=short_conv, **width)
    seq = random_codes(2, 30, model)
    with model.streaming(2):
        for t in range(20):
            model.forward_text(seq[..., t:t + 1])
        model.reset_streaming(torch.tensor([False, True]))
        after = torch.cat([model.forward_text(seq[..., t:t + 1])[0] for t in range(20, 30)], 1)
    cont = stream_text(model, seq, [1] * 30)[:, 20:]
    fresh = stream_text(model, seq[1:, :, 20:], [1] * 10)
    assert (after[0] - cont[0]).abs().max() < 1e-12      # untouched sample continues
    assert (after[1:] - fresh).abs().max() < 1e-12        # reset sample == a fresh stream


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("short_conv", [0, 3])
def test_exec_mask_is_per_sample(width, short_conv):
    model = tiny_ttt_model(short_conv=short_conv, **width)
    seq = random_codes(2, 30, model)
    junk = random_codes(2, 6, model, seed=7)
    with model.streaming(2):
        outs = [model.forward_text(seq[..., t:t + 1])[0] for t in range(12)]
        model.set_exec_mask(torch.tensor([True, False]))
        for t in range(6):  # sample 1 does not execute these frames
            model.forward_text(torch.where(torch.tensor([False, True]).view(2, 1, 1),
                                           junk[..., t:t + 1], seq[..., 12 + t:13 + t]))
        model.set_exec_mask(torch.tensor([True, True]))
        for t in range(18, 30):
            outs.append(model.forward_text(seq[..., t:t + 1])[0])
    masked = torch.cat(outs, 1)[1:]                        # sample 1 skipped frames 12..17
    skipped = torch.cat([seq[1:, :, :12], seq[1:, :, 18:]], -1)
    never_saw = stream_text(model, skipped, [1] * 24)
    assert (masked - never_saw).abs().max() < 1e-12


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_lmgen_runs_past_context_and_memory_matches_chunked(width):
    model = tiny_ttt_model(context=8, dtype=torch.float32, **width)
    inputs = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    gen = LMGen(model, temp=0.8, temp_text=0.8)
    user = random_codes(2, 210, model)[:, 1 + model.dep_q:]
    produced = 0
    with gen.streaming(2):
        for t in range(210):
            out = gen.step(user[..., t:t + 1])
            if out is not None:
                assert out.shape == (2, 1 + model.dep_q, 1)
                produced += 1
        mem_gen = {i: b._streaming_state.memory.clone() for i, b in ttt_blocks(model).items()}
    hook.remove()
    assert produced >= 200
    x = torch.cat(inputs, 1)                                     # what LMGen fed the transformer
    with model.streaming(2), torch.no_grad():
        for s, n in zip((0, 37, 120), (37, 83, 90)):
            model.transformer(x[:, s:s + n])
        mem_chunk = {i: b._streaming_state.memory for i, b in ttt_blocks(model).items()}
    for i in mem_gen:
        for name, t in mem_gen[i].items():
            assert torch.allclose(t.double(), getattr(mem_chunk[i], name).double(), atol=1e-4, rtol=1e-4), (i, name)
    assert int(mem_gen[0].pos[0]) == 210


def test_chunked_gradients():
    """The third chunk's loss reaches the learned initial weights, projections and gates, and not
    the carried keys/values (nor anything else of earlier chunks)."""
    model = tiny_ttt_model(context=8).train()
    x = torch.randn(2, 30, model.dim, dtype=D)
    chunks = [x[:, s:s + 10].clone().requires_grad_(True) for s in (0, 10, 20)]
    with model.streaming(2):
        outs = [model.transformer(c) for c in chunks]
    outs[2].pow(2).mean().backward()
    block = ttt_blocks(model)[1]
    for name in ("W1", "b1", "W2", "b2", "wq.weight", "wk.weight", "lr_gate.weight", "gating_alpha"):
        g = dict(block.layer.named_parameters())[name].grad
        assert g is not None and g.abs().max() > 0, name
    assert chunks[0].grad is None and chunks[1].grad is None
    assert chunks[2].grad is not None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_reset_schedule_must_be_a_positive_period(bad):
    with pytest.raises(ValueError, match="reset_every"):
        with memory_schedule(bad):
            pass
