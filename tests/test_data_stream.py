"""In-order chunk streams and the encoded-dataset format they read."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.data import ChunkStream, CodesLayout, DataError, EncodedDataset, EncodedDatasetWriter  # noqa: E402

LAYOUT = CodesLayout(n_q=4, dep_q=2, card=64, text_card=64)
LENGTHS = [37, 5, 64, 16, 17, 90, 1]  # 7 files; chunks of 16 -> 3, 1, 4, 1, 2, 6, 1
CHUNK = 16


def signature_codes(file_idx: int, T: int) -> torch.Tensor:
    """Codes that say where they come from: row0 = file + 4, rows 1/2 = frame // 64, frame % 64."""
    t = torch.arange(T)
    rows = [torch.full((T,), file_idx + 4), t // 64, t % 64, (t * 7) % 64, torch.full((T,), file_idx)]
    return torch.stack(rows)


def decode_frames(codes: torch.Tensor) -> list[int]:
    """[K, n] signature codes -> frame indices."""
    return (codes[1] * 64 + codes[2]).tolist()


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven")
    with EncodedDatasetWriter(root, LAYOUT, {"tool": "test"}) as w:
        for i, T in enumerate(LENGTHS):
            mask = torch.zeros(T, dtype=torch.bool)
            mask[::3] = True
            w.add(f"f{i}", signature_codes(i, T), recall_mask=mask, source={"i": i})
    return root


def run(stream, n=None):
    out = []
    for b in stream:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_dataset_roundtrip(seven):
    ds = EncodedDataset(seven)
    assert ds.file_ids == [f"f{i}" for i in range(7)]
    assert [f.num_frames for f in ds.files] == LENGTHS
    assert ds.layout == LAYOUT
    f = ds.load("f2")
    assert f.codes.dtype == torch.int64 and torch.equal(f.codes, signature_codes(2, 64))
    assert f.recall_mask.dtype == torch.bool and f.recall_mask[::3].all() and not f.recall_mask[1::3].any()
    index = [json.loads(line) for line in (seven / "index.jsonl").read_text().splitlines()]
    assert index[0] == {"file_id": "f0", "path": "codes/f0.safetensors", "num_frames": 37, "source": {"i": 0}}


def test_three_lanes_seven_files_each_chunk_once_in_order(seven):
    ds = EncodedDataset(seven)
    stream = ChunkStream(ds, batch_size=3, chunk_frames=CHUNK, seed=3, epochs=1)
    batches = run(stream)
    expected = {(f"f{i}", c) for i, T in enumerate(LENGTHS) for c in range(math.ceil(T / CHUNK))}
    seen = []
    per_lane_file: dict[int, str | None] = {}
    for b in batches:
        assert b.codes.shape == (3, 5, CHUNK) and b.codes.dtype == torch.int64
        for lane in range(3):
            fid = b.file_id[lane]
            if not b.active[lane]:
                assert fid is None and b.reset[lane] and not b.valid[lane].any()
                assert (b.codes[lane] == -1).all() and b.chunk_index[lane] == -1
                continue
            i, c = int(fid[1:]), int(b.chunk_index[lane])
            seen.append((fid, c))
            n_valid = min(CHUNK, LENGTHS[i] - c * CHUNK)
            # valid marks exactly the real frames; padding is moshi's zero_token_id (-1)
            assert b.valid[lane].tolist() == [True] * n_valid + [False] * (CHUNK - n_valid)
            assert (b.codes[lane][:, n_valid:] == -1).all()
            assert decode_frames(b.codes[lane][:, :n_valid]) == list(range(c * CHUNK, c * CHUNK + n_valid))
            assert (b.codes[lane][0, :n_valid] == i + 4).all()
            frames = torch.arange(c * CHUNK, c * CHUNK + n_valid)
            assert b.recall_mask[lane].tolist() == (frames % 3 == 0).tolist() + [False] * (CHUNK - n_valid)
            # reset exactly at file starts; first/last flags
            assert bool(b.reset[lane]) == (c == 0) == bool(b.is_first[lane])
            assert bool(b.is_last[lane]) == (c == math.ceil(LENGTHS[i] / CHUNK) - 1)
            # within a lane, a file continues with the next chunk until its end
            if c > 0:
                assert per_lane_file[lane] == fid
            per_lane_file[lane] = fid
    assert len(seen) == len(set(seen)) and set(seen) == expected
    # in order within each file
    for i in range(7):
        cs = [c for f, c in seen if f == f"f{i}"]
        assert cs == sorted(cs)
    # lanes kept busy: an inactive lane only once no file is left to start
    starts = [k for k, b in enumerate(batches) for lane in range(3) if b.is_first[lane]]
    last_start = max(starts)
    for b in batches[: last_start + 1]:
        assert b.active.all()
    assert len(batches) == stream.steps_in_epoch(0)


def test_shuffle_per_epoch_and_seed(seven):
    ds = EncodedDataset(seven)

    def first_files(seed, epoch):
        s = ChunkStream(ds, 3, CHUNK, seed=seed)
        s.load_state_dict({**s.state_dict(), "epoch": epoch, "step": 0})
        order = []
        for b in run(s, s.steps_in_epoch(epoch)):
            order += [f for f, first in zip(b.file_id, b.is_first.tolist()) if first]
        return order

    assert first_files(0, 0) == first_files(0, 0)
    orders = {tuple(first_files(0, e)) for e in range(4)} | {tuple(first_files(1, 0))}
    assert len(orders) > 1
    for o in orders:
        assert sorted(o) == [f"f{i}" for i in range(7)]


def test_resume_mid_epoch_is_identical(seven):
    ds = EncodedDataset(seven)
    ref = run(ChunkStream(ds, 3, CHUNK, seed=11, epochs=2))
    for cut in (1, 4, len(ref) // 2 + 1):
        s = ChunkStream(ds, 3, CHUNK, seed=11, epochs=2)
        head = run(s, cut)
        state = json.loads(json.dumps(s.state_dict()))  # serialisable
        resumed = ChunkStream(ds, 3, CHUNK, seed=11, epochs=2)
        resumed.load_state_dict(state)
        tail = run(resumed)
        assert len(head) + len(tail) == len(ref)
        for a, b in zip(head + tail, ref):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.valid, b.valid)
            assert torch.equal(a.reset, b.reset) and a.file_id == b.file_id
            assert torch.equal(a.chunk_index, b.chunk_index) and (a.epoch, a.step) == (b.epoch, b.step)
    with pytest.raises(ValueError, match="batch_size"):
        ChunkStream(ds, 2, CHUNK, seed=11).load_state_dict(state)


def test_ranks_split_files_and_run_equal_steps(seven):
    ds = EncodedDataset(seven)
    streams = [ChunkStream(ds, 2, CHUNK, seed=5, rank=r, world_size=2, epochs=1) for r in range(2)]
    outs = [run(s) for s in streams]
    assert len(outs[0]) == len(outs[1])
    chunks = [{(f, int(c)) for b in out for f, c, a in zip(b.file_id, b.chunk_index, b.active) if a} for out in outs]
    files = [{f for f, _ in ch} for ch in chunks]
    assert not files[0] & files[1]
    expected = {(f"f{i}", c) for i, T in enumerate(LENGTHS) for c in range(math.ceil(T / CHUNK))}
    assert chunks[0] | chunks[1] == expected


def test_clips_mode_is_independent_chunks(seven):
    ds = EncodedDataset(seven)
    out = run(ChunkStream(ds, 4, CHUNK, seed=0, mode="clips", epochs=1))
    got = [(f, int(c)) for b in out for f, c, a in zip(b.file_id, b.chunk_index, b.active) if a]
    expected = {(f"f{i}", c) for i, T in enumerate(LENGTHS) for c in range(math.ceil(T / CHUNK))}
    assert sorted(got) == sorted(expected)
    assert all(b.reset.all() for b in out)
    # shuffled: the chunks of the long file do not come in order in the same lane
    assert got != sorted(got, key=lambda x: (int(x[0][1:]), x[1]))


def test_batch_to_device(seven):
    b = next(iter(ChunkStream(EncodedDataset(seven), 2, CHUNK)))
    c = b.to("cpu")
    assert torch.equal(c.codes, b.codes) and c.file_id == b.file_id


def test_missing_and_corrupt_codes_files_are_reported(tmp_path):
    with EncodedDatasetWriter(tmp_path, LAYOUT, {"tool": "test"}) as w:
        for i in range(4):
            w.add(f"g{i}", signature_codes(i, 20))
    (tmp_path / "codes" / "g1.safetensors").unlink()
    (tmp_path / "codes" / "g2.safetensors").write_bytes(b"\x00garbage")
    ds = EncodedDataset(tmp_path)
    assert ds.file_ids == ["g0", "g3"]
    problems = {os.path.basename(i.source): i.problem for i in ds.report.issues}
    assert "missing" in problems["g1.safetensors"] and "unreadable" in problems["g2.safetensors"]
    with pytest.raises(DataError, match="g1.safetensors"):
        EncodedDataset(tmp_path, strict=True)
    # without the header check, load() names the file
    lazy = EncodedDataset(tmp_path, verify=False)
    with pytest.raises(DataError, match="g2.safetensors"):
        lazy.load("g2")


def test_writer_rejects_codes_outside_layout(tmp_path):
    w = EncodedDatasetWriter(tmp_path, LAYOUT, {})
    bad = signature_codes(0, 8)
    bad[3, 0] = 64  # audio code == card
    with pytest.raises(ValueError, match="audio codes outside"):
        w.add("x", bad)
    with pytest.raises(ValueError, match="shape"):
        w.add("y", torch.zeros(3, 8, dtype=torch.long))


@pytest.mark.parametrize("mode", ["ordered", "clips"])
def test_ranks_play_their_lanes_of_the_one_process_schedule(seven, mode):
    """N processes of B lanes see exactly the batches of one process of N*B lanes, lane for lane
    (what makes a DDP run equal to a one-process run with the global batch)."""
    ds = EncodedDataset(seven)
    whole = run(ChunkStream(ds, 4, CHUNK, seed=3, mode=mode, epochs=2))
    parts = [run(ChunkStream(ds, 2, CHUNK, seed=3, mode=mode, rank=r, world_size=2, epochs=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for step, ref in enumerate(whole):
        for r in range(2):
            got, lanes = parts[r][step], slice(2 * r, 2 * r + 2)
            assert got.file_id == ref.file_id[lanes] and (got.epoch, got.step) == (ref.epoch, ref.step)
            for name in ("codes", "valid", "reset", "recall_mask", "chunk_index", "active"):
                assert torch.equal(getattr(got, name), getattr(ref, name)[lanes]), (step, r, name)
    # Every rank's position is the global one: rank 1 resumes from rank 0's state.
    s0 = ChunkStream(ds, 2, CHUNK, seed=3, mode=mode, rank=0, world_size=2, epochs=2)
    run(s0, 3)
    s1 = ChunkStream(ds, 2, CHUNK, seed=3, mode=mode, rank=1, world_size=2, epochs=2)
    s1.load_state_dict(s0.state_dict())
    assert next(iter(s1)).file_id == parts[1][3].file_id
