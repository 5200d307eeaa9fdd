"""Checks across rows: duplicates collapsed, held-out instructions kept out of training, one instruction
with different responses (data.conflicts), and training rows like a held-out one (possible leaks).

Rows are compared by their context (earlier turns, then the instruction), case and whitespace aside.
"""

from __future__ import annotations

import pandas as pd

from finetune.core.config import Conflicts


def _normalized(text: pd.Series) -> pd.Series:
    return text.str.lower().str.split().str.join(" ")


def _plain(text: str) -> str:
    return " ".join(text.lower().split())


def _context(frame: pd.DataFrame) -> pd.Series:
    """What each row's response answers: its instruction after its earlier turns, case and spaces aside."""
    earlier = frame.history.map(lambda turns: "\x01".join(_plain(turn) for turn in turns)).astype(str)
    return earlier + "\x00" + _normalized(frame.instruction).astype(str)


def duplicate_pairs(frame: pd.DataFrame) -> pd.Series:
    """True for each row whose conversation (case and whitespace insensitive) an earlier row already has."""
    return (_context(frame) + "\x00" + _normalized(frame.response).astype(str)).duplicated()


def place(frame: pd.DataFrame, i: int) -> str:
    return f"{frame.at[i, 'source_file']}:{frame.at[i, 'source_line']}"


def drop_duplicates_and_leaks(train: pd.DataFrame, evaluation: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], int]:
    """Collapse duplicates (case and whitespace insensitive) and reject rows that leak the held-out set:
    a row with a held-out instruction as any of its user turns."""
    duplicated = duplicate_pairs(train)
    held_out = set(_normalized(evaluation.instruction))
    asked = [[*turns[0::2], instruction] for turns, instruction in zip(train.history, train.instruction)]
    leaked = pd.Series([any(_plain(turn) in held_out for turn in turns) for turns in asked], index=train.index, dtype=bool)
    rejected = [
        {"source_file": r.source_file, "source_line": int(r.source_line), "reason": "instruction is in the held-out set"}
        for r in train[leaked & ~duplicated].itertuples()
    ]
    return train[~duplicated & ~leaked].reset_index(drop=True), rejected, int(duplicated.sum())


def resolve_conflicts(train: pd.DataFrame, policy: Conflicts) -> tuple[pd.DataFrame, list[dict], list[dict], int]:
    """Rows with one context and different responses (duplicates already collapsed), by data.conflicts:
    (rows kept, rejects, the conflicts as listed in the report, rows left out by keep_first)."""
    groups = [list(rows) for rows in train.groupby(_context(train), sort=False).indices.values() if len(rows) > 1]
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


def near_duplicates(train: pd.DataFrame, evaluation: pd.DataFrame, similarity: float) -> list[dict]:
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
                found.append({"train": place(train, i), "heldout": place(evaluation, j), "similarity": round(score, 2)})
    return found
