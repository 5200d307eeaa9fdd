"""`finetune run` as a user runs it: a real subprocess, Prefect in ephemeral mode."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, workspace_overrides


def _finetune(*args: str, cwd=ROOT, prefect_home=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": ""}  # ephemeral mode, whatever the test session set
    env.pop("PREFECT_API_URL")
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_config_errors_exit_2_before_anything_runs(tmp_path):
    result = _finetune("run", "--set", "lora.rank=4", "--set", "train.epochs=0")
    assert result.returncode == 2
    assert "lora.rank: unknown key" in result.stderr
    assert "train.epochs: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_stage_exits_1_with_a_one_line_reason(workspace, tmp_path):
    """On a machine where Prefect never ran: the server Prefect starts for the run creates its database first
    (longer than Prefect's default 20 s wait on a 2-core CPU), and the run still gets to its stage."""
    (workspace / "data/raw/broken.jsonl").write_text("{not json\n" * 20)  # 20 of 124 rows rejected: over 5%
    sets = [arg for item in workspace_overrides(workspace) for arg in ("--set", item)]

    result = _finetune("run", *sets, prefect_home=tmp_path / "fresh-prefect-home")

    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("finetune: ")]
    assert len(ours) == 1
    assert ours[0].startswith("finetune: stage prepare failed: ")
    assert "20 of 124 rows rejected, over data.max_reject_share=0.05" in ours[0]
    assert "broken.jsonl:1 (malformed JSON" in ours[0]
    assert ours[0].endswith("run.json)")


def test_missing_or_empty_inputs_are_config_errors(workspace):
    (workspace / "data/eval/heldout.jsonl").write_text("")
    sets = [arg for item in workspace_overrides(workspace) for arg in ("--set", item)]
    result = _finetune("run", *sets)
    assert result.returncode == 2
    assert "paths.heldout_path:" in result.stderr and "is empty" in result.stderr

    result = _finetune("validate", *sets, "--set", f"paths.raw_dir={workspace / 'nowhere'}")
    assert result.returncode == 2
    assert "paths.raw_dir:" in result.stderr and "is not a folder" in result.stderr


def test_validate_prints_the_data_report(workspace):
    sets = [arg for item in workspace_overrides(workspace) for arg in ("--set", item)]
    result = _finetune("validate", *sets)
    assert result.returncode == 0, result.stderr
    assert "Training rows: **104** from 5 file(s); evaluation rows: **25**; rejected: **0**" in result.stdout
    assert "Traceback" not in result.stderr

    (workspace / "data/raw/broken.jsonl").write_text("{not json\n" * 20)
    result = _finetune("validate", *sets)
    assert result.returncode == 1
    assert result.stderr.startswith("finetune: data error: 20 of 124 rows rejected")


def test_a_paged_optimizer_on_a_machine_without_cuda_stops_before_anything_runs():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the rule is about machines without CUDA")
    result = _finetune("run", "--set", "train.optim=paged_adamw_32bit")
    assert result.returncode == 2
    assert "train.optim=paged_adamw_32bit needs a CUDA GPU" in result.stderr and "use adamw_torch" in result.stderr
