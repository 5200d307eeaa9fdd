"""`finetune run` as a user runs it: a real subprocess, Prefect in ephemeral mode."""

import os
import subprocess
import sys

from tests.conftest import ROOT, workspace_overrides


def _finetune(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": ""}  # ephemeral mode, whatever the test session set
    env.pop("PREFECT_API_URL")
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_config_errors_exit_2_before_anything_runs(tmp_path):
    result = _finetune("run", "--set", "lora.rank=4", "--set", "train.epochs=0")
    assert result.returncode == 2
    assert "lora.rank: unknown key" in result.stderr
    assert "train.epochs: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_stage_exits_1_with_a_one_line_reason(workspace):
    (workspace / "data/eval/heldout.jsonl").write_text("")
    sets = [arg for item in workspace_overrides(workspace) for arg in ("--set", item)]

    result = _finetune("run", *sets)

    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("finetune: ")]
    assert len(ours) == 1
    assert ours[0].startswith("finetune: stage prepare failed: ")
    assert "heldout.jsonl: no held-out rows" in ours[0]
    assert ours[0].endswith("run.json)")
