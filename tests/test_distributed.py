"""Training as data-parallel ranks through `accelerate launch`, here on the CPU (gloo): the launcher, the
event stream into the stage's logger, a failed rank's error and the cleanup are what a multi-GPU machine
runs (tests/test_gpu.py has the GPU form)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from finetune.core.config import load_config
from finetune.core.stage import Hooks
from finetune.training.distributed import RankFailed, train_on_ranks
from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

pytestmark = pytest.mark.slow


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def rank_pids(self) -> dict[int, int]:
        return {r.args[0]: r.args[1] for r in self.records if r.msg == "rank %d started (pid %d)"}


def _hooks(progress=lambda share: None) -> tuple[Hooks, Records]:
    records = Records()
    logger = logging.getLogger(f"test-ranks-{time.monotonic_ns()}")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    return Hooks(logger=logger, progress=progress), records


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def _config(workspace: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), "lora.dropout=0", "quant.compute_dtype=float32", *extra])


def test_two_ranks_train_the_steps_of_one_process_and_rank_zero_streams_its_log(workspace, tiny_model_dir, tmp_path):
    from finetune.stages.quantize import QuantizeInputs, quantize_base
    from finetune.stages.train import train_adapter

    config = _config(workspace, "train.epochs=0.25")  # 4 steps
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, tmp_path)
    inputs = train_inputs(config, tokenized_dir, tiny_model_dir)  # one process quantizes while loading
    one = json.loads((train_adapter(inputs, tmp_path / "one") / "log_history.json").read_text())

    out, shares = tmp_path / "two" / "out", []
    out.mkdir(parents=True)
    hooks, records = _hooks(shares.append)
    saved_base = quantize_base(QuantizeInputs(model_dir=tiny_model_dir, quant=config.quant), tmp_path)  # the ranks load it, as in the flow
    ranks_inputs = train_inputs(config, tokenized_dir, saved_base)
    result = train_on_ranks(ranks_inputs, "key", out, hooks, processes=2, work_dir=tmp_path / "two" / "work")

    summary = json.loads((out / "summary.json").read_text())
    two = json.loads((out / "log_history.json").read_text())
    assert result["train_steps"] == summary["train_steps"] == len(one) == len(two) == 4  # same global batch of 8
    assert summary["ranks"] == 2 and summary["micro_batch"] == [4, 1]  # each rank half of each step
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The same examples in each step, the gradients averaged, the same 4-bit weights: the same losses as one process.
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-4, (one, two)
    steps = [r.getMessage() for r in records.records if r.levelno == logging.INFO and r.getMessage().startswith("step ")]
    assert steps[-1].startswith("step 4/4") and shares[-1] == 1.0
    assert sorted(records.rank_pids()) == [0, 1]


def test_a_killed_rank_fails_the_training_by_name_and_leaves_no_process_behind(workspace, tiny_model_dir, tmp_path):
    config = _config(workspace, "train.epochs=3")  # long enough to be killed in the middle
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, tmp_path)
    killed = []

    def kill_rank_one(share: float) -> None:
        if not killed:
            pid = records.rank_pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    hooks, records = _hooks(kill_rank_one)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RankFailed, match=r"rank 1 died \(signal SIGKILL\)"):
        train_on_ranks(train_inputs(config, tokenized_dir, tiny_model_dir), "key", out, hooks, processes=2, work_dir=tmp_path / "work")

    assert killed
    pids = list(records.rank_pids().values())
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in pids), pids
    assert not (out / "summary.json").exists()
