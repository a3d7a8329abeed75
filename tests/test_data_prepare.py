"""Audio -> Mimi codes (tiny random Mimi), the code cache, ``prepare`` and its bad-input handling."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402
from scipy.io import wavfile  # noqa: E402

from moshi_ttt.data import (  # noqa: E402
    CodesLayout,
    DataError,
    EncodedDataset,
    MimiEncoder,
    MimiSpec,
    PrepareConfig,
    prepare,
)
from moshi_ttt.data import dataset as dataset_mod  # noqa: E402
from moshi_ttt.data.commands import register  # noqa: E402
from moshi_ttt.data.fixtures import make_toy_recordings, toy_alignment, toy_stereo, train_toy_tokenizer, write_wav  # noqa: E402
from moshi_ttt.model.presets import tiny_lm_kwargs  # noqa: E402

SR = 24000


@pytest.fixture(scope="module")
def encoder():
    return MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, card=64))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy")


@pytest.fixture(scope="module")
def sp(tok_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(tok_path))


@pytest.fixture(scope="module")
def layout():
    return CodesLayout.from_lm_kwargs(tiny_lm_kwargs())


def read_wav(path):
    """Independent reader (scipy) -> float32 [C, N]."""
    sr, data = wavfile.read(path)
    return sr, np.atleast_2d(data.T).astype(np.float32)


def mimi_codes(mimi, wav, per_channel=False):
    """moshi's MimiModel.encode, channels as the batch (as moshi-finetune calls it) -> [C * K, T]."""
    with torch.no_grad():
        if per_channel:
            return torch.cat([mimi.encode(torch.from_numpy(ch)[None, None])[0] for ch in wav]).long()
        codes = mimi.encode(torch.from_numpy(wav)[:, None])  # [C, K, T]
        return torch.cat(list(codes)).long()


def test_tiny_mimi_matches_moshi_encode_per_channel(encoder):
    wav = toy_stereo(3.0, SR, seed=1)
    codes = encoder.encode(wav)
    T = math.ceil(wav.shape[1] / 1920)
    assert codes.shape == (4, T) and codes.dtype == torch.int64
    assert torch.equal(codes, mimi_codes(encoder.mimi, wav))
    # channel c's codebooks are rows c*K..(c+1)*K-1 (batching changes float rounding: near-ties only)
    assert (codes == mimi_codes(encoder.mimi, wav, per_channel=True)).float().mean() > 0.99
    # non-degenerate: each codebook uses many entries, within [0, card)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert all(len(set(row.tolist())) >= 8 for row in codes)
    # frame count of a partial last frame
    assert encoder.encode(wav[:, : 1920 * 5 + 1]).shape == (4, 6)


def test_windowed_encoding_of_long_files(encoder):
    wav = toy_stereo(8.0, SR, seed=2)
    whole = MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, window_sec=1000), mimi=encoder.mimi).encode(wav)
    windowed = MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, window_sec=2.0, overlap_sec=2.0),
                           mimi=encoder.mimi).encode(wav)
    cold = MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, window_sec=2.0, overlap_sec=0.0),
                       mimi=encoder.mimi).encode(wav)
    assert windowed.shape == whole.shape == cold.shape
    # The overlap covers the tiny Mimi's receptive field: equal up to float near-ties.
    assert (windowed == whole).float().mean() > 0.99
    assert (cold == whole).float().mean() < (windowed == whole).float().mean()


def test_cache_key_tracks_mimi_settings(encoder):
    keys = {encoder.cache_key(),
            MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, seed=1), mimi=encoder.mimi).cache_key(),
            MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2, window_sec=10), mimi=encoder.mimi).cache_key(),
            MimiEncoder(MimiSpec(kind="tiny", num_codebooks=3), mimi=encoder.mimi).cache_key()}
    assert len(keys) == 4
    assert MimiEncoder(MimiSpec(kind="tiny", num_codebooks=2), mimi=encoder.mimi).cache_key() == encoder.cache_key()


def _cfg(tmp_path, layout, **kw):
    return PrepareConfig(out=tmp_path / "out", layout=layout, progress=False, workers=2, **kw)


def test_prepare_end_to_end(tmp_path, encoder, sp, layout):
    manifest = make_toy_recordings(tmp_path / "data", num_files=3)
    result = prepare(manifest, encoder, sp, _cfg(tmp_path, layout))
    assert result.written == ["audio__rec_00", "audio__rec_01", "audio__rec_02"] and not result.report.issues
    ds = EncodedDataset(tmp_path / "out")
    assert ds.layout.n_q == 4 and ds.layout.dep_q == 2 and ds.layout.card == 64 and ds.layout.text_card == 64
    for i, fid in enumerate(ds.file_ids):
        wav_path = tmp_path / "data" / "audio" / f"rec_{i:02d}.wav"
        sr, wav = read_wav(wav_path)
        f = ds.load(fid)
        T = math.ceil(wav.shape[1] / 1920)
        assert f.codes.shape == (5, T)
        # rows 1..2: left (Moshi) channel, rows 3..4: right (user) channel
        assert torch.equal(f.codes[1:], mimi_codes(encoder.mimi, wav))
        # text row: every token of the Moshi channel's words, the first word at its frame
        words = [w for w in json.loads(wav_path.with_suffix(".json").read_text())["alignments"]
                 if w[2] == "SPEAKER_MAIN"]
        toks = [t for w in words for t in sp.encode(w[0].strip())]
        text = f.codes[0].tolist()
        assert [t for t in text if t not in (0, 3)] == toks
        assert text[int(words[0][1][0] * 12.5)] == toks[0]
        assert ds[fid].source["audio"] == f"audio/rec_{i:02d}.wav"
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["written"] == 3 and report["issues"] == []


def test_cache_reuse_and_invalidation(tmp_path, encoder, sp, layout, monkeypatch):
    manifest = make_toy_recordings(tmp_path / "data", num_files=3)
    cfg = _cfg(tmp_path, layout)
    first = prepare(manifest, encoder, sp, cfg)
    ref = EncodedDataset(cfg.out)
    ref_codes = {fid: ref.load(fid).codes for fid in ref.file_ids}
    calls = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda wav: calls.append(wav.shape) or real(wav))
    again = prepare(manifest, encoder, sp, cfg)
    assert calls == [] and again.cache_hits == 3 and again.written == first.written
    ds = EncodedDataset(cfg.out)
    assert all(torch.equal(ds.load(fid).codes, ref_codes[fid]) for fid in ds.file_ids)
    # new content (size and mtime change) -> re-encoded, the others still cached
    wav1 = tmp_path / "data" / "audio" / "rec_01.wav"
    write_wav(wav1, toy_stereo(3.5, SR, seed=99), SR)
    third = prepare(manifest, encoder, sp, cfg)
    assert len(calls) == 1 and third.cache_hits == 2
    # a corrupt cache entry (e.g. a crash of another tool) is re-encoded, with a note
    entries = sorted(cfg.cache.rglob("*.safetensors"))
    assert len(entries) == 4
    for e in entries:
        e.write_bytes(b"\x00\x01truncated")
    fourth = prepare(manifest, encoder, sp, cfg)
    assert len(calls) == 4 and fourth.cache_hits == 0
    assert [i.kind for i in fourth.report.issues].count("cache entry re-encoded") == 3


def test_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    dataset_mod.atomic_save_file({"a": torch.zeros(3)}, target)
    before = target.read_bytes()

    def crashing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dataset_mod, "save_file", crashing_save)
    with pytest.raises(OSError):
        dataset_mod.atomic_save_file({"a": torch.ones(3)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def _bad_corpus(root):
    """Good files plus one of each bad input; returns (manifest, {name: expected kind or None})."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    expect = {}

    def rec(name, wav=None, sr=SR, align=True, kind=None, raw=None, seconds=2.0):
        path = audio / f"{name}.wav"
        if raw is not None:
            path.write_bytes(raw)
        elif wav is not None:
            write_wav(path, wav, sr)
        if align is True:
            path.with_suffix(".json").write_text(json.dumps(toy_alignment(seconds, seed=len(expect))))
        elif isinstance(align, str):
            path.with_suffix(".json").write_text(align)
        expect[name] = kind
        return json.dumps({"path": f"audio/{name}.wav", "duration": seconds})

    write_wav(root / "full.wav", toy_stereo(2.0, SR, seed=9), SR)
    truncated = (root / "full.wav").read_bytes()[:100_000]  # header says 2 s, data stops at ~0.5 s
    nan = toy_stereo(2.0, SR, seed=5)
    nan[1, 12345] = np.nan
    past = {"alignments": [["hello", [0.5, 0.8], "SPEAKER_MAIN"], ["moshi", [7.0, 7.5], "SPEAKER_MAIN"]]}
    lines = [
        rec("good_a", toy_stereo(3.0, SR, seed=1), seconds=3.0),
        rec("corrupt", raw=b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 4, kind="unreadable audio"),
        rec("missing_wav", kind="unreadable audio"),
        rec("truncated", raw=truncated, kind="unreadable audio"),
        rec("mono", toy_stereo(2.0, SR, seed=2)[0], kind="not stereo"),
        rec("rate16k", toy_stereo(2.5, 16000, seed=3), sr=16000, kind="resampled", seconds=2.5),
        rec("no_alignment", toy_stereo(2.0, SR, seed=4), align=False, kind="bad alignment"),
        rec("bad_alignment", toy_stereo(2.0, SR, seed=4), align='{"alignments": [["hi", [0.1], "X"]]}',
            kind="bad alignment"),
        rec("past_end", toy_stereo(2.0, SR, seed=6), align=json.dumps(past), kind="alignment past end"),
        rec("empty", np.zeros((2, 0), np.float32), kind="empty or too short"),
        rec("short", toy_stereo(0.3, SR, seed=7), kind="empty or too short", seconds=0.3),
        rec("nan", nan, kind="NaN samples"),
        "this line is not json",
        rec("good_b", toy_stereo(2.0, SR, seed=8)),
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, expect


def test_bad_inputs_each_reported_once_and_others_go_on(tmp_path, encoder, sp, layout):
    manifest, expect = _bad_corpus(tmp_path / "data")
    result = prepare(manifest, encoder, sp, _cfg(tmp_path, layout))
    issues = result.report.issues
    by_file = {}
    for issue in issues:
        name = os.path.splitext(os.path.basename(issue.source.split(":")[0]))[0]
        by_file.setdefault(name, []).append(issue)
    assert len(by_file.pop("manifest")) == 1  # the non-JSON line, named by manifest path and line number
    for name, kind in expect.items():
        got = by_file.get(name, [])
        if kind is None:
            assert got == [], name
        else:
            assert [i.kind for i in got] == [kind], (name, got)
            assert str(tmp_path / "data" / "audio" / name) in got[0].source
    assert sorted(result.written) == sorted(f"audio__{n}" for n in ("good_a", "good_b", "rate16k", "past_end"))
    assert result.total == len(expect) + 1
    # resampled to 24 kHz: frame count from the resampled length; alignment past end: kept with its valid word
    ds = EncodedDataset(tmp_path / "out")
    assert ds["audio__rate16k"].num_frames == math.ceil(2.5 * SR / 1920)
    assert sp.encode("hello")[0] in ds.load("audio__past_end").codes[0].tolist()
    summary = result.report.summary(result.total, len(result.written))
    assert "4 of 14 inputs kept, 10 skipped." in summary
    for name in ("corrupt", "mono", "no_alignment", "empty", "short", "nan", "missing_wav", "bad_alignment",
                 "truncated"):
        assert f"{name}." in summary
    # --strict: the first problem stops the run (the manifest is parsed before any audio)
    with pytest.raises(DataError, match=r"manifest.jsonl:13: not JSON"):
        prepare(manifest, encoder, sp, _cfg(tmp_path, layout, strict=True))
    clean = manifest.with_name("clean.jsonl")
    clean.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if line.startswith("{")))
    with pytest.raises(DataError, match="corrupt.wav: unreadable or corrupt audio"):
        prepare(clean, encoder, sp, _cfg(tmp_path, layout, strict=True))


def _parser():
    parser = argparse.ArgumentParser(prog="moshi-ttt")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_prepare(tmp_path, tok_path, capsys):
    manifest, _ = _bad_corpus(tmp_path / "data")
    out = tmp_path / "cli_out"
    args = _parser().parse_args(["prepare", str(manifest), "--out", str(out), "--tokenizer", str(tok_path),
                                 "--random-mimi", "tiny", "--quiet", "--workers", "1"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "4 of 14 inputs kept, 10 skipped." in err and "not JSON" in err
    assert len(EncodedDataset(out)) == 4
    shutil.rmtree(out)
    args = _parser().parse_args(["prepare", str(manifest), "--out", str(out), "--tokenizer", str(tok_path),
                                 "--random-mimi", "tiny", "--quiet", "--strict"])
    assert args.func(args) == 1
    assert "manifest.jsonl:13: not JSON" in capsys.readouterr().err
    # a Mimi that does not fit the layout is a clear configuration error
    args = _parser().parse_args(["prepare", str(manifest), "--out", str(out), "--tokenizer", str(tok_path),
                                 "--random-mimi", "tiny", "--num-codebooks", "3", "--quiet"])
    assert args.func(args) == 2
    assert "dep_q=2" in capsys.readouterr().err
