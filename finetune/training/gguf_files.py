"""GGUF files read through transformers' loader with one parse per file: the embedded model's conversion
(stage resolve_model) and the export check's read-back (stage export)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def one_gguf_parse():
    """While open, transformers parses each GGUF file once, however many times it reads it.

    For the architectures its GGUF loader has no fast reader for (llama among them, transformers 5.24),
    `from_pretrained(gguf_file=...)` calls its legacy `load_gguf_checkpoint` twice, for the config and for the
    weights, and a tokenizer from the file once or twice more; each call builds a `gguf.GGUFReader`, which
    parses every metadata field first: 4-6 s per read of SmolLM2's 49,152-token vocabulary on a 2-core CPU.
    That function imports GGUFReader from the gguf package at each call, so here the package's name gives
    the reader already built for a path. tests/test_export.py and tests/test_resolve.py count the readers
    built and fail if transformers stops using this one."""
    import gguf

    build = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = build(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = build
        readers.clear()
