"""moshi-ttt: a long-term test-time-training (TTT-MLP) memory for Kyutai's Moshi.

Public contract (docs/DESIGN.md section 6): ``TTTConfig``, ``build_lm``, ``tiny_lm_kwargs``, and the
operator functions ``init_state`` / ``ttt_mlp`` (in ``moshi_ttt.ttt.ops``).
The Moshi-facing names are imported lazily so that ``moshi_ttt.ttt`` stays usable (and fast to
import) without touching moshi.
"""

from __future__ import annotations

from typing import Any

from .ttt import TTTConfig, TTTState, init_state, ttt_mlp

__version__ = "0.1.0"
__all__ = ["TTTConfig", "TTTState", "init_state", "ttt_mlp", "build_lm", "tiny_lm_kwargs", "memory_lm_kwargs",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("build_lm", "tiny_lm_kwargs", "memory_lm_kwargs"):
        from .model import build as _build

        return getattr(_build, name)
    raise AttributeError(f"module 'moshi_ttt' has no attribute {name!r}")
