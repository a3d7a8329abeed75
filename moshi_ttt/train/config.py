"""Typed training configuration: dataclasses, loaded from YAML with ``--set key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the dotted key
(``optim.lr: expected a number, got 'fast'``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigValueError
from ..model.loss import LossConfig
from ..ttt.config import TTTConfig, TTTConfigError


class ConfigError(ConfigValueError):
    """A configuration value is invalid; the message names the dotted key (exit code 2)."""


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
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 100
    keep_last: int = 3
    max_nonfinite: int = 5
    progress: bool = True

    def validate(self) -> None:
        """Check every value against its range; the error names the dotted key and the value."""
        for name in ("steps", "bptt_chunks", "log_every", "eval_every", "ckpt_every", "keep_last", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for key, value in (("data.chunk_frames", self.data.chunk_frames), ("data.lanes", self.data.lanes)):
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.data.eval_max_files is not None and self.data.eval_max_files < 1:
            raise ConfigError(f"data.eval_max_files: must be >= 1 or null, got {self.data.eval_max_files}")
        if not self.data.train:
            raise ConfigError("data.train: the training dataset folder is empty")
        o = self.optim
        inf = math.inf
        ranges = [  # (key, value, low, high, low included, high included)
            ("optim.lr", o.lr, 0.0, inf, False, False),
            ("optim.grad_clip", o.grad_clip, 0.0, inf, False, False),
            ("optim.weight_decay", o.weight_decay, 0.0, inf, True, False),
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
            above = v >= lo if lo_in else v > lo
            below = v <= hi if hi_in else v < hi
            if not (math.isfinite(v) and above and below):
                bound = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                raise ConfigError(f"{key}: must be a finite number in {bound}, got {v}")
        if self.loss.text_weight == 0 and self.loss.audio_weight == 0:
            raise ConfigError("loss.text_weight and loss.audio_weight are both 0: nothing to train on")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
        if self.lora.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1, got {self.lora.rank}")
        if self.model.preset == "local" and not (self.model.moshi_weights and self.model.moshi_config):
            raise ConfigError("model.preset=local needs model.moshi_weights and model.moshi_config (local paths)")
        if self.trainable == "ttt+lora" and not self.lora.enable:
            raise ConfigError("trainable=ttt+lora needs lora.enable=true")

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
    defaults = _flatten(to_dict(TrainConfig()))
    applied, refused = [], []
    for k in sorted(set(a) | set(b)):
        if k.startswith("ttt.extra") or k == "progress" or k in _LEGACY:  # progress: display only
            continue
        if k not in a and b.get(k) == defaults.get(k):
            continue  # a setting added after the checkpoint was written, at its default
        va, vb = a.get(k), b.get(k)
        if va != vb:
            (applied if k in RESUME_CHANGEABLE else refused).append((k, va, vb))
    return applied, refused


# ----------------------------------------------------------------------------- generic loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    data = {k: v for k, v in data.items() if k not in getattr(cls, "LEGACY_KEYS", ())}  # saved by older versions
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known under '{prefix or '(top)'}': {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TTTConfigError, TypeError, ValueError) as e:  # a dataclass's own checks
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    if isinstance(out.get("ttt"), dict):
        out["ttt"].pop("extra", None)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "ttt.layers=[1,2]"]``: values parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key component")
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if p in node and not isinstance(child, dict):
                # A null or scalar section would be replaced by the override alone: the rest of
                # what the user wrote (or meant to write) there would silently vanish.
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"--set {item!r}: '{where}' is {child!r} in the config, not a mapping; "
                                  f"fix or remove the '{where}:' section first")
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML mapping from ``path`` (None: empty) with ``--set`` overrides applied; errors name the file."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(data, overrides or [])


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data = read_yaml(path, overrides)
    cfg = build(TrainConfig, data)
    cfg.validate()
    return cfg
