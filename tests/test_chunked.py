"""The chunked training path equals moshi's own full-sequence forward, token by token."""

import pytest
import torch
from model_helpers import random_codes, tiny_ttt_model

from moshi_ttt.model.chunked import ChunkedLM
from moshi_ttt.model.loss import token_losses_from_output


def _sum(tl):
    return tl.text.sum() + tl.audio.sum(), int(tl.text_mask.sum() + tl.audio_mask.sum())


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
