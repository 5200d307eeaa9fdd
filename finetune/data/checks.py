"""Checks across rows: duplicates collapsed, held-out instructions kept out of training, one instruction
with different responses (data.conflicts), and training rows like a held-out one (possible leaks).

Rows are compared by their context (earlier turns, then the instruction), case and whitespace aside.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pandas as pd

from finetune.core.config import Conflicts


def _plain(text: str) -> str:
    return " ".join(text.lower().split())


def context_keys(frame: pd.DataFrame) -> pd.Series:
    """What each row's response answers: its earlier turns, then its instruction, case and spaces aside
    (turns joined by U+0001, the instruction after U+0000: readers reject control characters in text)."""
    keys = [
        "\x01".join(map(_plain, turns)) + "\x00" + _plain(instruction)
        for turns, instruction in zip(frame.history, frame.instruction)
    ]
    return pd.Series(keys, index=frame.index, dtype=object)


def duplicate_pairs(frame: pd.DataFrame, context: pd.Series | None = None) -> pd.Series:
    """True for each row whose conversation (case and whitespace insensitive) an earlier row already has."""
    context = context_keys(frame) if context is None else context
    pairs = [key + "\x00" + _plain(response) for key, response in zip(context, frame.response)]
    return pd.Series(pairs, index=frame.index, dtype=object).duplicated()


def place(frame: pd.DataFrame, i: int) -> str:
    return f"{frame.at[i, 'source_file']}:{frame.at[i, 'source_line']}"


def drop_duplicates_and_leaks(
    train: pd.DataFrame, evaluation: pd.DataFrame, context: pd.Series
) -> tuple[pd.DataFrame, pd.Series, list[dict], int]:
    """Collapse duplicates (case and whitespace insensitive) and reject rows that leak the held-out set:
    a row with a held-out instruction as any of its user turns. `context` is context_keys(train); the
    kept rows' keys come back with them."""
    duplicated = duplicate_pairs(train, context)
    held_out = set(map(_plain, evaluation.instruction))

    def leaks(turns: list[str], key: str) -> bool:
        return key.partition("\x00")[2] in held_out or any(_plain(turn) in held_out for turn in turns[0::2])

    leaked = pd.Series(list(map(leaks, train.history, context)), index=train.index, dtype=bool)
    rejected = [
        {"source_file": r.source_file, "source_line": int(r.source_line), "reason": "instruction is in the held-out set"}
        for r in train[leaked & ~duplicated].itertuples()
    ]
    kept = ~duplicated & ~leaked
    return train[kept].reset_index(drop=True), context[kept].reset_index(drop=True), rejected, int(duplicated.sum())


def resolve_conflicts(
    train: pd.DataFrame, context: pd.Series, policy: Conflicts
) -> tuple[pd.DataFrame, list[dict], list[dict], int]:
    """Rows with one context (context_keys) and different responses (duplicates already collapsed), by
    data.conflicts: (rows kept, rejects, the conflicts as listed in the report, rows left out by keep_first)."""
    repeated = context[context.duplicated(keep=False)]  # at a million rows, most rows are in no conflict
    groups = sorted(list(rows) for rows in repeated.groupby(repeated, sort=False).indices.values())
    groups = [[int(repeated.index[i]) for i in g] for g in groups]
    listed = [{"instruction": train.at[g[0], "instruction"][:200], "places": [place(train, i) for i in g]} for g in groups]
    if policy == Conflicts.keep_all or not groups:
        return train, [], listed, 0
    left_out = [i for g in groups for i in (g if policy == Conflicts.reject else g[1:])]
    rejected = [
        {
            "source_file": train.at[i, "source_file"],
            "source_line": int(train.at[i, "source_line"]),
            "reason": f"same instruction as {', '.join(place(train, j) for j in g if j != i)} with a different response; "
            "fix one of them, or set data.conflicts: keep_first or keep_all",
        }
        for g in groups if policy == Conflicts.reject for i in g
    ]  # fmt: skip
    kept = train.drop(index=left_out).reset_index(drop=True)
    return kept, rejected, listed, 0 if policy == Conflicts.reject else len(left_out)


def _grams(text: str) -> set[str]:
    plain = _plain(text)
    return {plain[i : i + 4] for i in range(max(len(plain) - 3, 1))}


def near_duplicates(train: pd.DataFrame, evaluation: pd.DataFrame, similarity: float) -> list[dict]:
    """Training rows whose instruction is at least `similarity` like a held-out one: the exact Jaccard
    similarity of their sets of character 4-grams (case and spaces aside).

    The held-out grams are indexed; a training row is compared only with the held-out rows it shares grams
    with, and only when it shares enough of its own grams with the held-out set to reach `similarity` at
    all (Jaccard >= s needs at least s * |grams| shared), so a million rows cost one set per row."""
    held_out = [_grams(text) for text in evaluation.instruction]
    postings: dict[str, list[int]] = defaultdict(list)
    for j, grams in enumerate(held_out):
        for gram in grams:
            postings[gram].append(j)
    vocabulary = postings.keys()
    found = []
    for i, text in enumerate(train.instruction):
        grams = _grams(text)
        shared_any = grams & vocabulary
        if len(shared_any) < similarity * len(grams):
            continue
        for j, shared in Counter(j for gram in shared_any for j in postings[gram]).items():
            score = shared / (len(grams) + len(held_out[j]) - shared)
            if score >= similarity:
                found.append((j, i, score))
    return [
        {"train": place(train, i), "heldout": place(evaluation, j), "similarity": round(score, 2)}
        for j, i, score in sorted(found)
    ]
