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
from typing import Any

from ..data.dataset import EncodedDataset
from ..data.synthetic import SynthConfig, write_corpus
from ..train.config import ConfigError, TrainConfig, build, read_yaml, to_dict
from .evaluate import evaluate


@dataclass
class CorpusSpec:
    """A corpus: synthetic (generated into ``out_dir/data`` if missing) or existing encoded folders."""

    kind: str = "long-memory"            # "long-memory", "control" (synthetic) or "real"
    train: str | None = None             # existing encoded dataset folders (real data)
    eval: str | None = None              # held-out files: used once, for the final evaluation
    val: str | None = None               # monitored during training (never the held-out files)
    synth: dict[str, Any] = field(default_factory=dict)   # SynthConfig overrides
    train_files: int = 48
    eval_files: int = 16
    val_files: int = 8


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    corpora: list[CorpusSpec] = field(default_factory=lambda: [CorpusSpec("long-memory"), CorpusSpec("control")])
    arms: list[str] = field(default_factory=lambda: ["A", "B", "C"])
    # Base training config (the arms change only what defines them).
    train: dict[str, Any] = field(default_factory=dict)
    eval_lanes: int = 4
    n_boot: int = 10000
    lora_rank: int | None = None         # arm C; None: matched to the TTT parameter count


ARM_TRAIN_MODE = {"A": "reset", "B": "persistent", "C": "none"}


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    cfg = build(ExperimentConfig, read_yaml(path, overrides))
    unknown = [a for a in cfg.arms if a not in ARM_TRAIN_MODE]
    if unknown:
        raise ConfigError(f"arms: unknown arm(s) {unknown}; use A, B, C")
    build(TrainConfig, cfg.train)  # validate the base training config early (names the bad key)
    return cfg


def _corpus_dirs(spec: CorpusSpec, root: Path, seed: int) -> tuple[Path, Path | None, Path]:
    """(train, val, held-out eval) folders."""
    if spec.kind == "real":
        if not (spec.train and spec.eval):
            raise ConfigError("corpora: a 'real' corpus needs train and eval (encoded dataset folders)")
        return Path(spec.train), Path(spec.val) if spec.val else None, Path(spec.eval)
    control = spec.kind == "control"
    base = root / "data" / spec.kind
    # Train, validation and held-out files come from different generator seeds.
    splits = (("train", spec.train_files, 1000 + seed), ("val", spec.val_files, 3000 + seed),
              ("eval", spec.eval_files, 2000 + seed))
    for split, n, s in splits:
        out = base / f"{split}_seed{seed}"
        if n and not (out / "index.jsonl").is_file():
            scfg = SynthConfig(**{**spec.synth, "seed": s, "num_files": n, "control": control})
            write_corpus(scfg, out, progress=False)
    val = base / f"val_seed{seed}" if spec.val_files else None
    return base / f"train_seed{seed}", val, base / f"eval_seed{seed}"


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
    (out / "experiment.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    base_train = build(TrainConfig, cfg.train)
    base_train.progress = progress
    rank = cfg.lora_rank
    if "C" in cfg.arms and rank is None:
        rank, n_lora, n_ttt = matched_lora_rank(base_train)
        print(f"arm C: LoRA rank {rank} ({n_lora:,} trainable parameters) vs TTT's {n_ttt:,}")
    eval_paths: list[Path] = []
    logs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for spec in cfg.corpora:
        for seed in cfg.seeds:
            train_dir, val_dir, eval_dir = _corpus_dirs(spec, out, seed)
            eval_ds = EncodedDataset(eval_dir)
            for arm in cfg.arms:
                run_dir = out / "runs" / spec.kind / f"seed{seed}" / arm
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
                    trainer = Trainer(acfg, resume=(run_dir / "checkpoints").is_dir())
                    trainer.train()
                    trainer.close()
                logs[f"{arm}" if len(cfg.corpora) * len(cfg.seeds) == 1 else f"{arm}/{spec.kind}/s{seed}"] = \
                    read_metrics(run_dir)
                model, tcfg, ck = load_trained(run_dir)
                modes = ["none"] if arm == "C" else ["reset", "persistent"]
                for mode in modes:
                    path = out / "evals" / f"{spec.kind}_seed{seed}_{arm}_{mode}.json"
                    if not path.is_file():
                        res = evaluate(model, eval_ds, tcfg.data.chunk_frames, lanes=cfg.eval_lanes, mode=mode,
                                       meta={"arm": arm, "train_mode": ARM_TRAIN_MODE[arm], "seed": seed,
                                             "checkpoint": str(ck), "data": str(eval_dir), "corpus": spec.kind})
                        res["context"] = int(model.transformer.layers[0].self_attn.context)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(res))
                    eval_paths.append(path)
    config = {"experiment": dataclasses.asdict(cfg), "train_base": to_dict(base_train), "lora_rank_C": rank}
    from ..runtime import run_facts

    report = write_report(out / "report", load_evals(eval_paths), logs, config, command, n_boot=cfg.n_boot,
                          facts=run_facts(wall_time_s=time.perf_counter() - t0))
    print(f"[{time.perf_counter() - t0:6.0f}s] report: {report}")
    return report


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
