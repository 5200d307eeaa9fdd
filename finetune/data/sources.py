"""Where training pairs come from (data.sources): folders, object-storage prefixes and datasets.

Each source is listed before prepare runs, and the listing is what prepare's key sees of it: a folder's
bytes, every object's ETag (or generation) and size, a hub dataset's resolved commit, a local dataset
folder's bytes. An unchanged bucket lists the same, so prepare comes from cache without one object read;
an edited object lists another ETag, and prepare and what follows run again. Prepare then reads the
listed files one at a time; an object that changed since its listing stops the run (the next run lists it
again), so an output never mixes content with a key that does not name it.

A missing bucket, prefix, dataset, config or split and refused credentials are DataErrors naming the
data.sources entry; a store that cannot be reached is StoreUnreachable, which the flow retries.
Credentials come from a Prefect Secret block (credentials_secret) or the machine's environment; they are
never logged, written or part of a key.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from finetune.core.config import ConfigError, DataConfig, DataSource
from finetune.core.outputs import fingerprint
from finetune.core.stage import hub_token
from finetune.data.readers import READABLE, DataError, ReadResult, data_files, format_of, read_chunks, record_chunks

# URL scheme -> the fsspec package that reads it, and this project's extra that installs it.
PROTOCOLS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure")}
# What identifies an object's content in a listing, by the name each filesystem gives it.
CONTENT_FIELDS = ("ETag", "etag", "generation", "VersionId", "version_id")

class StoreUnreachable(OSError):
    """An object store that could not be reached or answered with a server error: the flow retries it."""


Secret = Callable[[str], str]
# (name shown in reports and errors, its rows and rejects chunk by chunk)
DataFile = tuple[str, Callable[[], Iterator[ReadResult]]]


class SourceListing(BaseModel):
    """One source as listed before prepare: what its key sees (`kind`, `content`) and how to read it."""

    model_config = ConfigDict(frozen=True)
    not_in_key: ClassVar[frozenset[str]] = frozenset({"where", "source", "token_secret"})

    where: str  # the config key that names it: data.sources[0]
    source: DataSource
    token_secret: str | None = None  # model.token_secret, for a hub dataset
    kind: Literal["folder", "objects", "dataset"]
    # folder: [fingerprint]; objects: [url, content id, size] each; dataset: [fingerprint or commit, name, split]
    content: list[list[Any]]

    @property
    def shown(self) -> str:
        """The source as the data report names it."""
        if self.kind != "dataset":
            return str(self.source.url)
        name = f"[{self.source.name}]" if self.source.name else ""
        revision = f"@{self.content[0][0][:12]}" if not self.content[0][0].startswith("dir:") else ""
        return f"{self.source.dataset}{name}:{self.source.split}{revision}"


def is_remote(url: str) -> bool:
    return "://" in url


Listed = tuple[tuple[SourceListing, ...], SourceListing | None]


def list_sources(data: DataConfig, secret: Secret, token_secret: str | None = None) -> Listed:
    """(every entry of data.sources, data.heldout_source or None), listed. `secret(name)` reads a Prefect
    Secret block; `token_secret` is model.token_secret, the hub token's block for hub datasets (HF_TOKEN
    without one)."""
    sources = tuple(list_source(f"data.sources[{i}]", source, data, secret, token_secret) for i, source in enumerate(data.sources))
    heldout = data.heldout_source and list_source("data.heldout_source", data.heldout_source, data, secret, token_secret)
    return sources, heldout


def list_source(where: str, source: DataSource, data: DataConfig, secret: Secret, token_secret: str | None = None) -> SourceListing:
    """One source, listed; `where` is the config key that names it (data.sources[0], data.heldout_source)."""
    if source.dataset is not None:
        return _list_dataset(where, source, token_secret, secret)
    if is_remote(source.url):
        return SourceListing(where=where, source=source, kind="objects", content=_list_objects(where, source, data, secret))
    folder = Path(source.url)
    _folder_files(where, folder, data)
    return SourceListing(where=where, source=source, kind="folder", content=[[fingerprint(folder)]])


def _folder_files(where: str, folder: Path, data: DataConfig) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{where}.url={folder}: not a folder; point it at a folder of data files or an s3://, gs://, az:// prefix")
    return data_files(folder, tuple(data.exclude))


def filesystem(where: str, source: DataSource, secret: Secret):
    """The fsspec filesystem of an object-storage source, with its options and credentials; nothing cached
    between calls (a listing must see the bucket as it is now)."""
    import fsspec

    protocol = source.url.split("://", 1)[0]
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}.url={source.url}: unknown scheme {protocol}://; use a folder, s3://, gs:// or az://")
    package, extra = PROTOCOLS[protocol]
    options = dict(source.storage_options)
    if source.credentials_secret:
        options |= _secret_options(where, source.credentials_secret, secret)
    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **options)
    except ImportError:
        raise ConfigError(f"{where}.url={source.url}: reading {protocol}:// needs {package}: pip install -e '.[{extra}]'") from None


def _secret_options(where: str, name: str, secret: Secret) -> dict[str, Any]:
    try:
        options = json.loads(secret(name))
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):  # the value itself is never shown
        raise ConfigError(f"{where}.credentials_secret={name}: the block must hold a JSON object of fsspec options, such as {{\"key\": ..., \"secret\": ...}} for S3")
    return options


def storage_error(where: str, url: str, error: Exception) -> Exception:
    """The error to raise for `error` from an object store: permanent when the same request would fail again."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, FileNotFoundError):
        return DataError(f"{where}.url={url}: not found ({reason}); check the bucket and prefix")
    if isinstance(error, PermissionError):
        return DataError(
            f"{where}.url={url}: access refused ({reason}); check {where}.credentials_secret or the worker's own credentials"
        )
    if isinstance(error, (TypeError, ValueError, KeyError)):  # options the filesystem does not take
        return DataError(f"{where}.storage_options: {type(error).__name__}: {reason}; check them against the filesystem's (fsspec)")
    return StoreUnreachable(f"{where}.url={url}: the store could not be reached ({type(error).__name__}: {reason}); retried")


def _list_objects(where: str, source: DataSource, data: DataConfig, secret: Secret) -> list[list[Any]]:
    fs = filesystem(where, source, secret)
    protocol, root = source.url.split("://", 1)
    try:
        found = fs.find(root.rstrip("/"), detail=True)
    except Exception as error:  # botocore, gcsfs and adlfs raise their own types; fsspec maps the common ones
        raise storage_error(where, source.url, error) from None
    objects = []
    for path, info in sorted(found.items()):
        name = path.rsplit("/", 1)[-1]
        if info.get("type") == "directory" or any(fnmatch.fnmatch(name, pattern) for pattern in data.exclude):
            continue
        content = next((str(info[f]).strip('"') for f in CONTENT_FIELDS if info.get(f)), None)
        objects.append([f"{protocol}://{path}", content or str(info.get("LastModified", "")), int(info.get("size") or 0)])
    unreadable = [url for url, _, _ in objects if format_of(url) is None]
    if unreadable:
        raise DataError(
            f"{where}.url={source.url}: no reader for {', '.join(unreadable[:3])}; readable: {READABLE}. Leave such "
            f"objects out with data.exclude (name globs)"
        )
    if not objects:
        raise DataError(f"{where}.url={source.url}: no data files ({READABLE}) under it; check the prefix")
    return objects


def _list_dataset(where: str, source: DataSource, token_secret: str | None, secret: Secret) -> SourceListing:
    folder = Path(source.dataset)
    if folder.is_dir():
        identity = fingerprint(folder)
    elif folder.is_absolute() or source.dataset.startswith(".") or source.dataset.count("/") != 1:
        raise DataError(f"{where}.dataset={source.dataset}: neither a dataset folder here nor a hub id (owner/name)")
    else:
        identity = _hub_commit(where, source, hub_token(token_secret, secret))
    content = [[identity, source.name, source.split]]
    return SourceListing(where=where, source=source, token_secret=token_secret, kind="dataset", content=content)


def _hub_commit(where: str, source: DataSource, token: str | None) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(token=token).dataset_info(source.dataset, revision=source.revision).sha
    except RepositoryNotFoundError:
        raise DataError(
            f"{where}.dataset={source.dataset}: no such dataset on the hub, or a gated one the token cannot read "
            "(model.token_secret or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise DataError(f"{where}.revision={source.revision}: no such branch, tag or commit of {source.dataset}") from None
    except OfflineModeIsEnabled:
        raise DataError(
            f"{where}.dataset={source.dataset}: the hub is off on this machine (HF_HUB_OFFLINE=1); unset it, or clone the "
            "dataset repository and give its folder"
        ) from None


def source_files(listing: SourceListing, data: DataConfig, markers: tuple[str, str], secret: Secret) -> list[DataFile]:
    """The data files of one listed source, each read only when its chunks are asked for."""
    if listing.kind == "folder":
        files = _folder_files(listing.where, Path(listing.source.url), data)
        return [(str(path), lambda path=path: read_chunks(path, markers, empty_ok=True)) for path in files]
    if listing.kind == "objects":
        fs = filesystem(listing.where, listing.source, secret)
        return [(entry[0], lambda entry=entry: _object_chunks(listing, fs, entry, markers)) for entry in listing.content]
    token = hub_token(listing.token_secret, secret) if not listing.content[0][0].startswith("dir:") else None
    return [(listing.shown, lambda: record_chunks(listing.shown, _dataset_rows(listing, token)))]


def _object_chunks(listing: SourceListing, fs, entry: list[Any], markers: tuple[str, str]) -> Iterator[ReadResult]:
    url, content, size = entry
    path = url.split("://", 1)[1]
    try:
        data = fs.cat_file(path)
        now = fs.info(path)
    except Exception as error:
        raise storage_error(listing.where, url, error) from None
    now_content = next((str(now[f]).strip('"') for f in CONTENT_FIELDS if now.get(f)), None)
    if len(data) != size or (now_content is not None and now_content != content):
        raise DataError(f"{url}: changed while this run read it (listed {content}, now {now_content}); run again: the new content gets its own key")
    yield from read_chunks(url, markers, empty_ok=True, data=data)


def _dataset_rows(listing: SourceListing, token: str | None) -> Iterator[dict[str, Any]]:
    """The rows of a dataset source, streamed (nothing written to the datasets cache)."""
    import datasets

    source, identity = listing.source, listing.content[0][0]
    revision = None if identity.startswith("dir:") else identity
    try:
        rows = datasets.load_dataset(source.dataset, source.name, split=source.split, revision=revision, token=token, streaming=True)
    except ValueError as error:  # an unknown split or config (the message lists those there are), a damaged file
        raise DataError(f"{listing.where}: {source.dataset}: {str(error).splitlines()[0]} (check {listing.where}.name and .split)") from None
    except FileNotFoundError as error:
        raise DataError(f"{listing.where}.dataset={source.dataset}: {error}") from None
    yield from rows
