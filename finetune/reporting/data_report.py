"""The data report of prepare: rows per file, topic and split, lengths, rejects, conflicts and possible
leaks, as report.json and report.md (the `data-report` artifact)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd


def length_stats(frame: pd.DataFrame) -> dict:
    stats = {}
    for column in ("instruction", "response"):
        words = pd.Series([len(text.split()) for text in frame[column]], dtype="int64")
        stats[column] = {"words_mean": round(float(words.mean()), 1), "words_max": int(words.max())} if len(frame) else {}
    return stats


def report_markdown(report: dict) -> str:
    lines = [
        "# Data report",
        "",
        f"Training rows: **{report['train_rows']}** from {len(report['train_files'])} file(s); "
        f"evaluation rows: **{report['eval_rows']}**; rejected: **{report['rejected_rows']}**; "
        f"duplicates collapsed: {report['duplicates_collapsed']}"
        + (f"; conversations of several exchanges: {report['conversations']}" if report.get("conversations") else "")
        + (f"; {report['eval_duplicates_collapsed']} duplicate held-out pair(s) collapsed" if report.get("eval_duplicates_collapsed") else "")
        + ".",
        "",
        "| topic | train | eval |",
        "|---|---:|---:|",
    ]
    topics = sorted(set(report["topics_train"]) | set(report["topics_eval"]))
    lines += [f"| {t} | {report['topics_train'].get(t, 0)} | {report['topics_eval'].get(t, 0)} |" for t in topics]
    if report.get("sources"):
        lines += ["", "| source | config | content | rows kept | rejected |", "|---|---|---|---:|---:|"]
        lines += [f"| {s['source']} | {s['config']} | {_content(s)} | {s['rows']} | {s['rejected']} |" for s in report["sources"]]
    lines += ["", "| file | rows kept | rejected |", "|---|---:|---:|"]
    lines += [f"| {Path(f['file']).name} | {f['rows']} | {f['rejected']} |" for f in report.get("files", [])]
    lines += ["", "| field | words (mean) | words (max) |", "|---|---:|---:|"]
    for field, stat in report["lengths_train"].items():
        lines.append(f"| {field} | {stat.get('words_mean', '-')} | {stat.get('words_max', '-')} |")
    if report.get("conflicts"):
        lines += ["", f"Same instruction, different responses ({len(report['conflicts'])}; data.conflicts: {report['conflicts_policy']}):", ""]
        lines += [f"- {', '.join(f'`{p}`' for p in c['places'])}: {c['instruction'][:80]!r}" for c in report["conflicts"][:10]]
    if report.get("near_duplicates"):
        lines += ["", f"Training rows like a held-out row ({len(report['near_duplicates'])}; possible leaks, kept):", ""]
        lines += [f"- `{n['train']}` ~ `{n['heldout']}` ({n['similarity']:.2f})" for n in report["near_duplicates"][:10]]
    if report["rejected_examples"]:
        lines += ["", "First rejects:", ""] + [f"- `{r['source_file']}:{r['source_line']}`: {r['reason']}" for r in report["rejected_examples"]]
    return "\n".join(lines) + "\n"


def _content(source: dict) -> str:
    """What identifies a source's content, in a few characters: its objects' count, or its digest or commit."""
    if source["kind"] == "objects":
        return f"{len(source['content'])} object(s) by ETag"
    return f"`{source['content'][0][0][:20]}`"


def data_report(files: list[Path], train: pd.DataFrame, evaluation: pd.DataFrame, rejected: list[dict], duplicates: int) -> dict:
    kept, refused = train.source_file.value_counts(), Counter(r["source_file"] for r in rejected)
    return {
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "rejected_rows": len(rejected),
        "duplicates_collapsed": duplicates,
        "train_files": [str(f) for f in files],
        "files": [
            {"file": str(f), "rows": int(kept.get(str(f), 0)), "rejected": refused[str(f)]}
            for f in files
        ],
        "topics_train": train.topic.fillna("(none)").value_counts().sort_index().to_dict(),
        "topics_eval": evaluation.topic.fillna("(none)").value_counts().sort_index().to_dict(),
        "lengths_train": length_stats(train),
        "rejected_examples": rejected[:10],
    }
