"""A full disk: a stage whose output does not fit fails with one line naming the folder, leaves no half
output that looks finished, and continues from its last sealed checkpoint once space is freed. The disk
is a real small filesystem (tmpfs) that fills up; where mounting is not permitted, the test skips."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from finetune.core.config import load_config
from finetune.core.errors import DiskFullError, PermanentError
from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MB tmpfs: room for two checkpoints of the tiny model's training (3.5 MB each), not a third."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); .ci/run runs as root, where it can")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_training_that_fills_the_disk_fails_in_one_line_and_resumes_once_space_is_freed(workspace, tiny_model_dir, small_disk):
    from finetune.stages.train import checkpoints_dir, train_adapter
    from finetune.training.checkpoints import checkpoint_problem

    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), "train.save_every_steps=2"])
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, workspace / "out")  # the inputs stay on the big disk
    inputs = train_inputs(config, tokenized_dir, tiny_model_dir)

    with pytest.raises(DiskFullError) as failure:
        train_adapter(inputs, small_disk)

    message = str(failure.value)
    assert "\n" not in message and isinstance(failure.value, PermanentError)  # not retried at once
    assert message.startswith(f"train: no space left on the disk of {small_disk / 'train'} (")
    written = float(re.search(r"needs more than the ([0-9.]+) MB it had written there", message).group(1))
    assert written >= 7.0  # at least the two whole checkpoints it holds
    work = checkpoints_dir(small_disk, train_adapter.key(inputs))
    assert not list((small_disk / "train").glob("*/manifest.json"))  # nothing that looks finished
    assert not list((small_disk / "train").glob(".*.tmp"))  # the half-built output is gone
    whole = [p.name for p in sorted(work.glob("checkpoint-*")) if checkpoint_problem(p) is None]
    assert whole == ["checkpoint-2", "checkpoint-4"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    out = train_adapter(inputs, small_disk)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["train_steps"] == 13
    assert (out / "manifest.json").is_file()
