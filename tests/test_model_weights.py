"""Real-weight loading, TTT-only checkpoints, LoRA, memory files, legacy migration."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from model_helpers import random_codes, tiny_ttt_model
from moshi.models import loaders
from moshi.modules.lora import LoRALinear
from safetensors.torch import save_file

from moshi_ttt import TTTConfig, tiny_lm_kwargs
from moshi_ttt.model.build import ttt_blocks
from moshi_ttt.model.memory import load_memory, save_memory, save_stream
from moshi_ttt.model.weights import (
    WeightsError,
    apply_lora,
    load_lm,
    load_ttt_checkpoint,
    save_ttt_checkpoint,
    trainable_names,
)


@pytest.fixture
def stock_files(tmp_path):
    """A tiny stock moshi model saved the way Kyutai ships 7B: model.safetensors + config.json."""
    kw = tiny_lm_kwargs(context=8)
    torch.manual_seed(0)
    stock = loaders.get_moshi_lm(None, lm_kwargs=kw, device="cpu", dtype=torch.float32)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(weights))
    config.write_text(json.dumps({**kw, "moshi_name": "model.safetensors", "tokenizer_name": "tok.model"}))
    return stock, weights, config


def test_load_real_weights_only_ttt_missing(stock_files):
    stock, weights, config = stock_files
    model = load_lm(weights, config, TTTConfig(layers="all", initial_gating_alpha=0.0), dtype=torch.float32)
    for k, v in stock.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ttt = ttt_blocks(model)[0].layer
    assert torch.isfinite(ttt.W1).all() and ttt.W1.std() > 0 and not ttt.W1.is_meta
    codes = random_codes(1, 12, model)
    assert torch.equal(stock.eval()(codes).logits.nan_to_num(), model.eval()(codes).logits.nan_to_num())


def test_load_errors_name_the_key(stock_files, tmp_path):
    stock, weights, config = stock_files
    sd = {k: v.contiguous() for k, v in stock.state_dict().items()}
    bad = tmp_path / "extra.safetensors"
    save_file({**sd, "transformer.layers.0.bogus.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(WeightsError, match="bogus"):
        load_lm(bad, config, TTTConfig(layers="all"), dtype=torch.float32)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "text_linear.weight"}, str(missing))
    with pytest.raises(WeightsError, match="text_linear.weight"):
        load_lm(missing, config, TTTConfig(layers="all"), dtype=torch.float32)
    shape = tmp_path / "shape.safetensors"
    save_file({**sd, "text_linear.weight": torch.zeros(3, 3)}, str(shape))
    with pytest.raises(WeightsError, match="text_linear.weight"):
        load_lm(shape, config, TTTConfig(layers="all"), dtype=torch.float32)
    cfg_bad = tmp_path / "bad_config.json"
    cfg_bad.write_text(json.dumps({**tiny_lm_kwargs(), "dimm": 3}))
    with pytest.raises(WeightsError, match="dimm"):
        load_lm(weights, cfg_bad, TTTConfig(layers="all"))
    cfg_small = tmp_path / "small.json"
    cfg_small.write_text(json.dumps(tiny_lm_kwargs(dim=32)))
    with pytest.raises(WeightsError, match="size mismatch"):
        load_lm(weights, cfg_small, TTTConfig(layers="all"), dtype=torch.float32)
    with pytest.raises(WeightsError, match="not found"):
        load_lm(tmp_path / "nope.safetensors", config)


def test_ttt_checkpoint_roundtrip_with_lora(tmp_path):
    model = tiny_ttt_model()
    apply_lora(model, rank=4, scaling=2.0)
    for block in ttt_blocks(model).values():  # LoRA never wraps TTT's linears
        assert not any(isinstance(m, LoRALinear) for m in block.modules())
    assert any(isinstance(m, LoRALinear) for m in model.transformer.layers[0].self_attn.modules())
    names = trainable_names(model, "ttt+lora")
    assert any("lora_A" in n for n in names) and any(".ttt." in n for n in names)
    assert not any("frozen_W" in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(torch.randn_like(p))
    save_ttt_checkpoint(model, tmp_path / "ckpt")
    other = tiny_ttt_model(seed=5)
    apply_lora(other, rank=4, scaling=2.0)
    load_ttt_checkpoint(other, tmp_path / "ckpt")
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    for n in names:
        assert torch.equal(mine[n], theirs[n]), n
    wrong = tiny_ttt_model(layers=[1, 2])
    with pytest.raises(WeightsError, match="layers"):
        load_ttt_checkpoint(wrong, tmp_path / "ckpt")


def test_memory_file_carries_ttt_state(tmp_path):
    model = tiny_ttt_model()
    seq = random_codes(2, 20, model)
    with model.streaming(2):
        model.forward_text(seq)
        save_memory(model, tmp_path / "mem.safetensors")
        ref = {i: b._streaming_state.memory.clone() for i, b in ttt_blocks(model).items()}
    with model.streaming(2):
        load_memory(model, tmp_path / "mem.safetensors")
        for i, b in ttt_blocks(model).items():
            for n, t in b._streaming_state.memory.items():
                assert torch.equal(t, getattr(ref[i], n))
    with model.streaming(3), pytest.raises(ValueError, match="shape"):
        load_memory(model, tmp_path / "mem.safetensors")
    other = tiny_ttt_model(layers=[0])
    with other.streaming(2), pytest.raises(ValueError, match="layers"):
        load_memory(other, tmp_path / "mem.safetensors")


def test_stream_restored_in_new_process_continues_exactly(tmp_path):
    model = tiny_ttt_model(context=8)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    seq = random_codes(2, 40, model)
    torch.save(seq, tmp_path / "seq.pt")
    with model.streaming(2):
        for t in range(25):
            model.forward_text(seq[..., t:t + 1])
        save_stream(model, tmp_path / "stream.safetensors")
        expected = torch.cat([model.forward_text(seq[..., t:t + 1])[0] for t in range(25, 40)], 1)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import os, sys, torch
        os.environ["NO_TORCH_COMPILE"] = "1"
        sys.path.insert(0, {str(tmp_path.parent)!r})
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from model_helpers import tiny_ttt_model
        from moshi_ttt.model.memory import load_stream
        model = tiny_ttt_model(context=8, seed=123)
        model.load_state_dict(torch.load({str(tmp_path / 'w.pt')!r}))
        seq = torch.load({str(tmp_path / 'seq.pt')!r})
        with model.streaming(2):
            load_stream(model, {str(tmp_path / 'stream.safetensors')!r})
            out = torch.cat([model.forward_text(seq[..., t:t + 1])[0] for t in range(25, 40)], 1)
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        print("MAXDIFF", (out - exp).abs().max().item())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    diff = float(res.stdout.split("MAXDIFF")[1])
    assert diff == 0.0
    with model.streaming(2):  # and without restoring, the continuation differs
        fresh = torch.cat([model.forward_text(seq[..., t:t + 1])[0] for t in range(25, 40)], 1)
    assert (fresh - expected).abs().max() > 1e-3


def test_legacy_checkpoint_migration():
    from moshi_ttt.model.migrate import migrate_legacy_state_dict

    model = tiny_ttt_model(layers=[1, 2])
    ours = model.state_dict()
    H, d = 4, 16
    p = "transformer.layers.{}.hybrid.ttt_layer."
    legacy = {k: v.clone() for k, v in ours.items() if ".ttt." not in k}  # base keys
    W1 = torch.randn(H, d, 4 * d, dtype=torch.float64)
    legacy.update({
        p.format(1) + "W1": W1, p.format(1) + "b1": torch.randn(H, 1, 4 * d, dtype=torch.float64),
        p.format(1) + "W2_base": torch.randn(H, 4 * d, d, dtype=torch.float64),
        p.format(1) + "W2": torch.randn(H, 4 * d, d, dtype=torch.float64),          # loses to W2_base
        p.format(1) + "W1_state": torch.randn(H, d, 4 * d, dtype=torch.float64),    # runtime buffer
        p.format(1) + "learnable_ttt_lr_weight": torch.randn(H, 1, 64, dtype=torch.float64),
        p.format(2) + "W1": torch.randn(H, d, 8, dtype=torch.float64),              # wrong shape
        p.format(3) + "b2": torch.randn(H, 1, d, dtype=torch.float64),              # no TTT there
        p.format(1) + "mystery_param": torch.randn(3, dtype=torch.float64),
    })
    new, rep = migrate_legacy_state_dict(legacy, target=ours)
    assert torch.equal(new["transformer.layers.1.ttt.layer.W1"], W1)
    assert torch.equal(new["transformer.layers.1.ttt.layer.W2"], legacy[p.format(1) + "W2_base"])
    assert new["transformer.layers.1.ttt.layer.lr_gate.weight"].shape == (H, 64)
    assert rep.dropped == [p.format(1) + "W1_state"]
    assert set(rep.left) == {p.format(1) + "W2", p.format(2) + "W1", p.format(3) + "b2",
                             p.format(1) + "mystery_param"}
    assert rep.passthrough == len([k for k in ours if ".ttt." not in k])
    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys
    assert "mapped" in rep.summary() and "left" in rep.summary()
