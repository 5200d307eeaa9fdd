"""Faults and reruns: a killed training resumes, damaged checkpoints are skipped, only what is missing
reruns, concurrent runs share work, OOM halves the micro-batch, a NaN loss stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.core.config import load_config
from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

TINY = ROOT / "configs" / "tiny.yaml"
# Two epochs of 13 steps (8 examples each), a checkpoint every 2 steps: resume points in every epoch.
LONGER = ["train.epochs=2", "train.save_every_steps=2"]
# Absolute, per step, resumed vs uninterrupted on the same CPU (losses about 10.8): measured up to 7.2e-5,
# float noise that grows slowly after the resume; a wrong data order or a lost optimizer state is > 1e-2.
LOSS_TOLERANCE = 1e-3


def _overrides(workspace: Path, model_dir: Path, *extra: str) -> list[str]:
    return [*workspace_overrides(workspace), f"model.base={model_dir}", *extra]


def _cli(workspace: Path, overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [sys.executable, "-m", "finetune.cli", "run", "--config", str(TINY), *sets]


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # ephemeral mode, own database
    return {**env, "PREFECT_HOME": str(prefect_home), "PYTHONUNBUFFERED": "1"}


def _served_env(prefect_home: Path) -> dict[str, str]:
    """The session's test server instead of an ephemeral one per command (which costs each command about
    15 s here). It has no training slot (global concurrency limit), as in ephemeral mode."""
    from prefect.settings import get_current_settings

    return {**_env(prefect_home), "PREFECT_API_URL": str(get_current_settings().api.url)}


def _newest_record(workspace: Path) -> dict:
    newest = max((workspace / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((newest / "run.json").read_text())


def _states(record: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in record["stages"].items()}


def test_sigkill_in_second_epoch_resumes_from_checkpoint(prefect_server, workspace, tiny_model_dir, tmp_path):
    from finetune.stages.train import train_adapter

    for name in ("education.jsonl", "environment.jsonl", "health_wellness.jsonl"):  # 42 rows: 6 steps an epoch, 12 in all
        (workspace / "data/raw" / name).unlink()
    overrides = _overrides(workspace, tiny_model_dir, *LONGER)
    killed = subprocess.Popen(
        _cli(workspace, overrides), cwd=ROOT, env=_served_env(tmp_path / "prefect"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    killed_at = None
    for line in killed.stdout:
        if "step " in line and "/12" in line:
            step = int(line.split("step ")[1].split("/")[0])
            if step >= 9:  # second epoch (steps 7..12), after its first checkpoint (step 8)
                os.killpg(killed.pid, signal.SIGKILL)
                killed_at = step
                break
    killed.wait(timeout=60)
    assert killed_at is not None, "training never reached the second epoch"

    rerun = subprocess.run(_cli(workspace, overrides), cwd=ROOT, env=_served_env(tmp_path / "prefect"), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    record = _newest_record(workspace)
    assert _states(record) == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached", "quantize_base": "cached",
                               "train": "completed", "evaluate": "completed", "merge": "completed",
                               "score": "completed"}  # fmt: skip
    (killed_record,) = [r for r in map(json.loads, map(Path.read_text, (workspace / "runs").glob("*/run.json"))) if r["run_name"] != record["run_name"]]
    assert killed_record["status"] == "crashed"  # the rerun found its process gone and said so
    assert f"pid {killed.pid} on " in killed_record["error"]
    resumed = record["metrics"]["resumed_from_step"]
    assert 8 <= resumed <= killed_at and resumed % 2 == 0
    assert record["metrics"]["train_steps"] == 12

    # The same training without interruption, in-process, from the same tokenized data; checkpoints only
    # cost time here (saving one changes no number of the training).
    config = load_config(TINY, [*overrides, "train.save_every_steps=1000"])
    tokenized_dir = Path(record["stages"]["tokenize"]["output_dir"])
    model_dir = Path(record["stages"]["resolve_model"]["output_dir"])
    reference = train_adapter(train_inputs(config, tokenized_dir, model_dir), tmp_path / "reference")
    expected = {e["step"]: e["loss"] for e in json.loads((reference / "log_history.json").read_text())}
    resumed_dir = Path(record["stages"]["train"]["output_dir"])
    got = {e["step"]: e["loss"] for e in json.loads((resumed_dir / "log_history.json").read_text())}
    after = [step for step in got if step > resumed]
    assert len(after) == 12 - resumed
    assert max(abs(got[s] - expected[s]) for s in after) <= LOSS_TOLERANCE


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(workspace, tiny_model_dir, monkeypatch):
    import transformers

    from finetune.stages.train import checkpoints_dir, train_adapter

    config = load_config(TINY, _overrides(workspace, tiny_model_dir, "train.save_every_steps=2"))  # 13 steps
    root = workspace / "out"
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
    inputs = train_inputs(config, tokenized_dir, tiny_model_dir)

    original = transformers.Trainer.training_step

    def crash_at_step_9(self, *args, **kwargs):
        if self.state.global_step == 9:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_at_step_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_adapter(inputs, root)
    monkeypatch.setattr(transformers.Trainer, "training_step", original)

    work = checkpoints_dir(root, train_adapter.key(inputs))
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    weights = work / "checkpoint-8" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    out = train_adapter(inputs, root)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6
    assert summary["train_steps"] == 13


@pytest.fixture
def run_flow(prefect_server, workspace, tiny_model_dir):
    from flows.finetune_flow import finetune

    def run(*extra: str) -> dict:  # a quarter epoch (4 steps): these tests are about what reruns, not training
        return finetune(str(TINY), _overrides(workspace, tiny_model_dir, "train.epochs=0.25", *extra))

    return run


def test_deleted_output_reruns_that_stage_only(run_flow):
    import shutil

    first = run_flow()
    shutil.rmtree(first["stages"]["tokenize"]["output_dir"])

    second = run_flow()

    assert _states(second) == {"prepare": "cached", "resolve_model": "cached", "tokenize": "completed", "quantize_base": "cached",
                               "train": "cached", "evaluate": "cached", "merge": "cached", "score": "cached"}  # fmt: skip
    assert {n: s["key"] for n, s in second["stages"].items()} == {n: s["key"] for n, s in first["stages"].items()}
    assert Path(second["stages"]["tokenize"]["output_dir"], "manifest.json").is_file()


def test_failure_in_evaluate_reruns_evaluate_and_merge_only(run_flow, monkeypatch):
    import finetune.stages.evaluate
    from flows.finetune_flow import StageFailed
    from tasks.stages import evaluate_task

    def disk_went_away(*args, **kwargs):
        raise OSError("disk went away")

    original = finetune.stages.evaluate.example_losses
    monkeypatch.setattr(finetune.stages.evaluate, "example_losses", disk_went_away)
    monkeypatch.setattr(evaluate_task.task, "retries", 0)  # fail now instead of after the retry delay
    with pytest.raises(StageFailed, match="stage evaluate failed: disk went away"):
        run_flow()
    monkeypatch.setattr(finetune.stages.evaluate, "example_losses", original)

    rerun = run_flow()

    assert _states(rerun) == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached", "quantize_base": "cached",
                              "train": "cached", "evaluate": "completed", "merge": "completed",
                              "score": "completed"}  # fmt: skip


def test_two_concurrent_runs_share_one_training(prefect_server, workspace, tiny_model_dir, tmp_path):
    """Two runs of the same inputs at once, on one server without a training slot: the output's lock
    makes one train and the other wait and reuse it."""
    command = _cli(workspace, _overrides(workspace, tiny_model_dir, "train.epochs=0.25"))  # 4 steps
    runs = [
        subprocess.Popen(command, cwd=ROOT, env=_served_env(tmp_path / f"prefect{i}"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs[0][-1500:] + outputs[1][-1500:]
    trained = [sum("step 1/4" in line for line in out.splitlines()) for out in outputs]
    assert sorted(trained) == [0, 1]  # the expensive stage ran in one process; the other waited and reused it
    records = [json.loads(p.read_text()) for p in (workspace / "runs").glob("*/run.json")]
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    assert records[0]["stages"]["merge"]["key"] == records[1]["stages"]["merge"]["key"]
    merged = Path(records[0]["stages"]["merge"]["output_dir"])
    assert json.loads((merged / "manifest.json").read_text())["files"]  # intact, manifest written last
    assert not [p for p in merged.parent.iterdir() if p.name.endswith(".tmp")]


def test_out_of_memory_retry_halves_the_micro_batch(run_flow, monkeypatch):
    import torch
    import transformers

    from tasks.stages import train_task

    original = transformers.Trainer.training_step

    def out_of_memory_at_batch_8(self, *args, **kwargs):
        if self.args.per_device_train_batch_size == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", out_of_memory_at_batch_8)
    monkeypatch.setattr(train_task.task, "retry_delay_seconds", [0, 0])

    record = run_flow()

    assert record["status"] == "completed"
    metrics = record["metrics"]
    assert metrics["micro_batch"] == [4, 2]  # tiny.yaml: 4 x 2 as one fast step of 8, then the same 8 in two
    assert metrics["micro_batch_adjustments"] == [{"at_step": 0, "from": [8, 1], "to": [4, 2]}]
    assert metrics["train_steps"] == 4  # ceil(0.25 x 13): the same steps as without the retry


def test_nan_loss_fails_at_once_naming_the_step(run_flow, monkeypatch):
    import transformers

    from flows.finetune_flow import StageFailed

    original = transformers.Trainer.training_step
    calls = []

    def nan_from_step_3(self, *args, **kwargs):
        calls.append(self.state.global_step)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(transformers.Trainer, "training_step", nan_from_step_3)

    with pytest.raises(StageFailed, match=r"stage train failed: train: loss is nan at step 3"):
        run_flow()
    assert max(calls) == 2  # stopped at the first bad step, and not retried (a retry would start over)
    assert len(calls) == 3  # 3 optimizer steps of one micro-batch each, once
