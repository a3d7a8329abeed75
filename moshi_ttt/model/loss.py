"""The language-model objective (moshi-finetune's loss), with per-token terms for evaluation.

Positions that are not valid targets are excluded: moshi's delay positions, codes equal to
``zero_token_id`` (-1, also the padding of partial chunks and inactive lanes). Text padding
tokens are down-weighted; the first audio codebook (semantic) can be weighted differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMOutput


@dataclass
class LossConfig:
    """Weights of the objective: ``text_weight * text mean + audio_weight * audio mean``, each mean
    weighted per token."""

    # Padding is most of the text stream (silence between words): at full weight it would dominate.
    text_padding_weight: float = 0.5
    # The first audio codebook is Mimi's semantic one; the others are acoustic detail.
    first_codebook_weight: float = 1.0
    text_weight: float = 1.0
    audio_weight: float = 1.0


@dataclass
class TokenLosses:
    """Per-token cross-entropy (nats), targets and validity masks; invalid positions hold 0.

    text [B, T], text_target [B, T], text_mask [B, T];
    audio [B, Q, T], audio_target [B, Q, T], audio_mask [B, Q, T] (Q = dep_q generated codebooks).
    """

    text: torch.Tensor
    text_target: torch.Tensor
    text_mask: torch.Tensor
    audio: torch.Tensor
    audio_target: torch.Tensor
    audio_mask: torch.Tensor


def _ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = torch.where(mask[..., None], logits, torch.zeros_like(logits))  # moshi fills NaN outside
    target = torch.where(mask, target, torch.zeros_like(target))  # masked ids may be -1 or initial tokens
    loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
    return loss.view(target.shape) * mask


def token_losses(text_logits: torch.Tensor, text_target: torch.Tensor, text_mask: torch.Tensor,
                 audio_logits: torch.Tensor, audio_target: torch.Tensor, audio_mask: torch.Tensor) -> TokenLosses:
    """text_logits [B, T, Vt], audio_logits [B, Q, T, V]; targets and masks as in ``TokenLosses``."""
    text_mask = text_mask & (text_target >= 0)
    audio_mask = audio_mask & (audio_target >= 0)
    return TokenLosses(_ce(text_logits, text_target, text_mask), text_target, text_mask,
                       _ce(audio_logits, audio_target, audio_mask), audio_target, audio_mask)


def token_losses_from_output(out: LMOutput, codes: torch.Tensor, audio_offset: int = 1) -> TokenLosses:
    """For moshi's own ``LMModel.forward(codes)`` (full sequence); codes [B, K, T]."""
    dep_q = out.logits.shape[1]
    return token_losses(out.text_logits[:, 0], codes[:, 0], out.text_mask[:, 0],
                        out.logits, codes[:, audio_offset:audio_offset + dep_q], out.mask)


@dataclass
class LossTerms:
    total: torch.Tensor   # the weighted objective (differentiable)
    text: torch.Tensor    # weighted text CE (detached)
    audio: torch.Tensor   # weighted audio CE (detached)
    weight: torch.Tensor  # total text + audio weight, to combine chunks/ranks exactly


@dataclass
class WeightedSums:
    """Numerators and denominators of the weighted text and audio means: sums can be added over
    chunks or all-reduced over ranks before dividing, so the global mean is exact."""

    text_num: torch.Tensor
    text_den: torch.Tensor
    audio_num: torch.Tensor
    audio_den: torch.Tensor


def weighted_sums(tl: TokenLosses, cfg: LossConfig | None = None, text_padding_id: int = 3) -> WeightedSums:
    cfg = cfg or LossConfig()
    tw = torch.where(tl.text_target == text_padding_id, cfg.text_padding_weight, 1.0).to(tl.text) * tl.text_mask
    aw = torch.ones_like(tl.audio)
    aw[:, 0] = cfg.first_codebook_weight
    aw = aw * tl.audio_mask
    return WeightedSums((tl.text * tw).sum(), tw.sum(), (tl.audio * aw).sum(), aw.sum())


def combine(ws: WeightedSums, cfg: LossConfig | None = None, text_den: torch.Tensor | None = None,
            audio_den: torch.Tensor | None = None) -> LossTerms:
    """``text_weight * text + audio_weight * audio`` from sums; optional global denominators."""
    cfg = cfg or LossConfig()
    tden = (ws.text_den if text_den is None else text_den).clamp_min(1e-8)
    aden = (ws.audio_den if audio_den is None else audio_den).clamp_min(1e-8)
    text, audio = ws.text_num / tden, ws.audio_num / aden
    return LossTerms(cfg.text_weight * text + cfg.audio_weight * audio, text.detach(), audio.detach(),
                     (tden + aden).detach())


def weighted_loss(tl: TokenLosses, cfg: LossConfig | None = None, text_padding_id: int = 3) -> LossTerms:
    """``text_weight * text + audio_weight * audio``, each a weighted mean over valid tokens."""
    return combine(weighted_sums(tl, cfg, text_padding_id), cfg)


def lm_loss(out: LMOutput, codes: torch.Tensor, cfg: LossConfig | None = None,
            text_padding_id: int = 3) -> LossTerms:
    """The objective of moshi's full-sequence forward (benchmarks, references)."""
    return weighted_loss(token_losses_from_output(out, codes), cfg, text_padding_id)
