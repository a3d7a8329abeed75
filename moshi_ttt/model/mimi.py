"""Mimi (moshi's audio codec), built by moshi's own ``loaders.get_mimi``.

* ``load_mimi(path)``: real weights from a local file (never downloaded);
* ``random_mimi(tiny=True)``: a small random Mimi with ``card``-entry codebooks (tests, CPU demo);
  ``random_mimi(tiny=False)``: the full-size architecture with random weights (speed measurements).
A random-init Mimi has all-zero codebooks (moshi fills them by k-means during training), so every
frame would encode to code 0; ``init_codebooks`` runs moshi's own k-means initialisation on a
deterministic calibration signal so that codes vary.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

SAMPLE_RATE = 24000
FRAME_RATE = 12.5


def tiny_mimi_config(card: int = 64) -> dict[str, Any]:
    """A small Mimi config for ``loaders.get_mimi``: 24 kHz, 12.5 Hz, ``card`` entries per codebook.

    Same architecture as the real one (SEANet with ratios 8,6,5,4, causal transformer, split RVQ),
    shrunk: 32-dim latent, 4 filters, a 2-layer transformer with an 8-frame context, 8 codebooks of
    16 dims.
    """
    cfg = copy.deepcopy(loaders._mimi_config)
    dim = 32
    cfg["seanet"].update(dimension=dim, n_filters=4)
    cfg["quantizer"].update(dimension=16, n_q=8, bins=card, input_dimension=dim, output_dimension=dim)
    cfg["transformer"].update(d_model=dim, num_heads=2, num_layers=2, context=8, dim_feedforward=64,
                              input_dimension=dim, output_dimensions=[dim])
    return cfg


def calibration_audio(seconds: float, sample_rate: int, seed: int, channels: int = 2) -> torch.Tensor:
    """Deterministic varied test audio ``[channels, 1, N]``: chirps, AM noise and silences."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    out = []
    for c in range(channels):
        f0, f1 = 100.0 + 150.0 * c, 2000.0 + 500.0 * c
        chirp = torch.sin(2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3))))
        env = 0.5 * (1 + torch.sin(2 * math.pi * (0.3 + 0.1 * c) * t))
        noise = torch.randn(n, generator=g, dtype=torch.float64)
        gate = (torch.sin(2 * math.pi * 0.17 * t + c) > -0.6).double()
        out.append((0.3 * chirp * env + 0.1 * noise * (1 - env)) * gate)
    return torch.stack(out)[:, None].float()


@torch.no_grad()
def init_codebooks(mimi: MimiModel, seed: int = 0, seconds: float = 10.0) -> None:
    """Give a random-init Mimi non-degenerate codebooks with moshi's k-means initialisation.

    moshi initialises one more residual level per training-mode forward of the quantizer (each
    level's k-means runs on the residual of the levels before), so we call it once per active
    codebook on the unquantized latents of :func:`calibration_audio`. Deterministic in ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = calibration_audio(seconds, mimi.sample_rate, seed).to(next(mimi.parameters()).device)
        latent = mimi._encode_to_unquantized_latent(x)
        q = mimi.quantizer
        was_training = q.training
        q.train()
        try:
            for _ in range(mimi.num_codebooks):
                q(latent, mimi.frame_rate)
        finally:
            q.train(was_training)
    mimi.eval()


def random_mimi(tiny: bool = True, num_codebooks: int = 2, card: int = 64, seed: int = 0,
                device: torch.device | str = "cpu", calibrate: bool | None = None) -> MimiModel:
    """A random Mimi: tiny (``card`` entries per codebook) or the full-size architecture.
    ``calibrate`` (default: tiny) gives it non-degenerate codebooks (``init_codebooks``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, tiny_mimi_config(card) if tiny else None, device=device,
                                num_codebooks=num_codebooks)
    if tiny if calibrate is None else calibrate:
        init_codebooks(mimi, seed=seed)
    return mimi.eval()


def load_mimi(path: str | Path, num_codebooks: int = 8, device: torch.device | str = "cpu") -> MimiModel:
    """Mimi with real weights from a local file (e.g. tokenizer-e351c8d8-checkpoint125.safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mimi weights not found: {path}")
    return loaders.get_mimi(path, device=device, num_codebooks=num_codebooks).eval()
