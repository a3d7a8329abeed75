"""Weights: real Moshi weights into a TTT model, TTT-only checkpoints, LoRA beside TTT.

* ``load_lm(weights, config, ttt_config)``: build the TTT model from moshi's own ``config.json``
  (local path, never downloaded, never a silent fallback to the 7B config), load the stock
  ``model.safetensors`` with ``strict=False``, check that the only missing keys are TTT keys
  (a clear error listing anything else), and initialise the TTT parameters.
* ``save_ttt_checkpoint`` / ``load_ttt_checkpoint``: the TTT (and LoRA) parameters alone, as
  ``ttt.safetensors`` + ``ttt_config.json``, like a LoRA adapter beside the base weights.
* ``apply_lora``: moshi's own LoRA on every linear except TTT's.

Integrity: an adapter records the SHA-256 of its tensors in ``ttt_config.json`` (checked on load);
every loaded tensor (stock weights and adapters) must be finite. Failures are a
:class:`WeightsError` naming the file and the tensor.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import IntegrityError
from ..fileio import atomic_path, atomic_write_json
from ..ttt.config import TTTConfig
from .build import TTT_KEY_MARKER, build_lm, ttt_blocks

TTT_WEIGHTS_NAME = "ttt.safetensors"
TTT_CONFIG_NAME = "ttt_config.json"

# Keys of moshi's config.json that name files or generation defaults, not LMModel arguments
# (moshi's loaders.CheckpointInfo pops the same ones when it reads a repository's config).
_NON_LM_KEYS = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                "lm_gen_config", "tts_config", "stt_config", "model_id"}


class WeightsError(IntegrityError):
    """Weights or config do not fit the model, or fail an integrity check; the message names the
    file and the key (exit code 5)."""


def _known_lm_keys() -> set[str]:
    keys: set[str] = set()
    for fn in (LMModel.__init__, StreamingTransformer.__init__, StreamingTransformerLayer.__init__):
        keys |= {p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs", "args")}
    # LMModel forwards depformer_* to the depformer transformer; conditioners/fuser/lora go to the loader.
    return keys | {"conditioners", "fuser", "lora", "lora_rank", "lora_scaling", "depformer_num_heads",
                   "depformer_num_layers", "depformer_layer_scale", "depformer_context",
                   "depformer_max_period", "depformer_gating", "depformer_pos_emb"}


def read_moshi_config(path: str | Path) -> dict[str, Any]:
    """moshi's ``config.json`` (local) -> ``lm_kwargs``. Unknown keys are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"moshi config not found: {path} (give the config.json that came with the weights)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a JSON object of LMModel arguments")
    kw = {k: v for k, v in raw.items() if k not in _NON_LM_KEYS}
    known = _known_lm_keys()
    unknown = sorted(k for k in kw if k not in known and not k.startswith("depformer_"))
    if unknown:
        raise WeightsError(f"{path}: unknown config key(s) {unknown}; not LMModel arguments")
    for required in ("dim", "num_heads", "num_layers", "n_q", "card", "text_card"):
        if required not in kw:
            raise WeightsError(f"{path}: missing config key {required!r} (no silent defaults)")
    return kw


def _materialise_ttt(model: LMModel, device: torch.device | str) -> None:
    """Give the TTT blocks real storage and their initial values (after a meta-device build)."""
    for block in ttt_blocks(model).values():
        block.to_empty(device=device)
        block.layer.reset_parameters()
        norm = block.norm
        if hasattr(norm, "reset_parameters"):
            norm.reset_parameters()
        else:  # moshi's RMSNorm: a scale initialised to one
            with torch.no_grad():
                for p in norm.parameters():
                    p.fill_(1.0)


def load_state_into(model: LMModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load stock moshi weights into a TTT model: only TTT keys may be missing; anything else
    (missing, unexpected, wrong shape) is one error naming the keys."""
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise WeightsError(f"{source}: weights do not fit the model built from the config:\n  "
                           + "\n  ".join(lines or [str(e)])) from e
    missing = [k for k in result.missing_keys if TTT_KEY_MARKER not in k]
    if result.unexpected_keys:
        raise WeightsError(f"{source}: unexpected key(s) not in the model: {_short(result.unexpected_keys)}")
    if missing:
        raise WeightsError(f"{source}: key(s) missing from the weights (only TTT keys may be): {_short(missing)}")


def _check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """A NaN or inf in a weight is a corrupt file (a flipped exponent bit, a diverged run)."""
    for k, t in tensors.items():
        if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"{source}: tensor {k!r} holds {n} NaN or infinite value(s): corrupt or "
                               "diverged weights")


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    from .memory import tensors_digest

    return tensors_digest(tensors)


def _short(keys: list[str], n: int = 10) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_lm(weights: str | Path, config: str | Path, ttt_config: TTTConfig | None = None,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
            chunkable: bool | None = None) -> LMModel:
    """Build the TTT model from a local moshi ``config.json`` and load ``model.safetensors``."""
    weights = Path(weights)
    if not weights.is_file():
        raise WeightsError(f"moshi weights not found: {weights}")
    lm_kwargs = read_moshi_config(config)
    model = build_lm(lm_kwargs, ttt_config, device="meta", dtype=dtype, chunkable=chunkable)
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:
        raise WeightsError(f"{weights}: not a readable safetensors file ({e})") from e
    _check_finite(state, weights)
    for k, v in state.items():
        if v.dtype.is_floating_point:
            # moshi keeps the conditioners in float32, everything else in the model dtype.
            state[k] = v.float() if k.startswith(("condition_provider.", "fuser.")) else v.to(dtype)
    load_state_into(model, state, str(weights))
    _materialise_ttt(model, device)
    # moshi's non-persistent buffers (if any) were created on meta: rebuild them by moving.
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise WeightsError(f"{weights}: buffer {name} was not initialised")
    return model


# ------------------------------------------------------------------------------ LoRA
def apply_lora(model: LMModel, rank: int, scaling: float) -> None:
    """moshi's ``replace_all_linear_with_lora`` on the whole model except the TTT blocks (whose
    linears are trained directly and must stay plain). Load base weights before this."""
    blocks = ttt_blocks(model)
    layers = model.transformer.layers
    for i in blocks:
        layers[i].ttt = None  # hide the TTT blocks from moshi's recursive replacement
    try:
        replace_all_linear_with_lora(model, rank, scaling)
    finally:
        for i, block in blocks.items():
            layers[i].ttt = block


def trainable_names(model: nn.Module, which: str) -> list[str]:
    """Parameter names for a trainable set: "ttt" (default), "ttt+lora", or "full"."""
    names = []
    for n, _ in model.named_parameters():
        is_ttt, is_lora = TTT_KEY_MARKER in n, ".lora_A." in n or ".lora_B." in n
        if which == "full" or is_ttt or (which == "ttt+lora" and is_lora):
            names.append(n)
    if which not in ("ttt", "ttt+lora", "full"):
        raise ValueError(f"trainable set must be 'ttt', 'ttt+lora' or 'full', got {which!r}")
    return names


# ------------------------------------------------------------------------------ TTT checkpoints
def adapter_keys(model: nn.Module) -> list[str]:
    """Names of the parameters an adapter folder holds (TTT and LoRA)."""
    return [n for n, _ in model.named_parameters()
            if TTT_KEY_MARKER in n or ".lora_A." in n or ".lora_B." in n]


_adapter_keys = adapter_keys


def save_ttt_checkpoint(model: LMModel, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the TTT (and LoRA) parameters + config to ``folder`` (atomically per file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {k: params[k].detach().contiguous().cpu() for k in _adapter_keys(model)}
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    cfg = {
        "format": "moshi-ttt-adapter", "version": 1,
        "ttt": model.ttt_config.to_dict(), "ttt_layers": list(getattr(model, "ttt_layers", [])),
        "lm": {k: int(getattr(model, k)) if hasattr(model, k) else None for k in ("dim", "dep_q", "n_q", "card")},
        "num_layers": len(model.transformer.layers),
        "lora": {"rank": lora[0].lora_A.out_features, "scaling": lora[0].scaling} if lora else None,
        **(extra or {}),
        "sha256": _tensors_digest(tensors),
    }
    with atomic_path(folder / TTT_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(folder / TTT_CONFIG_NAME, cfg)
    return folder


def read_ttt_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """``ttt_config.json`` of an adapter folder, checked: valid JSON, the expected keys and types."""
    path = Path(folder) / TTT_CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"TTT checkpoint config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "moshi-ttt-adapter":
        raise WeightsError(f"{path}: not a moshi-ttt adapter config")
    if not isinstance(cfg.get("ttt"), dict):
        raise WeightsError(f"{path}: key 'ttt' must be a mapping of TTT settings, got {cfg.get('ttt')!r}")
    layers = cfg.get("ttt_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise WeightsError(f"{path}: key 'ttt_layers' must be a list of layer indices, got {layers!r}")
    if "sha256" in cfg and not isinstance(cfg["sha256"], str):
        raise WeightsError(f"{path}: key 'sha256' must be a string")
    try:
        TTTConfig.from_dict(cfg["ttt"])
    except (TypeError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: invalid TTT settings under 'ttt' ({e})") from e
    return cfg


def load_ttt_checkpoint(model: LMModel, folder: str | Path) -> None:
    """Load TTT (+LoRA) parameters saved by ``save_ttt_checkpoint``; every adapter key of the model
    must be present with the right shape, and nothing else."""
    folder = Path(folder)
    cfg = read_ttt_checkpoint_config(folder)
    if cfg["ttt_layers"] != list(getattr(model, "ttt_layers", [])):
        raise WeightsError(f"{folder}: checkpoint has TTT in layers {cfg['ttt_layers']}, "
                           f"the model in {getattr(model, 'ttt_layers', [])}")
    path = folder / TTT_WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    params = dict(model.named_parameters())
    expected = set(_adapter_keys(model))
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unexpected:
        raise WeightsError(f"{path}: unexpected key(s): {_short(unexpected)}")
    if missing:
        raise WeightsError(f"{path}: missing key(s): {_short(missing)}")
    if "sha256" in cfg and _tensors_digest(tensors) != cfg["sha256"]:
        raise WeightsError(f"{path}: adapter weights are corrupted (sha256 does not match {TTT_CONFIG_NAME})")
    _check_finite(tensors, path)
    with torch.no_grad():
        for k, t in tensors.items():
            p = params[k]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightsError(f"{path}: {k} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
