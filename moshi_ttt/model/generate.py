"""``moshi-ttt generate``: streaming inference with ``LMGen`` over a recording of the user.

The user's channel (the right channel of a stereo file, or a mono file) is fed to Moshi frame by
frame (80 ms) through Mimi; Moshi answers with audio and text. The TTT memory persists for the
whole file, however long (the attention window is 240 s on 7B). ``--memory-in`` starts from a
memory saved earlier with ``--memory-out``: the same speaker, a new conversation.

Input is decoded block by block and the answer is written to disk frame by frame (16-bit wav and
text), so memory use does not grow with the length of the recording.

Examples:

    moshi-ttt generate talk.wav --tiny                    # random tiny model: noise out, any machine
    moshi-ttt generate talk.wav --moshi-weights model.safetensors --moshi-config configs/moshi7b_config.json \\
        --mimi-weights tokenizer-e351c8d8-checkpoint125.safetensors --tokenizer tokenizer_spm_32k_3.model \\
        --ttt-checkpoint runs/moshi7b_ttt/checkpoints/step_0020000/adapter --memory-out talk_memory.safetensors

The weights are the files of the Hugging Face repository kyutai/moshiko-pytorch-bf16, which has no
config.json: pass configs/moshi7b_config.json (moshi's default 7B configuration). The adapter
folder is written by `moshi-ttt train` into every checkpoint (run_dir/checkpoints/step_N/adapter).

Speed is printed as a real-time factor: seconds of audio per second of compute (above 1x is
faster than real time), with the compute time per second of audio beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime import PeriodicLog, is_terminal
from ..ttt.config import TTTConfig
from .build import build_lm, tiny_lm_kwargs
from .hybrid import memory_schedule
from .memory import load_memory, save_memory
from .mimi import FRAME_RATE, SAMPLE_RATE, load_mimi, random_mimi

FRAME = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples = 80 ms
BLOCK_SECONDS = 20.0                   # input decoded this much at a time


class AudioInputError(ValueError):
    """The input audio cannot be used; the message names the file and the problem."""


class OutputError(ValueError):
    """An output path cannot be written; the message names it."""


def _pick_channel(pcm: np.ndarray, channel: str, path: Path) -> np.ndarray:
    n_ch = pcm.shape[0]
    if channel == "auto":
        return pcm[1] if n_ch >= 2 else pcm[0]
    if channel == "mix":
        return pcm.mean(0)
    idx = {"left": 0, "right": 1}[channel]
    if idx >= n_ch:
        raise AudioInputError(f"{path}: has {n_ch} channel(s), no {channel} channel")
    return pcm[idx]


def read_user_audio(path: str | Path, channel: str = "auto") -> np.ndarray:
    """The user's channel as float32 mono at 24 kHz, whole: [samples] (see :class:`UserAudio` to stream).

    channel: "auto" (right of stereo = user, as in moshi-finetune data; the only one of mono),
    "left", "right", or "mix".
    """
    audio = UserAudio(path, channel)
    frames = list(audio.blocks())
    return np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)


class UserAudio:
    """The user's channel of an audio file, decoded ``BLOCK_SECONDS`` at a time (flat memory).

    ``header_seconds`` is the duration the file's header announces; after reading,
    ``decoded_seconds`` is what the file actually held, and :attr:`truncated` says whether the file
    ended early (a copy cut short, a recording that crashed).

    Files at another sample rate are resampled block by block (the block edges, every 20 s, are
    not filtered across; inaudible in speech).
    """

    def __init__(self, path: str | Path, channel: str = "auto"):
        import sphn

        self.path, self.channel = Path(path), channel
        if not self.path.is_file():
            raise AudioInputError(f"{self.path}: file not found")
        try:
            self._reader = sphn.FileReader(str(self.path))
        except Exception as e:  # sphn raises ValueError/OSError with the decoder's message
            raise AudioInputError(f"{self.path}: not a readable audio file ({e})") from e
        self.sample_rate = int(self._reader.sample_rate)
        self.channels = int(self._reader.channels)
        self.header_seconds = float(self._reader.duration_sec)
        if channel in ("left", "right") and {"left": 0, "right": 1}[channel] >= self.channels:
            raise AudioInputError(f"{self.path}: has {self.channels} channel(s), no {channel} channel")
        self.decoded_seconds = 0.0

    @property
    def truncated(self) -> bool:
        """True if the file held more than one frame less than its header announced."""
        return self.header_seconds - self.decoded_seconds > 1 / FRAME_RATE

    def blocks(self) -> Iterator[np.ndarray]:
        """Float32 mono 24 kHz blocks of the user's channel; raises on NaN or an empty file."""
        import sphn

        start = 0.0
        while True:
            try:
                pcm = self._reader.decode(start, BLOCK_SECONDS)
            except Exception as e:  # noqa: BLE001 - a decoder error mid-file names the file and time
                raise AudioInputError(f"{self.path}: cannot decode at {start:.1f} s ({e})") from e
            n = pcm.shape[1] if pcm.ndim == 2 else 0
            if n == 0:
                break
            if not np.isfinite(pcm).all():
                raise AudioInputError(f"{self.path}: contains NaN or infinite samples (after {start:.1f} s)")
            x = _pick_channel(pcm, self.channel, self.path)
            if self.sample_rate != SAMPLE_RATE:
                n_out = int(round(n * SAMPLE_RATE / self.sample_rate))
                x = sphn.resample(x[None].astype(np.float32), self.sample_rate, SAMPLE_RATE)[0][:n_out]
            self.decoded_seconds += n / self.sample_rate
            yield np.ascontiguousarray(x, dtype=np.float32)
            start += BLOCK_SECONDS
            if n < BLOCK_SECONDS * self.sample_rate - 1:
                break
        if self.decoded_seconds == 0:
            raise AudioInputError(f"{self.path}: contains no audio samples")

    def frames(self) -> Iterator[np.ndarray]:
        """80 ms frames (1920 samples); the last one is zero-padded."""
        yield from frames_of(self.blocks())


def frames_of(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Cut a stream of sample blocks into 1920-sample frames (the last zero-padded)."""
    rest = np.zeros(0, dtype=np.float32)
    for b in blocks:
        buf = np.concatenate([rest, b]) if rest.size else b
        n = buf.shape[0] // FRAME
        for i in range(n):
            yield buf[i * FRAME:(i + 1) * FRAME]
        rest = buf[n * FRAME:].copy()
    if rest.size:
        yield np.concatenate([rest, np.zeros(FRAME - rest.size, dtype=np.float32)])


def check_writable(path: str | Path, what: str) -> Path:
    """Fail now, before any work, if ``path`` cannot be created (parent folders are made)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write there ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: exists and is not writable")
    return path


class StreamingOutput:
    """Moshi's answer written as it is produced: ``PREFIX.wav`` (mono, 16-bit, 24 kHz) and ``PREFIX.txt``.

    The wav header is completed on :meth:`close`; text is flushed every ~2 s of audio, so a long
    run can be followed with ``tail -f`` and memory stays flat.

    Args:
        prefix: output path without extension.
        tokenizer: a sentencepiece model file to turn text tokens into words, or None to write token ids.
        padding_ids: text tokens that are not words (moshi's padding and end-of-padding ids).
    """

    def __init__(self, prefix: str | Path, tokenizer: str | Path | None = None, padding_ids: Iterable[int] = (0, 3)):
        self.wav_path = Path(str(prefix) + ".wav")
        self.txt_path = Path(str(prefix) + ".txt")
        self.padding_ids = set(padding_ids)
        self._sp = None
        if tokenizer is not None:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
        for p, what in ((self.wav_path, "--out"), (self.txt_path, "--out")):
            check_writable(p, what)
        try:
            self._wav_file = open(self.wav_path, "wb")  # noqa: SIM115 - closed in close()
            self._wav = wave.open(self._wav_file, "wb")
            self._txt = open(self.txt_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise OutputError(f"--out {self.wav_path}: cannot write ({e.strerror or e})") from None
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self.samples = 0
        self.words = 0
        self._since_flush = 0

    def add(self, text_token: int | None, audio: np.ndarray | None) -> None:
        """Append one frame of Moshi's answer (either part may be None)."""
        if audio is not None and audio.size:
            pcm16 = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
            self._wav.writeframesraw(pcm16.tobytes())
            self.samples += pcm16.size
        if text_token is not None and text_token not in self.padding_ids:
            if self._sp is not None:
                self._txt.write(self._sp.id_to_piece(text_token).replace("\u2581", " "))
            else:
                self._txt.write(f"{text_token} ")
            self.words += 1
        self._since_flush += 1
        if self._since_flush >= 25:  # every 2 s of audio: on disk, readable while running
            self._txt.flush()
            self._wav_file.flush()
            self._since_flush = 0

    def close(self) -> None:
        """Complete the wav header and close both files (idempotent)."""
        if self._wav is not None:
            self._wav.close()  # writes the final sizes into the header
            self._wav_file.close()
            self._wav = None
        if not self._txt.closed:
            self._txt.write("\n")
            self._txt.close()

    def __enter__(self) -> StreamingOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class StageTimes:
    """Wall seconds spent in each stage of the streaming loop (summed over frames)."""

    encode: float = 0.0   # Mimi encoder, user audio -> codes
    step: float = 0.0     # LMGen.step (Moshi + TTT memory, depformer sampling)
    decode: float = 0.0   # Mimi decoder, Moshi's codes -> audio
    write: float = 0.0    # output files


@dataclass
class GenerateResult:
    frames: int
    seconds: float           # audio duration processed
    wall: float              # wall time of the streaming loop
    times: StageTimes = field(default_factory=StageTimes)
    text_tokens: list[int] = field(default_factory=list)  # only with keep_text=True (tests)

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of audio per second of compute (> 1: faster than real time)."""
        return self.seconds / self.wall if self.wall > 0 else math.inf


def speed_line(seconds: float, wall: float) -> str:
    """"12.0 s of audio in 4.0 s: 3.00x real time (0.33 s of compute per second of audio)"."""
    rtf = seconds / wall if wall > 0 else math.inf
    per = wall / seconds if seconds > 0 else math.inf
    return (f"{seconds:.1f} s of audio in {wall:.1f} s: {rtf:.2f}x real time "
            f"({per:.2f} s of compute per second of audio; above 1x is faster than real time)")


def check_memory_file(path: str | Path) -> None:
    """Refuse a memory file holding NaN or infinite values (it would silently ruin the answer)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OutputError(f"--memory-in {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"--memory-in {path}: tensor {key!r} holds NaN or infinite values; "
                                     "this memory cannot be used")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors: a corrupt or foreign file
        raise ValueError(f"--memory-in {path}: not a readable memory file ({e})") from None


@torch.no_grad()
def generate(model, mimi, frames: Iterable[np.ndarray] | np.ndarray, output: StreamingOutput | None = None,
             memory_in: str | Path | None = None, memory_out: str | Path | None = None, temp: float = 0.8,
             temp_text: float = 0.7, progress: bool = True, total_frames: int | None = None,
             on_frame: Callable[[int, GenerateResult], None] | None = None, keep_text: bool = False
             ) -> GenerateResult:
    """Stream user audio frames (1920 samples each) through Mimi and ``LMGen``.

    ``frames`` may also be a whole recording, ``[samples]`` float32 at 24 kHz (cut into frames here).

    Moshi's answer goes to ``output`` frame by frame; the outputs are closed (complete) before the
    memory is saved to ``memory_out``. ``on_frame(i, result_so_far)`` is called after every frame
    (the benchmark samples memory use there). Nothing grows with the input length unless
    ``keep_text``.
    """
    from moshi.models import LMGen
    from tqdm import tqdm

    if isinstance(frames, np.ndarray):
        total_frames = total_frames or -(-frames.shape[0] // FRAME)
        frames = frames_of([frames.astype(np.float32, copy=False)])
    device = next(model.parameters()).device
    gen = LMGen(model, temp=temp, temp_text=temp_text)
    n_user = model.num_codebooks - 1 - model.dep_q
    res = GenerateResult(0, 0.0, 0.0)
    times = res.times
    log = PeriodicLog("generate", total_frames, every_s=60.0)
    t0 = time.perf_counter()
    with gen.streaming(1), mimi.streaming(1):
        if memory_in is not None:
            load_memory(model, memory_in)
        bar = tqdm(frames, total=total_frames, unit="frame", disable=not (progress and is_terminal()),
                   desc="generate")
        for i, frame in enumerate(bar):
            a = time.perf_counter()
            chunk = torch.from_numpy(frame).to(device).view(1, 1, FRAME)
            codes = mimi.encode(chunk)                                  # [1, n_mimi, 1]
            b = time.perf_counter()
            tokens = gen.step(codes[:, :n_user])
            c = time.perf_counter()
            text_token, audio = None, None
            if tokens is not None:
                text_token = int(tokens[0, 0, 0])
                audio = mimi.decode(tokens[:, 1:1 + model.dep_q]).float().cpu().numpy().ravel()
            d = time.perf_counter()
            if output is not None:
                output.add(text_token, audio)
            if keep_text and text_token is not None:
                res.text_tokens.append(text_token)
            e = time.perf_counter()
            times.encode += b - a
            times.step += c - b
            times.decode += d - c
            times.write += e - d
            res.frames = i + 1
            res.seconds = res.frames / FRAME_RATE
            res.wall = e - t0
            if progress:
                log.update(1, rtf=f"{res.rtf:.2f}x")
                if i % 25 == 0:
                    bar.set_postfix(rtf=f"{res.rtf:.2f}x")
            if on_frame is not None:
                on_frame(i, res)
        res.wall = time.perf_counter() - t0
        if output is not None:
            output.close()                      # the answer is safe on disk before the memory is written
        if memory_out is not None:
            save_memory(model, memory_out, extra={"frames": res.frames})
    return res


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _build(args: argparse.Namespace):
    device = torch.device(args.device)
    if args.tiny:
        conflicting = [f"--{n.replace('_', '-')}" for n in ("moshi_weights", "moshi_config", "mimi_weights")
                       if getattr(args, n)]
        if conflicting:
            raise OutputError(f"--tiny builds a random tiny model; it cannot use {', '.join(conflicting)} "
                              "(drop --tiny to use real weights)")
        if args.dtype not in (None, "fp32"):
            _say(f"warning: --tiny runs in float32; --dtype {args.dtype} is ignored")
        if args.tokenizer:
            _say("warning: --tiny has its own small text vocabulary; --tokenizer is ignored (token ids are written)")
            args.tokenizer = None
        cfg = TTTConfig(layers=args.ttt_layers or "all")
        if args.ttt_checkpoint:
            from .weights import read_ttt_checkpoint_config

            cfg = TTTConfig.from_dict(read_ttt_checkpoint_config(args.ttt_checkpoint)["ttt"])
            if args.ttt_layers:
                _say(f"warning: --ttt-layers {args.ttt_layers} is ignored: the checkpoint fixes the TTT layers")
        torch.manual_seed(args.seed)
        model = build_lm(tiny_lm_kwargs(), cfg, device=device, dtype=torch.float32)
        mimi = random_mimi(tiny=True, num_codebooks=model.dep_q, card=model.card, device=device)
        _say("note: --tiny uses random weights (Moshi and Mimi): the wav is noise and the text is raw token ids, "
             "not words. It shows the pipeline and its speed, not a conversation.")
    else:
        from .weights import load_lm, read_ttt_checkpoint_config

        missing = [n for n in ("moshi_weights", "moshi_config", "mimi_weights") if not getattr(args, n)]
        if missing:
            raise OutputError("give --tiny, or all of --moshi-weights, --moshi-config and "
                              f"--mimi-weights (missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
        if args.ttt_checkpoint:
            cfg = TTTConfig.from_dict(read_ttt_checkpoint_config(args.ttt_checkpoint)["ttt"])
            if args.ttt_layers:
                _say(f"warning: --ttt-layers {args.ttt_layers} is ignored: the checkpoint fixes the TTT layers")
        else:
            cfg = TTTConfig(layers=args.ttt_layers or "middle")
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
        model = load_lm(args.moshi_weights, args.moshi_config, cfg, device=device, dtype=dtype)
        mimi = load_mimi(args.mimi_weights, num_codebooks=max(model.dep_q, model.num_codebooks - 1 - model.dep_q),
                         device=device)
        if not args.ttt_checkpoint:
            _say("note: no --ttt-checkpoint: the TTT layers are freshly initialised (untrained memory)")
        if not args.tokenizer:
            _say("note: no --tokenizer: the text file holds token ids, not words")
    if args.ttt_checkpoint:
        from .weights import load_ttt_checkpoint

        load_ttt_checkpoint(model, args.ttt_checkpoint)
        _say(f"loaded TTT weights from {args.ttt_checkpoint}")
    return model.eval(), mimi


def _trained_reset_every(adapter: str | Path | None) -> int | None:
    """The memory's reset schedule a TTT adapter was trained with: None (kept for the whole
    conversation) unless it was trained with ``persistent_states: false``, then its training chunk
    (``reset_every``, written by the trainer; adapters written before it have ``ttt.chunk_frames``)."""
    if adapter is None:
        return None
    from .weights import read_ttt_checkpoint_config

    cfg = read_ttt_checkpoint_config(adapter)
    if cfg["ttt"].get("persistent_states", True):
        return None
    return cfg.get("reset_every") or cfg["ttt"].get("chunk_frames")


def main(args: argparse.Namespace) -> int:
    from ..runtime import setup_threads

    try:
        audio = UserAudio(args.input, args.channel)
        out = Path(args.out or Path(args.input).with_suffix("").as_posix() + "_moshi")
        # Every output is checked before minutes of generation, not after.
        check_writable(Path(str(out) + ".wav"), "--out")
        check_writable(Path(str(out) + ".txt"), "--out")
        if args.memory_out:
            check_writable(args.memory_out, "--memory-out")
        if args.memory_in:
            check_memory_file(args.memory_in)
    except (AudioInputError, OutputError, ValueError) as e:
        print(f"error: {e}")
        return 2
    setup_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        model, mimi = _build(args)
    except (OutputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    total = int(math.ceil(audio.header_seconds * FRAME_RATE))
    _say(f"input: {args.input}, {audio.header_seconds:.1f} s, {audio.channels} channel(s) at {audio.sample_rate} Hz "
         f"(user = {'right' if args.channel == 'auto' and audio.channels >= 2 else args.channel} channel)")
    try:
        with StreamingOutput(out, args.tokenizer, padding_ids=(0, model.existing_text_padding_id)) as sink:
            if args.memory_in:
                meta = _memory_meta(args.memory_in)
                frames = meta.get("frames")
                _say(f"memory loaded from {args.memory_in}: TTT layers {meta.get('ttt_layers')}"
                     + (f", after {int(frames) / FRAME_RATE:.1f} s of earlier conversation" if frames else ""))
            with memory_schedule(_trained_reset_every(args.ttt_checkpoint)):  # as the model was trained
                res = generate(model, mimi, audio.frames(), sink, args.memory_in, args.memory_out, args.temp,
                               args.temp_text, progress=not args.quiet, total_frames=total)
    except (AudioInputError, OutputError) as e:
        print(f"error: {e}")
        return 2
    except ValueError as e:  # a memory file of another model (load_memory names the file and the setting)
        print(f"error: {e}")
        return 2
    if audio.truncated:
        _say(f"warning: {args.input} is truncated: its header announces {audio.header_seconds:.1f} s but it holds "
             f"{audio.decoded_seconds:.1f} s; the answer covers the {audio.decoded_seconds:.1f} s present")
    t = res.times
    print(f"{speed_line(res.seconds, res.wall)}; Mimi encode {t.encode:.1f} s, LM step {t.step:.1f} s, "
          f"Mimi decode {t.decode:.1f} s, writing {t.write:.1f} s")
    print(f"wrote {sink.wav_path} and {sink.txt_path}" + (f"; memory saved to {args.memory_out}"
                                                          if args.memory_out else ""))
    return 0


def _memory_meta(path: str | Path) -> dict[str, Any]:
    """The metadata block of a memory file (layers, settings, frames seen)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    try:
        meta = json.loads(raw.get("meta", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a recording through Moshi+TTT with LMGen (wav + text out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="wav (or any format sphn reads); stereo: right = user; resampled to 24 kHz")
    p.add_argument("--out", help="output path prefix (.wav and .txt are added); default INPUT_moshi")
    p.add_argument("--tiny", action="store_true",
                   help="random tiny Moshi and Mimi (runs anywhere on CPU; output is noise and token ids)")
    p.add_argument("--moshi-weights", help="local model.safetensors (kyutai/moshiko-pytorch-bf16)")
    p.add_argument("--moshi-config", help="local config.json of those weights (configs/moshi7b_config.json if "
                   "the download has none)")
    p.add_argument("--mimi-weights", help="local Mimi weights, tokenizer-e351c8d8-checkpoint125.safetensors")
    p.add_argument("--tokenizer", help="local sentencepiece model for the text output, tokenizer_spm_32k_3.model")
    p.add_argument("--ttt-checkpoint", help="adapter folder written by training: run_dir/checkpoints/step_N/adapter")
    p.add_argument("--ttt-layers", default=None,
                   help="TTT layers when no checkpoint is given: middle, all, none or e.g. 8,12 "
                   "(default: middle; all with --tiny)")
    p.add_argument("--memory-in", help="start from this saved memory (.safetensors from --memory-out)")
    p.add_argument("--memory-out", help="save the memory at the end of the file here (after the wav and text)")
    p.add_argument("--channel", choices=["auto", "left", "right", "mix"], default="auto",
                   help="which channel is the user (auto: right of stereo, the only channel of mono)")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature of the audio tokens")
    p.add_argument("--temp-text", type=float, default=0.7, help="sampling temperature of the text tokens")
    p.add_argument("--seed", type=int, default=0, help="random seed (sampling, and the tiny model's weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="weights' precision with real weights (default bf16); --tiny always uses fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the free CPUs; 1 is often fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or periodic progress lines")
    p.set_defaults(func=main)
