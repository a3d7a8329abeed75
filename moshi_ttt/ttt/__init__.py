"""The TTT-MLP memory on its own: config, operator, state, layer. No Moshi import here."""

from .config import TTTConfig, TTTConfigError
from .dispatch import ttt_mlp
from .layer import TTTMLP
from .ops import init_state
from .state import TTTState

__all__ = ["TTTConfig", "TTTConfigError", "TTTMLP", "TTTState", "init_state", "ttt_mlp"]
