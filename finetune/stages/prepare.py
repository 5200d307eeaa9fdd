"""Stage `prepare`: raw instruction/response files -> validated train/eval parquet + data report.

The files come from paths.raw_dir, or from data.sources listed before the stage (folders, object storage,
datasets: finetune/data/sources.py), whose listings are in the key.

Rows are checked by a pandera schema, lazily, so every failing row is reported with its file, line and
reason instead of the first one only. Rejected rows are written beside the splits; the raw files are
only read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import pandas as pd

from finetune.core.config import DataConfig, FinetuneConfig
from finetune.core.stage import Hooks, Stage
from finetune.data.checks import (
    context_keys,
    drop_duplicates_and_leaks,
    duplicate_pairs,
    near_duplicates,
    place,
    resolve_conflicts,
)
from finetune.data.readers import SEED_MARKERS, DataError, ReadResult, data_files, read_chunks
from finetune.data.schemas import check_prepared, validate_rows
from finetune.data.sources import DataFile, SourceListing, source_files
from finetune.data.template import PromptFormat
from finetune.reporting.data_report import data_report, report_markdown

__all__ = ["DataError", "PrepareInputs", "prepare_dataset"]


@dataclass(frozen=True, kw_only=True)
class PrepareInputs:
    raw_dir: Path | None  # every data file in it is read; the folder's content is in the key. None: sources only
    heldout_path: Path | None  # None: heldout, from a source
    data: DataConfig
    template: str  # tokenize.template: rows that contain its markers are rejected
    sources: tuple[SourceListing, ...] = ()  # data.sources as listed (sources.list_sources): their content is in the key
    heldout: SourceListing | None = None  # data.heldout_source as listed, read instead of heldout_path

    @classmethod
    def of(cls, config: FinetuneConfig, sources: tuple[SourceListing, ...] = (), heldout: SourceListing | None = None) -> PrepareInputs:
        """The inputs of a run of `config`, with its data.sources and data.heldout_source as listed."""
        return cls(
            raw_dir=None if sources else config.paths.raw_dir, heldout_path=None if heldout else config.paths.heldout_path,
            data=config.data, template=config.tokenize.template, sources=sources, heldout=heldout,
        )  # fmt: skip


COLUMNS = ["instruction", "response", "history", "topic", "source_file", "source_line"]


def load_rows(files: list[Path], cfg: DataConfig, prompt: PromptFormat, empty_ok: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """The valid rows of `files`, trimmed, and the rejects (rows_of). `empty_ok`: an empty file has no rows
    rather than being an error (training files; the data report lists it with 0 rows)."""
    markers = prompt.line_markers or SEED_MARKERS
    return rows_of(chain.from_iterable(read_chunks(path, markers, empty_ok) for path in files), cfg, prompt)


def rows_of(chunks: Iterable[ReadResult], cfg: DataConfig, prompt: PromptFormat) -> tuple[pd.DataFrame, list[dict]]:
    """The valid rows of `chunks`, trimmed, and the rejects; validated and made columns chunk by chunk
    (readers.CHUNK_ROWS), so that only one chunk is ever held as Python dicts."""
    frames, rejected = [], []
    for chunk in chunks:
        frame = pd.DataFrame(chunk.rows, columns=COLUMNS).astype({"source_line": "int64"})
        chunk.rows.clear()
        frame, invalid = validate_rows(frame, cfg, prompt)
        frames.append(
            frame.assign(
                instruction=frame.instruction.str.strip(),
                response=frame.response.str.strip(),
                history=frame.history.map(lambda turns: [turn.strip() for turn in turns]),
            )
        )
        rejected += chunk.rejects + invalid
    frames = [frame for frame in frames if len(frame)] or frames[:1] or [pd.DataFrame(columns=COLUMNS)]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return frame.astype({"source_line": "int64"}).reset_index(drop=True), rejected


def _chunks(files: list[DataFile]) -> Iterable[ReadResult]:
    """The chunks of `files`, one file after another, each read when its turn comes."""
    return chain.from_iterable(chunks() for _, chunks in files)


def _named(inputs: PrepareInputs) -> str:
    return ", ".join(f"{listing.where} ({listing.shown})" for listing in inputs.sources) or str(inputs.raw_dir)


def _check_enough(inputs: PrepareInputs, train: pd.DataFrame, rejected: list[dict], duplicates: int) -> None:
    cfg = inputs.data
    total = len(train) + len(rejected) + duplicates
    listed = ", ".join(f"{r['source_file']}:{r['source_line']} ({r['reason']})" for r in rejected[:3])
    if not total:
        raise DataError(f"{_named(inputs)}: no rows in any data file (each is empty); add pairs, or check the job that writes them")
    if len(rejected) / total > cfg.max_reject_share:
        raise DataError(
            f"{len(rejected)} of {total} rows rejected, over data.max_reject_share={cfg.max_reject_share}: "
            f"{listed}. Fix those rows or raise the limit."
        )
    if len(train) < cfg.min_rows:
        raise DataError(
            f"{_named(inputs)}: {len(train)} usable training rows, fewer than data.min_rows={cfg.min_rows}"
            + (f"; rejected: {listed}" if rejected else "")
        )


def _load_heldout(inputs: PrepareInputs, prompt: PromptFormat, hooks: Hooks) -> tuple[pd.DataFrame, int]:
    if inputs.heldout is not None:
        files = source_files(inputs.heldout, inputs.data, prompt.line_markers or SEED_MARKERS, hooks.secret)
        evaluation, eval_rejected = rows_of(_chunks(files), inputs.data, prompt)
        heldout_path = f"{inputs.heldout.where} ({inputs.heldout.shown})"
    elif not (heldout_path := Path(inputs.heldout_path)).is_file():
        raise DataError(f"{heldout_path}: held-out file not found; paths.heldout_path must name a JSONL file")
    else:
        evaluation, eval_rejected = load_rows([heldout_path], inputs.data, prompt)
    if eval_rejected:
        first = eval_rejected[0]
        raise DataError(f"{first['source_file']}:{first['source_line']}: {first['reason']} (held-out rows must all be valid)")
    if evaluation.empty:
        raise DataError(f"{heldout_path}: no held-out rows; evaluation needs at least one pair")
    if (turns := evaluation.history.map(len)).any():
        i = int(turns.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{place(evaluation, i)}: a held-out row is one exchange (evaluation asks one instruction), this one has "
            f"{turns[i] // 2} earlier exchange(s); keep conversations in the training data"
        )
    duplicated = duplicate_pairs(evaluation)
    evaluation = evaluation[~duplicated].reset_index(drop=True)  # collapsed and counted, like training duplicates
    check_prepared(evaluation)
    return evaluation, int(duplicated.sum())


def _data_files(inputs: PrepareInputs, markers: tuple[str, str], hooks: Hooks) -> list[DataFile]:
    """paths.raw_dir's files, or those of every listed source in order."""
    if not inputs.sources:
        files = data_files(inputs.raw_dir, tuple(inputs.data.exclude))
        return [(str(path), lambda path=path: read_chunks(path, markers, empty_ok=True)) for path in files]
    found = []
    for listing in inputs.sources:
        hooks.logger.info("reading %s (%s)", listing.shown, listing.where)
        found += source_files(listing, inputs.data, markers, hooks.secret)
    return found


def _prepare(inputs: PrepareInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Validate the raw pairs and the held-out pairs; write train.parquet, eval.parquet, the report."""
    prompt = PromptFormat(inputs.template)
    files = _data_files(inputs, prompt.line_markers or SEED_MARKERS, hooks)
    evaluation, eval_duplicates = _load_heldout(inputs, prompt, hooks)
    # empty files have no rows (listed with 0 in the report); a source with no rows at all fails below
    train, rejected = rows_of(_chunks(files), inputs.data, prompt)
    if len(inputs.sources) > 1:  # one source's empty export fails the run as a folder's would
        for source in _sources_report(inputs, train, rejected):
            if not source["rows"] + source["rejected"]:
                raise DataError(f"{source['config']} ({source['source']}): no rows in any of its files; check the job that writes them")
    train, context, leaks, duplicates = drop_duplicates_and_leaks(train, evaluation, context_keys(train))
    train, conflicting, conflicts, left_out = resolve_conflicts(train, context, inputs.data.conflicts)
    del context
    rejected = sorted(rejected + leaks + conflicting, key=lambda r: (r["source_file"], r["source_line"]))
    _check_enough(inputs, train, rejected, duplicates + left_out)
    check_prepared(train)
    train.to_parquet(out / "train.parquet", index=False)
    evaluation.to_parquet(out / "eval.parquet", index=False)
    pd.DataFrame(rejected, columns=["source_file", "source_line", "reason"]).to_parquet(out / "rejected.parquet", index=False)
    report = {
        **data_report([name for name, _ in files], train, evaluation, rejected, duplicates),
        "sources": _sources_report(inputs, train, rejected),
        "eval_duplicates_collapsed": eval_duplicates,
        "conversations": int((train.history.map(len) > 0).sum()),
        "conflicts": conflicts,
        "conflicts_policy": str(inputs.data.conflicts),
        "conflicts_left_out": left_out,
        "near_duplicates": near_duplicates(train, evaluation, inputs.data.near_duplicate_similarity),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    hooks.logger.info("%d training rows, %d held-out rows, %d rejected", len(train), len(evaluation), len(rejected))
    return {"train_rows": len(train), "eval_rows": len(evaluation), "rejected_rows": len(rejected)}


def _sources_report(inputs: PrepareInputs, train: pd.DataFrame, rejected: list[dict]) -> list[dict]:
    """Each listed source with what identifies its content and its rows kept and rejected."""
    found = []
    for listing in inputs.sources:
        if listing.kind == "objects":
            names = {url for url, _, _ in listing.content}
            kept, refused = int(train.source_file.isin(names).sum()), sum(r["source_file"] in names for r in rejected)
        elif listing.kind == "dataset":
            kept, refused = int((train.source_file == listing.shown).sum()), sum(r["source_file"] == listing.shown for r in rejected)
        else:
            inside = f"{Path(listing.source.url)}/"
            kept = int(train.source_file.str.startswith(inside).sum())
            refused = sum(r["source_file"].startswith(inside) for r in rejected)
        found.append({"source": listing.shown, "config": listing.where, "kind": listing.kind, "content": listing.content, "rows": kept, "rejected": refused})
    return found


prepare_dataset = Stage("prepare", PrepareInputs, _prepare, __name__)
