"""What changed in the data since the champion was trained: the run's prepared and tokenized data against
those of the run that trained the champion (found through its run record).

Files are matched by name (the raw folder may have moved), rows by content, never by position: a row's context (earlier turns, then the instruction;
case and spaces aside, as the duplicate check compares them) identifies it, so a row moved to another
file or line is unchanged, one whose response differs is edited, and the rest are added or removed.
Rejects are counted by reason, with places and numbers left out of the reason so that like counts like.
Shifts are sized: topics by total variation distance (half the sum of the share differences, 0 to 1),
token lengths by the two-sample Kolmogorov-Smirnov statistic (the largest gap between the two
cumulative distributions, 0 to 1).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.data.checks import context_keys

_PLACE = re.compile(r"\S+:\d+")  # file:line in a reason
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_kind(reason: str) -> str:
    """A reject's reason without its places and numbers: `malformed JSON: Expecting value at column N`."""
    return _NUMBER.sub("N", _PLACE.sub("<place>", reason)).split(";")[0].strip()


def _rows(prepared_dir: Path) -> pd.DataFrame:
    train = pd.read_parquet(Path(prepared_dir) / "train.parquet")
    train["history"] = train.history.map(list)
    names = train.source_file.map(lambda path: Path(path).name)  # the raw folder holds files, no subfolders
    return train.assign(context=context_keys(train).to_numpy(), answer=train.response.str.strip().str.lower(), file=names)


def _rejects(prepared_dir: Path) -> Counter:
    path = Path(prepared_dir) / "rejected.parquet"
    return Counter(map(reason_kind, pd.read_parquet(path).reason)) if path.is_file() else Counter()


def _lengths(tokenized_dir: Path | None) -> np.ndarray | None:
    path = Path(tokenized_dir) / "train.parquet" if tokenized_dir else None
    return pd.read_parquet(path, columns=["input_ids"]).input_ids.map(len).to_numpy() if path and path.is_file() else None


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The largest gap between the empirical cumulative distributions of `a` and `b`."""
    values = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _shares(frame: pd.DataFrame) -> dict[str, float]:
    return (frame.topic.fillna("(none)").value_counts(normalize=True)).round(4).sort_index().to_dict()


def data_changes(now: tuple[Path, Path | None], then: tuple[Path, Path | None], champion_run: str) -> dict[str, Any]:
    """`now` and `then`: (prepared folder, tokenized folder) of this run and of the champion's run."""
    rows_now, rows_then = _rows(now[0]), _rows(then[0])
    answers_then = dict(zip(rows_then.context, rows_then.answer))
    contexts_now = set(rows_now.context)
    same_context = rows_now.context.isin(answers_then.keys())
    edited = same_context & (rows_now.answer != rows_now.context.map(answers_then))
    added, removed = rows_now[~same_context], rows_then[~rows_then.context.isin(contexts_now)]
    files_now, files_then = set(rows_now.file), set(rows_then.file)  # by name: the raw folder may have moved

    def pairs(rows: pd.DataFrame) -> dict[str, set]:  # each file's rows by content, in one pass over the rows
        return {name: set(zip(group.context, group.answer)) for name, group in rows.groupby("file", sort=False)}

    pairs_now, pairs_then = pairs(rows_now), pairs(rows_then)
    changed_files = sorted(name for name in files_now & files_then if pairs_now[name] != pairs_then[name])
    rejects_now, rejects_then = _rejects(now[0]), _rejects(then[0])
    shares_now, shares_then = _shares(rows_now), _shares(rows_then)
    topics = sorted(set(shares_now) | set(shares_then))
    lengths_now, lengths_then = _lengths(now[1]), _lengths(then[1])
    lengths = None
    if lengths_now is not None and lengths_then is not None and len(lengths_now) and len(lengths_then):
        lengths = {
            "then": {"mean": round(float(lengths_then.mean()), 1), "p95": int(np.percentile(lengths_then, 95)), "max": int(lengths_then.max())},
            "now": {"mean": round(float(lengths_now.mean()), 1), "p95": int(np.percentile(lengths_now, 95)), "max": int(lengths_now.max())},
            "ks": round(ks_statistic(lengths_now, lengths_then), 4),
        }  # fmt: skip
    return {
        "champion_run": champion_run,
        "rows": {"then": len(rows_then), "now": len(rows_now), "added": len(added), "removed": len(removed), "edited": int(edited.sum())},
        "files": {"added": sorted(files_now - files_then), "removed": sorted(files_then - files_now), "changed": changed_files},
        "examples": {
            "added": [f"{r.source_file}:{r.source_line}" for r in added.head(5).itertuples()],
            "removed": [f"{r.source_file}:{r.source_line}" for r in removed.head(5).itertuples()],
            "edited": [f"{r.source_file}:{r.source_line}" for r in rows_now[edited].head(5).itertuples()],
        },
        "rejects": {kind: {"then": rejects_then.get(kind, 0), "now": rejects_now.get(kind, 0)} for kind in sorted(set(rejects_now) | set(rejects_then))},
        "topics": {topic: {"then": shares_then.get(topic, 0.0), "now": shares_now.get(topic, 0.0)} for topic in topics},
        "topic_shift": round(0.5 * sum(abs(shares_now.get(t, 0.0) - shares_then.get(t, 0.0)) for t in topics), 4),
        "lengths": lengths,
    }


def changes_markdown(changes: dict[str, Any]) -> str:
    rows, files = changes["rows"], changes["files"]
    lines = [
        f"# Data since the champion (run {changes['champion_run']})",
        "",
        f"Training rows: {rows['then']} then, {rows['now']} now: **{rows['added']} added, {rows['removed']} removed, "
        f"{rows['edited']} edited** (matched by content, not position).",
        "",
        f"Files added: {', '.join(f'`{f}`' for f in files['added']) or 'none'}; removed: {', '.join(f'`{f}`' for f in files['removed']) or 'none'}; "
        f"changed: {', '.join(f'`{f}`' for f in files['changed']) or 'none'}.",
    ]
    for kind in ("added", "removed", "edited"):
        if changes["examples"][kind]:
            lines.append(f"First {kind}: " + ", ".join(f"`{place}`" for place in changes["examples"][kind]))
    if changes["rejects"]:
        lines += ["", "| reject reason | then | now |", "|---|---:|---:|"]
        lines += [f"| {kind} | {c['then']} | {c['now']} |" for kind, c in changes["rejects"].items()]
    lines += ["", f"Topic shares (shift, total variation distance: {changes['topic_shift']:.3f}):", "", "| topic | then | now |", "|---|---:|---:|"]
    lines += [f"| {topic} | {c['then']:.1%} | {c['now']:.1%} |" for topic, c in changes["topics"].items()]
    if (lengths := changes["lengths"]) is not None:
        lines += [
            "", f"Tokens per example (shift, Kolmogorov-Smirnov statistic: {lengths['ks']:.3f}): mean {lengths['then']['mean']} -> "
            f"{lengths['now']['mean']}, 95th percentile {lengths['then']['p95']} -> {lengths['now']['p95']}, longest "
            f"{lengths['then']['max']} -> {lengths['now']['max']}.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"
