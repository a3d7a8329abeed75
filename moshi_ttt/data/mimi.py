"""Audio -> Mimi codes with moshi's ``MimiModel``.

Three ways to get a Mimi (all through ``moshi.models.loaders.get_mimi``):

- ``MimiSpec(weights="path/to/mimi.safetensors")``: the real model from a local file;
- ``MimiSpec(kind="random")``: the full-size architecture with random weights (benchmarks);
- ``MimiSpec(kind="tiny", card=64)``: a small random Mimi for tests and CPU demos, whose codebooks
  are initialised by moshi's own k-means (the quantizer's training-mode forward) on latents of a
  calibration signal, so that its codes vary with the audio (a random-init moshi codebook is all
  zeros, which maps every frame to code 0).

Long files are encoded in windows (``window_sec``) each preceded by ``overlap_sec`` of the previous
audio whose codes are thrown away: moshi's non-streaming encoder attends over the whole input
(memory quadratic in length), while its streaming mode keeps exactly ``context`` keys, so
multi-frame streaming calls lose keys. The overlap gives every frame at least ``overlap_sec`` of
true left context in every transformer layer (Mimi's encoder transformer has a 10 s context):
the first layer is exact; deeper layers see up to ``overlap_sec`` less history than a single call
over the whole file would. A file no longer than ``window_sec`` is encoded in one exact call.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..runtime import cpu_name

from ..model.mimi import calibration_audio, init_codebooks, load_mimi, random_mimi, tiny_mimi_config

__all__ = ["MimiSpec", "MimiEncoder", "build_mimi", "tiny_mimi", "benchmark_encode", "calibration_audio",
           "init_codebooks", "tiny_mimi_config"]

MimiKind = Literal["weights", "random", "tiny"]


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class MimiSpec:
    """Which Mimi encodes the audio, and how; also what the code cache keys on.

    Attributes:
        kind: ``weights`` (a local file), ``random`` (full size, random weights) or ``tiny``.
        weights: path of the Mimi weights (``.safetensors`` or a torch checkpoint) for ``weights``.
        num_codebooks: codebooks kept per channel (the model's ``dep_q``).
        card: codebook size of the tiny Mimi (must equal the model's ``card``).
        seed: random init seed for ``random`` / ``tiny``.
        window_sec: longest audio encoded in one call; longer files are windowed.
        overlap_sec: left context re-encoded before each window after the first.
    """

    kind: MimiKind = "weights"
    weights: str | None = None
    num_codebooks: int = 8
    card: int = 64
    seed: int = 0
    window_sec: float = 30.0
    overlap_sec: float = 10.0

    def __post_init__(self) -> None:
        if self.kind == "weights" and not self.weights:
            raise ValueError("MimiSpec(kind='weights') needs a weights path")
        if self.window_sec <= 0 or self.overlap_sec < 0:
            raise ValueError(f"window_sec must be > 0 and overlap_sec >= 0, got {self.window_sec}, {self.overlap_sec}")

    def identity(self) -> dict[str, Any]:
        """Everything that determines the codes: config, weights file identity, codebooks, windowing."""
        import moshi

        d: dict[str, Any] = {"moshi": getattr(moshi, "__version__", "?"), **asdict(self)}
        if self.kind == "weights":
            d["weights"] = _file_identity(Path(self.weights))  # type: ignore[arg-type]
        else:
            d["weights"] = None
        if self.kind != "tiny":
            d.pop("card")
        return d


def build_mimi(spec: MimiSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build moshi's ``MimiModel`` for ``spec`` (eval mode, ``set_num_codebooks`` applied)."""
    if spec.kind == "weights":
        try:
            return load_mimi(spec.weights, num_codebooks=spec.num_codebooks, device=device)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors / torch.load / key errors of a wrong or corrupt file
            from ..errors import IntegrityError

            raise IntegrityError(f"{spec.weights}: not readable Mimi weights ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]})") from e
    # The full-size random Mimi keeps moshi's zero codebooks: it is for timing, codes don't matter.
    return random_mimi(tiny=spec.kind == "tiny", num_codebooks=spec.num_codebooks, card=spec.card,
                       seed=spec.seed, device=device)


def tiny_mimi(num_codebooks: int = 2, card: int = 64, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A small random ``MimiModel`` with non-degenerate codebooks (tests, CPU demos)."""
    return build_mimi(MimiSpec(kind="tiny", num_codebooks=num_codebooks, card=card, seed=seed), device)


def _mimi_fact(name: str, cast: type) -> property:
    """A read-only attribute of the wrapped Mimi model (``self.mimi.<name>``), cast to ``cast``."""
    return property(lambda self: cast(getattr(self.mimi, name)), doc=f"Mimi's ``{name}``.")


class MimiEncoder:
    """Encodes multichannel audio to Mimi codes, one channel per batch entry.

    Args:
        spec: which Mimi and how to window.
        device: where Mimi runs.
        mimi: an already built model matching ``spec`` (skips building).
    """

    def __init__(self, spec: MimiSpec, device: str | torch.device = "cpu", mimi: torch.nn.Module | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.mimi = mimi if mimi is not None else build_mimi(spec, self.device)
        if self.mimi.num_codebooks != spec.num_codebooks:
            self.mimi.set_num_codebooks(spec.num_codebooks)

    # Mimi's facts as plain Python numbers, read live (``set_num_codebooks`` changes the model).
    sample_rate = _mimi_fact("sample_rate", int)
    frame_rate = _mimi_fact("frame_rate", float)
    frame_size = _mimi_fact("frame_size", int)
    num_codebooks = _mimi_fact("num_codebooks", int)
    cardinality = _mimi_fact("cardinality", int)

    def cache_key(self) -> str:
        """Hash of :meth:`MimiSpec.identity` plus the model's frame size and rate."""
        ident = {"spec": self.spec.identity(), "frame_size": self.frame_size, "frame_rate": self.frame_rate,
                 "sample_rate": self.sample_rate}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def num_frames(self, num_samples: int) -> int:
        """Frames Mimi produces for ``num_samples`` samples (the last partial frame counts)."""
        return math.ceil(num_samples / self.frame_size)

    @torch.no_grad()
    def encode(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode ``wav`` [C, N] (float, at ``sample_rate``) to codes [C * num_codebooks, T].

        Rows ``c * K .. (c + 1) * K - 1`` are channel ``c``'s codebooks; ``T = ceil(N / frame_size)``.
        """
        x = torch.as_tensor(wav, dtype=torch.float32)
        if x.dim() != 2:
            raise ValueError(f"expected audio [channels, samples], got shape {tuple(x.shape)}")
        C, N = x.shape
        T = self.num_frames(N)
        fs = self.frame_size
        win = max(1, int(round(self.spec.window_sec * self.frame_rate)))
        ov = int(round(self.spec.overlap_sec * self.frame_rate))
        pieces = []
        f = 0
        while f < T:
            s, e = max(0, f - ov), min(T, f + win)
            # Window starts are on frame boundaries, so every window sees the same frame grid.
            chunk = x[:, s * fs:e * fs].to(self.device)[:, None]  # [C, 1, n]
            codes = self.mimi.encode(chunk)  # [C, K, e - s]
            pieces.append(codes[..., f - s:e - s].cpu())
            f = e
        if not pieces:
            return torch.zeros(C * self.num_codebooks, 0, dtype=torch.long)
        codes = torch.cat(pieces, dim=-1)
        assert codes.shape[-1] == T, (codes.shape, T)
        return codes.reshape(C * self.num_codebooks, T).long()


def benchmark_encode(seconds: float = 60.0, kind: MimiKind = "random", num_codebooks: int = 8,
                     device: str = "cpu", repeats: int = 1, spec: MimiSpec | None = None) -> dict[str, Any]:
    """Time the encoding of ``seconds`` of stereo audio; returns the real-time factor.

    ``real_time_factor`` = audio duration / wall time (> 1 means faster than real time). Weights
    are random (``kind="random"``: full-size Mimi), which does not change the cost. A short warm-up
    call is not timed.
    """
    import platform

    spec = spec or MimiSpec(kind=kind, num_codebooks=num_codebooks)
    enc = MimiEncoder(spec, device)
    wav = calibration_audio(seconds, enc.sample_rate, seed=0)[:, 0]
    enc.encode(wav[:, : enc.frame_size * 4])
    times = []
    for _ in range(repeats):
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc.encode(wav)
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"audio_sec": seconds, "channels": 2, "wall_sec": best, "real_time_factor": seconds / best,
            "device": str(enc.device), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "spec": asdict(spec)}


