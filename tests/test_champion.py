"""The promotion gate both ways, and a champion pointer that a kill never leaves half-switched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from finetune.core.champion import (
    KEPT,
    NO_CHANGE,
    PROMOTED,
    ChampionRecordError,
    RollbackError,
    champion_model_dir,
    decide,
    gate,
    read_record,
    rollback,
)
from finetune.core.config import PromoteConfig
from finetune.core.history import read_history
from finetune.reporting.history import history_markdown
from finetune.reporting.stats import compare_models
from tests.conftest import ROOT

CFG = PromoteConfig(rule="point", min_loss_gain=0.05)


@pytest.mark.parametrize(
    ("candidate", "champion", "expected"),
    [
        ({"loss": 2.0, "format_adherence": 1.0}, None, PROMOTED),
        ({"loss": 2.0, "format_adherence": 1.0}, {"loss": 2.5, "format_adherence": 0.9}, PROMOTED),
        ({"loss": 2.0, "format_adherence": 1.0}, {"loss": 2.0, "format_adherence": 1.0}, KEPT),  # equal
        ({"loss": 2.46, "format_adherence": 1.0}, {"loss": 2.5, "format_adherence": 1.0}, KEPT),  # inside the margin
        ({"loss": 2.6, "format_adherence": 1.0}, {"loss": 2.5, "format_adherence": 1.0}, KEPT),  # worse
        ({"loss": 2.0, "format_adherence": 0.8}, {"loss": 2.5, "format_adherence": 0.9}, KEPT),  # format fell
    ],
)
def test_decide(candidate, champion, expected):
    assert decide(candidate, champion, CFG)[0] == expected


def _scored(losses, tokens, adherent) -> pd.DataFrame:
    """score's per-prompt figures: mean loss per response token, the response's tokens, format adherence."""
    return pd.DataFrame({"loss": losses, "tokens": tokens, "format_adherence": adherent})


def test_the_interval_rule_promotes_a_clear_gain_and_keeps_one_inside_the_noise():
    """25 prompts. A candidate 0.02 nats better on average but with per-prompt swings of +-1 nat: the point
    rule promotes it, the interval rule keeps the champion (the gain's interval spans 0). A candidate 0.05
    better on every prompt is promoted by both; one that also breaks the format on 6 of 25 prompts is kept."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, size=25)
    champion_loss = rng.uniform(2.0, 3.0, size=25)
    swings = np.tile([1.0, -1.0], 13)[:25]
    noisy = champion_loss - 0.02 + swings - np.average(swings, weights=tokens)  # mean gain 0.02 per token, exactly
    champion = _scored(champion_loss, tokens, np.ones(25))
    interval = PromoteConfig()  # rule interval, margin 0

    def whole(frame):
        return {"loss": float((frame.loss * frame.tokens).sum() / frame.tokens.sum()), "format_adherence": float(frame.format_adherence.mean())}

    candidate = _scored(noisy, tokens, np.ones(25))
    compared = compare_models(candidate, champion)
    assert compared["loss_gain"]["delta"] == pytest.approx(0.02) and compared["loss_gain"]["low"] < 0 < compared["loss_gain"]["high"]
    assert decide(whole(candidate), whole(champion), PromoteConfig(rule="point"))[0] == PROMOTED
    verdict, reason = decide(whole(candidate), whole(champion), interval, compared)
    assert verdict == KEPT and "not clearly above promote.min_loss_gain=0.0" in reason

    clear = _scored(champion_loss - 0.05, tokens, np.ones(25))
    compared = compare_models(clear, champion)
    assert compared["loss_gain"]["low"] > 0.04
    assert decide(whole(clear), whole(champion), interval, compared)[0] == PROMOTED
    assert decide(whole(clear), whole(champion), PromoteConfig(min_loss_gain=0.06), compared)[0] == KEPT  # the margin

    broken = _scored(champion_loss - 0.05, tokens, np.r_[np.zeros(6), np.ones(19)])
    verdict, reason = decide(whole(broken), whole(champion), interval, compare_models(broken, champion))
    assert verdict == KEPT and reason.startswith("format adherence -0.240 [95% ") and reason.endswith("clearly lower")


def _model(tmp_path, name):
    folder = tmp_path / "outputs" / name / "model"
    folder.mkdir(parents=True)
    return folder


def test_gate_promotes_a_better_candidate_and_keeps_the_champion_against_a_worse_one(tmp_path):
    models, first, second, third = tmp_path / "models", _model(tmp_path, "a"), _model(tmp_path, "b"), _model(tmp_path, "c")

    assert gate(models, first, {"loss": 3.0, "format_adherence": 0.5}, None, None, CFG, "run-1")["decision"] == PROMOTED
    assert gate(models, first, {"loss": 3.0, "format_adherence": 0.5}, first, None, CFG, "run-2")["decision"] == NO_CHANGE
    better = gate(models, second, {"loss": 2.0, "format_adherence": 0.9}, first, {"loss": 3.0, "format_adherence": 0.5}, CFG, "run-3")
    assert better["decision"] == PROMOTED and better["champion_dir"] == str(first)
    worse = gate(models, third, {"loss": 2.5, "format_adherence": 1.0}, second, {"loss": 2.0, "format_adherence": 0.9}, CFG, "run-4")
    assert worse["decision"] == KEPT and "gain -0.5000 < promote.min_loss_gain=0.05" in worse["reason"]
    # A run that compared with an earlier champion (another run promoted meanwhile) does not promote.
    stale = gate(models, third, {"loss": 0.1, "format_adherence": 1.0}, first, {"loss": 3.0, "format_adherence": 0.5}, CFG, "run-5")
    assert stale["decision"] == KEPT and "the champion changed" in stale["reason"]

    assert (models / "champion").resolve() == second.resolve()
    record = read_record(models)
    assert [entry["run_name"] for entry in record["history"]] == ["run-1", "run-3"]
    assert record["current"]["model_dir"] == str(second.resolve()) and record["current"]["replaced"] == str(first.resolve())


_PROMOTE_THEN_DIE = textwrap.dedent("""\
    import os, signal, sys
    from pathlib import Path
    import finetune.core.champion as champion

    models, target, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    if step == "before-record":  # killed inside the record's atomic write, before its rename
        champion.write_text_atomic = lambda path, text: (path.with_name(".partial").write_text(text[:20]), die())
    else:  # killed after the record, before the link is switched
        champion._switch_link = die
    champion.promote(models, {"model_dir": str(target), "run_name": "killed"})
""")


@pytest.mark.parametrize("step", ["before-record", "before-link"])
def test_a_kill_between_steps_never_leaves_a_half_switched_champion(tmp_path, step):
    models, old, new = tmp_path / "models", _model(tmp_path, "old"), _model(tmp_path, "new")
    gate(models, old, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1")

    killed = subprocess.run([sys.executable, "-c", _PROMOTE_THEN_DIE, str(models), str(new), step], cwd=ROOT, env=os.environ)
    assert killed.returncode == -signal.SIGKILL

    link = models / "champion"
    assert link.is_symlink() and link.resolve() == old.resolve()  # the link is whole: still the old champion
    record = json.loads((models / "champion.json").read_text())  # and the record is whole JSON
    expected = old if step == "before-record" else new
    assert record["current"]["model_dir"] == str(expected)
    assert champion_model_dir(models) == expected  # the next gate reads the record and lines the link up
    assert link.resolve() == expected.resolve()


def test_a_deleted_champion_folder_is_replaced(tmp_path):
    import shutil

    models, first, second = tmp_path / "models", _model(tmp_path, "a"), _model(tmp_path, "b")
    gate(models, first, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1")
    shutil.rmtree(first)

    decision = gate(models, second, {"loss": 3.5, "format_adherence": 0.5}, None, None, CFG, "run-2")

    assert decision["decision"] == PROMOTED and "is gone" in decision["reason"]
    assert (models / "champion").resolve() == second.resolve()


def test_a_promotion_keeps_the_record_it_replaces_and_an_unreadable_record_names_its_repair(tmp_path):
    import shutil

    models, first, second, third = tmp_path / "models", _model(tmp_path, "a"), _model(tmp_path, "b"), _model(tmp_path, "c")
    record, previous = models / "champion.json", models / "champion.json.prev"
    gate(models, first, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1")
    assert not previous.exists()  # nothing was replaced
    after_first = record.read_text()
    gate(models, second, {"loss": 2.0, "format_adherence": 1.0}, first, {"loss": 3.0, "format_adherence": 1.0}, CFG, "run-2")
    assert previous.read_text() == after_first

    record.write_text(record.read_text()[:40])  # half-written by another tool
    with pytest.raises(ChampionRecordError) as error:
        read_record(models)
    assert str(error.value).startswith(f"{record}: the champion record cannot be read (not valid JSON: ")
    assert str(error.value).endswith(f"restore the last good version with `cp {previous} {record}`, or move {record} away to start with no champion")
    damaged = record.read_text()
    with pytest.raises(ChampionRecordError):  # a promotion never writes over it
        gate(models, third, {"loss": 1.0, "format_adherence": 1.0}, None, None, CFG, "run-3")
    assert (record.read_text(), previous.read_text()) == (damaged, after_first)

    shutil.copy(previous, record)  # the repair the message names
    assert champion_model_dir(models) == first.resolve()

    record.write_text(json.dumps({"current": {"run_name": "run-1"}, "history": []}))  # edited by hand
    previous.unlink()
    with pytest.raises(ChampionRecordError) as error:
        read_record(models)
    assert '(its "current" entry needs a "model_dir"); no readable earlier version is kept' in str(error.value)


def test_every_decision_is_in_the_history_and_a_rollback_puts_an_earlier_champion_back(tmp_path):
    models = tmp_path / "models"
    first, second, third = (_model(tmp_path, name) for name in "abc")
    for folder in (first, second, third):
        (folder / "config.json").write_text("{}")
    with pytest.raises(RollbackError, match="no champion yet, nothing to roll back to"):
        rollback(models)
    gate(models, first, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1", about={"data_key": "k1", "train_rows": 100})
    with pytest.raises(RollbackError, match="the history has no other champion"):
        rollback(models)
    gate(models, second, {"loss": 2.0, "format_adherence": 1.0}, first, {"loss": 3.0, "format_adherence": 1.0}, CFG, "run-2")
    gate(models, third, {"loss": 2.5, "format_adherence": 1.0}, second, {"loss": 2.0, "format_adherence": 1.0}, CFG, "run-3")
    gate(models, second, {"loss": 2.0, "format_adherence": 1.0}, second, None, CFG, "run-4")

    back = rollback(models)  # the one before the current: run-1's model

    assert (back["run_name"], back["replaced"], back["rollback"]) == ("run-1", str(second.resolve()), True)
    assert champion_model_dir(models) == first.resolve() and (models / "champion").resolve() == first.resolve()
    record = read_record(models)
    assert [e["run_name"] for e in record["history"]] == ["run-1", "run-2", "run-1"] and record["history"][-1]["rollback"]
    assert rollback(models, "run-2")["run_name"] == "run-2"  # --to: a named run's champion
    with pytest.raises(RollbackError, match="no earlier champion from run run-3 to put back; earlier champions: run-1"):
        rollback(models, "run-3")  # kept, never a champion

    entries, unreadable = read_history(models)
    assert [(e["run_name"], e["decision"]) for e in entries] == [
        ("run-1", PROMOTED), ("run-2", PROMOTED), ("run-3", KEPT), ("run-4", NO_CHANGE), ("run-1", "rollback"), ("run-2", "rollback")]
    assert (entries[0]["data_key"], entries[0]["train_rows"], unreadable) == ("k1", 100, [])
    assert entries[2]["candidate"] == {"loss": 2.5, "format_adherence": 1.0} and entries[2]["champion"]["loss"] == 2.0

    with open(models / "history.jsonl", "a") as history:
        history.write('{"run_name": "cut-off')  # a write a crash cut short
    gate(models, third, {"loss": 9.0, "format_adherence": 1.0}, second, {"loss": 2.0, "format_adherence": 1.0}, CFG, "run-5")
    entries, unreadable = read_history(models)
    assert (entries[-1]["run_name"], unreadable) == ("run-5", [7])
    table = history_markdown(entries, unreadable)
    assert "| run-3 | kept |" in table and "Lines 7 of history.jsonl could not be read and are left out." in table

    shutil.rmtree(first)
    with pytest.raises(RollbackError, match=f"{first}: the model of run run-1 is gone; pick another with --to"):
        rollback(models, "run-1")


def test_the_history_starts_with_the_promotions_the_record_held_before_it_was_kept(tmp_path):
    """A models folder from before history.jsonl: its first decision writes the record's promotions first."""
    models, first, second, third = tmp_path / "models", _model(tmp_path, "a"), _model(tmp_path, "b"), _model(tmp_path, "c")
    gate(models, first, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1")
    gate(models, second, {"loss": 2.0, "format_adherence": 1.0}, first, {"loss": 3.0, "format_adherence": 1.0}, CFG, "run-2")
    (models / "history.jsonl").unlink()  # as an older version left it: champion.json only

    gate(models, third, {"loss": 2.5, "format_adherence": 1.0}, second, {"loss": 2.0, "format_adherence": 1.0}, CFG, "run-3")

    entries, _ = read_history(models)
    assert [(e["run_name"], e["decision"], e.get("from_record", False)) for e in entries] == [
        ("run-1", PROMOTED, True), ("run-2", PROMOTED, True), ("run-3", KEPT, False)]
    assert entries[1]["candidate"] == {"loss": 2.0, "format_adherence": 1.0} and entries[1]["champion_dir"] == str(first.resolve())


def test_finetune_history_shows_the_decisions_and_names_an_unreadable_record(tmp_path):
    models, first = tmp_path / "models", _model(tmp_path, "a")
    gate(models, first, {"loss": 3.0, "format_adherence": 1.0}, None, None, CFG, "run-1", about={"data_key": "0123456789abcdef", "train_rows": 104})

    def history() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "finetune.cli", "history", "--set", f"paths.models_dir={models}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip

    shown = history()
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split()[1:6] == ["run-1", "promoted", "0123456789ab", "104", "3.0000"]
    assert shown.stdout.splitlines()[-1] == f"champion: run-1 ({first.resolve()})"
    (models / "champion.json").write_text('{"current": ')
    damaged = history()
    assert damaged.returncode == 1 and "run-1" in damaged.stdout  # the history is still shown
    assert damaged.stderr.startswith(f"finetune: {models / 'champion.json'}: the champion record cannot be read (not valid JSON: Expecting value (line 1, column 13))")
