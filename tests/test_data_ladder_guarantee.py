"""The ladder's guarantees, re-checked from the written files alone (no generator code), and by a
float64 model of the same reach.

Everything below is derived from ``dataset.json`` (layout, num_layers, context, delays, chunk and
span sizes, num_keys) and the codes: occurrences are recovered by scanning the key row.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt import TTTConfig, build_lm, memory_lm_kwargs  # noqa: E402
from moshi_ttt.data import EncodedDataset, LadderConfig, write_ladder  # noqa: E402


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    out = {}
    # "odd": rung 1 up to gap 5, reach 21 (beyond-reach gap 22) and chunks of 31: the rung boundaries
    # fall between the 3-frame grid's gaps, so a label off by one frame shows
    odd = {"num_layers": 3, "context": 7, "chunk_frames": 31, "span_chunks": 3, "seed": 5}
    for name, kw in (("mem", {}), ("ctl", {"control": True}), ("voice", {"background": "voice", "seed": 3}),
                     ("odd", odd)):
        out[name] = EncodedDataset(write_ladder(LadderConfig(num_files=6, **kw), root / name, progress=False))
    return out


def _setup(ds):
    m = ds.meta["synthetic"]
    delays = m["delays"]
    dq = ds.layout.dep_q
    D = max(delays)
    key_row = 1 + dq
    assert delays[key_row] == 0 and delays[0] == 0
    # The reach from first principles: L stacked windows of W positions, input p-1-d_j, target p-d_k.
    R = m["num_layers"] * (m["context"] - 1) + 1 + max(delays) - min(delays) + 1
    return m, delays, dq, D, key_row, R


def _occurrences(codes, key_row, num_keys, P):
    """``(frame, key)`` of every occurrence: key-row runs of codes < num_keys, cut into blocks of P."""
    row = codes[key_row].tolist()
    occ, t = [], 0
    while t < len(row):
        if row[t] < num_keys:
            e = t
            while e < len(row) and row[e] == row[t]:
                e += 1
            assert (e - t) % P == 0, f"key run of {e - t} frames at {t} is not whole occurrences of {P}"
            occ += [(s, row[t]) for s in range(t, e, P)]
            t = e
        else:
            t += 1
    return occ


def _positions_of(frame_rows, delays):
    """Delayed positions at which raw frames enter the model as inputs: frame f of row j -> f + 1 + d_j."""
    return [f + 1 + delays[j] for f, j in frame_rows]


def _expected_rung(prev, t, m, delays, dq, D, key_row, R):
    C, S, W = m["chunk_frames"], m["chunk_frames"] * m["span_chunks"], m["context"]
    prev_frames = [(f, key_row) for f in range(prev, prev + 2 + D)] + [(prev + 1, k) for k in range(1 + dq)]
    prev_pos = _positions_of(prev_frames, delays)
    tgt_pos = [t + 1 + delays[k] for k in range(1 + dq)]       # where frame t + 1 of row k is predicted
    if max(tgt_pos) - min(prev_pos) <= W - 1 and max(prev_pos) <= min(tgt_pos):
        return 1                                                 # all in one attention window
    beyond = all((t + 1) - f >= R for f, _ in prev_frames)
    if not beyond:
        return 0
    if max(p // S for p in prev_pos) < min(p // S for p in tgt_pos):
        return 3
    if {p // S for p in prev_pos + tgt_pos} == {tgt_pos[0] // S} and max(p // C for p in prev_pos) < min(
            p // C for p in tgt_pos):
        return 2
    return 0


@pytest.mark.parametrize("name", ["mem", "ctl", "voice", "odd"])
def test_rungs_and_layout_from_the_written_files(corpora, name):
    ds = corpora[name]
    m, delays, dq, D, key_row, R = _setup(ds)
    assert m["reach"] == R
    P = 2 + D
    totals = {0: 0, 1: 0, 2: 0, 3: 0}
    for fid in ds.file_ids:
        ef = ds.load(fid)
        codes, rung = ef.codes, ef.recall_rung
        assert torch.equal(ef.recall_mask, rung > 0)
        occ = _occurrences(codes, key_row, m["num_keys"], P)
        assert len({k for _, k in occ}) == m["num_bindings"]
        expect = torch.zeros_like(rung)
        last, values = {}, {}
        for t, key in occ:
            v = codes[:1 + dq, t + 1]
            assert v[0] >= m["first_text_id"]                   # a value: a real text id...
            if m["background"] == "zero":                        # ...and the only non-padding text
                assert (codes[0, t] == ds.layout.text_padding_id) and (codes[0, t + 2] == ds.layout.text_padding_id)
            if key in last:
                r = _expected_rung(last[key], t, m, delays, dq, D, key_row, R)
                expect[t + 1] = r
                totals[r] += 1
                if r >= 2:  # no frame of ANY earlier occurrence of this key within the reach
                    assert all((t + 1) - f >= R for s, k in occ if k == key and s < t for f in range(s, s + 2 + D))
                if r == 1:
                    assert t - last[key] <= m["context"] - 1 - D
            values.setdefault(key, []).append(v)
            last[key] = t
        assert torch.equal(rung, expect), fid
        if m["background"] == "zero":
            value_frames = {t + 1 for t, _ in occ}
            text_tokens = set((codes[0] != ds.layout.text_padding_id).nonzero().view(-1).tolist())
            assert text_tokens == value_frames
        if not m["control"]:  # every occurrence of a key holds the same value
            for vs in values.values():
                assert all(torch.equal(vs[0], v) for v in vs)
    assert min(totals[1], totals[2], totals[3]) >= 10 * len(ds)
    assert {str(k): v for k, v in totals.items()} == m["rung_counts"]


def test_control_values_differ_at_chance(corpora):
    ds = corpora["ctl"]
    m, delays, dq, D, key_row, R = _setup(ds)
    same = n = 0
    chance = 0.0
    for fid in ds.file_ids:
        codes = ds.load(fid).codes
        last = {}
        for t, key in _occurrences(codes, key_row, m["num_keys"], 2 + D):
            if key in last:
                same += int((codes[:1 + dq, t + 1] == codes[:1 + dq, last[key] + 1]).sum())
                n += 1 + dq
            last[key] = t
    chance = (1 / (ds.layout.text_card - m["first_text_id"]) + dq / ds.layout.card) / (1 + dq)
    sd = math.sqrt(chance * (1 - chance) / n)
    assert n > 600 and abs(same / n - chance) < 5 * sd + 1e-9, (same, n, chance)


def test_model_of_the_same_reach_cannot_see_rung_2_3_writes(corpora):
    """Perturb the whole previous occurrence of a read: on a float64 model (TTT off) of the same reach
    the read's target logits are exactly unchanged for rungs 2 and 3, and change for rung 1."""
    ds = corpora["mem"]
    m, delays, dq, D, key_row, R = _setup(ds)
    kw = memory_lm_kwargs()
    assert (kw["num_layers"], kw["context"], list(kw["delays"])) == (m["num_layers"], m["context"], delays)
    torch.manual_seed(0)
    model = build_lm(kw, TTTConfig(enable=False), dtype=torch.float64).eval()
    ef = ds.load(ds.file_ids[0])
    codes = ef.codes[None]
    occ = _occurrences(ef.codes, key_row, m["num_keys"], 2 + D)
    prev_of, last = {}, {}
    for t, key in occ:
        if key in last:
            prev_of[t] = last[key]
        last[key] = t

    def target_logits(c, t):
        with torch.no_grad():
            out = model(c)
        return torch.cat([out.text_logits[0, 0, t + 1], out.logits[0, :, t + 1].flatten()])

    checked = {1: 0, 2: 0, 3: 0}
    for t, s in prev_of.items():
        r = int(ef.recall_rung[t + 1])
        if r == 0 or checked[r] >= 2:
            continue
        other = codes.clone()
        other[0, :, s:s + 2 + D] = (other[0, :, s:s + 2 + D] + 1) % ds.layout.card  # every row, every frame
        a, b = target_logits(codes, t), target_logits(other, t)
        if r == 1:
            assert (a - b).abs().max() > 1e-6
        else:
            assert torch.equal(a, b), (t, s, r)
        checked[r] += 1
    assert checked == {1: 2, 2: 2, 3: 2}


@pytest.mark.parametrize("kw", [{}, {"num_layers": 3, "context": 7, "chunk_frames": 31, "span_chunks": 2},
                                {"context": 12, "chunk_frames": 16, "span_chunks": 3, "rung1_max_gap": 7}])
def test_read_rung_agrees_with_first_principles_on_every_gap(kw):
    """The generator's closed form against this file's derivation, for every (previous, read) pair."""
    cfg = LadderConfig(**kw)
    m = {**vars(cfg), "reach": cfg.reach}
    delays, dq, D, key_row = list(cfg.delays), cfg.dep_q, cfg.max_delay, 1 + cfg.dep_q
    R = cfg.num_layers * (cfg.context - 1) + 2 + D
    seen = set()
    for prev in range(0, 3 * cfg.span_frames):
        for t in range(prev + 2 + D, min(prev + 3 * cfg.span_frames, 4 * cfg.span_frames)):
            want = _expected_rung(prev, t, m, delays, dq, D, key_row, R)
            if want == 1:
                want = 1 if t - prev <= cfg.rung1_max_gap else 0  # the config may narrow rung 1
            assert cfg.read_rung(prev, t) == want, (prev, t)
            seen.add(want)
    assert seen == {0, 1, 2, 3}
