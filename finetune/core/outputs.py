"""Stage keys and atomic stage outputs.

A stage's key hashes its name, its code, its config section(s) and the content of its inputs: raw files
by their bytes, upstream outputs by their own keys. Same inputs give the same key on any machine, and a
change anywhere changes the key of that stage and of everything downstream, nothing upstream.

An output is a folder `<root>/<stage>/<key>/` built in a temporary sibling and renamed into place,
with `manifest.json` written last. A folder without its manifest is not an output.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel

from finetune.core.errors import DiskFullError, InternalError, MissingInputError

MANIFEST = "manifest.json"
KEY_LENGTH = 16  # hex digits of sha256 kept in folder names: 64 bits, no collision in practice


DIGEST_CACHE_MIN_BYTES = 16 << 20  # smaller files hash in milliseconds: not worth an entry


def digest_cache_dir() -> Path:
    """Where digests of large files are remembered: $FINETUNE_CACHE_DIR, else ~/.cache/qlora-flow/digests."""
    configured = os.environ.get("FINETUNE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "qlora-flow" / "digests"


DIGEST_CHUNK_BYTES = 64 << 20  # a large file is hashed as chunks of this size, on all cores at once
DIGEST_SCHEME = "sha256-chunks-64m"  # in remembered entries: a change of scheme reads every file again


def _chunk_digest(path: Path, offset: int) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(offset)
        left = DIGEST_CHUNK_BYTES
        while left and (block := handle.read(min(left, 1 << 20))):
            digest.update(block)  # hashlib lets other threads run while it hashes a large block
            left -= len(block)
    return digest.digest()


def _bytes_digest(path: Path, size: int) -> str:
    """sha256 of the bytes of a file up to one chunk; above, sha256 of its chunks' sha256 digests, the
    chunks hashed in parallel (a 13 GB model folder is read at the disk's speed, not one core's)."""
    if size <= DIGEST_CHUNK_BYTES:
        return _chunk_digest(path, 0).hex()
    from concurrent.futures import ThreadPoolExecutor

    offsets = range(0, size, DIGEST_CHUNK_BYTES)
    with ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1, 16)) as pool:
        parts = list(pool.map(lambda offset: _chunk_digest(path, offset), offsets))
    return hashlib.sha256(f"{DIGEST_SCHEME}\0".encode() + b"".join(parts)).hexdigest()


def file_digest(path: Path) -> str:
    """Digest of the file's bytes (_bytes_digest). A large file's digest is remembered under its device,
    inode, size, mtime and ctime: a write changes the ctime (which no user call can set back), so a changed
    file is read again, and an unchanged 13 GB model folder is not read on every run."""
    stat = path.stat()
    entry = None
    if stat.st_size >= DIGEST_CACHE_MIN_BYTES:
        identity = f"{DIGEST_SCHEME}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
        entry = digest_cache_dir() / hashlib.sha256(identity.encode()).hexdigest()
        try:
            return entry.read_text(encoding="ascii").strip()
        except OSError:
            pass
    digest = _bytes_digest(path, stat.st_size)
    if entry is not None:
        try:
            write_text_atomic(entry, digest)
        except OSError:  # a read-only home: hash again next time
            pass
    return digest


def read_manifest(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_complete(output_dir: Path) -> bool:
    return read_manifest(output_dir) is not None


def fingerprint(path: Path) -> str:
    """What a stage key sees of one input: an upstream output's key (or a folder inside one), else the
    bytes under the path."""
    path = Path(path).resolve()  # a link (the champion) counts as what it points to
    manifest = read_manifest(path)
    if manifest is not None:
        return f"output:{manifest['stage']}:{manifest['key']}"
    manifest = read_manifest(path.parent)  # a folder inside an output, such as merge's model/
    if manifest is not None:
        return f"output:{manifest['stage']}:{manifest['key']}/{path.name}"
    if path.is_file():
        return f"file:{file_digest(path)}"
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(child.relative_to(path).as_posix().encode())
            digest.update(file_digest(child).encode())
        return f"dir:{digest.hexdigest()}"
    raise MissingInputError(f"{path}: input not found")


def _key_part(value: Any) -> Any:
    """What a key sees of one field of a stage's inputs: paths by content, config sections by value."""
    if isinstance(value, Path):
        return fingerprint(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude=set(getattr(value, "not_in_key", ())))
    if isinstance(value, (list, tuple)):
        return [_key_part(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InternalError(f"a stage input of type {type(value).__name__} cannot enter a key; use a Path, a config section or a plain value")


def stage_key(stage: str, code: str, inputs: Any, libraries: dict[str, str] | None = None) -> str:
    """Key of a stage from its name, its code digest, its typed inputs object (a dataclass) and the
    versions of the libraries that compute it."""
    seen = {}
    for field in dataclasses.fields(inputs):
        value = getattr(inputs, field.name)
        try:
            seen[field.name] = _key_part(value)
        except FileNotFoundError:
            raise MissingInputError(f"{stage}: {field.name} {value} does not exist") from None
    parts = {"stage": stage, "code": code, "libraries": libraries or {}, "inputs": seen}
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC. Libraries wrap it: torch.save raises a
    RuntimeError ("file write failed") from the OSError, safetensors its own error with the message."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def disk_full(stage: str, folder: Path, written: int) -> DiskFullError:
    """The one-line error of a stage whose output did not fit: the folder, what it held and what is free."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    error = DiskFullError(
        f"{stage}: no space left on the disk of {folder} ({_gb(free)} free): the stage needs more than the "
        f"{_gb(written)} it had written there (its output and checkpoints); free space and run again (finished "
        "stages and sealed checkpoints are kept)"
    )
    error.errno = errno.ENOSPC
    return error


def output_dir_for(root: Path, stage: str, key: str) -> Path:
    return Path(root) / stage / key


def build_output(
    root: Path, stage: str, key: str, build: Callable[[Path], dict[str, Any] | None]
) -> Path:
    """Return `<root>/<stage>/<key>/`, calling `build(tmp_dir)` to fill it unless it is complete already.

    `build` writes into a temporary sibling folder and may return extra manifest fields; on success the
    folder is renamed into place with the manifest written last, on error it is removed and nothing
    changes. A file lock per key makes a second process with the same inputs wait, then reuse the output.
    """
    final_dir = output_dir_for(root, stage, key)
    if is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final_dir.with_name(f".{key}.lock")):
        if is_complete(final_dir):
            return final_dir
        for leftover in final_dir.parent.glob(f".{key}.*.tmp"):  # from a killed build; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final_dir.parent))
        try:
            info = build(tmp_dir) or {}
            files = sorted(p.relative_to(tmp_dir).as_posix() for p in tmp_dir.rglob("*") if p.is_file())
            manifest = {
                "stage": stage,
                "key": key,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
                **info,
            }
            write_text_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=2))
            if final_dir.exists():  # a leftover without its manifest: not an output
                shutil.rmtree(final_dir)
            os.rename(tmp_dir, final_dir)
        except BaseException as error:
            full = is_disk_full(error)
            written = _size(tmp_dir) + _size(final_dir.with_name(f"{key}.checkpoints")) if full else 0
            shutil.rmtree(tmp_dir, ignore_errors=True)  # no half output; and the space it held is free again
            if full:
                raise disk_full(stage, final_dir.parent, written) from error
            raise
    return final_dir


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
