"""Long-recording data: manifests, Mimi codes cache, text, in-order chunk streams, synthetic corpora (README.md here)."""

from .dataset import CodesLayout, EncodedDataset, EncodedDatasetWriter, EncodedFile, FileEntry
from .ladder import RUNG_NAMES, LadderConfig, LadderFile, generate_ladder_file, read_rung, write_ladder
from .manifest import ManifestEntry, Word, read_alignment, read_manifest
from .mimi import MimiEncoder, MimiSpec, benchmark_encode, build_mimi, tiny_mimi
from .prepare import CodeCache, PrepareConfig, PrepareResult, load_stereo, prepare
from .report import DataError, Issue, Report
from .stream import ChunkBatch, ChunkStream
from .synthetic import SynthConfig, SynthFile, generate_file, write_corpus
from .text import TextConfig, interleave, place_tokens, text_stream

__all__ = [
    "CodesLayout", "EncodedDataset", "EncodedDatasetWriter", "EncodedFile", "FileEntry",
    "RUNG_NAMES", "LadderConfig", "LadderFile", "generate_ladder_file", "read_rung", "write_ladder",
    "ManifestEntry", "Word", "read_alignment", "read_manifest",
    "MimiEncoder", "MimiSpec", "benchmark_encode", "build_mimi", "tiny_mimi",
    "CodeCache", "PrepareConfig", "PrepareResult", "load_stereo", "prepare",
    "DataError", "Issue", "Report",
    "ChunkBatch", "ChunkStream",
    "SynthConfig", "SynthFile", "generate_file", "write_corpus",
    "TextConfig", "interleave", "place_tokens", "text_stream",
]
