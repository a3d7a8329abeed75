"""``moshi-ttt experiment``: does persistent TTT memory help?

For every corpus (by default the synthetic long-memory corpus and its control) and every seed,
three arms are trained under identical seeds, data order and step counts:

* A: TTT, memory reset every chunk in training (``persistent_states: false``, the baseline);
* B: TTT, memory carried across the chunks of a file (``persistent_states: true``);
* C: no TTT; LoRA with about the same number of trainable parameters instead.

A and B are then evaluated in both memory modes (the 2x2 of train mode x eval mode), C once, on
the same held-out files, and ``report.write_report`` turns the per-file results into statistics
(paired tests, bootstrap intervals, the decision rule: keep persistent memory only if it lowers the loss
significantly and by more than 10%), plots and ``report.md``.
Training data and evaluation data are disjoint (different generator seeds); nothing is tuned on
the held-out files.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..data.dataset import EncodedDataset
from ..data.ladder import LadderConfig, write_ladder
from ..data.synthetic import SynthConfig, write_corpus
from ..model.presets import tiny_lm_kwargs
from ..records import dump
from ..train.config import ConfigError, TrainConfig, load_config
from .evaluate import evaluate, periodic_evaluator
from .ladder import LadderResult, analyse_ladder, ladder_json, ladder_markdown, plot_ladder

CorpusKind = Literal["kv", "kv-control", "long-memory", "control", "real"]
Arm = Literal["A", "B", "C"]
ARM_TRAIN_MODE = {"A": "reset", "B": "persistent", "C": "none"}


@dataclass
class CorpusSpec:
    """A corpus: synthetic (generated into ``out_dir/data/<name>`` if missing) or existing encoded
    folders.

    kind: "kv" / "kv-control" (the key -> value ladder, the positive control, and its control),
        "long-memory" / "control" (the motif corpus and its control) or "real".
    name: unique name in the run (folders, report); default: the kind.
    arms: the arms trained on this corpus (default: the experiment's).
    synth: overrides of ``LadderConfig`` (kv kinds) or ``SynthConfig`` (long-memory kinds); the
        model's attention stack, the chunk and the span come from the training config.
    """

    kind: CorpusKind = "long-memory"
    name: str | None = None
    arms: list[Arm] | None = None
    train: str | None = None             # existing encoded dataset folders (real data)
    eval: str | None = None              # held-out files: used once, for the final evaluation
    val: str | None = None               # monitored during training (never the held-out files)
    synth: dict[str, Any] = field(default_factory=dict)
    train_files: int = 48
    eval_files: int = 16
    val_files: int = 8

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    corpora: list[CorpusSpec] = field(default_factory=lambda: [CorpusSpec("long-memory"), CorpusSpec("control")])
    arms: list[Arm] = field(default_factory=lambda: ["A", "B", "C"])
    # Base training config (the arms change only what defines them).
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_lanes: int = 4
    n_boot: int = 10000
    lora_rank: int | None = None         # arm C; None: matched to the TTT parameter count

    def __post_init__(self) -> None:
        names = [c.label for c in self.corpora]
        for i, c in enumerate(self.corpora):
            if names.count(c.label) > 1:
                raise ConfigError("ExperimentConfig", f"corpora[{i}].name", c.name, f"two corpora are named "
                                  f"{c.label!r} (their runs and evaluations would overwrite each other); give "
                                  "each a distinct `name`")


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment config from a YAML file and ``--set`` overrides (the base training config
    under ``train`` is checked here too: its errors name ``train.<key>``)."""
    return load_config(ExperimentConfig, path, overrides)


def _corpus_dirs(spec: CorpusSpec, root: Path, seed: int, base: TrainConfig) -> tuple[Path, Path | None, Path]:
    """(train, val, held-out eval) folders; synthetic ones are generated for the model of ``base``
    (its attention reach, chunk and training span) if missing."""
    if spec.kind == "real":
        if not (spec.train and spec.eval):
            raise ConfigError("corpora: a 'real' corpus needs train and eval (encoded dataset folders)")
        return Path(spec.train), Path(spec.val) if spec.val else None, Path(spec.eval)
    if base.model.preset != "tiny":
        raise ConfigError(f"corpora: a synthetic corpus ({spec.kind}) needs the tiny preset (its layout); "
                          "use kind: real for data encoded for other models")
    lm_kwargs = tiny_lm_kwargs(**base.model.lm_overrides)
    control = spec.kind in ("control", "kv-control")
    folder = root / "data" / spec.label
    # Train, validation and held-out files come from different generator seeds.
    splits = (("train", spec.train_files, 1000 + seed), ("val", spec.val_files, 3000 + seed),
              ("eval", spec.eval_files, 2000 + seed))
    for split, n, s in splits:
        out = folder / f"{split}_seed{seed}"
        if n and not (out / "index.jsonl").is_file():
            over = {**spec.synth, "seed": s, "num_files": n, "control": control}
            try:
                if spec.kind.startswith("kv"):
                    lcfg = LadderConfig.from_lm_kwargs(lm_kwargs, chunk_frames=base.data.chunk_frames,
                                                       span_chunks=base.bptt_chunks, **over)
                    write_ladder(lcfg, out, progress=False)
                else:
                    write_corpus(SynthConfig.from_lm_kwargs(lm_kwargs, **over), out, progress=False)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"corpora ({spec.label}).synth: {e}") from e
    val = folder / f"val_seed{seed}" if spec.val_files else None
    return folder / f"train_seed{seed}", val, folder / f"eval_seed{seed}"


def _count_trainable(cfg: TrainConfig) -> int:
    from ..train.loop import make_model

    model = make_model(cfg, device=__import__("torch").device("cpu"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def arm_config(base: TrainConfig, arm: str, run_dir: Path, lora_rank: int | None) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.run_dir = str(run_dir)
    if arm == "A":
        cfg.ttt = dataclasses.replace(cfg.ttt, persistent_states=False)
    elif arm == "B":
        cfg.ttt = dataclasses.replace(cfg.ttt, persistent_states=True)
    else:  # C: the same base model without TTT, a LoRA of about the same size instead
        cfg.ttt = dataclasses.replace(cfg.ttt, layers="none")
        cfg.lora = dataclasses.replace(cfg.lora, enable=True, rank=lora_rank or cfg.lora.rank)
        if cfg.trainable != "full":  # with "full", C trains everything too, plus the LoRA
            cfg.trainable = "ttt+lora"
    cfg.validate()
    return cfg


def matched_lora_rank(base: TrainConfig) -> tuple[int, int, int]:
    """The LoRA rank whose trainable-parameter count is closest to arm B's. (rank, lora, ttt)."""
    ttt_params = _count_trainable(arm_config(base, "B", Path("unused"), None))
    best = (1, 0)
    for rank in (1, 2, 4, 8, 16, 32, 64):
        n = _count_trainable(arm_config(base, "C", Path("unused"), rank))
        if best[1] == 0 or abs(n - ttt_params) < abs(best[1] - ttt_params):
            best = (rank, n)
    return best[0], best[1], ttt_params


def run_experiment(cfg: ExperimentConfig, command: str = "", progress: bool = True) -> Path:
    from ..train.logging import read_metrics
    from ..train.loop import Trainer, load_trained
    from .report import load_evals, write_report

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(dump(cfg), indent=2))
    base_train = copy.deepcopy(cfg.train)
    base_train.progress = progress
    rank = cfg.lora_rank
    if "C" in cfg.arms and rank is None:
        rank, n_lora, n_ttt = matched_lora_rank(base_train)
        print(f"arm C: LoRA rank {rank} ({n_lora:,} trainable parameters) vs TTT's {n_ttt:,}")
    eval_paths: list[Path] = []
    logs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    ladder_evals: dict[str, list[Path]] = {}
    chance: dict[str, float] = {}
    for spec in cfg.corpora:
        for seed in cfg.seeds:
            train_dir, val_dir, eval_dir = _corpus_dirs(spec, out, seed, base_train)
            eval_ds = EncodedDataset(eval_dir)
            syn = eval_ds.meta.get("synthetic") or {}
            if spec.kind.startswith("kv"):
                chance[spec.label] = float(np.mean(syn["chance_nats"]["per_row"]))
            for arm in spec.arms or cfg.arms:
                run_dir = out / "runs" / spec.label / f"seed{seed}" / arm
                acfg = arm_config(base_train, arm, run_dir, rank)
                acfg.seed = seed
                acfg.model.init_seed = seed
                acfg = dataclasses.replace(acfg, data=dataclasses.replace(
                    acfg.data, train=str(train_dir), eval=str(val_dir) if val_dir else None))
                done = (run_dir / "summary.json").is_file() and \
                    json.loads((run_dir / "summary.json").read_text()).get("steps") == acfg.steps
                if not done:
                    print(f"[{time.perf_counter() - t0:6.0f}s] train {spec.kind} seed {seed} arm {arm} "
                          f"({ARM_TRAIN_MODE[arm]}), {acfg.steps} steps")
                    trainer = Trainer(acfg, resume=(run_dir / "checkpoints").is_dir(),
                                      evaluator=periodic_evaluator(acfg))
                    trainer.train()
                    trainer.close()
                logs[f"{arm}" if len(cfg.corpora) * len(cfg.seeds) == 1 else f"{arm}/{spec.label}/s{seed}"] = \
                    read_metrics(run_dir)
                model, tcfg, ck = load_trained(run_dir)
                modes = ["none"] if arm == "C" else ["reset", "persistent"]
                for mode in modes:
                    path = out / "evals" / f"{spec.label}_seed{seed}_{arm}_{mode}.json"
                    if not path.is_file():
                        evaluate(model, eval_ds, tcfg.data.chunk_frames, lanes=cfg.eval_lanes, mode=mode, arm=arm,
                                 train_mode=ARM_TRAIN_MODE[arm], seed=seed, checkpoint=str(ck), data=str(eval_dir),
                                 corpus=spec.kind, corpus_name=spec.label).save(path)
                    eval_paths.append(path)
                    if spec.kind.startswith("kv"):
                        ladder_evals.setdefault(spec.label, []).append(path)
    config = {"experiment": dump(cfg), "train_base": dump(base_train), "lora_rank_C": rank}
    from ..runtime import run_facts

    report = write_report(out / "report", load_evals(eval_paths), logs, config, command, n_boot=cfg.n_boot,
                          facts=run_facts(wall_time_s=time.perf_counter() - t0))
    if ladder_evals:
        kinds = {c.label: c.kind for c in cfg.corpora}
        results = [analyse_ladder(load_evals(paths), name, chance[name], kinds[name] == "kv-control",
                                  n_boot=min(cfg.n_boot, 2000)) for name, paths in ladder_evals.items()]
        prepend_ladder(report, results)
        for r in results:
            print(f"[{time.perf_counter() - t0:6.0f}s] {r.corpus}: {r.verdict}")
    print(f"[{time.perf_counter() - t0:6.0f}s] report: {report}")
    return report


def prepend_ladder(report: Path, results: list[LadderResult]) -> None:
    """Put the positive control's verdict at the top of ``report`` (report.md): every other result
    of the run is read in its light. Writes ``ladder.json`` and one plot per ladder corpus beside it."""
    positive = [r for r in results if not r.control]
    controls = [r for r in results if r.control]
    lines = ["## Can this run see a memory? (positive control)", ""]
    for r in results:
        lines.append(f"- **{r.corpus}**: {r.verdict}.")
    if positive and all(r.passed for r in positive) and all(r.passed for r in controls):
        lines += ["", "The apparatus detects a memory that helps, and nothing where there is nothing to remember: "
                  "the results on the other corpora below can be read as evidence either way."]
    elif positive:
        lines += ["", "**The apparatus could not detect memory in this run** (positive control not passed"
                  + (", or its control failed" if controls else "") + "): a null result on the other corpora "
                  "below is no evidence that memory does not help."]
    lines.append("")
    for r in results:
        plot = plot_ladder(r, report.parent / f"ladder_{r.corpus}.png").name
        lines += ladder_markdown(r, plot)
    (report.parent / "ladder.json").write_text(json.dumps([ladder_json(r) for r in results], indent=2))
    text = report.read_text().splitlines()
    title = 1 if text and text[0].startswith("# ") else 0
    report.write_text("\n".join(text[:title] + [""] + lines + text[title:]) + "\n")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_experiment_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "moshi-ttt experiment " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = run_experiment(cfg, command, progress=not args.quiet)
    print(f"Report written to {report}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="train arms A/B/C, evaluate the 2x2, write the report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="experiment YAML (default: configs/experiment_tiny.yaml values)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set seeds=[0,1] --set train.steps=500")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
