"""Tiny float64 models for integration tests."""

import torch

from moshi_ttt import TTTConfig, build_lm, tiny_lm_kwargs

D = torch.float64


def tiny_ttt_model(context=8, layers="all", seed=0, dtype=D, **ttt):
    torch.manual_seed(seed)
    cfg = TTTConfig(**{"layers": layers, "mini_batch_size": 4, "init_std": 0.2, "base_lr": 4.0,
                       "initial_gating_alpha": 0.5, **ttt})
    model = build_lm(tiny_lm_kwargs(context=context), cfg, dtype=dtype)
    return model.eval()


def random_codes(B, T, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, model.text_card, (B, 1, T), generator=g)
    audio = torch.randint(0, model.card, (B, model.num_codebooks - 1, T), generator=g)
    return torch.cat([text, audio], 1)


def stream_text(model, seq, sizes, B=None, reset=None):
    """Run ``forward_text`` chunk by chunk through moshi's streaming API."""
    outs, s = [], 0
    with model.streaming(B or seq.shape[0]):
        for n in sizes:
            o, _ = model.forward_text(seq[..., s:s + n])
            outs.append(o)
            s += n
    return torch.cat(outs, 1)
