"""Stage `prepare`: raw instruction/response files -> validated train/eval parquet + data report.

Rows are checked by a pandera schema, lazily, so every failing row is reported with its file, line and
reason instead of the first one only. Rejected rows are written beside the splits; the raw files are
only read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from finetune.config import Conflicts, DataConfig
from finetune.readers import SEED_MARKERS, DataError, data_files, read_pairs, visible_text
from finetune.stage import Hooks, Stage
from finetune.template import PromptFormat

__all__ = ["DataError", "PrepareInputs", "prepare_dataset"]


@dataclass(frozen=True, kw_only=True)
class PrepareInputs:
    raw_dir: Path  # every data file in it is read; the folder's content is in the key
    heldout_path: Path
    data: DataConfig
    template: str  # tokenize.template: rows that contain its markers are rejected


class RawRow(pa.DataFrameModel):
    """One instruction/response pair as read from disk, before any cleaning."""

    instruction: Series[str] = pa.Field(nullable=False)
    response: Series[str] = pa.Field(nullable=False)
    history: Series[object]  # the exchanges before the last one: user, assistant, ... (empty: one exchange)
    topic: Series[str] = pa.Field(nullable=True)
    source_file: Series[str]
    source_line: Series[int] = pa.Field(ge=1)

    @pa.check("instruction", "response", name="not_blank")
    def _not_blank(cls, text: Series[str]) -> Series[bool]:
        return text.map(visible_text).str.len() > 0

    @pa.check("history", name="not_blank")
    def _turns_not_blank(cls, history: Series[object]) -> Series[bool]:
        return history.map(lambda turns: all(visible_text(turn) for turn in turns))

    class Config:
        strict = True
        coerce = False


class PreparedRow(pa.DataFrameModel):
    """A row of train.parquet / eval.parquet: trimmed, checked, traceable to its source."""

    instruction: Series[str] = pa.Field(str_length={"min_value": 1})
    response: Series[str] = pa.Field(str_length={"min_value": 1})
    history: Series[object]
    topic: Series[str] = pa.Field(nullable=True)
    source_file: Series[str]
    source_line: Series[int] = pa.Field(ge=1)

    @pa.dataframe_check(name="unique_pairs")
    def _unique(cls, frame: pd.DataFrame) -> bool:
        return not (frame.history.map(tuple).map(str) + frame.instruction + "\x00" + frame.response).duplicated().any()

    class Config:
        strict = True


def _config_schema(cfg: DataConfig, prompt: PromptFormat) -> pa.DataFrameSchema:
    """Config-dependent checks (length bounds, the template's markers, topics), after the structural schema."""
    bounds = pa.Check(
        lambda text: text.str.strip().str.len().between(cfg.min_chars, cfg.max_chars), name="length_bounds"
    )
    pattern = "|".join(re.escape(marker) for marker in prompt.markers)
    no_marker = pa.Check(lambda text: ~text.str.contains(pattern, regex=True), name="no_template_marker")
    each_turn = [  # the same checks on every turn of the earlier exchanges
        pa.Check(lambda h: h.map(lambda turns: all(cfg.min_chars <= len(t.strip()) <= cfg.max_chars for t in turns)), name="length_bounds"),
        pa.Check(lambda h: h.map(lambda turns: not any(re.search(pattern, t) for t in turns)), name="no_template_marker"),
    ]  # fmt: skip
    checks = {
        "instruction": pa.Column(str, [bounds, no_marker]),
        "response": pa.Column(str, [bounds, no_marker]),
        "history": pa.Column(object, each_turn),
    }
    if cfg.topics is not None:
        known = set(cfg.topics)
        checks["topic"] = pa.Column(
            str, pa.Check(lambda topic: topic.isin(known), name="known_topic", ignore_na=False), nullable=True
        )
    return pa.DataFrameSchema(checks, strict=False)


def _describe(column: str, check: str, cfg: DataConfig, prompt: PromptFormat) -> str:
    """A pandera check name as a reason a person can act on."""
    reasons = {
        "not_blank": "is empty after trimming whitespace and invisible format characters (zero-width spaces and "
        "joiners, soft hyphens, direction marks)",
        "no_template_marker": f"contains a template marker ({' / '.join(prompt.markers)}, from tokenize.template); "
        "trained on, the model would learn to write turns of its own",
        "length_bounds": f"length is outside data.min_chars..data.max_chars ({cfg.min_chars}..{cfg.max_chars} characters)",
        "known_topic": f"is missing or not one of data.topics {cfg.topics}; data.topics: null accepts any topic",
        "not_nullable": "is missing",
    }
    return f"{'an earlier turn' if column == 'history' else column} {reasons.get(check, check)}"


def _validate(frame: pd.DataFrame, cfg: DataConfig, prompt: PromptFormat) -> tuple[pd.DataFrame, list[dict]]:
    """Split rows into those passing both schemas and rejects with every reason that applies."""
    if frame.empty:
        return frame, []
    reasons: dict[int, list[str]] = {}
    for schema in (RawRow.to_schema(), _config_schema(cfg, prompt)):
        try:
            schema.validate(frame, lazy=True)
        except pa.errors.SchemaErrors as errors:
            cases = errors.failure_cases
            for index, column, check, case in cases[["index", "column", "check", "failure_case"]].itertuples(index=False):
                if pd.isna(index):  # a failure of the whole frame (a column's type): a bug, not a row
                    raise DataError(f"rows do not match the schema: {column}: expected {check}, got {case}") from None
                reasons.setdefault(int(index), []).append(_describe(column, check, cfg, prompt))
    rejected = [
        {"source_file": frame.at[i, "source_file"], "source_line": int(frame.at[i, "source_line"]), "reason": "; ".join(r)}
        for i, r in sorted(reasons.items())
    ]
    return frame.drop(index=list(reasons)), rejected


def _normalized(text: pd.Series) -> pd.Series:
    return text.str.lower().str.split().str.join(" ")


def _plain(text: str) -> str:
    return " ".join(text.lower().split())


def _context(frame: pd.DataFrame) -> pd.Series:
    """What each row's response answers: its instruction after its earlier turns, case and spaces aside."""
    earlier = frame.history.map(lambda turns: "\x01".join(_plain(turn) for turn in turns)).astype(str)
    return earlier + "\x00" + _normalized(frame.instruction).astype(str)


def _duplicate_pairs(frame: pd.DataFrame) -> pd.Series:
    """True for each row whose conversation (case and whitespace insensitive) an earlier row already has."""
    return (_context(frame) + "\x00" + _normalized(frame.response).astype(str)).duplicated()


def _place(frame: pd.DataFrame, i: int) -> str:
    return f"{frame.at[i, 'source_file']}:{frame.at[i, 'source_line']}"


def load_rows(files: list[Path], cfg: DataConfig, prompt: PromptFormat) -> tuple[pd.DataFrame, list[dict]]:
    rows, rejected = [], []
    for path in files:
        result = read_pairs(path, prompt.line_markers or SEED_MARKERS)
        rows += result.rows
        rejected += result.rejects
    columns = ["instruction", "response", "history", "topic", "source_file", "source_line"]
    frame = pd.DataFrame(rows, columns=columns).astype({"source_line": "int64"})
    frame, invalid = _validate(frame, cfg, prompt)
    frame = frame.assign(
        instruction=frame.instruction.str.strip(),
        response=frame.response.str.strip(),
        history=frame.history.map(lambda turns: [turn.strip() for turn in turns]),
    )
    return frame.reset_index(drop=True), rejected + invalid


def _length_stats(frame: pd.DataFrame) -> dict:
    stats = {}
    for column in ("instruction", "response"):
        words = frame[column].str.split().str.len()
        stats[column] = {"words_mean": round(float(words.mean()), 1), "words_max": int(words.max())} if len(frame) else {}
    return stats


def _report_markdown(report: dict) -> str:
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


def _drop_duplicates_and_leaks(train: pd.DataFrame, evaluation: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], int]:
    """Collapse duplicates (case and whitespace insensitive) and reject rows that leak the held-out set:
    a row with a held-out instruction as any of its user turns."""
    duplicated = _duplicate_pairs(train)
    held_out = set(_normalized(evaluation.instruction))
    asked = [[*turns[0::2], instruction] for turns, instruction in zip(train.history, train.instruction)]
    leaked = pd.Series([any(_plain(turn) in held_out for turn in turns) for turns in asked], index=train.index, dtype=bool)
    rejected = [
        {"source_file": r.source_file, "source_line": int(r.source_line), "reason": "instruction is in the held-out set"}
        for r in train[leaked & ~duplicated].itertuples()
    ]
    return train[~duplicated & ~leaked].reset_index(drop=True), rejected, int(duplicated.sum())


def _resolve_conflicts(train: pd.DataFrame, policy: Conflicts) -> tuple[pd.DataFrame, list[dict], list[dict], int]:
    """Rows with one context and different responses (duplicates already collapsed), by data.conflicts:
    (rows kept, rejects, the conflicts as listed in the report, rows left out by keep_first)."""
    groups = [list(rows) for rows in train.groupby(_context(train), sort=False).indices.values() if len(rows) > 1]
    listed = [{"instruction": train.at[g[0], "instruction"][:200], "places": [_place(train, i) for i in g]} for g in groups]
    if policy == Conflicts.keep_all or not groups:
        return train, [], listed, 0
    left_out = [i for g in groups for i in (g if policy == Conflicts.reject else g[1:])]
    rejected = [
        {
            "source_file": train.at[i, "source_file"],
            "source_line": int(train.at[i, "source_line"]),
            "reason": f"same instruction as {', '.join(_place(train, j) for j in g if j != i)} with a different response; "
            "fix one of them, or set data.conflicts: keep_first or keep_all",
        }
        for g in groups if policy == Conflicts.reject for i in g
    ]  # fmt: skip
    kept = train.drop(index=left_out).reset_index(drop=True)
    return kept, rejected, listed, 0 if policy == Conflicts.reject else len(left_out)


def _near_duplicates(train: pd.DataFrame, evaluation: pd.DataFrame, similarity: float) -> list[dict]:
    """Training rows whose instruction is at least `similarity` like a held-out one: datasketch's MinHash
    LSH over character 4-grams finds the candidates, their MinHash estimate is reported."""
    from datasketch import MinHash, MinHashLSH

    def sketch(text: str) -> MinHash:
        plain = _plain(text)
        grams = {plain[i : i + 4] for i in range(max(len(plain) - 3, 1))}
        minhash = MinHash(num_perm=128, seed=1)
        minhash.update_batch([gram.encode("utf-8") for gram in grams])
        return minhash

    index = MinHashLSH(threshold=similarity, num_perm=128)
    sketches = {}
    for i, text in enumerate(train.instruction):
        sketches[i] = sketch(text)
        index.insert(i, sketches[i])
    found = []
    for j, text in enumerate(evaluation.instruction):
        held_out = sketch(text)
        for i in sorted(index.query(held_out)):
            score = held_out.jaccard(sketches[i])
            if score >= similarity:
                found.append({"train": _place(train, i), "heldout": _place(evaluation, j), "similarity": round(score, 2)})
    return found


def _check_enough(inputs: PrepareInputs, train: pd.DataFrame, rejected: list[dict], duplicates: int) -> None:
    cfg = inputs.data
    total = len(train) + len(rejected) + duplicates
    listed = ", ".join(f"{r['source_file']}:{r['source_line']} ({r['reason']})" for r in rejected[:3])
    if total and len(rejected) / total > cfg.max_reject_share:
        raise DataError(
            f"{len(rejected)} of {total} rows rejected, over data.max_reject_share={cfg.max_reject_share}: "
            f"{listed}. Fix those rows or raise the limit."
        )
    if len(train) < cfg.min_rows:
        raise DataError(
            f"{inputs.raw_dir}: {len(train)} usable training rows, fewer than data.min_rows={cfg.min_rows}"
            + (f"; rejected: {listed}" if rejected else "")
        )


def _load_heldout(inputs: PrepareInputs, prompt: PromptFormat) -> tuple[pd.DataFrame, int]:
    heldout_path = Path(inputs.heldout_path)
    if not heldout_path.is_file():
        raise DataError(f"{heldout_path}: held-out file not found; paths.heldout_path must name a JSONL file")
    evaluation, eval_rejected = load_rows([heldout_path], inputs.data, prompt)
    if eval_rejected:
        first = eval_rejected[0]
        raise DataError(f"{first['source_file']}:{first['source_line']}: {first['reason']} (held-out rows must all be valid)")
    if evaluation.empty:
        raise DataError(f"{heldout_path}: no held-out rows; evaluation needs at least one pair")
    if (turns := evaluation.history.map(len)).any():
        i = int(turns.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{_place(evaluation, i)}: a held-out row is one exchange (evaluation asks one instruction), this one has "
            f"{turns[i] // 2} earlier exchange(s); keep conversations in the training data"
        )
    duplicated = _duplicate_pairs(evaluation)
    evaluation = evaluation[~duplicated].reset_index(drop=True)  # collapsed and counted, like training duplicates
    _check_prepared(evaluation)
    return evaluation, int(duplicated.sum())


def _check_prepared(frame: pd.DataFrame) -> None:
    """PreparedRow's checks, failing as a DataError with file:line places, never as pandera's dump."""
    try:
        PreparedRow.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        rows = [int(i) for i in cases["index"].dropna().unique()][:3] or list(range(min(3, len(frame))))
        places = ", ".join(f"{frame.at[i, 'source_file']}:{frame.at[i, 'source_line']}" for i in rows if i in frame.index)
        checks = ", ".join(sorted(set(cases["check"].astype(str))))
        raise DataError(f"prepared rows fail {checks} at {places}; fix those rows") from None


def _report(files: list[Path], train: pd.DataFrame, evaluation: pd.DataFrame, rejected: list[dict], duplicates: int) -> dict:
    return {
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "rejected_rows": len(rejected),
        "duplicates_collapsed": duplicates,
        "train_files": [str(f) for f in files],
        "files": [
            {"file": str(f), "rows": int((train.source_file == str(f)).sum()), "rejected": sum(r["source_file"] == str(f) for r in rejected)}
            for f in files
        ],
        "topics_train": train.topic.fillna("(none)").value_counts().sort_index().to_dict(),
        "topics_eval": evaluation.topic.fillna("(none)").value_counts().sort_index().to_dict(),
        "lengths_train": _length_stats(train),
        "rejected_examples": rejected[:10],
    }


def _prepare(inputs: PrepareInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Validate the raw pairs and the held-out pairs; write train.parquet, eval.parquet, the report."""
    prompt = PromptFormat(inputs.template)
    files = data_files(inputs.raw_dir, tuple(inputs.data.exclude))
    evaluation, eval_duplicates = _load_heldout(inputs, prompt)
    train, rejected = load_rows(files, inputs.data, prompt)
    train, leaks, duplicates = _drop_duplicates_and_leaks(train, evaluation)
    train, conflicting, conflicts, left_out = _resolve_conflicts(train, inputs.data.conflicts)
    rejected = sorted(rejected + leaks + conflicting, key=lambda r: (r["source_file"], r["source_line"]))
    _check_enough(inputs, train, rejected, duplicates + left_out)
    _check_prepared(train)
    train.to_parquet(out / "train.parquet", index=False)
    evaluation.to_parquet(out / "eval.parquet", index=False)
    pd.DataFrame(rejected, columns=["source_file", "source_line", "reason"]).to_parquet(out / "rejected.parquet", index=False)
    report = {
        **_report(files, train, evaluation, rejected, duplicates),
        "eval_duplicates_collapsed": eval_duplicates,
        "conversations": int((train.history.map(len) > 0).sum()),
        "conflicts": conflicts,
        "conflicts_policy": str(inputs.data.conflicts),
        "conflicts_left_out": left_out,
        "near_duplicates": _near_duplicates(train, evaluation, inputs.data.near_duplicate_similarity),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(_report_markdown(report), encoding="utf-8")
    hooks.logger.info("%d training rows, %d held-out rows, %d rejected", len(train), len(evaluation), len(rejected))
    return {"train_rows": len(train), "eval_rows": len(evaluation), "rejected_rows": len(rejected)}


prepare_dataset = Stage("prepare", PrepareInputs, _prepare, __name__)
