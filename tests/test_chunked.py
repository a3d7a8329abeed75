"""The chunked training path equals moshi's own full-sequence forward, token by token."""

import pytest
import torch
from model_helpers import random_codes, tiny_ttt_model

from moshi_ttt.model.chunked import ChunkedLM
from moshi_ttt.model.loss import token_losses_from_output
from moshi_ttt.model.memory import stream_nbytes


def _sum(tl):
    # The per-token losses are float32 (the loss casts logits): add them in float64 so that the
    # order of summation (chunk by chunk vs all at once) cannot show up at 1e-9.
    return tl.text.double().sum() + tl.audio.double().sum(), int(tl.text_mask.sum() + tl.audio_mask.sum())


@pytest.mark.parametrize("chunk", [16, 7])
@torch.no_grad()
def test_chunks_equal_full_file_forward(chunk):
    model = tiny_ttt_model(context=8)
    T = 45
    codes = random_codes(2, T, model)
    full = token_losses_from_output(model(codes), codes)
    total, count = _sum(full)
    got, n = 0.0, 0
    with ChunkedLM(model, 2) as runner:
        for s in range(0, T, chunk):
            piece = codes[..., s:s + chunk]
            if piece.shape[-1] < chunk:  # the last partial chunk is padded with -1
                pad = torch.full((*piece.shape[:2], chunk - piece.shape[-1]), -1)
                piece = torch.cat([piece, pad], -1)
            out = runner.step(piece, reset=torch.tensor([s == 0, s == 0]))
            c_sum, c_n = _sum(out.losses)
            got, n = got + c_sum, n + c_n
    # moshi's full forward never predicts the delayed codebooks' last frames; neither do chunks
    # (beyond the padded end): same tokens, same losses.
    assert n == count
    assert abs(float(got) - float(total)) < 1e-9 * max(1.0, abs(float(total)))


@torch.no_grad()
def test_reset_lane_starts_a_new_file():
    """Lane 1 switches file at chunk 2: its losses equal those of that file run alone."""
    model = tiny_ttt_model(context=8)
    a, b = random_codes(2, 32, model, seed=3), random_codes(1, 16, model, seed=4)
    with ChunkedLM(model, 2) as runner:
        runner.step(a[..., :16], reset=torch.tensor([True, True]))
        second = torch.cat([a[:1, :, 16:], b], 0)
        out = runner.step(second, reset=torch.tensor([False, True]))
    with ChunkedLM(model, 1) as alone:
        ref = alone.step(b, reset=torch.tensor([True]))
    assert torch.allclose(out.losses.text[1], ref.losses.text[0], atol=1e-12)
    assert torch.allclose(out.losses.audio[1], ref.losses.audio[0], atol=1e-12)
    assert torch.equal(out.losses.audio_mask[1], ref.losses.audio_mask[0])


def _span_grads(model, codes, chunk, cut_every=None):
    """Sum of token losses over the file through ChunkedLM with ``chunk``-frame chunks, cut every
    ``cut_every`` chunks; returns ({name: grad}, loss)."""
    model.zero_grad(set_to_none=True)
    B, _, T = codes.shape
    total = 0.0
    with ChunkedLM(model, B) as runner:
        for i, s in enumerate(range(0, T, chunk)):
            if cut_every and i % cut_every == 0:
                runner.cut()
            out = runner.step(codes[..., s:s + chunk], reset=torch.full((B,), s == 0))
            total = total + _sum(out.losses)[0]
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, total.item()


@pytest.mark.parametrize("chunk,placement", [(8, "after_attention"), (5, "after_attention"),
                                             (5, "before_attention")])
def test_full_state_grad_equals_full_sequence_gradient(chunk, placement):
    """state_grad "full": the gradient of the summed losses of N chunks equals that of one forward
    over the same frames, for every parameter (float64), through TTT memory and attention alike."""
    model = tiny_ttt_model(context=6, state_grad="full", placement=placement, short_conv=2).train()
    T = 40
    codes = random_codes(2, T, model, seed=5)
    ref, ref_loss = _span_grads(model, codes, chunk=T)
    got, loss = _span_grads(model, codes, chunk=chunk, cut_every=T // chunk)
    assert abs(loss - ref_loss) < 1e-9 * abs(ref_loss)
    assert set(got) == set(ref) and len(ref) > 20
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-9, atol=1e-11), n
    # The write side of earlier chunks is what "delta" misses: its gradient differs.
    delta = tiny_ttt_model(context=6, state_grad="delta").train()
    d_grads, _ = _span_grads(delta, codes, chunk=chunk, cut_every=1)
    wk = "transformer.layers.0.ttt.layer.wk.weight"
    assert not torch.allclose(d_grads[wk], ref[wk], rtol=1e-6)


def test_full_state_grad_is_cut_at_span_boundaries():
    """Cut every 2 chunks: the gradient of span 2's losses is the same whether span 1 ran with
    autograd or without (its carried values enter span 2 as constants, plus the identity path to
    the learned initial weights), and differs from the uncut gradient."""
    codes = random_codes(1, 32, tiny_ttt_model(), seed=6)

    def grads(first_span_grad: bool, cut: bool):
        model = tiny_ttt_model(context=6, state_grad="full").train()
        with ChunkedLM(model, 1) as runner:
            last = 0.0
            for i, s in enumerate(range(0, 32, 8)):
                if cut and i % 2 == 0:
                    runner.cut()
                with torch.set_grad_enabled(first_span_grad or i >= 2):
                    out = runner.step(codes[..., s:s + 8], reset=torch.tensor([s == 0]))
                if i >= 2:
                    last = last + _sum(out.losses)[0]
            last.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    a, b, uncut = grads(True, True), grads(False, True), grads(True, False)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n
    wk = "transformer.layers.0.ttt.layer.wk.weight"
    assert not torch.allclose(a[wk], uncut[wk], rtol=1e-6)


def _span_grads_saved(model, codes, chunk, recompute):
    """Gradients of one span's summed losses and the bytes autograd keeps for backward."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    B, _, T = codes.shape
    total = 0.0
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with ChunkedLM(model, B, recompute=recompute) as runner, hooks:
        runner.cut()
        for s in range(0, T, chunk):
            total = total + _sum(runner.step(codes[..., s:s + chunk], reset=torch.full((B,), s == 0)).losses)[0]
        if recompute:  # each chunk also keeps a copy of the state it started from
            saved[0] += (T // chunk) * stream_nbytes(model)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("n_chunks", [1, 4, 16])
def test_recomputed_chunks_give_the_same_gradient_and_keep_only_carried_inputs(n_chunks):
    """Per-chunk recomputation (activation checkpointing from the carried state): the gradient of a
    state_grad "full" span is unchanged, and what a span keeps for backward is each chunk's starting
    state instead of its activations (5x less here; it still grows with the chunks, by one copy of the
    streaming state each)."""
    model = tiny_ttt_model(context=6, state_grad="full").train()
    codes = random_codes(2, 4 * n_chunks, model, seed=7)
    ref, saved_plain = _span_grads_saved(model, codes, 4, recompute=False)
    got, saved_ckpt = _span_grads_saved(model, codes, 4, recompute=True)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-10, atol=1e-12), n
    print(f"N={n_chunks}: kept for backward {saved_plain / 1e6:.2f} MB plain, {saved_ckpt / 1e6:.3f} MB recomputed")
    assert saved_ckpt * 5 < saved_plain
