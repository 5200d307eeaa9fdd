"""The data contract as pandera schemas: rows as read (RawRow), the config's checks on them, and the
prepared rows written to train/eval parquet (PreparedRow). Checks run lazily, so every failing row is
reported with its file, line and a reason a person can act on."""

from __future__ import annotations

import re

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from finetune.core.config import DataConfig
from finetune.core.errors import InternalError
from finetune.data.readers import DataError, visible_text
from finetune.data.template import PromptFormat


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
        # column by column (no joined strings: at a million rows those would double the memory held)
        pairs = pd.DataFrame({"history": frame.history.map(tuple), "instruction": frame.instruction, "response": frame.response})
        return not pairs.duplicated().any()

    class Config:
        strict = True


def config_schema(cfg: DataConfig, prompt: PromptFormat) -> pa.DataFrameSchema:
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


def describe(column: str, check: str, cfg: DataConfig, prompt: PromptFormat) -> str:
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


def validate_rows(frame: pd.DataFrame, cfg: DataConfig, prompt: PromptFormat) -> tuple[pd.DataFrame, list[dict]]:
    """Split rows into those passing both schemas and rejects with every reason that applies."""
    if frame.empty:
        return frame, []
    reasons: dict[int, list[str]] = {}
    for schema in (RawRow.to_schema(), config_schema(cfg, prompt)):
        try:
            schema.validate(frame, lazy=True)
        except pa.errors.SchemaErrors as errors:
            cases = errors.failure_cases
            for index, column, check, case in cases[["index", "column", "check", "failure_case"]].itertuples(index=False):
                if pd.isna(index):  # a failure of the whole frame (a column's type): the readers' bug, not a row
                    raise InternalError(f"read rows do not match RawRow: {column}: expected {check}, got {case}") from None
                reasons.setdefault(int(index), []).append(describe(column, check, cfg, prompt))
    rejected = [
        {"source_file": frame.at[i, "source_file"], "source_line": int(frame.at[i, "source_line"]), "reason": "; ".join(r)}
        for i, r in sorted(reasons.items())
    ]
    return frame.drop(index=list(reasons)), rejected


def check_prepared(frame: pd.DataFrame) -> None:
    """PreparedRow's checks, failing as a DataError with file:line places, never as pandera's dump."""
    try:
        PreparedRow.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        rows = [int(i) for i in cases["index"].dropna().unique()][:3] or list(range(min(3, len(frame))))
        places = ", ".join(f"{frame.at[i, 'source_file']}:{frame.at[i, 'source_line']}" for i in rows if i in frame.index)
        checks = ", ".join(sorted(set(cases["check"].astype(str))))
        raise DataError(f"prepared rows fail {checks} at {places}; fix those rows") from None
