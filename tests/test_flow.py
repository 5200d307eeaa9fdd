"""The whole flow under a Prefect test server, on a tiny random Llama: stages, record, artifacts, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, workspace_overrides

STAGES = ["prepare", "resolve_model", "tokenize", "train", "evaluate", "merge", "score"]


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


def test_flow_runs_every_stage_then_serves_all_from_cache(tiny_flow_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.finetune_flow import finetune

    first, overrides, workspace = tiny_flow_run  # the first run; its data has a blank row in extra.jsonl

    assert first["status"] == "completed"
    assert list(first["stages"]) == STAGES
    assert {s["state"] for s in first["stages"].values()} == {"completed"}
    metrics = first["metrics"]
    assert metrics["train_steps"] == 13  # 104 pairs / (4 x 2), one epoch
    assert metrics["trainable_params"] > 0 and metrics["total_params"] > metrics["trainable_params"]
    assert metrics["eval_loss_base"] is not None and metrics["eval_loss_tuned"] is not None
    assert 0 <= metrics["format_adherence_tuned"] <= 1
    loss = metrics["eval_differences"]["loss"]  # 13 steps at lr 1e-3 lower every example's loss: the interval says so
    assert loss["delta"] < 0 and loss["high"] < 0 and loss["excludes_zero"]
    assert set(metrics["eval_differences"]) == {"loss", "rouge_l", "format_adherence", "new_tokens"}

    run_dir = workspace / "runs" / first["run_name"]
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["flow_run_id"] == first["flow_run_id"]
    assert on_disk["versions"]["prefect"].startswith("3.")
    assert {"config.yaml", "run.json", "run_card.md", "data_report.md", "evaluation.md", "training_curve.png", "evaluation.png"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{loss['delta']:+.3f} [{loss['low']:+.3f}, {loss['high']:+.3f}] *" in (run_dir / "run_card.md").read_text()
    assert "lora:" in (run_dir / "config.yaml").read_text()

    artifacts = _artifacts(first["flow_run_id"])
    assert {"run-card", "data-report", "training-curve", "training-loss", "training-progress", "evaluation", "adapter", "merged-model"} <= set(artifacts)
    assert "](data:image/png;base64," in artifacts["training-curve"].data and "](data:image/png;base64," in artifacts["evaluation"].data
    assert "| loss per response token |" in artifacts["evaluation"].data
    assert artifacts["training-progress"].data == 100.0
    assert len(json.loads(artifacts["training-loss"].data)) == 13
    table = json.loads(artifacts["rejected-rows"].data)  # the blank row of extra.jsonl, with file and line
    assert [(row["stage"], row["source_line"]) for row in table] == [("prepare", "1")]
    assert table[0]["source_file"].endswith("extra.jsonl")
    assert table[0]["reason"].startswith("instruction is empty after trimming whitespace")

    merged_dir = workspace / "outputs" / "merge" / first["stages"]["merge"]["key"] / "model"
    assert on_disk["stages"]["merge"]["output_dir"] == str(merged_dir.parent.resolve())
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    generated = model.generate(**tokenizer("### HUMAN:\nHi\n\n### RESPONSE:\n", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 0

    assert {name: state for name, state in _task_states(first["flow_run_id"]).items() if name in STAGES} == dict.fromkeys(
        STAGES, "Completed"
    )
    assert first["promotion"]["decision"] == "promoted" and first["promotion"]["reason"] == "no champion yet"
    assert (workspace / "models" / "champion").resolve() == merged_dir.resolve()
    assert "Promotion: **promoted**" in artifacts["promotion"].data and "Promotion: **promoted**" in (run_dir / "run_card.md").read_text()

    second = finetune(TINY, overrides)
    assert {name: s["state"] for name, s in second["stages"].items()} == dict.fromkeys(STAGES, "cached")
    assert {name: state for name, state in _task_states(second["flow_run_id"]).items() if name in STAGES} == dict.fromkeys(
        STAGES, "Cached"
    )
    assert {name: s["key"] for name, s in second["stages"].items()} == {name: s["key"] for name, s in first["stages"].items()}
    assert second["metrics"] == first["metrics"]
    assert second["promotion"]["decision"] == "no change"
    assert len(json.loads((workspace / "models" / "champion.json").read_text())["history"]) == 1
    assert {"run-card", "data-report", "training-loss", "evaluation"} <= set(_artifacts(second["flow_run_id"]))

    third = finetune(TINY, [*overrides, "lora.r=16", "train.epochs=0.5"])
    states = {name: s["state"] for name, s in third["stages"].items()}
    assert states == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached",
                      "train": "completed", "evaluate": "completed", "merge": "completed",
                      "score": "completed", "score_champion": "cached"}  # fmt: skip
    assert third["stages"]["train"]["key"] != first["stages"]["train"]["key"]
    assert third["metrics"]["trainable_params"] == 2 * first["metrics"]["trainable_params"]
    gate = third["promotion"]
    assert gate["champion"]["loss"] == json.loads(Path(third["stages"]["score_champion"]["output_dir"], "metrics.json").read_text())["loss"]
    champion = json.loads((workspace / "models" / "champion.json").read_text())
    promoted = gate["decision"] == "promoted"
    assert len(champion["history"]) == (2 if promoted else 1)
    expected = third if promoted else first
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
