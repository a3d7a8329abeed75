"""``moshi-ttt generate`` end to end on the tiny model (CPU)."""

import json
import re

import numpy as np
import pytest
import scipy.io.wavfile as wavfile
import sphn

from moshi_ttt.cli import main
from moshi_ttt.model.generate import FRAME, AudioInputError, StreamingOutput, read_user_audio


def _wav(path, seconds, sr=24000, channels=2, nan=False):
    t = np.arange(int(seconds * sr)) / sr
    x = np.stack([0.2 * np.sin(2 * np.pi * (200 + 100 * c) * t) for c in range(channels)]).astype(np.float32)
    if nan:
        x[0, 10] = np.nan
    wavfile.write(path, sr, x.T if channels > 1 else x[0])
    return path


def test_generate_tiny_writes_wav_text_and_memory(tmp_path, capsys, monkeypatch):
    import moshi_ttt.runtime

    monkeypatch.setattr(moshi_ttt.runtime, "_ANNOUNCED", None)  # threads are printed once per process
    wav = _wav(tmp_path / "talk.wav", 10.0)
    out = tmp_path / "out" / "talk"
    rc = main(["generate", str(wav), "--tiny", "--quiet", "--out", str(out),
               "--memory-out", str(tmp_path / "mem.safetensors")])
    assert rc == 0
    audio, sr = sphn.read(str(out) + ".wav")
    assert sr == 24000 and 8.0 < audio.shape[1] / sr <= 10.0 and np.isfinite(audio).all()
    assert (out.parent / "talk.txt").read_text().strip()
    text = capsys.readouterr()
    # Random weights are announced; speed is printed with its convention spelled out.
    assert "random weights" in text.err and "noise" in text.err and "token ids" in text.err
    assert re.search(r"10\.0 s of audio in [0-9.]+ s: [0-9.]+x real time \([0-9.]+ s of compute per second of audio",
                     text.out)
    assert "Mimi encode" in text.out and "LM step" in text.out and "threads:" in text.err
    rc = main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "again"),
               "--memory-in", str(tmp_path / "mem.safetensors")])
    assert rc == 0
    err = capsys.readouterr().err
    # What was loaded is confirmed, with how much conversation the memory has seen.
    assert f"memory loaded from {tmp_path / 'mem.safetensors'}" in err and "after 10.0 s" in err


def test_streaming_output_is_on_disk_before_close(tmp_path):
    sink = StreamingOutput(tmp_path / "o")
    for i in range(60):
        sink.add(5 + i % 7, np.full(FRAME, 0.25, dtype=np.float32))
    # Written as produced, flushed every 25 frames (the header is completed at close): nothing is kept
    # in memory.
    assert (tmp_path / "o.wav").stat().st_size >= 50 * FRAME * 2
    assert (tmp_path / "o.txt").read_text().split()[:3] == ["5", "6", "7"]
    sink.close()
    audio, sr = sphn.read(str(tmp_path / "o.wav"))
    assert audio.shape == (1, 60 * FRAME) and abs(float(audio.mean()) - 0.25) < 1e-3
    assert (tmp_path / "o.txt").read_text().split()[:3] == ["5", "6", "7"]


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    wav = _wav(tmp_path / "talk.wav", 2.0)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["generate", str(wav), "--tiny", "--quiet", "--out", str(blocker / "x")]) == 2
    assert "--out" in capsys.readouterr().out
    assert main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "ok"),
                 "--memory-out", str(blocker / "mem.safetensors")]) == 2
    assert "--memory-out" in capsys.readouterr().out
    assert not (tmp_path / "ok.wav").exists()  # refused before generating anything


def test_non_finite_memory_file_is_refused(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    wav = _wav(tmp_path / "talk.wav", 2.0)
    mem = tmp_path / "mem.safetensors"
    assert main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "a"),
                 "--memory-out", str(mem)]) == 0
    tensors = load_file(str(mem))
    with safe_open(str(mem), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key][..., 0] = float("nan")
    save_file(tensors, str(mem), metadata=meta)
    capsys.readouterr()
    assert main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "b"),
                 "--memory-in", str(mem)]) == 2
    assert "NaN" in capsys.readouterr().out and not (tmp_path / "b.wav").exists()


def test_truncated_wav_is_reported(tmp_path, capsys):
    wav = _wav(tmp_path / "talk.wav", 4.0)
    data = wav.read_bytes()
    wav.write_bytes(data[:len(data) // 2])
    assert main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "truncated" in err and "4.0 s" in err and "2.0 s" in err


def test_tiny_refuses_real_weights_and_warns_on_ignored_flags(tmp_path, capsys):
    wav = _wav(tmp_path / "talk.wav", 1.0)
    assert main(["generate", str(wav), "--tiny", "--quiet", "--moshi-weights", "m.safetensors"]) == 2
    assert "--moshi-weights" in capsys.readouterr().out
    assert main(["generate", str(wav), "--tiny", "--quiet", "--dtype", "bf16", "--ttt-layers", "middle",
                 "--out", str(tmp_path / "w")]) == 0
    assert "--dtype bf16 is ignored" in capsys.readouterr().err


def test_bench_generate_reports_memory_and_speed(tmp_path, capsys):
    assert main(["bench", "generate", "--minutes", "0.2", "--quiet", "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "resident memory: start" in out and "middle" in out and "end" in out
    assert "x real time" in out and "Mimi encode" in out and "LM step" in out
    r = json.loads((tmp_path / "g.json").read_text())
    assert r["frames"] == 150 and r["real_time_factor"] > 0 and set(r["rss_mb"]) == {"start", "middle", "end"}
    assert r["machine_start"]["torch_threads"] >= 1 and "load_1min" in r["machine_start"]


def test_user_channel_and_resampling(tmp_path):
    stereo = _wav(tmp_path / "s.wav", 1.0, sr=16000)
    x = read_user_audio(stereo)
    assert x.shape == (24000,)
    right = 0.2 * np.sin(2 * np.pi * 300 * np.arange(24000) / 24000)  # right channel = user
    assert np.abs(np.fft.rfft(x)).argmax() == np.abs(np.fft.rfft(right)).argmax()
    mono = _wav(tmp_path / "m.wav", 1.0, channels=1)
    assert read_user_audio(mono).shape == (24000,)
    with pytest.raises(AudioInputError, match="no right channel"):
        read_user_audio(mono, channel="right")


@pytest.mark.parametrize("make,match", [
    (lambda p: p, "file not found"),
    (lambda p: (p.write_text("not audio"), p)[1], "not a readable audio file"),
    (lambda p: _wav(p, 0.5, nan=True), "NaN"),
])
def test_bad_input_is_a_clear_error(tmp_path, make, match, capsys):
    path = make(tmp_path / "bad.wav")
    with pytest.raises(AudioInputError, match=match):
        read_user_audio(path)
    assert main(["generate", str(path), "--tiny", "--quiet"]) == 2
    assert "bad.wav" in capsys.readouterr().out


def test_generate_library_call_on_an_array_matches_the_file_path(tmp_path):
    """The library entry point takes a whole array too; same frames, same answer as from a file."""
    import torch

    from moshi_ttt.model.build import build_lm, tiny_lm_kwargs
    from moshi_ttt.model.generate import UserAudio, generate
    from moshi_ttt.model.mimi import random_mimi
    from moshi_ttt.ttt.config import TTTConfig

    wav = _wav(tmp_path / "talk.wav", 1.5, channels=1)
    torch.manual_seed(0)
    model = build_lm(tiny_lm_kwargs(), TTTConfig(layers="all"), dtype=torch.float32).eval()
    mimi = random_mimi(tiny=True, num_codebooks=model.dep_q, card=model.card)
    runs = []
    for frames in (read_user_audio(wav), UserAudio(wav).frames()):
        torch.manual_seed(1)
        runs.append(generate(model, mimi, frames, progress=False, keep_text=True))
    assert runs[0].frames == runs[1].frames == 19 and runs[0].text_tokens == runs[1].text_tokens
