"""Manifest and alignment parsing; words on the 12.5 Hz frame grid."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.data import (  # noqa: E402
    DataError,
    Report,
    TextConfig,
    Word,
    interleave,
    place_tokens,
    read_alignment,
    read_manifest,
    text_stream,
)
from moshi_ttt.data.fixtures import train_toy_tokenizer  # noqa: E402
from moshi_ttt.data.manifest import file_id_for  # noqa: E402

PAD, EOP = 3, 0


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = train_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy")
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def test_place_tokens_known_layout():
    # word A at 0.5 s -> frame 6 (0.5 * 12.5 = 6.25); word B at 1.2 s -> frame 15; C at 1.28 s -> frame 16
    # but B has 3 tokens (15, 16, 17), so C shifts to 18 rather than cutting B.
    words = [(0.5, [10, 11]), (1.2, [20, 21, 22]), (1.28, [30])]
    text, dropped = place_tokens(words, 22, 12.5, PAD, EOP)
    expected = [PAD] * 22
    expected[5] = EOP
    expected[6:8] = [10, 11]
    expected[14] = EOP
    expected[15:18] = [20, 21, 22]
    expected[18] = 30  # directly after B: no padding in between, so no end-of-padding
    assert text.tolist() == expected and dropped == 0


def test_place_tokens_edges():
    # a word at t=0 has no frame before it; exact frame boundaries (0.08 s = frame 1) land on their frame
    text, dropped = place_tokens([(0.0, [7]), (0.08 * 3, [8])], 5, 12.5, PAD, EOP)
    assert text.tolist() == [7, PAD, EOP, 8, PAD] and dropped == 0
    # tokens past the end are counted, not silently lost
    text, dropped = place_tokens([(0.3, [4, 5, 6, 7])], 5, 12.5, PAD, EOP)  # 0.3 s -> frame 3
    assert text.tolist() == [PAD, PAD, EOP, 4, 5] and dropped == 2


def test_text_stream_main_speaker_only(sp):
    words = [Word("hello", 0.5, 0.8, "SPEAKER_MAIN"), Word("world", 0.9, 1.1, "SPEAKER_USER"),
             Word("memory", 1.6, 2.0, "SPEAKER_MAIN")]
    report = Report()
    text = text_stream(words, sp, 30, 2.4, TextConfig(), "x.wav", report, text_card=64)
    hello, memory = sp.encode("hello"), sp.encode("memory")
    expected = [PAD] * 30
    expected[6 - 1] = EOP
    expected[6:6 + len(hello)] = hello
    expected[20 - 1] = EOP  # 1.6 * 12.5 = 20
    expected[20:20 + len(memory)] = memory
    assert text.tolist() == expected
    assert not report.issues
    assert min(hello + memory) >= 4  # word pieces never collide with padding (3) / end of padding (0)


def test_text_stream_reports_problems(sp):
    report = Report()
    words = [Word("hello", 0.5, 0.4, "SPEAKER_MAIN"),   # ends before it starts
             Word("moshi", 1.0, 1.3, "SPEAKER_MAIN"),
             Word("memory", 1.8, 2.9, "SPEAKER_MAIN"),  # runs past the end (2.0 s + tolerance 0.5)
             Word("voice", 3.5, 3.9, "SPEAKER_MAIN")]   # starts after the end
    text = text_stream(words, sp, 25, 2.0, TextConfig(), "y.wav", report)
    kinds = sorted(i.kind for i in report.issues)
    assert kinds == ["alignment past end", "malformed alignment"]
    assert all(i.source == "y.wav" and i.action == "warning" for i in report.issues)
    past = next(i for i in report.issues if i.kind == "alignment past end")
    assert "1 word(s) start after the end" in past.problem and "1 word(s) run past the end" in past.problem
    assert text[12:12 + len(sp.encode("moshi"))].tolist() == sp.encode("moshi")
    assert sp.encode("hello")[0] not in text.tolist()


def test_text_stream_wrong_speaker_label_is_reported(sp):
    report = Report()
    text = text_stream([Word("hello", 0.5, 0.8, "SPEAKER_0")], sp, 20, 1.6, TextConfig(), "z.wav", report)
    assert (text == PAD).all()
    assert report.issues[0].kind == "no main-speaker words" and "SPEAKER_0" in report.issues[0].problem
    with pytest.raises(DataError, match="z.wav"):
        text_stream([Word("hello", 0.5, 0.8, "SPEAKER_0")], sp, 20, 1.6, TextConfig(), "z.wav", Report(strict=True))


def test_tokenizer_larger_than_text_card_is_an_error(sp):
    with pytest.raises(ValueError, match="text_card"):
        text_stream([Word("hello", 0.5, 0.8, "SPEAKER_MAIN")], sp, 20, 1.6, TextConfig(), "a.wav", Report(),
                    text_card=4)


def test_interleave_layout():
    T = 6
    text = torch.full((T,), 3)
    moshi = torch.arange(2 * T).view(2, T)
    user = 100 + torch.arange(2 * T).view(2, T)
    codes = interleave(text, moshi, user)
    assert codes.shape == (5, T) and codes.dtype == torch.int64
    assert codes[0].tolist() == [3] * T
    assert codes[1:3].tolist() == moshi.tolist() and codes[3:].tolist() == user.tolist()


def test_manifest_relative_paths_and_bad_lines(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.jsonl"
    abs_wav = tmp_path / "abs.wav"
    manifest.write_text("\n".join([
        json.dumps({"path": "a/x.wav", "duration": 3.0}),
        "{not json",
        json.dumps({"duration": 2.0}),
        "",
        json.dumps({"path": str(abs_wav), "duration": "long", "speaker": "s"}),
        json.dumps({"path": "a/../a/x.wav"}),
    ]) + "\n")
    report = Report()
    entries = read_manifest(manifest, report)
    assert [e.path for e in entries] == [tmp_path / "sub" / "a" / "x.wav", abs_wav]
    assert entries[0].duration == 3.0 and entries[1].duration is None and entries[1].extra == {"speaker": "s"}
    assert entries[0].alignment_path == tmp_path / "sub" / "a" / "x.json"
    by_line = {i.source.rsplit(":", 1)[1]: i for i in report.issues}
    assert set(by_line) == {"2", "3", "5", "6"}
    assert "not JSON" in by_line["2"].problem and by_line["2"].action == "skipped"
    assert "'path'" in by_line["3"].problem
    assert by_line["5"].action == "note"
    assert "duplicate of line 1" in by_line["6"].problem
    assert all(str(manifest) in i.source for i in report.issues)
    with pytest.raises(DataError, match="m.jsonl"):
        read_manifest(manifest, Report(strict=True))
    with pytest.raises(DataError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl", Report())


@pytest.mark.parametrize("content, message", [
    (None, "missing"),
    ("{oops", "not valid JSON"),
    (json.dumps({"words": []}), "no 'alignments' list"),
    (json.dumps({"alignments": [["hi", [0.1, 0.2], "S"], ["x", [0.3], "S"]]}), r"alignments\[1\]"),
    (json.dumps({"alignments": [["hi", ["a", 0.2], "S"]]}), r"alignments\[0\]"),
    ('{"alignments": [["hi", [NaN, 0.2], "S"]]}', r"alignments\[0\]"),
])
def test_malformed_alignment(tmp_path, content, message):
    path = tmp_path / "rec.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_alignment(path)
    assert str(path) in str(e.value)


def test_alignment_ok(tmp_path):
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"alignments": [["hi", [0.1, 0.2], "SPEAKER_MAIN"], [" yo ", [1, 2], "U"]]}))
    assert read_alignment(path) == [Word("hi", 0.1, 0.2, "SPEAKER_MAIN"), Word(" yo ", 1.0, 2.0, "U")]


def test_file_ids():
    assert file_id_for("a/b c/x.wav") == "a__b_c__x"
    assert file_id_for("/abs/x.wav") == "abs__x"
    assert file_id_for("../up/x.wav") == "up__x"
