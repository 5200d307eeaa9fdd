"""The champion: the one promoted model of scheduled retraining, and the gate a candidate must pass.

In `paths.models_dir`:
- `champion.json`: the record, `{"current": <entry>, "history": [<entry>, ...]}`, oldest first. It is the
  source of truth, and a promotion is one atomic write of it (temporary file, then rename).
- `champion`: a link to the promoted merged model folder, so any tool can load `models/champion`. It
  is switched atomically (a new link renamed over the old) right after the record; if a crash falls
  between the two, the next gate puts the link back in line with the record before anything else.

A candidate is promoted when there is no champion yet, or when on the same held-out set its loss is
lower by at least `promote.min_loss_gain` and its format adherence is not lower. A candidate that is
the champion already (nothing changed since) is "no change".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from finetune.core.config import PromoteConfig
from finetune.core.outputs import write_text_atomic

RECORD = "champion.json"
LINK = "champion"
PROMOTED, KEPT, NO_CHANGE = "promoted", "kept", "no change"


def read_record(models_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(models_dir) / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _switch_link(link: Path, target: Path) -> None:
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)  # rename(2): the link is the old one or the new one, never missing


def champion_model_dir(models_dir: Path) -> Path | None:
    """The promoted model folder per the record (the link is repaired to match), or None."""
    record = read_record(models_dir)
    if record is None:
        return None
    target = Path(record["current"]["model_dir"])
    link = Path(models_dir) / LINK
    if not link.is_symlink() or Path(os.readlink(link)) != target:
        _switch_link(link, target)
    return target


def decide(candidate: dict, champion: dict | None, cfg: PromoteConfig) -> tuple[str, str]:
    """(decision, reason) from held-out metrics {"loss", "format_adherence"} of both models."""
    if champion is None:
        return PROMOTED, "no champion yet"
    gain = champion["loss"] - candidate["loss"]
    if gain < cfg.min_loss_gain:
        return KEPT, f"held-out loss {candidate['loss']} vs champion {champion['loss']}: gain {gain:.4f} < promote.min_loss_gain={cfg.min_loss_gain}"
    if candidate["format_adherence"] < champion["format_adherence"]:
        return KEPT, f"format adherence {candidate['format_adherence']} < champion's {champion['format_adherence']}"
    return PROMOTED, f"held-out loss {candidate['loss']} vs champion {champion['loss']} (gain {gain:.4f}), format adherence {candidate['format_adherence']} vs {champion['format_adherence']}"


def _same(a: Path | None, b: Path | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())


def gate(
    models_dir: Path, candidate_dir: Path, candidate: dict, scored_dir: Path | None, champion: dict | None,
    cfg: PromoteConfig, run_name: str,
) -> dict:  # fmt: skip
    """Decide, promote when the candidate wins, and return the decision with its numbers. `champion` is
    the score of the model in `scored_dir`, the champion when this run looked. Runs that reach the gate
    together take turns (a file lock), so no promotion is lost from the history."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(models_dir / ".champion.lock"):
        return _decide_and_promote(models_dir, candidate_dir, candidate, scored_dir, champion, cfg, run_name)


def _decide_and_promote(
    models_dir: Path, candidate_dir: Path, candidate: dict, scored_dir: Path | None, champion: dict | None,
    cfg: PromoteConfig, run_name: str,
) -> dict:  # fmt: skip
    current = champion_model_dir(models_dir)
    decision: dict[str, Any] = {
        "candidate_dir": str(candidate_dir), "champion_dir": str(current) if current else None,
        "candidate": candidate, "champion": champion, "min_loss_gain": cfg.min_loss_gain,
    }  # fmt: skip
    if current is not None and _same(candidate_dir, current):
        return {**decision, "decision": NO_CHANGE, "reason": "the candidate is the champion: nothing changed"}
    if current is not None and not current.is_dir():
        verdict, reason = PROMOTED, f"the champion's folder {current} is gone"
    elif not _same(scored_dir, current):  # another run promoted after this one scored the champion
        verdict, reason = KEPT, f"the champion changed to {current} while this run compared with {scored_dir}; run again to compare"
    else:
        verdict, reason = decide(candidate, champion, cfg)
    decision.update(decision=verdict, reason=reason)
    if verdict == PROMOTED:
        promote(models_dir, {"model_dir": str(Path(candidate_dir).resolve()), "run_name": run_name,
                             "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": candidate,
                             "replaced": str(current) if current else None, "reason": reason})  # fmt: skip
    return decision


def promote(models_dir: Path, entry: dict) -> None:
    """Make `entry["model_dir"]` the champion: the record first (one atomic write), then the link."""
    models_dir.mkdir(parents=True, exist_ok=True)
    history = (read_record(models_dir) or {}).get("history", [])
    write_text_atomic(models_dir / RECORD, json.dumps({"current": entry, "history": [*history, entry]}, indent=2))
    _switch_link(models_dir / LINK, Path(entry["model_dir"]))
