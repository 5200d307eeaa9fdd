"""Seconds to compute the resolve stage's key of a local model folder: the first time (every file
hashed) and again (digests of unchanged large files remembered), as a rerun pays it.

    python benchmarks/rerun_key.py /path/to/model-folder [--cache DIR]

Prints one JSON line: folder size, first and second key times, and whether the keys match.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="digest cache folder (default: a new empty one)")
    args = parser.parse_args()
    os.environ["FINETUNE_CACHE_DIR"] = str(args.cache or tempfile.mkdtemp(prefix="digests-"))

    from finetune.core.config import ModelConfig
    from finetune.stages.resolve import ResolveInputs, resolve_model

    inputs = ResolveInputs.of(ModelConfig(base=str(args.model_dir)))
    times, keys = [], []
    for _ in range(2):
        started = time.monotonic()
        keys.append(resolve_model.key(inputs))
        times.append(round(time.monotonic() - started, 3))
    size = sum(p.stat().st_size for p in args.model_dir.rglob("*") if p.is_file())
    print(json.dumps({"folder_bytes": size, "first_key_seconds": times[0], "second_key_seconds": times[1], "same_key": keys[0] == keys[1]}))


if __name__ == "__main__":
    main()
