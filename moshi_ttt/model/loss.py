"""The language-model objective (moshi-finetune's loss), with per-token terms for evaluation.

Positions that moshi marks invalid (delays, codes equal to ``zero_token_id`` = -1, which is also
the padding value of partial chunks) are excluded. Text padding tokens are down-weighted; the
first audio codebook (semantic) can be up-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMOutput


@dataclass
class LossConfig:
    text_padding_weight: float = 0.5
    first_codebook_weight: float = 1.0
    text_weight: float = 1.0
    audio_weight: float = 1.0


@dataclass
class TokenLosses:
    """Per-token cross-entropy (nats) and validity masks.

    text [B, T], text_mask [B, T]; audio [B, dep_q, T], audio_mask [B, dep_q, T].
    Invalid positions hold 0.
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    audio: torch.Tensor
    audio_mask: torch.Tensor


def token_losses(out: LMOutput, codes: torch.Tensor, audio_offset: int = 1,
                 valid: torch.Tensor | None = None) -> TokenLosses:
    """codes [B, K, T] (the model's input codes); valid [B, T] optionally restricts positions."""
    dep_q = out.logits.shape[1]
    text_t = codes[:, 0]
    audio_t = codes[:, audio_offset:audio_offset + dep_q]
    text_mask = out.text_mask[:, 0].clone()
    audio_mask = out.mask.clone()
    if valid is not None:
        text_mask &= valid
        audio_mask &= valid[:, None]

    def ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = torch.where(mask[..., None], logits, torch.zeros_like(logits))  # NaN outside the mask
        loss = F.cross_entropy(logits.flatten(0, -2).float(), target.clamp_min(0).flatten(), reduction="none")
        return loss.view(target.shape) * mask

    return TokenLosses(ce(out.text_logits[:, 0], text_t, text_mask), text_mask,
                       ce(out.logits, audio_t, audio_mask), audio_mask)


@dataclass
class LossTerms:
    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor


def lm_loss(out: LMOutput, codes: torch.Tensor, cfg: LossConfig | None = None,
            valid: torch.Tensor | None = None, text_padding_id: int = 3) -> LossTerms:
    """Weighted mean cross-entropy: ``text_weight * text + audio_weight * audio``."""
    cfg = cfg or LossConfig()
    tl = token_losses(out, codes, valid=valid)
    tw = torch.where(codes[:, 0] == text_padding_id, cfg.text_padding_weight, 1.0).to(tl.text) * tl.text_mask
    aw = torch.ones_like(tl.audio)
    aw[:, 0] = cfg.first_codebook_weight
    aw = aw * tl.audio_mask
    text = (tl.text * tw).sum() / tw.sum().clamp_min(1e-8)
    audio = (tl.audio * aw).sum() / aw.sum().clamp_min(1e-8)
    return LossTerms(cfg.text_weight * text + cfg.audio_weight * audio, text.detach(), audio.detach())
