"""The whole flow under a Prefect test server, on a tiny random Llama: stages, record, artifacts, cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, workspace_overrides

STAGES = ["prepare", "resolve_model", "tokenize", "quantize_base", "train", "evaluate", "merge", "score"]


def _artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


def _task_states(flow_run_id: str) -> dict[str, str]:
    """Prefect's own record: task name -> state name of each task run of the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def tiny_overrides(workspace, tiny_model_dir):
    def make(*extra: str) -> list[str]:
        return [*workspace_overrides(workspace), f"model.base={tiny_model_dir}", *extra]

    return make


@pytest.fixture(scope="module")
def first(tiny_flow_run) -> dict:
    """The record of the first run of the tiny flow; its data has a blank row in extra.jsonl."""
    return tiny_flow_run[0]


@pytest.fixture(scope="module")
def second(tiny_flow_run, first) -> dict:
    """The same run again: nothing changed."""
    from flows.finetune_flow import finetune

    return finetune(TINY, tiny_flow_run[1])


@pytest.fixture(scope="module")
def third(tiny_flow_run, second) -> dict:
    """A larger adapter trained for half an epoch: a new candidate against the champion of the first run."""
    from flows.finetune_flow import finetune

    return finetune(TINY, [*tiny_flow_run[1], "lora.r=16", "train.epochs=0.5"])


def test_the_first_run_completes_every_stage_and_learns(first):
    assert first["status"] == "completed"
    assert list(first["stages"]) == STAGES
    assert {s["state"] for s in first["stages"].values()} == {"completed"}
    assert _task_states(first["flow_run_id"]) == dict.fromkeys([*STAGES, "promote", "publish-reports"], "Completed")
    metrics = first["metrics"]
    assert metrics["train_steps"] == 13  # 104 pairs less the blank one / (4 x 2) per step, one epoch
    per_layer = 2 * (64 * 8 + 8 * 64) + 2 * (64 * 8 + 8 * 32)  # A and B of r=8: q, o 64->64; k, v 64->32 (2 KV heads)
    assert metrics["trainable_params"] == 2 * per_layer  # 2 layers
    loss = metrics["eval_differences"]["loss"]  # 13 steps at lr 1e-3 lower every example's loss: the interval says so
    assert loss["delta"] < 0 and loss["high"] < 0 and loss["excludes_zero"]
    assert metrics["eval_loss_tuned"] < metrics["eval_loss_base"]
    assert set(metrics["eval_differences"]) == {"loss", "rouge_l", "format_adherence", "new_tokens"}


def test_the_run_record_holds_the_config_the_reports_and_the_pictures(first, tiny_flow_run):
    workspace = tiny_flow_run[2]
    run_dir = workspace / "runs" / first["run_name"]
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["flow_run_id"] == first["flow_run_id"]
    assert on_disk["versions"]["prefect"].startswith("3.")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.yaml", "run.json", "run_card.md", "data_report.md", "evaluation.md", "training_curve.png", "evaluation.png"]
    )
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss = first["metrics"]["eval_differences"]["loss"]
    card = (run_dir / "run_card.md").read_text()
    assert f"{loss['delta']:+.3f} [{loss['low']:+.3f}, {loss['high']:+.3f}] *" in card
    assert f"`{first['stages']['train']['key']}`" in card
    assert "r: 8" in (run_dir / "config.yaml").read_text()


def test_the_artifacts_show_the_run_and_its_rejected_row(first):
    artifacts = _artifacts(first["flow_run_id"])
    assert {"run-card", "data-report", "training-curve", "training-loss", "training-progress", "evaluation", "adapter", "merged-model",
            "promotion", "retraining-history", "rejected-rows"} == set(artifacts)  # fmt: skip
    assert "](data:image/png;base64," in artifacts["training-curve"].data and "](data:image/png;base64," in artifacts["evaluation"].data
    assert "| loss per response token |" in artifacts["evaluation"].data
    assert artifacts["training-progress"].data == 100.0
    assert len(json.loads(artifacts["training-loss"].data)) == 13
    table = json.loads(artifacts["rejected-rows"].data)  # the blank row of extra.jsonl, with file and line
    assert [(row["stage"], row["source_line"]) for row in table] == [("prepare", "1")]
    assert table[0]["source_file"].endswith("extra.jsonl")
    assert table[0]["reason"].startswith("instruction is empty after trimming whitespace")


def test_the_merged_model_loads_alone_and_answers_as_the_gate_scored_it(first, tiny_flow_run):
    """Plain transformers, prompted through the saved chat template, gives the answers `score` recorded."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = Path(first["stages"]["merge"]["output_dir"]) / "model"
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, padding_side="left")
    samples = pd.read_json(Path(first["stages"]["score"]["output_dir"]) / "samples.jsonl", lines=True)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
               for text in samples.instruction]  # fmt: skip
    assert prompts[0] == f"### HUMAN:\n{samples.instruction[0]}\n\n### RESPONSE:\n"  # the training prompt, exactly

    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1] :]
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]
    assert sum(len(row) for row in generated) > 0
    assert answers == list(samples.answer)


def test_the_first_run_promotes_its_model(first, tiny_flow_run):
    workspace = tiny_flow_run[2]
    assert first["promotion"]["decision"] == "promoted" and first["promotion"]["reason"] == "no champion yet"
    assert (workspace / "models" / "champion").resolve() == (Path(first["stages"]["merge"]["output_dir"]) / "model").resolve()
    assert "Promotion: **promoted**" in _artifacts(first["flow_run_id"])["promotion"].data
    assert "Promotion: **promoted**" in (workspace / "runs" / first["run_name"] / "run_card.md").read_text()


def test_an_unchanged_rerun_is_all_cached_and_changes_nothing(first, second, tiny_flow_run):
    workspace = tiny_flow_run[2]
    assert {name: s["state"] for name, s in second["stages"].items()} == dict.fromkeys(STAGES, "cached")
    assert {name: state for name, state in _task_states(second["flow_run_id"]).items() if name in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert {name: s["key"] for name, s in second["stages"].items()} == {name: s["key"] for name, s in first["stages"].items()}
    assert second["metrics"] == first["metrics"]
    assert second["promotion"]["decision"] == "no change"
    assert len(json.loads((workspace / "models" / "champion.json").read_text())["history"]) == 1
    assert {"run-card", "data-report", "training-loss", "evaluation"} <= set(_artifacts(second["flow_run_id"]))
    for picture in ("training_curve.png", "evaluation.png"):  # the same pictures, kept by what they show
        assert Path(second["run_dir"], picture).read_bytes() == Path(first["run_dir"], picture).read_bytes()


def test_each_stage_records_its_peak_memory_from_its_own_start(first):
    stages = first["stages"]
    assert all(s["peak_rss_bytes"] > 50 * 2**20 for s in stages.values())  # a Python process with torch loaded
    assert all(s["peak_gpu_bytes"] is None for s in stages.values())  # CPU: no GPU figure rather than a wrong one
    # Each is measured from the stage's own start: tokenizing a hundred rows peaks far below training.
    assert stages["tokenize"]["peak_rss_bytes"] < stages["train"]["peak_rss_bytes"]


def test_a_lora_change_reruns_train_onwards_and_the_gate_applies_its_rule(first, third, tiny_flow_run):
    workspace = tiny_flow_run[2]
    states = {name: s["state"] for name, s in third["stages"].items()}
    assert states == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached", "quantize_base": "cached",
                      "train": "completed", "evaluate": "completed", "merge": "completed",
                      "score": "completed", "score_champion": "cached"}  # fmt: skip
    assert third["stages"]["train"]["key"] != first["stages"]["train"]["key"]
    assert third["metrics"]["trainable_params"] == 2 * first["metrics"]["trainable_params"]

    def scored(stage: str) -> dict:
        return json.loads(Path(third["stages"][stage]["output_dir"], "metrics.json").read_text())

    candidate, champion, gate = scored("score"), scored("score_champion"), third["promotion"]
    assert (gate["candidate"]["loss"], gate["champion"]["loss"]) == (candidate["loss"], champion["loss"])
    compared = gate["compared"]  # promote.rule: interval, min_loss_gain: 0
    assert compared["loss_gain"]["delta"] == pytest.approx(champion["loss"] - candidate["loss"], abs=1e-4)
    beats = compared["loss_gain"]["low"] > 0 and compared["format_adherence"]["high"] >= 0
    assert gate["decision"] == ("promoted" if beats else "kept")
    history = json.loads((workspace / "models" / "champion.json").read_text())["history"]
    assert len(history) == (2 if beats else 1)
    expected = third if beats else first
    assert (workspace / "models" / "champion").resolve() == Path(expected["stages"]["merge"]["output_dir"], "model").resolve()


def test_a_failing_stage_fails_the_run_and_is_recorded(prefect_server, tiny_overrides, workspace):
    from flows.finetune_flow import StageFailed, finetune

    (workspace / "data" / "eval" / "heldout.jsonl").write_text("")  # an empty evaluation set

    with pytest.raises(StageFailed) as failure:
        finetune(TINY, tiny_overrides())

    assert failure.value.stage == "prepare"
    assert failure.value.reason.endswith("heldout.jsonl: the file is empty; add pairs or remove it")
    record = json.loads((failure.value.run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["stages"]["prepare"]["state"] == "failed"
    assert "train" not in record["stages"]


def test_a_key_that_cannot_be_computed_fails_the_run_instead_of_running_uncached(prefect_server, tiny_overrides, monkeypatch):
    from finetune.core import stage as stage_module
    from flows.finetune_flow import StageFailed, finetune

    def broken(module: str) -> str:
        raise RuntimeError(f"cannot read the code of {module}")

    monkeypatch.setattr(stage_module, "code_digest", broken)

    with pytest.raises(StageFailed, match="stage prepare failed: cannot read the code of finetune.stages.prepare") as failure:
        finetune(TINY, tiny_overrides())

    record = json.loads((failure.value.run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["prepare"]["state"] == "failed"
    assert not set(_task_states(record["flow_run_id"])) & set(STAGES)  # no stage task ran, cached or not


def test_an_unreadable_champion_record_stops_the_run_before_any_stage(prefect_server, tiny_overrides, workspace, first):
    """Also: the run's start finds the records of runs elsewhere that can never finish (another host's,
    whose flow run the server knows has ended) and marks them crashed, with when they were last seen."""
    from flows.finetune_flow import StageFailed, finetune

    for name, flow_run_id in (("lost", first["flow_run_id"]), ("unknown", "00000000-0000-0000-0000-000000000000")):
        (workspace / "runs" / name).mkdir(parents=True)
        (workspace / "runs" / name / "run.json").write_text(json.dumps({
            "run_name": name, "status": "running", "flow_run_id": flow_run_id, "updated_at": "2026-12-01T03:00:00Z",
            "process": {"host": "a-machine-that-was-lost", "pid": 4242}}))  # fmt: skip
    (workspace / "models").mkdir()
    (workspace / "models" / "champion.json").write_text('{"current": {"model_dir": "/models/a"}, "hist')

    with pytest.raises(StageFailed) as failure:
        finetune(TINY, tiny_overrides())

    assert failure.value.stage == "champion"
    assert failure.value.reason.startswith(f"{workspace / 'models' / 'champion.json'}: the champion record cannot be read (not valid JSON")
    record = json.loads((failure.value.run_dir / "run.json").read_text())
    assert (record["status"], record["stages"]) == ("failed", {})
    assert record["error"] == f"champion: {failure.value.reason}"
    lost, unknown = (json.loads((workspace / "runs" / name / "run.json").read_text()) for name in ("lost", "unknown"))
    assert lost["status"] == "crashed" and unknown["status"] == "running"  # the server knows nothing of the second
    assert lost["error"].startswith("the run's process (pid 4242 on a-machine-that-was-lost) never finished this record; Prefect reports its flow run COMPLETED")
    assert "; last seen alive at 2026-12-01T03:00:00Z;" in lost["error"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120)


def test_the_history_shows_every_run_in_the_ui_and_on_the_command_line(tiny_flow_run, second, third):
    """Each run publishes a new version of the keyed artifact retraining-history (read back from the server
    for the third run: its picture and a row per decision so far); `finetune history` prints the same rows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retraining-history"])))
    ours = {str(v.flow_run_id): v.data for v in versions if str(v.flow_run_id) in {r["flow_run_id"] for r in (tiny_flow_run[0], second, third)}}
    assert len(ours) == 3  # one version per run
    latest = ours[third["flow_run_id"]]
    assert "![held-out loss across retrains](data:image/png;base64," in latest
    decisions = [(tiny_flow_run[0]["run_name"], "promoted"), (second["run_name"], "no change"), (third["run_name"], third["promotion"]["decision"])]
    for run_name, decision in decisions:
        assert f"| {run_name} | {decision} | {first_key(tiny_flow_run[0])} |" in latest
    rows = [line for line in latest.splitlines() if line.startswith("| 20")]  # runs of other tests share this models folder
    assert f"{len(rows)} decisions, oldest first" in latest and rows[-1].split(" | ")[1] == third["run_name"]

    sets = [arg for item in tiny_flow_run[1] for arg in ("--set", item)]
    printed = _cli("history", "--config", TINY, *sets)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0].split() == ["when", "run", "decision", "data", "key", "rows", "candidate", "loss", "champion", "loss", "loss", "gain", "[95%]"]
    printed_rows = {line.split()[1]: line.split()[2] for line in lines[1:-1]}
    assert all(printed_rows[run] == decision.split()[0] for run, decision in decisions)
    assert len(lines) >= 1 + len(rows) + 1 and lines[-1].startswith("champion: ")


def first_key(record: dict) -> str:
    return record["stages"]["prepare"]["key"][:12]


def test_finetune_rollback_puts_the_earlier_champion_back_and_it_answers_as_that_model(tiny_flow_run, third, tmp_path):
    """Two real merged models promoted in turn into a models folder of its own; `finetune rollback` makes
    the first current again, and what models/champion points to loads and answers as the first model."""
    from transformers import AutoModelForCausalLM

    from finetune.core.champion import gate
    from finetune.core.config import PromoteConfig
    from finetune.stages.tokenize import load_tokenizer

    models = tmp_path / "models"
    first_model = Path(tiny_flow_run[0]["stages"]["merge"]["output_dir"]) / "model"
    third_model = Path(third["stages"]["merge"]["output_dir"]) / "model"
    point = PromoteConfig(rule="point")
    gate(models, first_model, {"loss": 3.0, "format_adherence": 1.0}, None, None, point, tiny_flow_run[0]["run_name"])
    gate(models, third_model, {"loss": 2.0, "format_adherence": 1.0}, first_model, {"loss": 3.0, "format_adherence": 1.0}, point, third["run_name"])
    assert (models / "champion").resolve() == third_model.resolve()

    sets = [arg for item in [*tiny_flow_run[1], f"paths.models_dir={models}"] for arg in ("--set", item)]
    done = _cli("rollback", "--config", TINY, *sets)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"champion: {tiny_flow_run[0]['run_name']} ({first_model.resolve()}), rollback from {third['run_name']} to ")
    assert (models / "champion").resolve() == first_model.resolve()
    tokenizer = load_tokenizer(first_model)
    prompt = tokenizer("### HUMAN:\nWhat is rain?\n\n### RESPONSE:\n", return_tensors="pt")

    def answer(folder: Path) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        return model.generate(**prompt, max_new_tokens=8, do_sample=False)[0].tolist()

    assert answer(models / "champion") == answer(first_model)
    assert answer(first_model) != answer(third_model)  # the rollback changed which model answers

    history = _cli("history", "--config", TINY, *sets)
    assert history.stdout.splitlines()[3].split()[1:3] == [tiny_flow_run[0]["run_name"], "rollback"]
    again = _cli("rollback", "--config", TINY, *sets, "--to", "no-such-run")
    assert again.returncode == 1 and again.stderr.startswith("finetune: rollback failed: ") and "earlier champions: " in again.stderr


def test_a_run_reports_its_data_against_the_data_its_champion_was_trained_on(first, third):
    assert first["data_changes"] is None  # no champion yet: nothing to compare
    changes = third["data_changes"]  # a LoRA change on the same data
    assert (Path(third["run_dir"]).parent / changes["champion_run"] / "run.json").is_file()
    assert changes["rows"] == {"then": 104, "now": 104, "added": 0, "removed": 0, "edited": 0}
    assert (changes["topic_shift"], changes["lengths"]["ks"]) == (0.0, 0.0)
    artifacts = _artifacts(third["flow_run_id"])
    assert "**0 added, 0 removed, 0 edited**" in artifacts["data-changes"].data
    assert f"## Data since the champion (run {changes['champion_run']})" in artifacts["data-report"].data
    card = Path(third["run_dir"], "run_card.md").read_text()
    assert f"Data since the champion (run {changes['champion_run']}): 0 rows added, 0 removed, 0 edited; topic shift 0.000" in card
