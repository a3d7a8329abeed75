"""A miniature persistence experiment end to end (seconds): data, arms, 2x2 eval, report."""

import json

from moshi_ttt.eval.experiment import load_experiment_config, run_experiment
from moshi_ttt.eval.report import fmt_loss, fmt_p


def test_miniature_experiment_end_to_end(tmp_path):
    cfg = load_experiment_config(None, [
        f"out_dir={tmp_path}", "n_boot=200", "eval_lanes=2",
        "corpora=[{kind: long-memory, train_files: 4, eval_files: 6, synth: {frames_min: 96, frames_max: 128}}]",
        "train={steps: 4, log_every: 1, eval_every: 100, ckpt_every: 4, progress: false, "
        "data: {chunk_frames: 32, lanes: 2}, ttt: {layers: [1, 2], mini_batch_size: 8}}",
    ])
    report = run_experiment(cfg, command="test", progress=False)
    text = report.read_text()
    results = json.loads((report.parent / "results.json").read_text())
    evals = sorted(p.name for p in (tmp_path / "evals").glob("*.json"))
    assert evals == [f"long-memory_seed0_{a}.json" for a in
                     ("A_persistent", "A_reset", "B_persistent", "B_reset", "C_none")]
    contrasts = results["corpora"]["long-memory"]["contrasts"]
    assert {c["id"] for c in contrasts} >= {"i", "ii", "iii"}
    for c in contrasts:
        comp = c["comparison"]
        if comp is None:
            continue
        row = next(ln for ln in text.splitlines()
                   if ln.startswith(f"| ({c['id']})") and f"| {c['x_label']} | {c['y_label']} |" in ln
                   and (c["metric"].split("_")[0] in ln))
        assert fmt_loss(comp["mean_x"]) in row and fmt_loss(comp["mean_y"]) in row
        assert fmt_p(comp["wilcoxon_p"]) in row
    assert "## Conclusion" in text and "Verdict" in text
    figures = results["corpora"]["long-memory"]["figures"]
    assert len(figures) >= 3
    for fig in figures.values():
        assert (report.parent / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
