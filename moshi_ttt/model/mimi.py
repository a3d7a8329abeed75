"""Mimi (moshi's audio codec), built by moshi's own ``loaders.get_mimi``.

* ``load_mimi(path)``: real weights from a local safetensors file (never downloaded);
* ``random_mimi(tiny=True)``: a tiny random Mimi matching ``tiny_lm_kwargs`` (64-entry codebooks),
  for tests and the CPU demo; ``random_mimi(tiny=False)``: the full-size architecture with random
  weights (speed measurements).
A random-init Mimi has all-zero codebooks (moshi fills them by k-means during training), so every
frame would encode to code 0. ``random_mimi`` draws random codebook vectors so that codes vary.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import EuclideanCodebook

SAMPLE_RATE = 24000
FRAME_RATE = 12.5


def tiny_mimi_config(card: int = 64) -> dict[str, Any]:
    """moshi's Mimi config shrunk (same 24 kHz / 12.5 Hz framing, tiny widths)."""
    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(dimension=32, n_filters=4)
    cfg["quantizer"].update(dimension=16, n_q=8, bins=card, input_dimension=32, output_dimension=32)
    cfg["transformer"].update(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
                              input_dimension=32, output_dimensions=[32])
    return cfg


def _calibration_audio(seconds: float, seed: int) -> torch.Tensor:
    """Deterministic noise bursts and chirps, [1, 1, samples] at 24 kHz."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    f0 = 100 + 900 * torch.rand(8, generator=g)
    seg = n // 8
    chirps = torch.cat([torch.sin(2 * torch.pi * f * t[:seg] * (1 + 2 * t[:seg])) for f in f0])
    env = torch.rand(n // 2400 + 1, generator=g).repeat_interleave(2400)[:n]
    x = 0.3 * torch.nn.functional.pad(chirps, (0, n - chirps.numel())) + 0.2 * env * torch.randn(n, generator=g)
    return x.view(1, 1, n)


@torch.no_grad()
def randomize_codebooks_(mimi: MimiModel, seed: int = 0, passes: int = 3) -> None:
    """Give every codebook distinct vectors drawn from the latents it actually receives
    (a one-step k-means init on calibration audio), so that varied audio gives varied codes."""
    books = [m for m in mimi.modules() if isinstance(m, EuclideanCodebook)]
    g = torch.Generator().manual_seed(seed)
    for m in books:  # start from tiny random vectors so that the first pass runs
        m.embedding_sum.copy_(1e-3 * torch.randn(m.embedding_sum.shape, generator=g))
        m.cluster_usage.fill_(1.0)
        m._initialized.fill_(1.0)
        m._embedding = None
    audio = _calibration_audio(8.0, seed).to(next(mimi.parameters()).device)
    for _ in range(passes):
        seen: dict[int, torch.Tensor] = {}
        originals = {}
        for m in books:
            originals[m] = m.encode

            def record(x, m=m, seen=seen, originals=originals):
                seen[id(m)] = x.reshape(-1, x.shape[-1])
                return originals[m](x)

            m.encode = record
        try:
            mimi.encode(audio)
        finally:
            for m in books:
                del m.encode  # back to the class method
        for m in books:
            x = seen.get(id(m))
            if x is None:
                continue
            pick = torch.randint(0, x.shape[0], (m.codebook_size,), generator=g)
            noise = 1e-2 * x.std() * torch.randn(m.codebook_size, x.shape[1], generator=g).to(x)
            m.embedding_sum.copy_((x[pick] + noise).to(m.embedding_sum))
            m._embedding = None


def random_mimi(tiny: bool = True, num_codebooks: int = 2, card: int = 64, seed: int = 0,
                device: torch.device | str = "cpu") -> MimiModel:
    """A random Mimi: tiny (``card`` entries per codebook) or the full-size architecture."""
    torch.manual_seed(seed)
    cfg = tiny_mimi_config(card) if tiny else None
    mimi = loaders.get_mimi(None, cfg, device=device, num_codebooks=num_codebooks)
    randomize_codebooks_(mimi, seed)
    return mimi.eval()


def load_mimi(path: str | Path, num_codebooks: int = 8, device: torch.device | str = "cpu") -> MimiModel:
    """Mimi with real weights from a local file (e.g. tokenizer-e351c8d8-checkpoint125.safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mimi weights not found: {path}")
    return loaders.get_mimi(path, device=device, num_codebooks=num_codebooks).eval()
