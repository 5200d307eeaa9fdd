"""The champion: the one promoted model of scheduled retraining, and the gate a candidate must pass.

In `paths.models_dir`:
- `champion.json`: the record, `{"current": <entry>, "history": [<entry>, ...]}`, oldest first. It is the
  source of truth, and a promotion is one atomic write of it (temporary file, then rename). No cache can
  rebuild it, so the version it replaces is kept beside it first (`champion.json.prev`), and a record
  that cannot be read stops a run before any stage with one line naming the file and how to repair it.
- `champion`: a link to the promoted merged model folder, so any tool can load `models/champion`. It
  is switched atomically (a new link renamed over the old) right after the record; if a crash falls
  between the two, the next gate puts the link back in line with the record before anything else.

A candidate is promoted when there is no champion yet, or when it beats the champion on the same
held-out prompts by `promote.rule`: `interval` (default) compares the two per prompt and promotes when
the paired 95% interval of the loss gain lies above `promote.min_loss_gain` and format adherence is not
clearly lower; `point` compares the whole-set figures. A candidate that is the champion already (nothing
changed since) is "no change".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from finetune.core.config import PromoteConfig
from finetune.core.errors import InternalError, PermanentError
from finetune.core.history import HISTORY, append
from finetune.core.outputs import write_text_atomic

RECORD = "champion.json"
PREVIOUS = "champion.json.prev"  # the record as it was before the last promotion
LINK = "champion"
PROMOTED, KEPT, NO_CHANGE = "promoted", "kept", "no change"


class ChampionRecordError(PermanentError, ValueError):
    """champion.json cannot be read: damaged, half-written by another tool, or edited by hand."""


def _problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, what is wrong with it); (None, None) where there is no such file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text at byte {error.start}"
    except json.JSONDecodeError as error:
        return None, f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    if not isinstance(record, dict) or not isinstance(record.get("history"), list):
        return None, 'it needs a "history" list of promotions'
    current = record.get("current")
    if not isinstance(current, dict) or not isinstance(current.get("model_dir"), str):
        return None, 'its "current" entry needs a "model_dir"'
    return record, None


def read_record(models_dir: Path) -> dict[str, Any] | None:
    """The champion record, None where there is none yet; a ChampionRecordError naming the file and the
    repair (the last good version kept beside it, where it can be read) if it cannot be read."""
    path = Path(models_dir) / RECORD
    record, problem = _problem(path)
    if problem is None:
        return record
    previous = path.with_name(PREVIOUS)
    if _problem(previous)[0] is not None:
        repair = f"restore the last good version with `cp {previous} {path}`, or move {path} away to start with no champion"
    else:
        repair = f"no readable earlier version is kept ({previous}); move {path} away to start with no champion (the next run promotes)"
    raise ChampionRecordError(f"{path}: the champion record cannot be read ({problem}); {repair}")


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


def decide(candidate: dict, champion: dict | None, cfg: PromoteConfig, compared: dict | None = None) -> tuple[str, str]:
    """(decision, reason) from held-out metrics {"loss", "format_adherence"} of both models and, for the
    interval rule, their per-prompt comparison (finetune.reporting.stats.compare_models)."""
    if champion is None:
        return PROMOTED, "no champion yet"
    if cfg.rule == "interval":
        if compared is None:
            raise InternalError("promote.rule=interval needs the per-prompt comparison of candidate and champion")
        gain, adherence = compared["loss_gain"], compared["format_adherence"]
        shown = f"held-out loss gain {gain['delta']:+.4f} [95% {gain['low']:+.4f}, {gain['high']:+.4f}]"
        if gain["low"] <= cfg.min_loss_gain:
            return KEPT, f"{shown}: not clearly above promote.min_loss_gain={cfg.min_loss_gain} (promote.rule=interval)"
        if adherence["high"] < 0:
            return KEPT, f"format adherence {adherence['delta']:+.3f} [95% {adherence['low']:+.3f}, {adherence['high']:+.3f}]: clearly lower"
        return PROMOTED, f"{shown}, clearly above {cfg.min_loss_gain}; format adherence {adherence['delta']:+.3f} [95% {adherence['low']:+.3f}, {adherence['high']:+.3f}]"
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
    cfg: PromoteConfig, run_name: str, compared: dict | None = None, about: dict | None = None,
) -> dict:  # fmt: skip
    """Decide, promote when the candidate wins, and return the decision with its numbers. `champion` is
    the score of the model in `scored_dir`, the champion when this run looked; `compared`, the two per
    prompt (stats.compare_models); `about`, what the history keeps of the run (data_key, train_rows). Runs that reach
    the gate together take turns (a file lock), so no promotion is lost from the record or the history."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(models_dir / ".champion.lock"):
        _backfill_history(models_dir)
        decision = _decide_and_promote(models_dir, candidate_dir, candidate, scored_dir, champion, cfg, run_name, compared)
        append(models_dir, {
            "at": _now(), "run_name": run_name, **(about or {}), "model_dir": str(candidate_dir),
            **{name: decision.get(name) for name in ("decision", "reason", "candidate", "champion", "champion_dir", "compared", "rule")},
        })  # fmt: skip
        return decision


def _backfill_history(models_dir: Path) -> None:
    """Before the first line of history.jsonl: the promotions champion.json already holds (from before the
    history was kept), oldest first, so that the history starts with the first champion."""
    if (models_dir / HISTORY).exists() or (record := read_record(models_dir)) is None:
        return
    for entry in record["history"]:
        append(models_dir, {
            "at": entry.get("promoted_at"), "run_name": entry.get("run_name"), "decision": "rollback" if entry.get("rollback") else PROMOTED,
            "reason": entry.get("reason"), "candidate": entry.get("metrics"), "model_dir": entry.get("model_dir"),
            "champion_dir": entry.get("replaced"), "from_record": True,
        })  # fmt: skip


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RollbackError(PermanentError, ValueError):
    """No earlier champion to put back, or its model folder is gone."""


def rollback(models_dir: Path, to_run: str | None = None) -> dict:
    """Make an earlier champion current again: the newest entry of the record's history with another model
    than the current one (or the newest of run `to_run`). Atomic like a promotion (the record, then the
    link), and recorded as a decision of its own in the record's history and in history.jsonl."""
    models_dir = Path(models_dir)
    with FileLock(models_dir / ".champion.lock"):
        record = read_record(models_dir)
        if record is None:
            raise RollbackError(f"{models_dir / RECORD}: no champion yet, nothing to roll back to")
        _backfill_history(models_dir)
        current = record["current"]
        earlier = [e for e in reversed(record["history"]) if not _same(Path(e["model_dir"]), Path(current["model_dir"]))]
        if to_run is not None:
            earlier = [e for e in earlier if e.get("run_name") == to_run]
        if not earlier:
            names = sorted({str(e.get("run_name")) for e in record["history"] if not _same(Path(e["model_dir"]), Path(current["model_dir"]))})
            known = f"earlier champions: {', '.join(names)}" if names else "the history has no other champion"
            raise RollbackError(f"{models_dir / RECORD}: no earlier champion {'from run ' + to_run if to_run else ''} to put back; {known}")
        target = earlier[0]
        model_dir = Path(target["model_dir"])
        if not (model_dir / "config.json").is_file():
            raise RollbackError(f"{model_dir}: the model of run {target.get('run_name')} is gone; pick another with --to")
        reason = f"rollback from {current.get('run_name')} to {target.get('run_name')}"
        entry = {
            "model_dir": str(model_dir), "run_name": target.get("run_name"), "promoted_at": _now(), "metrics": target.get("metrics"),
            "replaced": current["model_dir"], "reason": reason, "rollback": True,
        }  # fmt: skip
        promote(models_dir, entry)
        append(models_dir, {
            "at": entry["promoted_at"], "run_name": target.get("run_name"), "decision": "rollback", "reason": reason,
            "candidate": target.get("metrics"), "champion": current.get("metrics"), "champion_dir": current["model_dir"],
            "model_dir": str(model_dir),
        })  # fmt: skip
        return entry


def _decide_and_promote(
    models_dir: Path, candidate_dir: Path, candidate: dict, scored_dir: Path | None, champion: dict | None,
    cfg: PromoteConfig, run_name: str, compared: dict | None,
) -> dict:  # fmt: skip
    current = champion_model_dir(models_dir)
    decision: dict[str, Any] = {
        "candidate_dir": str(candidate_dir), "champion_dir": str(current) if current else None,
        "candidate": candidate, "champion": champion, "rule": cfg.rule, "min_loss_gain": cfg.min_loss_gain,
        "compared": compared,
    }  # fmt: skip
    if current is not None and _same(candidate_dir, current):
        return {**decision, "decision": NO_CHANGE, "reason": "the candidate is the champion: nothing changed"}
    if current is not None and not current.is_dir():
        verdict, reason = PROMOTED, f"the champion's folder {current} is gone"
    elif not _same(scored_dir, current):  # another run promoted after this one scored the champion
        verdict, reason = KEPT, f"the champion changed to {current} while this run compared with {scored_dir}; run again to compare"
    else:
        verdict, reason = decide(candidate, champion, cfg, compared)
    decision.update(decision=verdict, reason=reason)
    if verdict == PROMOTED:
        promote(models_dir, {"model_dir": str(Path(candidate_dir).resolve()), "run_name": run_name,
                             "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": candidate,
                             "replaced": str(current) if current else None, "reason": reason})  # fmt: skip
    return decision


def promote(models_dir: Path, entry: dict) -> None:
    """Make `entry["model_dir"]` the champion: the record first (one atomic write, after the version it
    replaces is kept as champion.json.prev), then the link. A record that cannot be read is never
    overwritten: the ChampionRecordError stops the promotion."""
    models_dir.mkdir(parents=True, exist_ok=True)
    current = read_record(models_dir)
    if current is not None:
        write_text_atomic(models_dir / PREVIOUS, (models_dir / RECORD).read_text(encoding="utf-8"))
    history = (current or {}).get("history", [])
    write_text_atomic(models_dir / RECORD, json.dumps({"current": entry, "history": [*history, entry]}, indent=2))
    _switch_link(models_dir / LINK, Path(entry["model_dir"]))
