"""The retraining history (finetune.core.history) as a table: the `retraining-history` artifact and
`finetune history` show the same rows."""

from __future__ import annotations

from typing import Any

from finetune.core.history import HISTORY
from finetune.reporting.stats import format_difference


def _loss(figures: dict | None) -> str:
    return f"{figures['loss']:.4f}" if figures and figures.get("loss") is not None else "-"


def history_rows(entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per decision, as the artifact and `finetune history` show it."""
    rows = []
    for entry in entries:
        gain = (entry.get("compared") or {}).get("loss_gain")
        rows.append({
            "when": entry.get("at", "-"), "run": entry.get("run_name", "-"), "decision": entry.get("decision", "-"),
            "data key": (entry.get("data_key") or "-")[:12], "rows": str(entry.get("train_rows") or "-"),
            "candidate loss": _loss(entry.get("candidate")), "champion loss": _loss(entry.get("champion")),
            "loss gain [95%]": format_difference(gain, 4) if gain else "-",
        })  # fmt: skip
    return rows


def history_markdown(entries: list[dict[str, Any]], unreadable: list[int], image: str = "") -> str:
    """The history as markdown: the picture (a data URI image, when given), then one row per decision."""
    rows = history_rows(entries)
    lines = ["# Retraining history", "", image.rstrip(), ""] if image else ["# Retraining history", ""]
    lines += [f"{len(rows)} decision{'' if len(rows) == 1 else 's'}, oldest first; promotions replace the champion, rollbacks put an earlier one back.", ""]
    if rows:
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    if unreadable:
        lines += ["", f"Lines {', '.join(map(str, unreadable))} of {HISTORY} could not be read and are left out."]
    return "\n".join(lines) + "\n"
