"""Attention's reach, measured by perturbation on float64 models through moshi's full forward."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt import TTTConfig, build_lm, memory_lm_kwargs, tiny_lm_kwargs  # noqa: E402
from moshi_ttt.model.reach import attention_reach, pair_reach  # noqa: E402


def _logits(model, codes):
    """Per target frame, all logits: text [T, text_card] and audio [dep_q, T, card] (NaN -> 0)."""
    with torch.no_grad():
        out = model(codes)
    return out.text_logits[0, 0].nan_to_num(0.0), out.logits[0].nan_to_num(0.0)


def _influence(model, codes, row, f):
    """Largest change, per target row (text, then audio) and frame, when code ``row, f`` changes."""
    other = codes.clone()
    hi = model.text_card if row == 0 else model.card
    other[0, row, f] = (other[0, row, f] + 1) % hi
    (ta, aa), (tb, ab) = _logits(model, codes), _logits(model, other)
    text = (ta - tb).abs().amax(-1)                        # [T]
    audio = (aa - ab).abs().amax(-1)                       # [dep_q, T]
    return torch.cat([text[None], audio], 0)               # [1 + dep_q, T]


@pytest.mark.parametrize("num_layers,context", [(2, 8), (3, 5), (1, 6)])
def test_reach_is_exact_by_perturbation(num_layers, context):
    kw = tiny_lm_kwargs(num_layers=num_layers, context=context)
    R = attention_reach(kw)
    assert R == num_layers * (context - 1) + 2 + 1
    torch.manual_seed(num_layers * 10 + context)
    model = build_lm(kw, TTTConfig(enable=False), dtype=torch.float64).eval()
    f = 3
    T = f + R + 4
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(4, model.text_card, (1, 1, T), generator=g),
                       torch.randint(0, model.card, (1, model.num_codebooks - 1, T), generator=g)], 1)
    delays = kw["delays"]
    worst = 0
    for row in range(model.num_codebooks):
        diff = _influence(model, codes, row, f)
        for k in range(1 + model.dep_q):
            # exactly the frames t with t - f <= pair_reach are affected, never t - f >= R
            gaps = [t - f for t in range(T) if diff[k, t] > 0]
            assert max(gaps) == pair_reach(num_layers, context, delays[row], delays[k]), (row, k, gaps)
            assert max(gaps) < R and (diff[k, f + R:] == 0).all()
            worst = max(worst, max(gaps))
    # the most delayed input and the least delayed target (text) realise the bound: R - 1
    assert worst == R - 1
    assert _influence(model, codes, 2, f)[0, f + R - 1] > 0  # row 2 has delay 1; text delay 0


def test_memory_preset_reach():
    kw = memory_lm_kwargs()
    assert (kw["num_layers"], kw["context"]) == (2, 8) and attention_reach(kw) == 17
    assert attention_reach(tiny_lm_kwargs()) == 4 * 31 + 3 == 127
    with pytest.raises(ValueError):
        attention_reach(tiny_lm_kwargs(context=None))
