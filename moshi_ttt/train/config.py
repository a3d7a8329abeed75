"""Typed training configuration: dataclasses, read from YAML with ``--set key=value`` overrides.

Loading and dumping go through :mod:`moshi_ttt.records` (the YAML file and the ``--set`` overrides
too): unknown keys, values of the wrong type and values out of range are errors that name the dotted
key and the value (``optim.lr: expected a number, got 'fast'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .. import records
from ..model.loss import LossConfig
from ..records import FieldValueError, check_range, dump, load
from ..ttt.config import TTTConfig

R = TypeVar("R")


class ConfigError(FieldValueError):
    """A configuration value is invalid; the message names the dotted key and the value (exit code 2)."""


@dataclass
class ModelConfig:
    """Which Moshi: the tiny preset (random init, CPU) or local weights (``moshi_weights`` +
    ``moshi_config``, e.g. Moshi 7B). ``lm_overrides`` changes preset fields (e.g. context)."""

    preset: Literal["tiny", "local"] = "tiny"
    moshi_weights: str | None = None
    moshi_config: str | None = None
    lm_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    init_seed: int = 0


@dataclass
class DataConfig:
    """Encoded datasets (``moshi-ttt prepare`` or ``moshi-ttt synth`` output folders)."""

    train: str = "data/synth/train"
    eval: str | None = "data/synth/eval"
    chunk_frames: int = 64
    lanes: int = 4
    mode: Literal["ordered", "clips"] = "ordered"
    eval_max_files: int | None = None


@dataclass
class LoRAConfig:
    enable: bool = False
    rank: int = 64
    scaling: float = 2.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    seed: int = 0
    steps: int = 300
    trainable: Literal["ttt", "ttt+lora", "full"] = "ttt"
    device: str = "auto"
    # Multi-process training (torchrun): "ddp" replicates the model; "fsdp" shards the base model's
    # layers with FSDP2 (train/fsdp.py). Ignored in a single process.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ttt: TTTConfig = field(default_factory=lambda: TTTConfig(layers="all", mini_batch_size=8))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Chunks per optimizer step (a training span). With ``ttt.state_grad: full`` the carried
    # memory and attention keys/values keep their graph over the span, so reads train the writes
    # of earlier chunks; the span's gradient equals the full-sequence gradient over its frames.
    bptt_chunks: int = 1
    # Recompute each chunk's activations in backward from the state it started from (activation
    # checkpointing): a span keeps one copy of the streaming state per chunk instead of its
    # activations. Same gradients; about one more forward per step.
    recompute_chunks: bool = False
    # Probability that a lane's TTT memory is reset to the learned initial weights at a chunk
    # boundary inside a file (persistent memory only; attention caches are kept). A model trained
    # with its memory always kept meets a fresh memory mid-file only when evaluated with resets,
    # and is then confidently wrong (measured: 30% above chance on the ladder's control); a few
    # resets in training make that condition familiar, so "memory reset" is a fair baseline.
    memory_dropout: float = 0.0
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 100
    keep_last: int = 3
    max_nonfinite: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value against its range; the error names the dotted key and the value."""
        def need(ok: bool, key: str, value: Any, rule: str) -> None:
            if not ok:
                raise ConfigError("TrainConfig", key, value, rule)

        for name in ("steps", "bptt_chunks", "log_every", "eval_every", "ckpt_every", "keep_last", "max_nonfinite"):
            need(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for key, value in (("data.chunk_frames", self.data.chunk_frames), ("data.lanes", self.data.lanes)):
            need(value >= 1, key, value, "must be >= 1")
        need(self.data.eval_max_files is None or self.data.eval_max_files >= 1, "data.eval_max_files",
             self.data.eval_max_files, "must be >= 1 or null")
        need(bool(self.data.train), "data.train", self.data.train, "the training dataset folder is empty")
        o, inf = self.optim, math.inf
        ranges = [  # (key, value, low, high, low included, high included)
            ("optim.lr", o.lr, 0.0, inf, False, False),
            ("optim.grad_clip", o.grad_clip, 0.0, inf, False, False),
            ("optim.weight_decay", o.weight_decay, 0.0, inf, True, False),
            ("memory_dropout", self.memory_dropout, 0.0, 1.0, True, False),
            ("optim.beta1", o.beta1, 0.0, 1.0, True, False),
            ("optim.beta2", o.beta2, 0.0, 1.0, True, False),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0, True, True),
            ("lora.scaling", self.lora.scaling, -inf, inf, False, False),
            ("loss.text_padding_weight", self.loss.text_padding_weight, 0.0, inf, True, False),
            ("loss.first_codebook_weight", self.loss.first_codebook_weight, 0.0, inf, True, False),
            ("loss.text_weight", self.loss.text_weight, 0.0, inf, True, False),
            ("loss.audio_weight", self.loss.audio_weight, 0.0, inf, True, False),
        ]
        for key, v, lo, hi, lo_in, hi_in in ranges:
            check_range("TrainConfig", key, v, lo, hi, lo_in, hi_in, error=ConfigError)
        need(not (self.loss.text_weight == 0 and self.loss.audio_weight == 0), "loss.audio_weight",
             self.loss.audio_weight, "loss.text_weight and loss.audio_weight are both 0: nothing to train on")
        need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
        need(self.lora.rank >= 1, "lora.rank", self.lora.rank, "must be >= 1")
        need(self.model.preset != "local" or bool(self.model.moshi_weights and self.model.moshi_config),
             "model.preset", self.model.preset, "needs model.moshi_weights and model.moshi_config (local paths)")
        need(self.trainable != "ttt+lora" or self.lora.enable, "trainable", self.trainable,
             "ttt+lora needs lora.enable=true")


# Keys a resumed run may change, and how they take effect (anything else is refused on resume:
# the optimizer, model and data order in the checkpoint were built from the saved values).
RESUME_CHANGEABLE = {
    "steps": "the run continues to the new step count (the schedule follows it)",
    "log_every": "", "eval_every": "", "ckpt_every": "", "keep_last": "", "max_nonfinite": "", "progress": "",
    "device": "", "run_dir": "", "data.eval": "", "data.eval_max_files": "", "optim.grad_clip": "",
    "optim.lr": "the new base learning rate replaces the saved one from the next step",
}


# Keys of checkpoints written by earlier versions, dropped on load (``TTTConfig.LEGACY_KEYS``).
_LEGACY = {f"ttt.{k}" for k in TTTConfig.LEGACY_KEYS}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("lm_overrides",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict[str, Any], current: dict[str, Any]
                   ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Differences between a checkpoint's config and the current one: ``(applied, refused)``,
    each a list of ``(dotted key, saved value, current value)``."""
    a, b = _flatten(saved), _flatten(current)
    defaults = _flatten(dump(TrainConfig()))
    applied, refused = [], []
    for k in sorted(set(a) | set(b)):
        if k == "progress" or k in _LEGACY:  # progress: display only
            continue
        if k not in a and b.get(k) == defaults.get(k):
            continue  # a setting added after the checkpoint was written, at its default
        va, vb = a.get(k), b.get(k)
        if va != vb:
            (applied if k in RESUME_CHANGEABLE else refused).append((k, va, vb))
    return applied, refused


def load_config(cls: type[R], path: str | Path | None, overrides: list[str] | None = None,
                prefix: str = "") -> R:
    """Record ``cls`` from a YAML file (None: the defaults) and ``--set`` overrides: the one way every
    config file is read. Errors are :class:`ConfigError` naming the dotted key and the value."""
    return load(cls, read_yaml(path, overrides), prefix=prefix, error=ConfigError)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``records.apply_overrides`` raising :class:`ConfigError`."""
    return records.apply_overrides(data, overrides, error=ConfigError)


def read_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``records.read_yaml`` raising :class:`ConfigError`."""
    return records.read_yaml(path, overrides, error=ConfigError)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
