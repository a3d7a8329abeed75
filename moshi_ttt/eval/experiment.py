"""``moshi-ttt experiment``: does persistent TTT memory help?

For every corpus (by default the synthetic long-memory corpus and its control) and every seed, three arms
are trained under identical seeds, data order and step counts: A, TTT with its memory reset every chunk
(``persistent_states: false``, the baseline); B, TTT with its memory carried across a file's chunks; C, no
TTT but a LoRA of about as many trainable parameters. A and B are evaluated in both memory modes (the 2x2
of train mode x eval mode), C once, on the same held-out files (never tuned on: other generator seeds),
and the report gives paired tests, bootstrap intervals, the decision rule (keep persistent memory only if
it lowers the loss significantly and by more than 10%), plots and ``report.md``.
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
from .ladder import analyse_ladder
from .results import Corpus

Arm = Literal["A", "B", "C"]
ARM_TRAIN_MODE = {"A": "reset", "B": "persistent", "C": "none"}


@dataclass
class CorpusSpec:
    """kind: "kv" / "kv-control" (the key -> value ladder: the positive control, and its control),
    "long-memory" / "control" (the motif corpus and its control), or "real" (``train``/``eval``/``val``:
    encoded dataset folders); name: unique in the run (default: the kind); arms: default the experiment's;
    synth: overrides of ``LadderConfig`` / ``SynthConfig`` (model, chunk and span come from the training config)."""

    kind: Corpus = "long-memory"
    name: str | None = None
    arms: list[Arm] | None = None
    train: str | None = None
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
    train: TrainConfig = field(default_factory=TrainConfig)  # the base; the arms change only what defines them
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
    """From a YAML file and ``--set`` overrides; errors name the key (``train.<key>`` for the base config)."""
    return load_config(ExperimentConfig, path, overrides)


def _corpus_dirs(spec: CorpusSpec, root: Path, seed: int, base: TrainConfig) -> tuple[Path, Path | None, Path]:
    """(train, val, held-out eval) folders; synthetic ones are generated for ``base``'s model if missing."""
    if spec.kind == "real":
        if not (spec.train and spec.eval):
            raise ConfigError("corpora: a 'real' corpus needs train and eval (encoded dataset folders)")
        return Path(spec.train), Path(spec.val) if spec.val else None, Path(spec.eval)
    if base.model.preset != "tiny":
        raise ConfigError(f"corpora: a synthetic corpus ({spec.kind}) needs the tiny preset (its layout); "
                          "use kind: real for data encoded for other models")
    lm_kwargs, folder = tiny_lm_kwargs(**base.model.lm_overrides), root / "data" / spec.label
    # The ladder is laid out for the training chunk and span; the motif corpus needs only the model.
    make, write, span = (LadderConfig, write_ladder, {"chunk_frames": base.data.chunk_frames, "span_chunks":
                         base.bptt_chunks}) if spec.kind.startswith("kv") else (SynthConfig, write_corpus, {})
    # Train, validation and held-out files come from different generator seeds.
    for split, n, s in [("train", spec.train_files, 1000), ("val", spec.val_files, 3000),
                        ("eval", spec.eval_files, 2000)]:
        if n and not (folder / f"{split}_seed{seed}" / "index.jsonl").is_file():
            over = {**spec.synth, "seed": s + seed, "num_files": n, "control": spec.kind.endswith("control")}
            try:
                write(make.from_lm_kwargs(lm_kwargs, **span, **over), folder / f"{split}_seed{seed}", progress=False)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"corpora ({spec.label}).synth: {e}") from e
    val = folder / f"val_seed{seed}" if spec.val_files else None
    return folder / f"train_seed{seed}", val, folder / f"eval_seed{seed}"


def arm_config(base: TrainConfig, arm: str, run_dir: Path, lora_rank: int | None) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.run_dir = str(run_dir)
    if arm == "C":  # the same base model without TTT, a LoRA of about the same size instead
        cfg.ttt = dataclasses.replace(cfg.ttt, layers="none")
        cfg.lora = dataclasses.replace(cfg.lora, enable=True, rank=lora_rank or cfg.lora.rank)
        if cfg.trainable != "full":  # with "full", C trains everything too, plus the LoRA
            cfg.trainable = "ttt+lora"
    else:
        cfg.ttt = dataclasses.replace(cfg.ttt, persistent_states=arm == "B")
    cfg.validate()
    return cfg


def matched_lora_rank(base: TrainConfig) -> tuple[int, int, int]:
    """The LoRA rank whose trainable-parameter count is closest to arm B's: (rank, its count, B's count)."""
    import torch

    from ..train.loop import make_model

    def count(arm: str, rank: int | None) -> int:
        model = make_model(arm_config(base, arm, Path("unused"), rank), device=torch.device("cpu"))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    ttt = count("B", None)
    rank, n = min(((r, count("C", r)) for r in (1, 2, 4, 8, 16, 32, 64)), key=lambda rn: abs(rn[1] - ttt))
    return rank, n, ttt


def run_experiment(cfg: ExperimentConfig, command: str = "", progress: bool = True) -> Path:
    from ..runtime import run_facts
    from ..train.logging import read_metrics
    from ..train.loop import Trainer, load_trained
    from .report import write_report
    from .results import EvalResult

    out, t0 = Path(cfg.out_dir), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(dump(cfg), indent=2))
    base = dataclasses.replace(cfg.train, progress=progress)
    rank = cfg.lora_rank
    if "C" in cfg.arms and rank is None:
        rank, n_lora, n_ttt = matched_lora_rank(base)
        print(f"arm C: LoRA rank {rank} ({n_lora:,} trainable parameters) vs TTT's {n_ttt:,}")
    evals: dict[str, list[EvalResult]] = {}
    logs: dict[str, list[dict]] = {}
    chance: dict[str, float] = {}
    for spec in cfg.corpora:
        for seed in cfg.seeds:
            train_dir, val_dir, eval_dir = _corpus_dirs(spec, out, seed, base)
            eval_ds = EncodedDataset(eval_dir)
            if spec.kind.startswith("kv"):
                chance[spec.label] = float(np.mean(eval_ds.meta["synthetic"]["chance_nats"]["per_row"]))
            for arm in spec.arms or cfg.arms:
                run_dir = out / "runs" / spec.label / f"seed{seed}" / arm
                acfg = arm_config(base, arm, run_dir, rank)
                acfg.seed = acfg.model.init_seed = seed
                acfg = dataclasses.replace(acfg, data=dataclasses.replace(
                    acfg.data, train=str(train_dir), eval=str(val_dir) if val_dir else None))
                summary = run_dir / "summary.json"
                if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == acfg.steps):
                    print(f"[{time.perf_counter() - t0:6.0f}s] train {spec.kind} seed {seed} arm {arm} "
                          f"({ARM_TRAIN_MODE[arm]}), {acfg.steps} steps")
                    trainer = Trainer(acfg, (run_dir / "checkpoints").is_dir(), evaluator=periodic_evaluator(acfg))
                    trainer.train()
                    trainer.close()
                logs[arm if len(cfg.corpora) * len(cfg.seeds) == 1 else f"{arm}/{spec.label}/s{seed}"] = \
                    read_metrics(run_dir)
                model, tcfg, ck = load_trained(run_dir)
                for mode in ["none"] if arm == "C" else ["reset", "persistent"]:
                    path = out / "evals" / f"{spec.label}_seed{seed}_{arm}_{mode}.json"
                    if not path.is_file():  # written atomically: an existing file is a finished evaluation
                        evaluate(model, eval_ds, tcfg.data.chunk_frames, lanes=cfg.eval_lanes, mode=mode, arm=arm,
                                 train_mode=ARM_TRAIN_MODE[arm], seed=seed, checkpoint=str(ck), data=str(eval_dir),
                                 corpus=spec.kind, corpus_name=spec.label).save(path)
                    evals.setdefault(spec.label, []).append(EvalResult.load(path))
    ladders = [analyse_ladder(evals[c.label], c.label, chance[c.label], c.kind == "kv-control",
                              n_boot=min(cfg.n_boot, 2000)) for c in cfg.corpora if c.kind.startswith("kv")]
    for r in ladders:
        print(f"[{time.perf_counter() - t0:6.0f}s] {r.corpus}: {r.verdict}")
    report = write_report(out / "report", [r for rs in evals.values() for r in rs], logs,
                          {"experiment": dump(cfg), "train_base": dump(base), "lora_rank_C": rank}, command,
                          n_boot=cfg.n_boot, facts=run_facts(wall_time_s=time.perf_counter() - t0), ladders=ladders)
    print(f"[{time.perf_counter() - t0:6.0f}s] Report written to {report}")
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of ``moshi-ttt experiment``; errors (a ConfigError: exit code 2) are printed by the caller."""
    cfg = load_experiment_config(args.config, args.set)
    run_experiment(cfg, "moshi-ttt experiment " + shlex.join(sys.argv[2:]), progress=not args.quiet)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="train arms A/B/C, evaluate the 2x2, write the report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="experiment YAML (default: configs/experiment_tiny.yaml values)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set seeds=[0,1] --set train.steps=500")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
