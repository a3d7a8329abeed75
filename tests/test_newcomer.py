"""A newcomer's first hour: the README's snippet runs, its commands give clear answers, outputs land
where the README says, and the words are the user's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moshi_ttt.cli import build_parser, main
from moshi_ttt.data.synthetic import SynthConfig, write_corpus

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _python_blocks(text: str, after: str) -> list[str]:
    section = text.split(after, 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_library_snippet_runs_as_written(tmp_path):
    snippet = _python_blocks(README, "### As a library")[0]
    assert "codes = " in snippet  # everything it uses is defined in it
    env = {**os.environ, "NO_TORCH_COMPILE": "1"}
    res = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch.Size([2, 1, 100, 64])" in res.stdout


def test_readme_says_what_a_newcomer_needs():
    for fact in ("kyutai/moshiko-pytorch-bf16", "model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors",
                 "tokenizer_spm_32k_3.model", "configs/moshi7b_config.json", "moshi_ttt/data/README.md",
                 "https://download.pytorch.org/whl/cpu", "MOSHI_TTT_THREADS", "NO_TORCH_COMPILE=1",
                 "docs/DESIGN.md", "per-token loss", "training loss"):
        assert fact in README, fact
    assert "../shared" not in README and "seed document" not in README and "seeds'" not in README
    # The training section in the order it is run: synth, train, eval.
    steps = README.split("## Training, in the order you run it")[1]
    assert steps.index("moshi-ttt synth") < steps.index("moshi-ttt train") < steps.index("moshi-ttt eval")
    assert (REPO / "docs" / "DESIGN.md").is_file()
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (REPO / link).exists(), link


def test_default_7b_config_is_moshis_own():
    from moshi.models import loaders

    from moshi_ttt.model.weights import read_moshi_config

    assert read_moshi_config(REPO / "configs" / "moshi7b_config.json") == loaders._lm_kwargs


def test_generated_folders_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().split()
    for folder in ("data/", "eval_out/", "runs/"):
        assert folder in ignored, folder


def test_no_internal_words_in_the_package():
    offenders = []
    for p in (REPO / "moshi_ttt").rglob("*.py"):
        # ttt/, train/loop.py and model/chunked.py are owned elsewhere and not user-facing text.
        if "ttt/" in p.relative_to(REPO / "moshi_ttt").as_posix() or p.name in ("loop.py", "chunked.py"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"seed document|seeds' |seed 004|[Ii]ssue \d", line):
                offenders.append(f"{p.name}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_train_without_data_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(REPO / "configs" / "tiny_cpu.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    line = next(line for line in err if line.startswith("error:"))
    assert "data/synth/train" in line and "moshi-ttt synth --out data/synth/train" in line


def test_every_option_of_eval_and_generate_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("eval", "generate", "train", "experiment"):
        for action in sub.choices[command]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings[0]} has no help text"


def test_eval_writes_beside_the_run_rounded_with_the_right_corpus(tmp_path, capsys):
    from moshi_ttt.train.config import load_train_config
    from moshi_ttt.train.loop import Trainer

    data = tmp_path / "data"
    # A short-reach corpus (1 layer, context 16), so that 96-frame files hold recall targets.
    short = {"num_layers": 1, "context": 16, "frames_min": 96, "frames_max": 96}
    write_corpus(SynthConfig(seed=0, num_files=3, **short), data / "train", progress=False)
    write_corpus(SynthConfig(seed=1, num_files=2, **short), data / "held", progress=False)
    run = tmp_path / "run"
    cfg = load_train_config(None, [f"run_dir={run}", f"data.train={data / 'train'}", "data.chunk_frames=32",
                                   "data.lanes=2", "steps=2", "log_every=1", "ckpt_every=2", "progress=false",
                                   f"data.eval={data / 'held'}", "eval_every=1000",
                                   "ttt.layers=[1]"])
    from moshi_ttt.eval.evaluate import periodic_evaluator

    trainer = Trainer(cfg, evaluator=periodic_evaluator(cfg))
    trainer.train()
    trainer.close()
    # The trainer's evaluation callback: the monitored files' JSON, and its token-weighted mean in the log.
    step = json.loads((run / "eval" / "step_0000002.json").read_text())
    chunks = [c for f in step["files"] for c in f["chunks"]]
    expected = sum(c["loss"] * c["tokens"] for c in chunks) / sum(c["tokens"] for c in chunks)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval/loss"] for m in logged if "eval/loss" in m] == [pytest.approx(expected, rel=1e-9)]
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data / "held"), "--mode", "persistent", "--quiet"]) == 0
    out = capsys.readouterr().out
    files = list((run / "eval").glob("*/eval_persistent.json"))
    assert len(files) == 1 and files[0].parent.name == "step_0000002-held"
    res = json.loads(files[0].read_text())
    assert res["corpus"] == "long-memory" and res["recall_chance_nats"] == pytest.approx(4.13, abs=0.05)
    assert "per-token loss" in res["loss_definition"]
    printed = [float(x) for x in re.findall(r"\d+\.\d+", out.split("memory persistent")[1].split("->")[0])]
    assert printed and all(len(x.split(".")[1]) <= 4 for x in re.findall(r"\d+\.\d+", out.split("->")[0]))
    assert "chance" in out and not (Path.cwd() / "eval_out").exists()
