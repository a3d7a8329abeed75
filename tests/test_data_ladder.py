"""The key -> value ladder: layout in moshi's delayed domain, rung labels, on-disk plumbing."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt import TTTConfig, build_lm  # noqa: E402
from moshi_ttt.data import ChunkStream, EncodedDataset, LadderConfig, generate_ladder_file, write_ladder  # noqa: E402
from moshi_ttt.data.commands import register  # noqa: E402
from moshi_ttt.model.chunked import ChunkedLM  # noqa: E402
from moshi_ttt.model.presets import memory_lm_kwargs  # noqa: E402

CFG = LadderConfig(num_files=4)


def test_defaults_fit_the_memory_preset():
    kw = memory_lm_kwargs()
    assert LadderConfig.from_lm_kwargs(kw, num_files=4) == CFG
    assert (CFG.num_layers, CFG.context, CFG.max_delay) == (2, 8, 1)
    assert CFG.reach == 2 * 7 + 2 + 1 == 17
    assert CFG.num_frames == 3 * 4 * 32 and CFG.rung1_max_gap == 6 and CFG.beyond_gap == 18
    with pytest.raises(ValueError, match="key row"):
        LadderConfig(delays=(0, 0, 1, 1, 1))
    with pytest.raises(ValueError, match="rung1_max_gap"):
        LadderConfig(rung1_max_gap=7)


def test_rung1_share_adds_reads_within_reach_and_keeps_the_others():
    def counts(share):
        cfg = LadderConfig(num_files=8, rung1_share=share)
        tot = {1: 0, 2: 0, 3: 0}
        for i in range(cfg.num_files):
            for r, n in generate_ladder_file(cfg, i).rung_counts().items():
                if r:
                    tot[r] += n
        return tot

    one, three = counts(1.0), counts(3.0)
    assert one[1] == one[2] > 0 and one[3] > 0                     # equal quotas by default
    assert three[1] >= 2.5 * one[1] and three[2] == one[2] and three[3] >= 0.9 * one[3]
    with pytest.raises(ValueError, match="rung1_share"):
        LadderConfig(rung1_share=0)


def test_delayed_domain_puts_key_and_value_in_one_input_frame():
    """Through moshi_ttt.model.chunked's own indexing (what training sees), chunk by chunk: the read
    position of each row sees the key, and the value only at the next position, with the key."""
    f = generate_ladder_file(CFG, 0)
    torch.manual_seed(0)
    model = build_lm(memory_lm_kwargs(), TTTConfig(enable=False)).eval()
    seen_in, seen_tgt = [], []
    fwd_text, fwd_dep = model.forward_text, model.forward_depformer_training

    def record_text(seq, *a, **k):
        seen_in.append(seq.clone())
        return fwd_text(seq, *a, **k)

    def record_dep(seq, *a, **k):
        seen_tgt.append(seq.clone())
        return fwd_dep(seq, *a, **k)

    model.forward_text, model.forward_depformer_training = record_text, record_dep
    C = CFG.chunk_frames
    with torch.no_grad(), ChunkedLM(model, 1) as runner:
        for c in range(CFG.num_frames // C):
            runner.step(f.codes[None, :, c * C:(c + 1) * C], torch.tensor([c == 0]))
    seq_in, seq_tgt = torch.cat(seen_in, 2)[0], torch.cat(seen_tgt, 2)[0]  # [K, T] per position
    n_checked = 0
    for (t, b), value in zip(f.occurrences, f.values):
        key = int(f.keys[b])
        for k in range(1 + CFG.dep_q):
            d = CFG.delays[k]
            read, write = t + 1 + d, t + 2 + d
            assert int(seq_tgt[k, read]) == int(value[k])  # the read position predicts the value...
            assert int(seq_in[CFG.key_row, read]) == key  # ...with the key in view
            assert int(seq_in[k, read]) == int(f.codes[k, t])  # frame t, the value (t + 1) not yet in
            if write < CFG.num_frames:  # (an occurrence in the file's last slot is read, never written)
                assert int(seq_in[CFG.key_row, write]) == key and int(seq_in[k, write]) == int(value[k])
            n_checked += 1
    assert n_checked == 3 * len(f.occurrences) > 100


def test_rungs_are_balanced_and_dense():
    for i in range(4):
        f = generate_ladder_file(LadderConfig(num_files=4, rung1_share=1.0), i)
        c = f.rung_counts()
        assert min(c[1], c[2], c[3]) >= 12 and max(c[1], c[2], c[3]) <= 1.25 * min(c[1], c[2], c[3]), c
        assert torch.equal(f.recall_mask, f.recall_rung > 0)
        assert int(f.recall_mask.sum()) >= CFG.num_frames // 8  # a measured read every <= 8 frames
        d = generate_ladder_file(CFG, i).rung_counts()          # the default: rung 1 dense, 2-3 kept
        assert d[1] >= 4 * d[2] and d[2] >= 12 and d[3] >= 4, d


def test_control_changes_only_values():
    a = generate_ladder_file(CFG, 2)
    b = generate_ladder_file(LadderConfig(num_files=4, control=True), 2)
    assert a.occurrences == b.occurrences and torch.equal(a.recall_rung, b.recall_rung)
    diff = (a.codes != b.codes).nonzero()
    value_frames = {t + 1 for t, _ in a.occurrences}
    assert all(int(r) <= CFG.dep_q and int(t) in value_frames for r, t in diff.tolist())


def test_written_files_carry_rungs_through_the_chunk_stream(tmp_path):
    out = write_ladder(CFG, tmp_path / "kv", progress=False)
    ds = EncodedDataset(out)
    meta = ds.meta["synthetic"]
    assert meta["task"] == "kv" and meta["reach"] == 17 and meta["chunk_frames"] == 32
    assert meta["span_chunks"] == 4 and meta["control"] is False
    assert LadderConfig.from_meta(meta) == CFG
    assert len(meta["chance_nats"]["per_row"]) == 1 + CFG.dep_q
    expect = {str(k): sum(generate_ladder_file(CFG, i).rung_counts()[k] for i in range(4)) for k in range(4)}
    assert meta["rung_counts"] == expect
    ef = ds.load(ds.file_ids[1])
    assert ef.recall_rung.dtype == torch.int64 and torch.equal(ef.recall_rung, generate_ladder_file(CFG, 1).recall_rung)
    assert torch.equal(ef.recall_mask, ef.recall_rung > 0)
    stream = ChunkStream(ds, 2, 32, shuffle=False, epochs=1)
    seen = {}
    for batch in stream:
        assert batch.recall_rung.shape == (2, 32) and batch.recall_rung.dtype == torch.int64
        assert not (batch.recall_rung[~batch.valid] != 0).any()
        for b, fid in enumerate(batch.file_id):
            if fid is not None:
                seen.setdefault(fid, []).append(batch.recall_rung[b][batch.valid[b]])
    for fid, parts in seen.items():
        assert torch.equal(torch.cat(parts), ds.load(fid).recall_rung)


def test_synth_command_kv(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moshi-ttt")
    register(parser.add_subparsers(dest="command"))
    for extra, name in (([], "mem"), (["--control", "--background", "voice"], "ctl")):
        args = parser.parse_args(["synth", "--task", "kv", "--out", str(tmp_path / name), "--num-files", "3",
                                  "--quiet", *extra])
        assert args.func(args) == 0
    mem, ctl = EncodedDataset(tmp_path / "mem"), EncodedDataset(tmp_path / "ctl")
    assert mem.meta["synthetic"]["kind"] == "kv" and ctl.meta["synthetic"]["kind"] == "kv-control"
    assert ctl.meta["synthetic"]["background"] == "voice" and mem.meta["synthetic"]["reach"] == 17
    assert "reach 17 frames" in capsys.readouterr().err
