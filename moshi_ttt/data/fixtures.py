"""Small generated inputs for tests and CPU demos: stereo wavs with alignments, a toy tokenizer.

Nothing here is downloaded: the audio is synthesised, the sentencepiece model is trained on the
fly on a few hundred generated sentences (ids 0..3 = unk, BOS, EOS, pad, like Moshi's tokenizer,
so that text padding 3 and end-of-padding 0 never collide with a word piece).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TOY_WORDS = ("hello world moshi memory test time training long recording chunk stream file audio "
             "text token frame window voice recall motif").split()


def train_toy_tokenizer(model_prefix: str | Path, vocab_size: int = 40, seed: int = 0) -> Path:
    """Train a tiny sentencepiece model on generated sentences; returns the ``.model`` path.

    ``vocab_size`` is an upper bound (the trainer may use fewer pieces). Fits a text_card of 64.
    """
    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(TOY_WORDS, size=8)) for _ in range(300)]
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return prefix.with_suffix(".model")


def toy_stereo(seconds: float, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Speech-like stereo audio ``[2, N]`` float32: syllable-rate AM tones + noise, a few pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    chans = []
    for c in range(2):
        f0 = rng.uniform(110, 260)
        syll = 0.5 * (1 + np.sin(2 * math.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * math.pi)))
        voice = sum(np.sin(2 * math.pi * f0 * h * t) / h for h in range(1, 6))
        pause = (np.sin(2 * math.pi * 0.25 * t + c * math.pi) > -0.3).astype(np.float64)
        x = 0.2 * voice * syll * pause + 0.01 * rng.standard_normal(n)
        chans.append(x)
    return np.stack(chans).astype(np.float32)


def toy_alignment(seconds: float, seed: int = 0, main_speaker: str = "SPEAKER_MAIN",
                  other_speaker: str = "SPEAKER_USER") -> dict[str, Any]:
    """``{"alignments": [[word, [start, end], speaker], ...]}`` with words every ~0.3-0.6 s."""
    rng = np.random.default_rng(seed)
    out = []
    t = 0.2
    while t < seconds - 0.3:
        dur = float(rng.uniform(0.15, 0.4))
        speaker = main_speaker if rng.random() < 0.6 else other_speaker
        out.append([str(rng.choice(TOY_WORDS)), [round(t, 3), round(min(t + dur, seconds), 3)], speaker])
        t += dur + float(rng.uniform(0.05, 0.3))
    return {"alignments": out}


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> Path:
    """Write ``wav`` [C, N] (float32) as a C-channel wav (scipy; sphn writes mono only)."""
    from scipy.io import wavfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(wav)
    wavfile.write(str(path), sample_rate, data.T if data.ndim == 2 else data)
    return path


def make_toy_recordings(root: str | Path, num_files: int = 3, seconds: tuple[float, ...] = (3.0, 4.2, 2.6),
                        sample_rate: int = 24000, seed: int = 0, subdir: str = "audio") -> Path:
    """Write ``num_files`` stereo wavs + alignments under ``root/subdir`` and ``root/manifest.jsonl``.

    Manifest paths are relative to the manifest. Returns the manifest path.
    """
    root = Path(root)
    lines = []
    for i in range(num_files):
        sec = seconds[i % len(seconds)]
        rel = f"{subdir}/rec_{i:02d}.wav"
        write_wav(root / rel, toy_stereo(sec, sample_rate, seed + i), sample_rate)
        (root / rel).with_suffix(".json").write_text(json.dumps(toy_alignment(sec, seed + i)))
        lines.append(json.dumps({"path": rel, "duration": sec}))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
