"""``moshi-ttt prepare``: a manifest of stereo recordings -> an encoded dataset.

Per manifest entry: read the alignment JSON (cheap, first, so a bad one costs no encoding), then
the Mimi codes of both channels from the cache or by encoding the wav, then the text stream of the
Moshi channel's words, and write ``codes`` [1 + n_q, T] to the output dataset
(:mod:`moshi_ttt.data.dataset`). Every problem is reported with the file it concerns (see
:mod:`moshi_ttt.data.report`); the other files go on. Reading, checking and resampling audio run in
a thread pool, ``workers`` files ahead of the encoder, which runs in the calling thread (Mimi
already uses every core through torch; on a GPU, I/O is what it waits for).

Code cache: ``<cache>/<key[:2]>/<key>.safetensors`` holding ``audio_codes`` [2 * K, T] (int16)
and the audio's sample count and source rate. The key hashes the audio file's identity (resolved
path, size, mtime; or its SHA-256 with ``hash_content``) and :meth:`MimiEncoder.cache_key` (Mimi
config, weights file identity, number of codebooks, windowing), so changing any of them re-encodes.
Entries are written through a temporary file and ``os.replace``, and carry a SHA-256 of their codes:
an entry that is unreadable, fails its checksum, or holds codes of the wrong shape or outside
``[0, card)`` is reported (naming the cache entry) and re-encoded. A cache folder that cannot be
written is reported once and the run goes on without caching.

Audio levels: a silent channel, samples beyond [-1, 1] and hard clipping are warnings (the file is
kept); they are stored in the cache entry so a cache hit reports them again.

If ``prepare`` stops (``--strict`` at the first problem, or any error), the output is marked
incomplete: ``dataset.json`` says ``"complete": false`` and no ``index.jsonl`` is written, so the
partial dataset cannot be mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..fileio import atomic_write_text
from .dataset import CodesLayout, EncodedDatasetWriter, atomic_save_file
from .manifest import ManifestEntry, Word, file_id_for, read_alignment, read_manifest
from .mimi import MimiEncoder
from .report import DataError, Report
from .text import TextConfig, Tokenizer, interleave, text_stream

CACHE_VERSION = 2  # 2: entries carry a checksum and the audio level warnings

# Audio level checks (float samples in [-1, 1]): a channel quieter than this RMS is silent.
SILENCE_RMS = 1e-4
# More than this fraction of samples at full scale means the recording was clipped.
CLIP_FRACTION = 1e-3


@dataclass
class PrepareConfig:
    """Settings of ``prepare`` other than the Mimi (:class:`~moshi_ttt.data.mimi.MimiSpec`).

    Attributes:
        out: output dataset directory.
        layout: the model's code layout (``CodesLayout.preset("7b")`` for Moshi 7B).
        cache: Mimi code cache directory (default ``<out>/mimi_cache``).
        main_speaker: alignment speaker label of the Moshi (left) channel.
        min_duration_sec: shorter files are skipped.
        workers: files read/checked/resampled ahead of the encoder, in threads.
        strict: stop at the first problem (DataError) instead of skipping.
        hash_content: key the cache on the audio's SHA-256 rather than path + size + mtime.
        progress: show a tqdm progress bar.
    """

    out: Path
    layout: CodesLayout
    cache: Path | None = None
    main_speaker: str = "SPEAKER_MAIN"
    min_duration_sec: float = 1.0
    workers: int = 2
    strict: bool = False
    hash_content: bool = False
    progress: bool = True
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.cache = Path(self.cache) if self.cache is not None else self.out / "mimi_cache"
        self.text = TextConfig(**{**asdict(self.text), "main_speaker": self.main_speaker,
                                  "text_padding_id": self.layout.text_padding_id,
                                  "end_of_text_padding_id": self.layout.end_of_text_padding_id,
                                  "frame_rate": self.layout.frame_rate})


@dataclass
class PrepareResult:
    """What ``prepare`` did: files written, problems, throughput."""

    total: int
    written: list[str]
    report: Report
    audio_sec: float = 0.0
    encode_sec: float = 0.0
    cache_hits: int = 0

    @property
    def encode_real_time_factor(self) -> float:
        """Seconds of (stereo) audio encoded per second of encoding, cache hits excluded."""
        return self.audio_sec / self.encode_sec if self.encode_sec > 0 else float("nan")


def load_stereo(path: Path, sample_rate: int, min_duration_sec: float, source: str, report: Report
                ) -> tuple[np.ndarray, int] | None:
    """Read a stereo wav as float32 ``[2, N]`` at ``sample_rate``; None (reported) if unusable.

    Returns ``(wav, source_sample_rate)``. Skips, with a message: unreadable/corrupt/truncated files, mono or
    more than 2 channels, empty or shorter than ``min_duration_sec``, NaN or infinite samples.
    Other rates are resampled (``scipy.signal.resample_poly``: exact output length, so the frame
    grid and the alignment stay in step; sphn's resampler pads to its block size and panics on NaN).
    """
    import sphn

    try:
        wav, sr = sphn.read(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # sphn raises ValueError, or a pyo3 PanicException (a BaseException)
        problem = "file not found" if not path.exists() else f"unreadable or corrupt audio ({str(e).strip()[:200]})"
        report.add(source, problem, kind="unreadable audio")
        return None
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 2:
        report.add(source, f"unexpected audio array shape {wav.shape}", kind="unreadable audio")
        return None
    channels, n = wav.shape
    if channels != 2:
        what = "mono audio (1 channel)" if channels == 1 else f"{channels} channels"
        report.add(source, f"{what}; a stereo file is needed (left = Moshi, right = user)", kind="not stereo")
        return None
    if n == 0:
        report.add(source, "empty audio (0 samples)", kind="empty or too short")
        return None
    # A truncated file decodes without error: compare with the length its header declares.
    declared = (sphn.durations([str(path)]) or [None])[0]
    if declared is not None and declared - n / sr > 0.08:
        report.add(source, f"truncated or corrupt audio: the header says {declared:.2f} s but only {n / sr:.2f} s "
                   "can be decoded", kind="unreadable audio")
        return None
    bad = ~np.isfinite(wav)
    if bad.any():
        ch, first = np.argwhere(bad)[0]
        report.add(source, f"{int(bad.sum())} NaN or infinite sample(s) (first in channel {ch} at "
                   f"{first / sr:.3f} s)", kind="NaN samples")
        return None
    if n / sr < min_duration_sec:
        report.add(source, f"too short: {n / sr:.3f} s < {min_duration_sec} s", kind="empty or too short")
        return None
    if sr != sample_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(sample_rate, int(sr))
        wav = resample_poly(wav, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)
        report.add(source, f"resampled from {sr} Hz to {sample_rate} Hz", action="note", kind="resampled")
    return wav, int(sr)


def audio_identity(path: Path, hash_content: bool) -> dict[str, Any]:
    """What identifies the audio's content for the cache key."""
    st = path.stat()
    if hash_content:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"sha256": h.hexdigest(), "size": st.st_size}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def audio_level_problems(wav: np.ndarray) -> list[str]:
    """Warnings about the levels of ``wav`` [2, N] float: silent channels, over-range, clipping."""
    out = []
    for c, name in enumerate(("left (Moshi)", "right (user)")):
        x = wav[c]
        peak = float(np.abs(x).max()) if x.size else 0.0
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
        if rms < SILENCE_RMS:
            out.append(f"{name} channel is silent (RMS {rms:.1e})")
        if peak > 1.0:
            n = int((np.abs(x) > 1.0).sum())
            out.append(f"{name} channel is over range: peak {peak:.2f} ({n} sample(s) beyond [-1, 1]); "
                       "Mimi expects [-1, 1]")
        elif x.size and float((np.abs(x) >= 0.999).mean()) > CLIP_FRACTION:
            out.append(f"{name} channel is clipped ({100 * float((np.abs(x) >= 0.999).mean()):.2f}% of "
                       "samples at full scale)")
    return out


def codes_digest(codes: torch.Tensor) -> str:
    """SHA-256 of a cache entry's codes (int16 bytes, shape included)."""
    t = codes.to(torch.int16).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()


class CodeCache:
    """Mimi codes per audio file on disk, keyed on the audio's identity and the encoder's.

    ``rows``, ``card`` and ``frame_size`` (when given) are what a valid entry must fit: ``rows``
    codebooks of ``ceil(num_samples / frame_size)`` frames, every code in ``[0, card)``.
    """

    def __init__(self, root: Path, encoder_key: str, hash_content: bool = False, rows: int | None = None,
                 card: int | None = None, frame_size: int | None = None):
        self.root = Path(root)
        self.encoder_key = encoder_key
        self.hash_content = hash_content
        self.rows, self.card, self.frame_size = rows, card, frame_size
        self.writable = True  # set False after the first refused write: go on without caching

    def key(self, audio: Path) -> str:
        material = {"v": CACHE_VERSION, "audio": audio_identity(audio, self.hash_content), "encoder": self.encoder_key}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, source: str, report: Report) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """``(audio_codes [2K, T] int64, info)`` or None on a miss (a corrupt entry is a miss, noted)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            raw = load_file(str(p))["audio_codes"]
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            info = json.loads(meta["info"])
            problem = self._check(raw, info, meta.get("sha256"))
        except Exception as e:  # safetensors, JSON and key errors alike: the entry is unusable
            problem = f"unreadable ({type(e).__name__})"
        if problem is not None:
            report.add(source, f"cache entry {p} {problem}; re-encoding", action="note",
                       kind="cache entry re-encoded")
            return None
        return raw.long(), info

    def _check(self, raw: torch.Tensor, info: dict[str, Any], digest: str | None) -> str | None:
        if digest is None or codes_digest(raw) != digest:
            return "fails its checksum (corrupted)"
        if raw.dim() != 2 or (self.rows is not None and raw.shape[0] != self.rows):
            return f"has codes of shape {tuple(raw.shape)}, expected [{self.rows}, T]"
        n = info.get("num_samples")
        if self.frame_size and isinstance(n, int) and raw.shape[1] != -(-n // self.frame_size):
            return f"has {raw.shape[1]} frames for {n} samples"
        if raw.numel() and (int(raw.min()) < 0 or (self.card is not None and int(raw.max()) >= self.card)):
            return f"holds codes outside [0, {self.card}) ([{int(raw.min())}, {int(raw.max())}])"
        return None

    def put(self, key: str, codes: torch.Tensor, info: dict[str, Any], report: Report | None = None) -> None:
        """Store an entry; a refused write (read-only, disk full) is reported once, then caching stops."""
        if not self.writable:
            return
        # int16 holds every Mimi code (card <= 2048).
        try:
            atomic_save_file({"audio_codes": codes.to(torch.int16)}, self.path(key),
                             {"info": json.dumps(info), "encoder": self.encoder_key,
                              "sha256": codes_digest(codes)})
        except OSError as e:
            self.writable = False
            if report is None:
                raise
            report.add(str(self.root), f"cache folder not writable ({e.strerror or e}); going on without "
                       "caching", action="note", kind="cache not writable")


@dataclass
class _Loaded:
    """A manifest entry after the thread-pool stage: alignment parsed, audio read or cache hit."""

    entry: ManifestEntry
    source: str
    words: list[Word] | None = None
    key: str | None = None
    level_warnings: list[str] = field(default_factory=list)
    wav: np.ndarray | None = None
    source_sample_rate: int | None = None
    cached: tuple[torch.Tensor, dict[str, Any]] | None = None


def _load(entry: ManifestEntry, encoder: MimiEncoder, cache: CodeCache, cfg: PrepareConfig,
          report: Report) -> _Loaded | None:
    source = str(entry.path)
    item = _Loaded(entry, source)
    try:
        item.words = read_alignment(entry.alignment_path)
    except DataError as e:
        report.add(e.source, f"{e.problem}; skipping {entry.path.name}", kind="bad alignment")
        return None
    if not entry.path.is_file():
        report.add(source, "audio file not found", kind="unreadable audio")
        return None
    item.key = cache.key(entry.path)
    item.cached = cache.get(item.key, source, report)
    if item.cached is not None:
        sr = item.cached[1].get("source_sample_rate")
        if sr is not None and sr != encoder.sample_rate:
            report.add(source, f"resampled from {sr} Hz to {encoder.sample_rate} Hz (cached)",
                       action="note", kind="resampled")
        item.level_warnings = list(item.cached[1].get("level_warnings", []))
    else:
        loaded = load_stereo(entry.path, encoder.sample_rate, cfg.min_duration_sec, source, report)
        if loaded is None:
            return None
        item.wav, item.source_sample_rate = loaded
        item.level_warnings = audio_level_problems(item.wav)
    for problem in item.level_warnings:
        report.add(source, problem + "; kept", action="warning", kind="audio level")
    return item


def _prefetch(fn: Callable[[ManifestEntry], _Loaded | None], entries: list[ManifestEntry], workers: int
              ) -> Iterator[tuple[ManifestEntry, _Loaded | None]]:
    """``fn`` over ``entries`` in a thread pool, in order, at most ``workers`` + 1 ahead."""
    if workers <= 0:
        for e in entries:
            yield e, fn(e)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-load") as pool:
        pending: deque[tuple[ManifestEntry, Future]] = deque()
        it = iter(entries)
        for e in it:
            pending.append((e, pool.submit(fn, e)))
            if len(pending) > workers:
                break
        while pending:
            e, fut = pending.popleft()
            try:
                result = fut.result()
            except BaseException:
                for _, f in pending:
                    f.cancel()
                raise
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield e, result


def prepare(manifest: str | Path, encoder: MimiEncoder, tokenizer: Tokenizer, cfg: PrepareConfig,
            tokenizer_path: str | None = None) -> PrepareResult:
    """Encode every usable entry of ``manifest`` into the dataset at ``cfg.out``.

    Raises :class:`DataError` in strict mode at the first problem, ``ValueError`` when the Mimi or
    the tokenizer does not match ``cfg.layout``.
    """
    layout = cfg.layout
    if encoder.num_codebooks != layout.dep_q or 2 * encoder.num_codebooks != layout.n_q:
        raise ValueError(f"Mimi gives {encoder.num_codebooks} codebooks per channel; the layout needs "
                         f"dep_q={layout.dep_q} and n_q={layout.n_q} (= 2 x dep_q for stereo)")
    if encoder.cardinality != layout.card:
        raise ValueError(f"Mimi codebooks have {encoder.cardinality} entries; the layout's card is {layout.card}")
    if abs(encoder.frame_rate - layout.frame_rate) > 1e-9:
        raise ValueError(f"Mimi frame rate {encoder.frame_rate} != layout frame rate {layout.frame_rate}")
    report = Report(strict=cfg.strict)
    entries = read_manifest(manifest, report)
    total = len(entries) + len(report.by_action("skipped"))
    cache = CodeCache(cfg.cache, encoder.cache_key(), cfg.hash_content,  # type: ignore[arg-type]
                      rows=2 * encoder.num_codebooks, card=encoder.cardinality, frame_size=encoder.frame_size)
    produced_by = {"tool": "moshi-ttt prepare", "manifest": str(Path(manifest).resolve()),
                   "mimi": encoder.spec.identity(), "tokenizer": tokenizer_path,
                   "main_speaker": cfg.main_speaker}
    result = PrepareResult(total=total, written=[], report=report)
    bar = tqdm(total=len(entries), unit="file", desc="prepare", disable=not cfg.progress, dynamic_ncols=True)
    try:
        _encode_all(entries, encoder, tokenizer, cfg, cache, report, result, produced_by, bar)
    except BaseException as e:
        bar.close()
        try:
            _write_report(cfg, result, complete=False, reason=str(e) or type(e).__name__)
        except OSError:  # the output folder itself may be what failed; the error says so
            pass
        e.prepare_result = result  # type: ignore[attr-defined]  # the CLI prints its summary
        raise
    bar.close()
    _write_report(cfg, result, complete=True)
    return result


def _write_report(cfg: PrepareConfig, result: PrepareResult, complete: bool, reason: str | None = None) -> None:
    atomic_write_text(cfg.out / "prepare_report.json", json.dumps(
        {"complete": complete, "stopped_by": reason, "total": result.total, "written": len(result.written),
         "issues": result.report.to_json(), "audio_sec_encoded": result.audio_sec,
         "encode_sec": result.encode_sec, "cache_hits": result.cache_hits}, indent=2) + "\n")


def _encode_all(entries: list[ManifestEntry], encoder: MimiEncoder, tokenizer: Tokenizer, cfg: PrepareConfig,
                cache: CodeCache, report: Report, result: PrepareResult, produced_by: dict[str, Any],
                bar: tqdm) -> None:
    """The encoding loop of :func:`prepare` (the writer marks the output incomplete on an error)."""
    layout = cfg.layout
    used_ids: set[str] = set()
    with EncodedDatasetWriter(cfg.out, layout, produced_by) as writer:
        loader = lambda e: _load(e, encoder, cache, cfg, report)  # noqa: E731
        for entry, item in _prefetch(loader, entries, cfg.workers):
            if item is None:
                bar.update(1)
                continue
            if item.cached is not None:
                audio_codes, info = item.cached
                result.cache_hits += 1
            else:
                assert item.wav is not None
                t0 = time.perf_counter()
                audio_codes = encoder.encode(item.wav)
                result.encode_sec += time.perf_counter() - t0
                n = item.wav.shape[-1]
                result.audio_sec += n / encoder.sample_rate
                info = {"num_samples": n, "sample_rate": encoder.sample_rate,
                        "source_sample_rate": item.source_sample_rate, "level_warnings": item.level_warnings}
                cache.put(item.key, audio_codes, info, report)  # type: ignore[arg-type]
                item.wav = None  # free the audio before the next file
            T = int(audio_codes.shape[-1])
            duration = info["num_samples"] / info["sample_rate"]
            if entry.duration is not None and abs(entry.duration - duration) > 0.5:
                report.add(item.source, f"manifest duration {entry.duration:.2f} s differs from the audio's "
                           f"{duration:.2f} s; using the audio", action="note", kind="duration mismatch")
            text = text_stream(item.words or [], tokenizer, T, duration, cfg.text, item.source, report,
                               text_card=layout.text_card)
            K = layout.dep_q
            codes = interleave(text, audio_codes[:K], audio_codes[K:])
            fid = file_id_for(entry.rel)
            base, n_dup = fid, 1
            while fid in used_ids:
                n_dup += 1
                fid = f"{base}-{n_dup}"
            used_ids.add(fid)
            source = {"audio": entry.rel, "alignment": str(Path(entry.rel).with_suffix(".json")),
                      "manifest_line": entry.line, "duration": duration,
                      "source_sample_rate": info.get("source_sample_rate"), "cache_key": item.key}
            writer.add(fid, codes, source=source)
            result.written.append(fid)
            if result.encode_sec > 0:
                bar.set_postfix(rtf=f"{result.encode_real_time_factor:.1f}x", refresh=False)
            bar.update(1)


def default_workers() -> int:
    import os

    return max(1, min(4, (os.cpu_count() or 2)))


__all__ = ["PrepareConfig", "PrepareResult", "CodeCache", "load_stereo", "prepare", "default_workers",
           "audio_identity"]
