"""Evaluation JSON schema and the experiment report on synthetic results with a planted effect."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from moshi_ttt.eval.report import write_report
from moshi_ttt.eval.results import EvalResult, SchemaError

CONDS = [("A", "reset", "reset"), ("A", "reset", "persistent"), ("B", "persistent", "reset"),
         ("B", "persistent", "persistent"), ("C", "none", "none")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synth(effect: float, corpus: str = "long-memory", seeds=(0,), n_files: int = 16, n_chunks: int = 4,
          rng_seed: int = 0, conds=CONDS) -> list[dict]:
    """Raw evaluation JSON dicts. Files share a difficulty across arms (a paired design); the
    recall-target loss of B-persistent is scaled by (1 - effect), every other arm and metric is
    noise around the same values."""
    rng = np.random.default_rng(rng_seed)
    base = rng.normal(3.0, 0.3, n_files)
    rbase = rng.normal(2.5, 0.3, n_files)
    tokens = rng.integers(150, 200, (n_files, n_chunks))
    rtok = rng.integers(10, 16, (n_files, n_chunks))
    rtok[:, 0] = 0  # the motif is shown in chunk 0; recalls come later
    out = []
    for seed in seeds:
        for arm, tm, em in conds:
            files = []
            for f in range(n_files):
                chunks = []
                for k in range(n_chunks):
                    rec = None
                    if rtok[f, k]:
                        scale = 1 - effect if (tm, em) == ("persistent", "persistent") else 1.0
                        rec = float(rbase[f] * scale + rng.normal(0, 0.05))
                    loss = float(base[f] + rng.normal(0, 0.05))
                    drift = None if tm == "none" else 0.01 * (k + 1 if em == "persistent" else 1)
                    chunks.append({"chunk_index": k, "loss": loss, "text_loss": loss - 0.2, "audio_loss": loss + 0.1,
                                   "tokens": int(tokens[f, k]), "recall_loss": rec, "recall_tokens": int(rtok[f, k]),
                                   "state_drift": drift})
                files.append({"file_id": f"f{f:03d}", "num_frames": 64 * n_chunks, "chunks": chunks})
            out.append({"format": "moshi-ttt-eval", "version": 1, "arm": arm, "train_mode": tm, "eval_mode": em,
                        "seed": seed, "checkpoint": f"runs/{arm}/seed{seed}/checkpoint", "data": f"data/{corpus}",
                        "corpus": corpus, "chunk_frames": 64, "context": 32, "files": files})
    return out


def load(raw: list[dict]) -> list[EvalResult]:
    return [EvalResult.from_json(r) for r in raw]


# ---- schema -----------------------------------------------------------------------------------


def test_schema_round_trip_preserves_everything(tmp_path):
    raw = synth(0.0, n_files=3)[3]
    raw["model_note"] = "extra top-level key"  # unknown keys survive a round trip
    raw["files"][0]["chunks"][1]["extra_metric"] = 1.5
    r = EvalResult.from_json(json.dumps(raw))
    assert r.label == "B-persistent" and r.condition == ("persistent", "persistent")
    assert r.to_json() == raw
    path = r.save(tmp_path / "e.json")
    assert EvalResult.load(path).to_json() == raw
    assert EvalResult.from_json(synth(0.0, n_files=2)[4]).label == "C"


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["files"][1]["chunks"][2].update(recall_loss=None), "files[1].chunks[2].recall_loss"),
    (lambda r: r["files"][0]["chunks"][0].update(recall_loss=0.0), "files[0].chunks[0].recall_loss"),
    (lambda r: r["files"][2]["chunks"][1].update(loss=float("nan")), "files[2].chunks[1].loss"),
    (lambda r: r["files"][0]["chunks"][3].pop("tokens"), "files[0].chunks[3].tokens"),
    (lambda r: r["files"][0]["chunks"][1].update(tokens=-1), "files[0].chunks[1].tokens"),
    (lambda r: r["files"][0]["chunks"][1].update(tokens=0), "files[0].chunks[1].loss"),  # 0 tokens, a loss
    (lambda r: r["files"][0]["chunks"][2].update(loss=None), "files[0].chunks[2].loss"),  # tokens, no loss
    (lambda r: r["files"][1]["chunks"][2].update(chunk_index=1), "files[1].chunks[2].chunk_index"),
    (lambda r: r["files"][2].update(file_id="f000"), "files[2].file_id"),
    (lambda r: r.update(eval_mode="sometimes"), "eval_mode"),
    (lambda r: r.update(eval_mode="none"), "eval_mode"),  # TTT arm evaluated without TTT
    (lambda r: r.update(corpus="other"), "corpus"),
    (lambda r: r.update(version=2), "version"),
    (lambda r: r.update(seed=True), "seed"),
    (lambda r: r["files"][1].update(chunks=[]), "files[1].chunks"),
])
def test_schema_errors_name_the_field(mutate, field):
    raw = copy.deepcopy(synth(0.0, n_files=3)[0])
    mutate(raw)
    with pytest.raises(SchemaError) as err:
        EvalResult.from_json(raw)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_load_names_the_file(tmp_path):
    raw = synth(0.0, n_files=2)[0]
    raw["files"][1]["num_frames"] = -3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SchemaError, match=r"bad\.json: files\[1\]\.num_frames"):
        EvalResult.load(path)


# ---- report -----------------------------------------------------------------------------------

NUM = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def nums(cell: str) -> list[float]:
    """Numbers in a table cell; percentages as fractions."""
    return [float(t[:-1]) / 100 if t.endswith("%") else float(t) for t in NUM.findall(cell)]


def close_to_printed(printed: float, value: float, cell: str, significant: bool = False) -> bool:
    """``printed`` is ``value`` rounded as the cell shows it: to its decimals, or (p-values) to 3
    significant digits."""
    token = NUM.findall(cell)[0]
    if significant:
        return abs(printed - value) <= 5e-3 * abs(value) + 1e-15
    decimals = len(token.rstrip("%").split(".")[1]) if "." in token else 0
    scale = 100 if token.endswith("%") else 1
    return abs(printed - value) <= 0.5 * 10 ** -decimals / scale + 1e-12


def table_rows(section: str, header_start: str) -> list[list[str]]:
    lines = section.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def check_contrast_table(md: str, results: dict) -> int:
    checked = 0
    for name, corpus in results["corpora"].items():
        section = md.split(f"## Corpus: {name}")[1].split("## Corpus:")[0]
        rows = table_rows(section, "| contrast | metric |")
        entries = corpus["contrasts"]
        assert len(rows) == len(entries)
        for row, e in zip(rows, entries):
            assert row[0].startswith(f"({e['id']})")
            c = e["comparison"]
            if c is None:
                assert "skipped" in row[-1]
                continue
            assert (row[2], row[3]) == (c["x_name"], c["y_name"])
            assert int(row[4]) == c["n"]
            cells = {5: [c["mean_x"]], 6: [c["mean_y"]], 7: [c["mean_diff"], c["diff_ci_low"], c["diff_ci_high"]],
                     8: [c["rel_change"], c["rel_ci_low"], c["rel_ci_high"]], 9: [c["wilcoxon_p"]],
                     10: [c["ttest_p"]]}
            for col, values in cells.items():
                printed = nums(row[col])
                assert len(printed) == len(values), (row[col], values)
                for p, v in zip(printed, values):
                    assert close_to_printed(p, v, row[col], significant=col >= 9), (name, e["id"], col, row[col], v)
                    checked += 1
            assert row[11] == c["decision"]
    return checked


def token_weighted_recall(raw: dict) -> list[float]:
    """Per-file recall-target loss computed here from the raw JSON (independent of stats.py)."""
    out = []
    for f in raw["files"]:
        w = np.array([c["recall_tokens"] for c in f["chunks"]], dtype=float)
        v = np.array([c["recall_loss"] or 0.0 for c in f["chunks"]], dtype=float)
        out.append((w * v).sum() / w.sum())
    return out


def assert_png(path):
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_planted_effect(tmp_path):
    raw = synth(0.3, seeds=(0, 1)) + synth(0.0, corpus="control", rng_seed=1)
    logs = {"A": [{"step": i, "loss": 5 - 0.01 * i, "ttt_state_drift": 0.001 * i, "gate_mean": 0.1}
                  for i in range(100)],
            "B": [{"step": i, "loss": 5 - 0.012 * i} for i in range(100)] + [{"step": 100, "loss": float("nan")}],
            "C": [{"step": i, "loss": 5 - 0.008 * i} for i in range(100)]}
    config = {"lr": 1e-4, "ttt": {"layers": "middle", "mini_batch_size": 16}}
    command = "moshi-ttt experiment --config configs/tiny.yaml --out runs/exp"
    md_path = write_report(tmp_path / "rep", load(raw), logs, config, command, n_boot=2000)
    out = md_path.parent
    md = md_path.read_text()
    results = json.loads((out / "results.json").read_text())

    # Verdict: the planted 30% effect on recall is kept; the control shows none (sanity check).
    assert results["overall"]["decision"] == "keep"
    assert results["overall"]["corpus"] == "long-memory" and results["overall"]["metric"] == "recall_loss"
    conclusion = md.split("## Conclusion")[1].split("## Corpus")[0]
    verdict = next(line for line in conclusion.splitlines() if line.startswith("**Verdict:"))
    assert verdict.startswith("**Verdict: keep persistence")
    assert results["sanity_check"]["passed"] is True
    assert "absent on the control" in conclusion
    assert results["corpora"]["control"]["headline"]["decision"] == "no significant difference"

    # Independent numbers: contrast (ii) recall means from the raw JSON (seeds averaged per file).
    lm = results["corpora"]["long-memory"]
    ii = next(e for e in lm["contrasts"] if e["id"] == "ii" and e["metric"] == "recall_loss")["comparison"]
    a_reset = np.mean([token_weighted_recall(r) for r in raw if r["corpus"] == "long-memory"
                       and (r["train_mode"], r["eval_mode"]) == ("reset", "reset")], axis=0)
    b_pers = np.mean([token_weighted_recall(r) for r in raw if r["corpus"] == "long-memory"
                      and (r["train_mode"], r["eval_mode"]) == ("persistent", "persistent")], axis=0)
    assert ii["mean_x"] == pytest.approx(a_reset.mean(), rel=1e-12)
    assert ii["mean_y"] == pytest.approx(b_pers.mean(), rel=1e-12)
    assert ii["rel_change"] == pytest.approx(-0.3, abs=0.02)
    assert ii["rel_ci_low"] < -0.25 and ii["rel_ci_high"] < -0.25
    assert ii["n"] == 16 and ii["wilcoxon_p"] < 0.05

    # Every number in the markdown contrast tables is the one in results.json.
    assert check_contrast_table(md, results) > 100
    # The conditions table too.
    rows = table_rows(md.split("## Corpus: long-memory")[1], "| condition |")
    for row in rows:
        s = lm["conditions"][row[0]]
        for col, key in ((6, "later_chunk_loss"), (7, "recall_loss")):
            printed = nums(row[col])
            for p, v in zip(printed, (s[key]["mean"], s[key]["low"], s[key]["high"])):
                assert close_to_printed(p, v, row[col])

    # Seeds: per-seed spread reported for contrasts whose arms share seeds 0 and 1.
    assert lm["contrasts"][0]["seed_spread"]["n"] == 2

    # Configuration and the exact command are in the report.
    assert command in md and '"mini_batch_size": 16' in md

    # Training summary: B's NaN row is counted, not averaged.
    assert results["training"]["B"]["non_finite_losses"] == 1
    assert results["training"]["A"]["final_loss"] == pytest.approx(np.mean([5 - 0.01 * i for i in range(90, 100)]))

    # Every figure embedded in the markdown exists and is a valid PNG.
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"training_curves.png", "loss_by_chunk_long-memory.png", "recall_loss_long-memory.png",
            "state_drift_long-memory.png", "contrasts_long-memory.png", "contrasts_control.png"} <= set(embedded)
    for name in embedded:
        assert_png(out / name)


def test_report_null_effect_says_no_significant_difference(tmp_path):
    md_path = write_report(tmp_path, load(synth(0.0, rng_seed=4)), None, {}, "cmd", n_boot=1000, make_plots=False)
    md = md_path.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["decision"] == "no significant difference"
    conclusion = md.split("## Conclusion")[1].split("## Corpus")[0]
    verdict = next(line for line in conclusion.splitlines() if line.startswith("**Verdict:"))
    assert verdict.startswith("**Verdict: no significant difference")
    assert "keep persistence" not in conclusion
    assert check_contrast_table(md, results) > 50
    assert not list(tmp_path.glob("*.png"))


def test_report_missing_arm_skips_contrast_with_note(tmp_path):
    raw = [r for r in synth(0.3) if r["arm"] != "C"]
    md_path = write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=500)
    md = md_path.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    skipped = [e for e in results["corpora"]["long-memory"]["contrasts"] if e["skipped"]]
    assert {e["id"] for e in skipped} == {"iii", "v"}
    assert all("C not evaluated" in e["skipped"] for e in skipped)
    assert "skipped: C not evaluated on this corpus" in md
    assert results["overall"]["decision"] == "keep"
    assert check_contrast_table(md, results) > 50
    assert_png(tmp_path / "loss_by_chunk_long-memory.png")


def test_report_only_baseline_and_no_ttt(tmp_path):
    # No B arm at all: the headline cannot be decided, and the report says so instead of crashing.
    raw = [r for r in synth(0.0, n_files=8) if r["arm"] in ("A", "C")]
    md = write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=200, make_plots=False).read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["decision"] is None
    assert "not decided: B-persistent not evaluated" in md


def test_report_file_missing_in_one_arm_is_an_error_naming_it(tmp_path):
    raw = synth(0.3, n_files=8)
    del raw[0]["files"][5]  # A-reset lacks f005
    with pytest.raises(ValueError, match="'f005'"):
        write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=200, make_plots=False)


def test_report_corpus_without_recall_targets_decides_on_later_chunk_loss(tmp_path):
    raw = synth(0.0, corpus="real", n_files=10, rng_seed=2)
    for r in raw:
        for f in r["files"]:
            for c in f["chunks"]:
                c.update(recall_loss=None, recall_tokens=0)
                if (r["train_mode"], r["eval_mode"]) == ("persistent", "persistent") and c["chunk_index"] >= 1:
                    c["loss"] *= 0.8  # persistent memory lowers the loss of later chunks by 20%
    md = write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=500).read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"] == {"corpus": "real", "contrast": "ii", "metric": "later_chunk_loss",
                                  "decision": "keep", "verdict": results["overall"]["verdict"], "at_chance": False}
    recall = [e for e in results["corpora"]["real"]["contrasts"] if e["metric"] == "recall_loss"]
    assert all(e["skipped"] == "no recall targets in this corpus" for e in recall)
    assert "recall_loss_real.png" not in md
    assert_png(tmp_path / "loss_by_chunk_real.png")


# ---- chance level -----------------------------------------------------------------------------


def with_chance(raw: list[dict], chance: float) -> list[dict]:
    """The evaluator's ``recall_chance_nats`` planted into every result."""
    for r in raw:
        r["recall_chance_nats"] = chance
    return raw


def test_report_all_arms_at_chance_says_so_first_and_decides_nothing(tmp_path):
    # Planted: a 3% "effect" between arms whose recall loss (~2.3-2.4 nats) is within 1% of chance (2.4)
    # or above it, by their 95% CIs: a "significant" difference that says nothing about memory.
    raw = with_chance(synth(0.03, rng_seed=5) + synth(0.0, corpus="control", rng_seed=6), 2.4)
    md_path = write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=500,
                           facts={"wall_time_s": 75.0, "torch": "2.9.1", "cpu": "test CPU", "load_1min": 3.5,
                                  "git_commit": "abc123"})
    md = md_path.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    first = "\n".join(md.splitlines()[:4])
    assert "No arm learned the recall targets (all at chance): this run cannot tell whether memory helps" in first
    assert results["overall"]["at_chance"] is True and results["overall"]["decision"] is None
    lm = results["corpora"]["long-memory"]
    assert lm["chance"]["recall_loss"] == pytest.approx(2.4)
    assert lm["headline"]["verdict"].startswith("no arm learned the recall targets")
    conclusion = md.split("## Conclusion")[1].split("## Corpus")[0]
    assert "keep the simpler" not in conclusion.split("\n\n")[1]  # the verdict paragraph decides nothing
    assert "Chance level of the recall-target loss: 2.4000" in md
    # Run facts in the report, wall time readable.
    facts = md.split("## Run facts")[1]
    assert "75 s (1.2 min)" in facts and "2.9.1" in facts and "abc123" in facts and "3.50" in facts
    assert_png(tmp_path / "recall_loss_long-memory.png")


def test_report_an_arm_below_chance_keeps_the_decision(tmp_path):
    # Same data, chance 4.0: every arm is far below it, so the decision rule applies as usual.
    raw = with_chance(synth(0.3, rng_seed=5), 4.0)
    md = write_report(tmp_path, load(raw), None, {}, "cmd", n_boot=500, make_plots=False).read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["at_chance"] is False and results["overall"]["decision"] == "keep"
    assert "No arm learned" not in md and "No arm did" not in md


def test_chance_verdict_unit():
    from moshi_ttt.eval.report import AT_CHANCE_STATEMENT, chance_verdict
    from moshi_ttt.eval.stats import MeanCI

    at = {"A": MeanCI(16, 4.17, 4.15, 4.19), "B": MeanCI(16, 4.16, 4.13, 4.19)}
    assert chance_verdict(at, 4.16) == AT_CHANCE_STATEMENT
    assert chance_verdict(at, None) is None                                      # unknown chance: no claim
    learned = {**at, "B": MeanCI(16, 3.0, 2.9, 3.1)}
    assert chance_verdict(learned, 4.16) is None
    # Below chance by less than the margin is still chance.
    assert chance_verdict({"A": MeanCI(16, 4.13, 4.12, 4.14)}, 4.16) == AT_CHANCE_STATEMENT


def test_plot_axes_are_sized_to_the_data():
    from types import SimpleNamespace

    from moshi_ttt.eval.plots import contrast_limits, metric_limits
    from moshi_ttt.eval.stats import MeanCI

    # Recall losses 4.15-4.19 and chance 4.16: the axis spans them, not 0..4.2 (equal-looking bars).
    lo, hi = metric_limits([MeanCI(16, 4.17, 4.15, 4.19), MeanCI(16, 4.18, 4.16, 4.20)], chance=4.09)
    assert 4.0 < lo < 4.09 and 4.20 < hi < 4.3
    # +-0.6% estimates are not squeezed against a -10% threshold: the axis stays within a few percent.
    comps = [SimpleNamespace(rel_change=0.003, rel_ci_low=-0.0001, rel_ci_high=0.0059),
             SimpleNamespace(rel_change=-0.006, rel_ci_low=-0.012, rel_ci_high=0.0)]
    lo, hi = contrast_limits(comps)
    assert -2.0 < lo < -1.2 and 0.59 < hi < 1.0
