"""The synthetic long-memory corpus: recall targets need memory beyond the window; the control has none."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from moshi_ttt.data import ChunkStream, EncodedDataset, SynthConfig, generate_file  # noqa: E402
from moshi_ttt.data.commands import register  # noqa: E402
from moshi_ttt.model.presets import tiny_lm_kwargs  # noqa: E402

CFG = SynthConfig()
L, W, DQ = CFG.motif_len, CFG.context, CFG.dep_q
# Attention's reach over the 4 stacked layers (4*(32-1) + 2 + 1; moshi_ttt.model.reach, measured by
# perturbation in tests/test_model_reach.py): a frame t - R or older cannot change frame t's predictions.
R = 127
CUE_ROW = 1 + DQ  # first user codebook


def cue_positions(codes: torch.Tensor) -> dict[int, list[int]]:
    """From the data alone: slot j -> frames t whose cue (user row at t - 1) announces slot j."""
    cue = codes[CUE_ROW]
    out: dict[int, list[int]] = {}
    for t in range(1, codes.shape[1]):
        if int(cue[t - 1]) < L:
            out.setdefault(int(cue[t - 1]), []).append(t)
    return out


def test_defaults_fit_the_tiny_preset():
    kw = tiny_lm_kwargs()
    assert (CFG.n_q, CFG.dep_q, CFG.card, CFG.text_card, CFG.context) == (4, 2, 64, 64, 32)
    assert (kw["n_q"], kw["dep_q"], kw["card"], kw["text_card"], kw["context"]) == (4, 2, 64, 64, 32)
    assert CFG.reach == R and kw["num_layers"] == CFG.num_layers == 4
    assert CFG.text_padding_id == kw["existing_text_padding_id"]
    assert SynthConfig.from_lm_kwargs(kw) == CFG
    assert CFG.frames_min >= 6 * W and CFG.gap_min >= R
    with pytest.raises(ValueError, match="gap_min"):
        SynthConfig(gap_min=W + 1)  # beyond one window, but within the stacked layers' reach
    with pytest.raises(ValueError, match="gap_min"):
        SynthConfig(gap_min=R - 1)


def test_deterministic_and_in_moshi_layout():
    a, b = generate_file(CFG, 3), generate_file(CFG, 3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.recall_mask, b.recall_mask)
    assert not torch.equal(generate_file(SynthConfig(seed=1), 3).codes[:, :100], a.codes[:, :100])
    c = a.codes
    assert c.dtype == torch.int64 and c.shape[0] == 1 + CFG.n_q and CFG.frames_min <= c.shape[1] <= CFG.frames_max
    assert c[0].min() >= 0 and c[0].max() < 64 and c[1:].min() >= 0 and c[1:].max() < 64
    # moshi's text convention: end-of-padding (0) only right before a token, padding (3) elsewhere
    text = c[0].tolist()
    for t, tok in enumerate(text[:-1]):
        if tok == 0:
            assert text[t + 1] >= 4
        if text[t + 1] >= 4 and tok == 3:
            pytest.fail(f"token at {t + 1} follows padding without end-of-padding")


def test_recall_targets_copy_the_shown_motif_from_beyond_the_window():
    n_targets = 0
    for i in range(20):
        f = generate_file(CFG, i)
        codes, mask = f.codes, f.recall_mask
        slots = cue_positions(codes)
        assert sorted(slots) == list(range(L))
        first = {j: ts[0] for j, ts in slots.items()}
        expected_mask = torch.zeros_like(mask)
        for j, ts in slots.items():
            for t in ts[1:]:
                expected_mask[t] = True
                # memory solves it: the Moshi streams repeat the first occurrence exactly
                assert torch.equal(codes[: 1 + DQ, t], codes[: 1 + DQ, first[j]])
                # attention does not: no frame of any earlier occurrence (motif frames and their cues,
                # one frame earlier) within the reach of frame t's predictions (t - f < R)
                earlier = [x - j for x in ts if x < t]  # starts of the earlier occurrences
                seen = [s for s in earlier if any(t - f < R for f in range(s - 1, s + L))]
                assert seen == [], (i, j, t, seen)
        assert torch.equal(mask, expected_mask)
        n_targets += int(mask.sum())
    assert n_targets > 20 * 2 * L  # at least two recalls per file on average


def test_window_of_a_recall_target_carries_no_information_about_it():
    """Intervention: change one motif entry; every frame within attention's reach of the target is unchanged."""
    f = generate_file(CFG, 7)
    motif = f.motifs[0].numpy()
    for row in range(1 + DQ):
        for j in range(L):
            other = motif.copy()
            lo = CFG.first_text_id if row == 0 else 0
            hi = CFG.text_card if row == 0 else CFG.card
            other[row, j] = lo + (other[row, j] - lo + 1) % (hi - lo)
            g = generate_file(CFG, 7, motif=other)
            diff = (f.codes != g.codes).nonzero().tolist()
            assert diff == [[row, s + j] for s in f.starts]
            for s in f.starts[1:]:
                t = s + j
                lo_t = max(0, t - R + 1)  # frames f with t - f < R
                a, b = f.codes[:, lo_t:t + 1].clone(), g.codes[:, lo_t:t + 1].clone()
                assert a[row, -1] != b[row, -1]  # the target differs...
                a[row, -1] = b[row, -1] = -1
                assert torch.equal(a, b)  # ...while everything in view is identical


def _predict_rates(cfg, files=600):
    """Accuracy on recall targets (audio row 1) of a memory copy and of a reach-limited predictor.

    One target per file and slot (the first recall), so that the samples are independent.
    """
    targets, mem_hits, win_hits = [], 0, 0
    for i in range(files):
        f = generate_file(cfg, i)
        slots = cue_positions(f.codes)
        for ts in slots.values():
            for t in ts[1:2]:
                y = int(f.codes[1, t])
                targets.append(y)
                mem_hits += y == int(f.codes[1, ts[0]])
                window = f.codes[1, max(0, t - R + 1):t]  # best guess in view: the most frequent code
                win_hits += y == int(torch.mode(window).values)
    n = len(targets)
    return np.array(targets), mem_hits / n, win_hits / n


def _entropy_nats(values, k):
    counts = np.bincount(values, minlength=k)
    p = counts[counts > 0] / counts.sum()
    # Miller-Madow bias correction of the plug-in estimate
    return float(-(p * np.log(p)).sum() + (np.count_nonzero(counts) - 1) / (2 * counts.sum()))


def test_recall_targets_are_at_chance_without_memory_and_control_has_no_dependence():
    chance = 1 / CFG.card
    for control in (False, True):
        cfg = SynthConfig(control=control)
        targets, mem_acc, win_acc = _predict_rates(cfg)
        n = len(targets)
        assert n == 600 * L
        # uniform over the 64 codes: entropy at chance, chi-square does not reject uniformity
        assert abs(_entropy_nats(targets, CFG.card) - math.log(CFG.card)) < 0.05
        assert stats.chisquare(np.bincount(targets, minlength=CFG.card)).pvalue > 1e-3
        # a predictor limited to the window is at chance (binomial 5-sigma bound)
        assert win_acc < chance + 5 * math.sqrt(chance * (1 - chance) / n)
        if control:
            assert mem_acc < chance + 5 * math.sqrt(chance * (1 - chance) / n)  # nothing to remember
        else:
            assert mem_acc == 1.0  # memory of the first occurrence predicts every target


def test_control_has_the_same_background_cues_and_labels():
    a, b = generate_file(SynthConfig(), 5), generate_file(SynthConfig(control=True), 5)
    assert torch.equal(a.recall_mask, b.recall_mask) and a.starts == b.starts
    differs = (a.codes != b.codes).any(0)
    assert not (differs & ~a.recall_mask).any()
    assert differs[a.recall_mask].float().mean() > 0.9


def test_synth_command_writes_encoded_datasets(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moshi-ttt")
    register(parser.add_subparsers(dest="command"))
    for extra, name in (([], "mem"), (["--control"], "ctl")):
        args = parser.parse_args(["synth", "--out", str(tmp_path / name), "--num-files", "5", "--quiet", *extra])
        assert args.func(args) == 0
    mem, ctl = EncodedDataset(tmp_path / "mem"), EncodedDataset(tmp_path / "ctl")
    assert len(mem) == len(ctl) == 5
    assert mem.meta["synthetic"]["kind"] == "memory" and ctl.meta["synthetic"]["kind"] == "control"
    assert mem.meta["synthetic"]["reach"] == R and mem.meta["synthetic"]["gap_min"] >= R
    assert mem.layout.n_q == 4 and mem.layout.dep_q == 2
    for fid_m, fid_c in zip(mem.file_ids, ctl.file_ids):
        fm, fc = mem.load(fid_m), ctl.load(fid_c)
        assert torch.equal(fm.codes, generate_file(CFG, mem[fid_m].source["index"]).codes)
        assert torch.equal(fm.recall_mask, fc.recall_mask) and fm.recall_mask.any()
    # the chunk stream carries the labels
    batch = next(iter(ChunkStream(mem, 2, 64, shuffle=False)))
    first = mem.load(mem.file_ids[0])
    assert torch.equal(batch.recall_mask[0], first.recall_mask[:64])
    assert "wrote 5 synthetic (control)" in capsys.readouterr().err
