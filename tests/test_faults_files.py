"""Issue 12, failures 8-10: prepare's cache, warnings and --strict output; integrity of memory,
adapter and weight files; eval and config errors that used to be raw tracebacks."""

import json
import math

import pytest
import sentencepiece
import torch
from model_helpers import tiny_ttt_model
from moshi.models import loaders
from safetensors.torch import save_file

from moshi_ttt import TTTConfig, tiny_lm_kwargs
from moshi_ttt.cli import main as cli_main
from moshi_ttt.data import CodesLayout, DataError, EncodedDataset, MimiEncoder, MimiSpec, PrepareConfig, prepare
from moshi_ttt.data.dataset import atomic_save_file
from moshi_ttt.data.fixtures import make_toy_recordings, toy_stereo, train_toy_tokenizer, write_wav
from moshi_ttt.data.synthetic import SynthConfig, write_corpus
from moshi_ttt.model.memory import load_memory, save_memory
from moshi_ttt.model.weights import WeightsError, load_lm, load_ttt_checkpoint, save_ttt_checkpoint
from moshi_ttt.train.config import ConfigError, load_train_config
from moshi_ttt.ttt.state import save_states

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


def _cfg(tmp_path, layout, **kw):
    return PrepareConfig(out=tmp_path / "out", layout=layout, progress=False, workers=1, **kw)


def _codes(out):
    ds = EncodedDataset(out)
    return {fid: ds.load(fid).codes for fid in ds.file_ids}


# ------------------------------------------------------------------------------------ failure 8
def test_cache_entry_bit_flip_in_range_is_detected(tmp_path, encoder, sp, layout):
    manifest = make_toy_recordings(tmp_path / "data", num_files=2)
    cfg = _cfg(tmp_path, layout)
    prepare(manifest, encoder, sp, cfg)
    ref = _codes(cfg.out)
    entry = sorted(cfg.cache.rglob("*.safetensors"))[0]
    data = bytearray(entry.read_bytes())
    old = int.from_bytes(data[-2:], "little", signed=True)
    data[-2:] = ((old + 1) % 64).to_bytes(2, "little", signed=True)   # still a valid code
    entry.write_bytes(bytes(data))
    again = prepare(manifest, encoder, sp, cfg)
    notes = [i for i in again.report.issues if i.kind == "cache entry re-encoded"]
    assert len(notes) == 1 and entry.name in notes[0].problem and "checksum" in notes[0].problem
    assert again.cache_hits == 1
    assert all(torch.equal(c, ref[f]) for f, c in _codes(cfg.out).items())


def test_cache_entry_out_of_range_codes_name_the_entry(tmp_path, encoder, sp, layout):
    manifest = make_toy_recordings(tmp_path / "data", num_files=2)
    cfg = _cfg(tmp_path, layout)
    prepare(manifest, encoder, sp, cfg)
    ref = _codes(cfg.out)
    entry = sorted(cfg.cache.rglob("*.safetensors"))[1]
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
    from moshi_ttt.data.prepare import codes_digest

    codes = load_file(str(entry))["audio_codes"].long() + 500        # out of [0, 64), checksum matches
    atomic_save_file({"audio_codes": codes.to(torch.int16)}, entry, {**meta, "sha256": codes_digest(codes)})
    again = prepare(manifest, encoder, sp, cfg)
    notes = [i for i in again.report.issues if i.kind == "cache entry re-encoded"]
    assert len(notes) == 1 and str(entry) in notes[0].problem and "outside [0, 64)" in notes[0].problem
    assert again.written == list(ref) and all(torch.equal(c, ref[f]) for f, c in _codes(cfg.out).items())


def test_unwritable_cache_goes_on_without_caching(tmp_path, encoder, sp, layout):
    manifest = make_toy_recordings(tmp_path / "data", num_files=3)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = prepare(manifest, encoder, sp, _cfg(tmp_path, layout, cache=blocker / "cache"))
    assert len(res.written) == 3
    notes = [i for i in res.report.issues if i.kind == "cache not writable"]
    assert len(notes) == 1


def test_strict_prints_summary_and_leaves_no_complete_looking_dataset(tmp_path, tok_path, capsys):
    manifest = make_toy_recordings(tmp_path / "data", num_files=3)
    (tmp_path / "data" / "audio" / "rec_02.json").write_text("{not json")
    out = tmp_path / "out"
    rc = cli_main(["prepare", str(manifest), "--out", str(out), "--tokenizer", str(tok_path),
                   "--random-mimi", "tiny", "--quiet", "--strict", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "inputs kept" in err and "rec_02" in err and "Traceback" not in err
    assert not (out / "index.jsonl").exists()
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    assert json.loads((out / "prepare_report.json").read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete dataset"):
        EncodedDataset(out)


def test_prepare_warns_on_times_unknown_chars_empty_silence_clipping(tmp_path, encoder, sp, layout):
    root = tmp_path / "data"
    manifest = make_toy_recordings(root, num_files=5)
    ali = lambda i: root / "audio" / f"rec_{i:02d}.json"  # noqa: E731
    a = json.loads(ali(0).read_text())
    a["alignments"][0][1] = [-0.5, -0.2]
    ali(0).write_text(json.dumps(a))
    a = json.loads(ali(1).read_text())
    a["alignments"] = [["Zürich§", [0.4, 0.8], "SPEAKER_MAIN"]] + a["alignments"]
    ali(1).write_text(json.dumps(a))
    ali(2).write_text(json.dumps({"alignments": []}))
    wav = toy_stereo(2.6, SR, seed=5)
    wav[1] = 0.0
    write_wav(root / "audio" / "rec_03.wav", wav, SR)
    write_wav(root / "audio" / "rec_04.wav", toy_stereo(3.0, SR, seed=6) * 40.0, SR)
    res = prepare(manifest, encoder, sp, _cfg(tmp_path, layout))
    kinds = {(i.source.rsplit("/", 1)[-1], i.kind) for i in res.report.issues if i.action == "warning"}
    assert ("rec_00.wav", "negative times") in kinds
    assert ("rec_01.wav", "unknown characters") in kinds
    assert ("rec_02.wav", "empty alignment") in kinds
    assert ("rec_03.wav", "audio level") in kinds
    assert ("rec_04.wav", "audio level") in kinds
    assert len(res.written) == 5                                     # warnings keep the file
    text = EncodedDataset(tmp_path / "out").load("audio__rec_01").codes[0]
    first = int(math.floor(0.4 * 12.5))
    assert int(text[first]) not in (0, 3, sp.unk_id())               # a real id, never a control id
    silent = [i.problem for i in res.report.issues if "rec_03" in i.source]
    assert any("right (user) channel is silent" in p for p in silent)
    loud = [i.problem for i in res.report.issues if "rec_04" in i.source]
    assert any("over range" in p for p in loud)
    # A cache hit reports the level warnings again.
    again = prepare(manifest, encoder, sp, _cfg(tmp_path, layout))
    assert again.cache_hits == 5 and any(i.kind == "audio level" and "rec_04" in i.source
                                         for i in again.report.issues)


# ------------------------------------------------------------------------------------ failure 9
def test_memory_file_nan_or_flipped_is_refused(tmp_path):
    model = tiny_ttt_model(dtype=torch.float32)
    with model.streaming(1):
        model.forward_text(torch.zeros(1, model.num_codebooks, 4, dtype=torch.long))
        good = tmp_path / "mem.safetensors"
        save_memory(model, good)
        load_memory(model, good)                                    # round trip works
        from moshi_ttt.ttt.state import load_states

        grouped, meta = load_states(good)
        states = {}
        from moshi_ttt.model.build import ttt_blocks

        for i, b in ttt_blocks(model).items():
            states[f"layer{i}"] = b._streaming_state.memory.map(lambda n, t: t.clone())
        states["layer0"].W1[0, 0, 0, 0] = float("nan")
        bad = tmp_path / "nan.safetensors"
        save_states(bad, states, {k: v for k, v in meta.items() if k != "sha256"})
        with pytest.raises(ValueError, match=r"nan\.safetensors.*NaN"):
            load_memory(model, bad)
        with pytest.raises(ValueError, match="NaN"):
            with torch.no_grad():
                ttt_blocks(model)[0]._streaming_state.memory.W1.fill_(float("nan"))
            save_memory(model, tmp_path / "out.safetensors")
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(good.read_bytes())
    data[-5] ^= 0x01                                                 # a low mantissa bit: finite
    flipped.write_bytes(bytes(data))
    model2 = tiny_ttt_model(dtype=torch.float32)
    with model2.streaming(1):
        with pytest.raises(ValueError, match="corrupted"):
            load_memory(model2, flipped)


# ------------------------------------------------------------------------------------ failure 10
def test_adapter_flipped_bytes_nan_and_bad_config(tmp_path):
    model = tiny_ttt_model(dtype=torch.float32)
    folder = save_ttt_checkpoint(model, tmp_path / "adapter")
    w = folder / "ttt.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load_ttt_checkpoint(model, folder)
    folder = save_ttt_checkpoint(model, tmp_path / "adapter2")
    cfg = json.loads((folder / "ttt_config.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(folder / "ttt.safetensors"))
    k = next(iter(t))
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(folder / "ttt.safetensors"))
    cfg.pop("sha256")
    (folder / "ttt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="NaN"):
        load_ttt_checkpoint(model, folder)
    (folder / "ttt_config.json").write_text('{"format": "moshi-ttt-adapter", ')
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_ttt_checkpoint(model, folder)
    (folder / "ttt_config.json").write_text(json.dumps({**cfg, "ttt_layers": "all"}))
    with pytest.raises(WeightsError, match="ttt_layers"):
        load_ttt_checkpoint(model, folder)
    (folder / "ttt_config.json").write_text(json.dumps({**cfg, "ttt": {**cfg["ttt"], "bogus": 1}}))
    with pytest.raises(WeightsError, match="bogus"):
        load_ttt_checkpoint(model, folder)


def test_stock_weights_with_nan_are_refused(tmp_path):
    kw = tiny_lm_kwargs(context=8)
    stock = loaders.get_moshi_lm(None, lm_kwargs=kw, device="cpu", dtype=torch.float32)
    sd = {k: v.contiguous().clone() for k, v in stock.state_dict().items()}
    sd["text_linear.weight"][0, 0] = float("inf")
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    save_file(sd, str(weights))
    config.write_text(json.dumps(kw))
    with pytest.raises(WeightsError, match="text_linear.weight"):
        load_lm(weights, config, TTTConfig(layers="all"), dtype=torch.float32)


def test_eval_on_data_of_another_layout_and_wrong_typed_config(tmp_path, capsys):
    data = tmp_path / "train"
    write_corpus(SynthConfig(seed=0, num_files=2, frames_min=64, frames_max=64), data, progress=False)
    run = tmp_path / "run"
    rc = cli_main(["train", "--quiet", "--set", f"run_dir={run}", "--set", f"data.train={data}", "--set",
                   "data.eval=null", "--set", "steps=1", "--set", "data.chunk_frames=32", "--set", "data.lanes=1",
                   "--set", "ttt.layers=[1]"])
    assert rc == 0
    capsys.readouterr()
    other = tmp_path / "other"                              # a consistent dataset of another layout
    write_corpus(SynthConfig(seed=0, num_files=2, frames_min=64, frames_max=64, n_q=6, dep_q=3), other,
                 progress=False)
    assert len(EncodedDataset(other)) == 2
    rc = cli_main(["eval", str(run), "--data", str(other), "--out", str(tmp_path / "ev"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "another layout" in err and "Traceback" not in err, err
    bad = tmp_path / "c.yaml"
    bad.write_text("ttt:\n  layers: {a: 1}\n")
    with pytest.raises(ConfigError, match="ttt"):
        load_train_config(bad)


def test_codes_file_bit_flip_is_detected(tmp_path):
    write_corpus(SynthConfig(seed=0, num_files=2, frames_min=64, frames_max=64), tmp_path / "d", progress=False)
    ds = EncodedDataset(tmp_path / "d")
    fid = ds.file_ids[0]
    ref = ds.load(fid).codes
    path = tmp_path / "d" / ds[fid].path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01                                   # one bit of one code, still in range
    path.write_bytes(bytes(raw))
    ds = EncodedDataset(tmp_path / "d")
    with pytest.raises(DataError, match="corrupted"):
        ds.load(fid)
    assert ref.shape[0] == 5
