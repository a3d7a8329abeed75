"""``moshi-ttt generate`` end to end on the tiny model (CPU)."""

import numpy as np
import pytest
import scipy.io.wavfile as wavfile
import sphn

from moshi_ttt.cli import main
from moshi_ttt.model.generate import AudioInputError, read_user_audio


def _wav(path, seconds, sr=24000, channels=2, nan=False):
    t = np.arange(int(seconds * sr)) / sr
    x = np.stack([0.2 * np.sin(2 * np.pi * (200 + 100 * c) * t) for c in range(channels)]).astype(np.float32)
    if nan:
        x[0, 10] = np.nan
    wavfile.write(path, sr, x.T if channels > 1 else x[0])
    return path


def test_generate_tiny_writes_wav_text_and_memory(tmp_path):
    wav = _wav(tmp_path / "talk.wav", 10.0)
    out = tmp_path / "out" / "talk"
    rc = main(["generate", str(wav), "--tiny", "--quiet", "--out", str(out),
               "--memory-out", str(tmp_path / "mem.safetensors")])
    assert rc == 0
    audio, sr = sphn.read(str(out) + ".wav")
    assert sr == 24000 and 8.0 < audio.shape[1] / sr <= 10.0 and np.isfinite(audio).all()
    assert (out.parent / "talk.txt").read_text().strip()
    rc = main(["generate", str(wav), "--tiny", "--quiet", "--out", str(tmp_path / "again"),
               "--memory-in", str(tmp_path / "mem.safetensors")])
    assert rc == 0


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
