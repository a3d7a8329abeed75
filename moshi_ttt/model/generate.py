"""``moshi-ttt generate``: streaming inference with ``LMGen`` over a recording of the user.

The user's channel (the right channel of a stereo file, or a mono file) is fed to Moshi frame by
frame (80 ms) through Mimi; Moshi answers with audio and text. The TTT memory persists for the
whole file, however long (the attention window is 240 s on 7B). ``--memory-in`` starts from a
memory saved earlier with ``--memory-out``: the same speaker, a new conversation.

    moshi-ttt generate talk.wav --tiny                    # random tiny model, any machine
    moshi-ttt generate talk.wav --moshi-weights model.safetensors --moshi-config config.json \\
        --mimi-weights tokenizer-e351c8d8-checkpoint125.safetensors --tokenizer tokenizer_spm_32k_3.model \\
        --ttt-checkpoint runs/exp/checkpoints/last/adapter
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ttt.config import TTTConfig
from .build import build_lm, tiny_lm_kwargs
from .memory import load_memory, save_memory
from .mimi import FRAME_RATE, SAMPLE_RATE, load_mimi, random_mimi

FRAME = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples = 80 ms


class AudioInputError(ValueError):
    """The input audio cannot be used; the message names the file and the problem."""


def read_user_audio(path: str | Path, channel: str = "auto") -> np.ndarray:
    """The user's channel as float32 mono at 24 kHz: [samples].

    channel: "auto" (right of stereo = user, as in moshi-finetune data; the only one of mono),
    "left", "right", or "mix".
    """
    import sphn

    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"{path}: file not found")
    try:
        pcm, sr = sphn.read(str(path))
    except Exception as e:  # sphn raises ValueError with the decoder's message
        raise AudioInputError(f"{path}: not a readable audio file ({e})") from e
    if pcm.ndim != 2 or pcm.shape[1] == 0:
        raise AudioInputError(f"{path}: contains no audio samples")
    if not np.isfinite(pcm).all():
        raise AudioInputError(f"{path}: contains NaN or infinite samples")
    n_ch = pcm.shape[0]
    if channel == "auto":
        x = pcm[1] if n_ch >= 2 else pcm[0]
    elif channel == "mix":
        x = pcm.mean(0)
    else:
        idx = {"left": 0, "right": 1}[channel]
        if idx >= n_ch:
            raise AudioInputError(f"{path}: has {n_ch} channel(s), no {channel} channel")
        x = pcm[idx]
    if sr != SAMPLE_RATE:
        n_out = int(round(x.shape[0] * SAMPLE_RATE / sr))
        x = sphn.resample(x[None].astype(np.float32), sr, SAMPLE_RATE)[0][:n_out]
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class GenerateResult:
    audio: np.ndarray        # [samples] Moshi's voice at 24 kHz
    text_tokens: list[int]   # one per frame (padding included)
    frames: int
    seconds: float           # audio duration processed
    wall: float              # wall time


@torch.no_grad()
def generate(model, mimi, user_audio: np.ndarray, memory_in: str | Path | None = None,
             memory_out: str | Path | None = None, temp: float = 0.8, temp_text: float = 0.7,
             progress: bool = True) -> GenerateResult:
    """Stream ``user_audio`` [samples] through Mimi and ``LMGen``, one 80 ms frame at a time."""
    from moshi.models import LMGen
    from tqdm import tqdm

    device = next(model.parameters()).device
    gen = LMGen(model, temp=temp, temp_text=temp_text)
    n_user = model.num_codebooks - 1 - model.dep_q
    n_frames = -(-user_audio.shape[0] // FRAME)
    pcm = np.zeros(n_frames * FRAME, dtype=np.float32)
    pcm[:user_audio.shape[0]] = user_audio
    out_audio, text = [], []
    t0 = time.perf_counter()
    with gen.streaming(1), mimi.streaming(1):
        if memory_in is not None:
            load_memory(model, memory_in)
        bar = tqdm(range(n_frames), unit="frame", disable=not progress, desc="generate")
        for i in bar:
            chunk = torch.from_numpy(pcm[i * FRAME:(i + 1) * FRAME]).to(device).view(1, 1, FRAME)
            codes = mimi.encode(chunk)                                  # [1, n_mimi, 1]
            tokens = gen.step(codes[:, :n_user])
            if tokens is not None:
                text.append(int(tokens[0, 0, 0]))
                out_audio.append(mimi.decode(tokens[:, 1:1 + model.dep_q]).float().cpu().numpy().ravel())
            if i % 25 == 0 or i == n_frames - 1:
                done = (i + 1) / FRAME_RATE
                bar.set_postfix(rtf=f"{done / max(time.perf_counter() - t0, 1e-9):.2f}x")
        if memory_out is not None:
            save_memory(model, memory_out, extra={"frames": n_frames})
    wall = time.perf_counter() - t0
    audio = np.concatenate(out_audio) if out_audio else np.zeros(0, dtype=np.float32)
    return GenerateResult(audio, text, n_frames, n_frames / FRAME_RATE, wall)


def tokens_to_text(tokens: list[int], tokenizer_path: str | Path | None, padding_ids=(0, 3)) -> str:
    """Decode the text stream; without a tokenizer (tiny model) the token ids are written."""
    words = [t for t in tokens if t not in padding_ids]
    if tokenizer_path is None:
        return " ".join(str(t) for t in words)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    return sp.decode(words)


def _build(args: argparse.Namespace):
    device = torch.device(args.device)
    if args.tiny:
        cfg = TTTConfig(layers="all")
        if args.ttt_checkpoint:
            from .weights import read_ttt_checkpoint_config

            cfg = TTTConfig.from_dict(read_ttt_checkpoint_config(args.ttt_checkpoint)["ttt"])
        torch.manual_seed(args.seed)
        model = build_lm(tiny_lm_kwargs(), cfg, device=device, dtype=torch.float32)
        mimi = random_mimi(tiny=True, num_codebooks=model.dep_q, card=model.card, device=device)
    else:
        from .weights import load_lm, read_ttt_checkpoint_config

        missing = [n for n in ("moshi_weights", "moshi_config", "mimi_weights") if not getattr(args, n)]
        if missing:
            raise SystemExit("generate: give --tiny, or all of --moshi-weights, --moshi-config and "
                             f"--mimi-weights (missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
        cfg = TTTConfig(layers=args.ttt_layers) if not args.ttt_checkpoint else \
            TTTConfig.from_dict(read_ttt_checkpoint_config(args.ttt_checkpoint)["ttt"])
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        model = load_lm(args.moshi_weights, args.moshi_config, cfg, device=device, dtype=dtype)
        mimi = load_mimi(args.mimi_weights, num_codebooks=max(model.dep_q, model.num_codebooks - 1 - model.dep_q),
                         device=device)
    if args.ttt_checkpoint:
        from .weights import load_ttt_checkpoint

        load_ttt_checkpoint(model, args.ttt_checkpoint)
    return model.eval(), mimi


def main(args: argparse.Namespace) -> int:
    import sphn

    try:
        user = read_user_audio(args.input, args.channel)
    except AudioInputError as e:
        print(f"error: {e}")
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, mimi = _build(args)
    res = generate(model, mimi, user, args.memory_in, args.memory_out, args.temp, args.temp_text,
                   progress=not args.quiet)
    out = Path(args.out or Path(args.input).with_suffix("").as_posix() + "_moshi")
    out.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(out) + ".wav", res.audio, SAMPLE_RATE)
    Path(str(out) + ".txt").write_text(tokens_to_text(res.text_tokens, args.tokenizer) + "\n")
    print(f"{res.seconds:.1f} s of audio in {res.wall:.1f} s (real-time factor {res.seconds / res.wall:.2f}x); "
          f"wrote {out}.wav and {out}.txt" + (f"; memory saved to {args.memory_out}" if args.memory_out else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a recording through Moshi+TTT with LMGen (wav + text out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="wav (or any format sphn reads); stereo: right = user; resampled to 24 kHz")
    p.add_argument("--out", help="output path prefix (.wav and .txt are added); default INPUT_moshi")
    p.add_argument("--tiny", action="store_true", help="random tiny Moshi and Mimi (runs anywhere, CPU)")
    p.add_argument("--moshi-weights", help="local model.safetensors")
    p.add_argument("--moshi-config", help="local config.json of those weights")
    p.add_argument("--mimi-weights", help="local Mimi safetensors")
    p.add_argument("--tokenizer", help="local sentencepiece model for the text output")
    p.add_argument("--ttt-checkpoint", help="folder with ttt.safetensors + ttt_config.json (from training)")
    p.add_argument("--ttt-layers", default="middle", help="TTT layers when no checkpoint is given")
    p.add_argument("--memory-in", help="start from this saved memory (.safetensors)")
    p.add_argument("--memory-out", help="save the memory at the end of the file here")
    p.add_argument("--channel", choices=["auto", "left", "right", "mix"], default="auto")
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--temp-text", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
