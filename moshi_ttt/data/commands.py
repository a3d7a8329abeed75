"""``moshi-ttt prepare`` and ``moshi-ttt synth``: write encoded datasets (real and synthetic)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import MoshiTTTError
from .report import DataError

PREPARE_HELP = """\
Encode a moshi-finetune style manifest into an encoded dataset for in-order training.

Input: a JSONL manifest, one {"path": "x.wav", "duration": ...} per line (paths relative to the
manifest), stereo wavs (left = Moshi, right = user) and beside each wav its word alignment
x.json = {"alignments": [[word, [start, end], speaker], ...]}.
Output (--out): index.jsonl, dataset.json and codes/<file_id>.safetensors with codes
[1 + n_q, T] in moshi's layout (text row, Moshi codebooks, user codebooks), plus
prepare_report.json. Mimi codes are cached (--cache) and reused while the audio file, the Mimi
weights and settings stay the same.

Bad inputs (unreadable, corrupt or truncated wav, mono, NaN samples, empty or too short audio, missing or
malformed alignment, alignment past the end of the audio, bad manifest lines) are reported with
the file and the problem; the other files go on and a summary ends the run. Other sample rates
are resampled (a note). --strict stops at the first problem instead (exit code 1).
"""

SYNTH_HELP = """\
Write the synthetic long-memory corpus (same on-disk format as `prepare`).

Each file: a file-specific background "voice", one random motif shown near the start and recalled
after gaps at least attention's reach (num_layers*(context-1) + 2 + max_delay frames: how far the
stacked sliding windows carry information), cued by markers in the user stream; recall_mask marks
the recall targets, which no attention-only model of that reach can predict better than chance.
--control writes the variant with fresh motifs at every recall (same statistics, no long-range
dependence). Defaults fit the tiny preset (4 layers, context 32, reach 4*(32-1) + 2 + 1 = 127):
gaps of 135-151 frames, files of 330-469 frames.

--task kv writes the positive-control ladder instead (moshi_ttt.data.ladder): per file
--num-bindings random keys (user codes below --num-keys) with random values. An occurrence puts the
key on the first user stream for 2 + max_delay frames and the value one frame after the key starts
in every Moshi stream, so that key and value enter the model in the same input frame and the key is
visible before the value must be predicted. Every repeat of a key is a read, labelled per frame in
recall_rung (recall_mask = rung > 0), given the model's reach R (from --preset, --num-layers,
--context), --chunk-frames C and --span-chunks N (training span S = N*C frames):
  rung 1  the previous occurrence lies within one attention window (gap <= context - 1 - max_delay):
          attention alone must solve it;
  rung 2  beyond the reach (gap >= R + max_delay: no frame of any earlier occurrence can reach the
          target through attention) with the previous occurrence in the same span, an earlier chunk;
  rung 3  beyond the reach with the previous occurrence in an earlier span (only a memory kept
          across spans helps);
  0       other reads, not measured.
--control draws a fresh value at every occurrence (same layout and labels, nothing to remember).
--background zero (default: zero-entropy filler) or voice. Defaults fit --preset memory (2 layers,
context 8, reach 17), chunks of 32, spans of 4 chunks, files of 3 spans: per file about 17 reads of
rungs 1 and 2 and 16 of rung 3.
"""


@contextlib.contextmanager
def _console_messages(quiet: bool) -> Iterator[None]:
    """Per-file problem messages on stderr, written through tqdm so the progress bar stays intact."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = logging.getLogger("moshi_ttt.data")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old[0])
        log.propagate = old[1]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` and ``synth`` subcommands."""
    from .prepare import default_workers

    p = sub.add_parser("prepare", help="encode a manifest of stereo recordings into an encoded dataset",
                       description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="JSONL manifest of stereo wavs")
    p.add_argument("--out", type=Path, required=True, help="output dataset directory")
    p.add_argument("--tokenizer", type=Path, required=True, help="sentencepiece model of the text stream")
    mimi = p.add_mutually_exclusive_group(required=True)
    mimi.add_argument("--mimi-weights", type=Path, help="local Mimi weights (.safetensors or torch checkpoint)")
    mimi.add_argument("--random-mimi", choices=["full", "tiny"],
                      help="random-weight Mimi instead of real weights: 'full' size (benchmarks) or "
                      "'tiny' (tests and CPU demos; pairs with --preset tiny)")
    p.add_argument("--preset", choices=["auto", "7b", "tiny"], default="auto",
                   help="model layout (codebooks, vocabularies, padding ids); auto: tiny with "
                   "--random-mimi tiny, else 7b (default: %(default)s)")
    p.add_argument("--num-codebooks", type=int, default=None,
                   help="Mimi codebooks per channel (default: the preset's dep_q)")
    p.add_argument("--cache", type=Path, default=None, help="Mimi code cache directory (default: OUT/mimi_cache)")
    p.add_argument("--main-speaker", default="SPEAKER_MAIN",
                   help="alignment speaker label of the Moshi (left) channel (default: %(default)s)")
    p.add_argument("--min-duration", type=float, default=1.0,
                   help="skip recordings shorter than this many seconds (default: %(default)s)")
    p.add_argument("--window-sec", type=float, default=30.0,
                   help="encode long files in windows of this length (default: %(default)s)")
    p.add_argument("--overlap-sec", type=float, default=10.0,
                   help="left context re-encoded before each window (default: %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="files read, checked and resampled in parallel ahead of the encoder (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device for Mimi, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--hash-content", action="store_true",
                   help="key the cache on each wav's SHA-256 instead of its path, size and mtime")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) at the first bad input instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only warnings")
    p.set_defaults(func=run_prepare)

    s = sub.add_parser("synth", help="write the synthetic long-memory corpus (or its control)",
                       description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", type=Path, required=True, help="output dataset directory")
    s.add_argument("--task", choices=["motif", "kv"], default="motif",
                   help="motif: the long-memory corpus; kv: the key -> value positive-control ladder "
                   "(default: %(default)s)")
    s.add_argument("--preset", choices=["tiny", "memory", "7b"], default=None,
                   help="model layout, layers, context and delays to fit (default: tiny for motif, memory for kv)")
    s.add_argument("--num-layers", type=int, default=None, help="attention layers (default: the preset's)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--num-files", type=int, default=64, help="number of files (default: %(default)s)")
    s.add_argument("--frames-min", type=int, default=None,
                   help="shortest file in frames (default: room for two recalls)")
    s.add_argument("--frames-max", type=int, default=None, help="longest file in frames (default: one gap more)")
    s.add_argument("--context", type=int, default=None, help="attention context in frames (default: the preset's)")
    s.add_argument("--motif-len", type=int, default=4, help="frames per motif (default: %(default)s)")
    s.add_argument("--gap-min", type=int, default=None,
                   help="min frames between occurrences, >= the reach (default: reach + 8)")
    s.add_argument("--gap-max", type=int, default=None, help="max frames between occurrences (default: reach + 24)")
    s.add_argument("--voice-size", type=int, default=8,
                   help="codes per stream in a file's voice (default: %(default)s)")
    s.add_argument("--control", action="store_true",
                   help="write the control: fresh motif (kv: fresh value) at every recall")
    kv = s.add_argument_group("kv ladder (--task kv)")
    kv.add_argument("--num-bindings", type=int, default=8, help="keys per file (default: %(default)s)")
    kv.add_argument("--num-keys", type=int, default=16,
                    help="user codes reserved for keys; each file draws its keys there (default: %(default)s)")
    kv.add_argument("--chunk-frames", type=int, default=32, help="training chunk C in frames (default: %(default)s)")
    kv.add_argument("--span-chunks", type=int, default=4,
                    help="chunks per training span N (S = N*C frames) (default: %(default)s)")
    kv.add_argument("--num-spans", type=int, default=3, help="file length in spans (default: %(default)s)")
    kv.add_argument("--num-frames", type=int, default=None, help="file length in frames (overrides --num-spans)")
    kv.add_argument("--background", choices=["zero", "voice"], default="zero",
                    help="filler between occurrences: zero entropy or a file-specific voice (default: %(default)s)")
    kv.add_argument("--rung1-share", type=float, default=None,
                    help="rung 1's quota of reads relative to rungs 2 and 3 (default: the LadderConfig's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)


def run_prepare(args: argparse.Namespace) -> int:
    """Entry point of ``moshi-ttt prepare``; returns the exit code."""
    try:
        from .dataset import CodesLayout
        from .mimi import MimiEncoder, MimiSpec
        from .prepare import PrepareConfig, prepare

        preset = args.preset
        if preset == "auto":
            preset = "tiny" if args.random_mimi == "tiny" else "7b"
        _check_prepare_args(args)
        layout = CodesLayout.preset(preset)
        K = args.num_codebooks if args.num_codebooks is not None else layout.dep_q
        if K != layout.dep_q or 2 * K != layout.n_q:
            raise ValueError(f"--num-codebooks {K} does not fit the {preset} layout (dep_q={layout.dep_q}, "
                             f"n_q={layout.n_q}: both channels give dep_q codebooks)")
        if args.mimi_weights is not None:
            spec = MimiSpec(kind="weights", weights=str(args.mimi_weights), num_codebooks=K,
                            window_sec=args.window_sec, overlap_sec=args.overlap_sec)
        else:
            spec = MimiSpec(kind="random" if args.random_mimi == "full" else "tiny", num_codebooks=K,
                            card=layout.card, window_sec=args.window_sec, overlap_sec=args.overlap_sec)
        tokenizer = _load_tokenizer(args.tokenizer, layout.text_card)
        encoder = MimiEncoder(spec, args.device)
        cfg = PrepareConfig(out=args.out, layout=layout, cache=args.cache, main_speaker=args.main_speaker,
                            min_duration_sec=args.min_duration, workers=args.workers, strict=args.strict,
                            hash_content=args.hash_content, progress=not args.quiet)
        with _console_messages(args.quiet):
            result = prepare(args.manifest, encoder, tokenizer, cfg, tokenizer_path=str(args.tokenizer))
    except MoshiTTTError:
        raise  # printed with its own exit code by the command line
    except DataError as e:
        partial = getattr(e, "prepare_result", None)
        if partial is not None:  # --strict: the summary of what was done before the stop
            print(partial.report.summary(total=partial.total, kept=len(partial.written)), file=sys.stderr)
            print(f"stopped after {len(partial.written)} file(s); {args.out} is marked incomplete "
                  "(no index.jsonl): fix the input and run again", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = len(result.written)
    print(result.report.summary(total=result.total, kept=kept), file=sys.stderr)
    if result.audio_sec > 0:
        print(f"encoded {result.audio_sec:.1f} s of stereo audio in {result.encode_sec:.1f} s "
              f"({result.encode_real_time_factor:.1f}x real time); {result.cache_hits} file(s) from the cache",
              file=sys.stderr)
    print(f"wrote {kept} file(s) to {args.out}", file=sys.stderr)
    return 0 if kept > 0 else 1


def _check_prepare_args(args: argparse.Namespace) -> None:
    """Ranges of the numeric options: 0 or a negative value is an error, never a silent default."""
    from ..errors import ConfigValueError

    checks = [("--num-codebooks", args.num_codebooks, 1, True), ("--min-duration", args.min_duration, 0, True),
              ("--window-sec", args.window_sec, 0, False), ("--overlap-sec", args.overlap_sec, 0, True),
              ("--workers", args.workers, 0, True)]
    for opt, value, low, inclusive in checks:
        if value is None:
            continue
        if value != value or (value < low if inclusive else value <= low):
            raise ConfigValueError(f"{opt} must be {'>=' if inclusive else '>'} {low}, got {value}")


def _load_tokenizer(path: Path, text_card: int):
    import sentencepiece

    from ..errors import ConfigValueError

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError, ValueError) as e:  # sentencepiece's parse errors
        raise ConfigValueError(f"tokenizer {path}: not a sentencepiece model ({' '.join(str(e).split())[:200]})") from e
    if sp.vocab_size() > text_card:
        raise ValueError(f"tokenizer {path} has {sp.vocab_size()} pieces, more than the model's text_card {text_card}")
    return sp


def run_synth(args: argparse.Namespace) -> int:
    """Entry point of ``moshi-ttt synth``; returns the exit code."""
    from ..model import presets

    preset = args.preset or ("memory" if args.task == "kv" else "tiny")
    kw = {"tiny": presets.tiny_lm_kwargs, "memory": presets.memory_lm_kwargs,
          "7b": presets.moshi_7b_lm_kwargs}[preset]()
    if args.num_layers is not None:
        kw["num_layers"] = args.num_layers
    if args.task == "kv":
        return _run_synth_kv(args, kw)
    from .synthetic import SynthConfig, write_corpus

    context = args.context or kw["context"]
    overrides = {"seed": args.seed, "num_files": args.num_files, "context": context, "motif_len": args.motif_len,
                 "gap_min": args.gap_min, "gap_max": args.gap_max, "voice_size": args.voice_size,
                 "control": args.control}
    overrides["frames_min"], overrides["frames_max"] = args.frames_min, args.frames_max
    return _write_synthetic(args, lambda: SynthConfig.from_lm_kwargs(kw, **overrides), write_corpus,
                            lambda cfg: f"synthetic ({_kind(cfg)}) file(s) to {args.out}: reach {cfg.reach} "
                            f"frames, gaps {cfg.gap_min}-{cfg.gap_max}")


def _run_synth_kv(args: argparse.Namespace, kw: dict) -> int:
    """``moshi-ttt synth --task kv``: the positive-control ladder."""
    from .ladder import LadderConfig, write_ladder

    if args.context is not None:
        kw["context"] = args.context
    overrides = {"seed": args.seed, "num_files": args.num_files, "num_bindings": args.num_bindings,
                 "num_keys": args.num_keys, "chunk_frames": args.chunk_frames, "span_chunks": args.span_chunks,
                 "num_spans": args.num_spans, "num_frames": args.num_frames, "background": args.background,
                 "voice_size": args.voice_size, "control": args.control}
    if args.rung1_share is not None:
        overrides["rung1_share"] = args.rung1_share
    from .dataset import EncodedDataset

    def describe(cfg: LadderConfig) -> str:
        counts = EncodedDataset(args.out, verify=False).meta["synthetic"]["rung_counts"]
        return f"kv ladder ({_kind(cfg)}) file(s) to {args.out}: reach {cfg.reach} frames, reads per rung {counts}"

    return _write_synthetic(args, lambda: LadderConfig.from_lm_kwargs(kw, **overrides), write_ladder, describe)


def _kind(cfg: Any) -> str:
    return "control" if cfg.control else "memory"


def _write_synthetic(args: argparse.Namespace, make: Callable[[], Any], write: Callable[..., Any],
                     describe: Callable[[Any], str]) -> int:
    """Build a synthetic corpus config (a rule it breaks: exit code 2), write the corpus, say what."""
    try:
        cfg = make()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(cfg, args.out, progress=not args.quiet)
    print(f"wrote {cfg.num_files} {describe(cfg)}", file=sys.stderr)
    return 0
