"""The positive control: the ladder's verdict rule on planted results, and a miniature ladder run."""

import json

import numpy as np
import pytest

from moshi_ttt.eval.experiment import load_experiment_config, run_experiment
from moshi_ttt.eval.ladder import analyse_ladder
from moshi_ttt.eval.results import EvalResult
from moshi_ttt.train.config import ConfigError

CHANCE = 4.137
AT_CHANCE = {1: 0.5, 2: CHANCE, 3: CHANCE}   # rung 1 solved, nothing beyond the reach


def planted(arm: str, mode: str, rung_means: dict[int, float], n_files: int = 16, seed: int = 0) -> EvalResult:
    """An evaluation whose files have the given per-rung losses (plus small per-file noise)."""
    rng = np.random.default_rng([seed, ord(arm), len(mode)])
    files = []
    for i in range(n_files):
        chunk = {"chunk_index": 0, "loss": 1.0, "text_loss": 1.0, "audio_loss": 1.0, "tokens": 100,
                 "recall_loss": None, "recall_tokens": 0, "state_drift": None}
        for r, m in rung_means.items():
            chunk[f"rung{r}_loss"] = float(m + 0.05 * rng.standard_normal())
            chunk[f"rung{r}_tokens"] = 30
        files.append({"file_id": f"f{i:02d}", "num_frames": 384, "chunks": [chunk]})
    train_mode = {"A": "reset", "B": "persistent", "C": "none"}[arm]
    return EvalResult.from_json({"format": "moshi-ttt-eval", "version": 1, "arm": arm, "train_mode": train_mode,
                                 "eval_mode": mode, "seed": seed, "checkpoint": "x", "data": "d", "corpus": "kv",
                                 "chunk_frames": 32, "context": 8, "files": files})


def test_memory_that_helps_is_detected():
    good = {1: 0.5, 2: 1.0, 3: 1.2}
    evals = [planted("B", "persistent", good), planted("B", "reset", AT_CHANCE),
             planted("A", "reset", AT_CHANCE), planted("C", "none", AT_CHANCE)]
    res = analyse_ladder(evals, "kv", CHANCE, control=False, n_boot=100)
    assert res.passed and "memory detected" in res.verdict
    rungs = {r.rung: r for r in res.rungs}
    assert all(rungs[1].solved.values()) and rungs[2].detected and rungs[3].detected
    assert rungs[2].kept_vs_reset.rel_change < -0.5 and rungs[2].kept_vs_a.wilcoxon_p < 0.01


def test_small_or_one_sided_gains_are_not_a_detection():
    # 20% better than reset only: below the 50% bar.
    evals = [planted("B", "persistent", {1: 0.5, 2: 3.3, 3: 3.3}), planted("B", "reset", AT_CHANCE),
             planted("A", "reset", AT_CHANCE)]
    res = analyse_ladder(evals, "kv", CHANCE, control=False, n_boot=100)
    assert not res.passed and "not detected" in res.verdict
    # Better than its own reset, but not than arm A (A learned the same thing some other way).
    evals[2] = planted("A", "reset", {1: 0.5, 2: 1.0, 3: 1.0})
    evals[0] = planted("B", "persistent", {1: 0.5, 2: 1.0, 3: 1.0})
    assert not analyse_ladder(evals, "kv", CHANCE, control=False, n_boot=100).passed


def test_unsolved_rung_one_says_the_apparatus_does_not_work():
    evals = [planted("B", "persistent", {1: CHANCE, 2: CHANCE, 3: CHANCE}),
             planted("B", "reset", {1: CHANCE, 2: CHANCE, 3: CHANCE})]
    res = analyse_ladder(evals, "kv", CHANCE, control=False, n_boot=100)
    assert not res.passed and res.verdict.startswith("apparatus not working")


def test_control_passes_only_without_a_change():
    flat = {1: 0.5, 2: CHANCE, 3: CHANCE}
    ok = analyse_ladder([planted("B", "persistent", flat, seed=1), planted("B", "reset", flat, seed=2)],
                        "kv-control", CHANCE, control=True, n_boot=100)
    assert ok.passed and "control passed" in ok.verdict
    biased = analyse_ladder([planted("B", "persistent", {1: 0.5, 2: 3.8, 3: 3.8}), planted("B", "reset", flat)],
                            "kv-control", CHANCE, control=True, n_boot=100)
    assert not biased.passed and "FAILED" in biased.verdict


def test_two_corpora_of_one_kind_need_distinct_names(tmp_path):
    with pytest.raises(ConfigError, match="named 'real'"):
        load_experiment_config(None, [f"out_dir={tmp_path}",
                                      "corpora=[{kind: real, train: a, eval: b}, {kind: real, train: c, eval: d}]"])
    cfg = load_experiment_config(None, [f"out_dir={tmp_path}", "corpora=[{kind: real, name: one, train: a, eval: b}, "
                                                               "{kind: real, name: two, train: c, eval: d}]"])
    assert [c.label for c in cfg.corpora] == ["one", "two"]


def test_miniature_ladder_experiment(tmp_path):
    """Ladder and its control through training, per-rung evaluation and the report's first section;
    every corpus has its own run and evaluation paths."""
    cfg = load_experiment_config(None, [
        f"out_dir={tmp_path}", "n_boot=100", "eval_lanes=2",
        "corpora=[{kind: kv, train_files: 2, eval_files: 3, synth: {num_spans: 2}}, "
        "{kind: kv-control, name: kvc, arms: [B], train_files: 2, eval_files: 3, synth: {num_spans: 2}}]",
        "train={steps: 2, bptt_chunks: 2, log_every: 1, eval_every: 100, ckpt_every: 2, progress: false, "
        "model: {lm_overrides: {num_layers: 2, context: 8}}, data: {chunk_frames: 16, lanes: 2}, "
        "ttt: {layers: all, mini_batch_size: 4, state_grad: full}}",
    ])
    report = run_experiment(cfg, command="test", progress=False)
    text = report.read_text()
    assert text.splitlines()[2] == "## Can this run see a memory? (positive control)"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kv", "kvc"]
    evals = sorted(p.name for p in (tmp_path / "evals").glob("*.json"))
    assert evals == [f"kv_seed0_{a}.json" for a in ("A_persistent", "A_reset", "B_persistent", "B_reset", "C_none")] \
        + ["kvc_seed0_B_persistent.json", "kvc_seed0_B_reset.json"]
    ladder = json.loads((report.parent / "ladder.json").read_text())
    assert [x["corpus"] for x in ladder] == ["kv", "kvc"] and ladder[1]["control"]
    assert {r["rung"] for r in ladder[0]["rungs"]} == {1, 2, 3}
    res = json.loads((tmp_path / "evals" / "kv_seed0_B_persistent.json").read_text())
    assert sum(c.get("rung2_tokens", 0) for f in res["files"] for c in f["chunks"]) > 0
    assert (report.parent / "ladder_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
