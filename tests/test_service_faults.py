"""A lost worker, for real: the worker and the flow-run process it started are SIGKILLed while training, as
when their machine is lost; then a second and a third worker join the pool. Minutes of waiting on Prefect's
own clocks (heartbeats every 30 s, the training slot's lease), so it runs in `make faults`, not `make test`.

The end state checked: the server shows the lost run Crashed (the heartbeat automation of `make deploy`),
the training slot comes free by itself when the lease runs out, the lost run's record says crashed, and of
the two runs then triggered with the same inputs, one resumes training from the last sealed checkpoint while
the other waits and reuses it: nothing trains twice, both complete, and the champion history stays whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.scheduling import run_record, service, slots_taken, trigger, wait

pytestmark = [pytest.mark.slow, pytest.mark.faults]
LEASE_SECONDS = 60  # the least Prefect takes; the default (300) would only make the wait longer
STEPS = ["train.epochs=2", "train.save_every_steps=2", "train.seed=11"]  # 26 steps, a checkpoint every 2


@pytest.fixture(scope="module")
def scheduling(tmp_path_factory, tiny_model_dir):
    with service(tmp_path_factory, tiny_model_dir, worker_env={"FINETUNE_SLOT_LEASE_SECONDS": str(LEASE_SECONDS)}) as running:
        yield running


def _sealed_checkpoints(workspace: Path) -> list[Path]:
    return sorted(workspace.glob("outputs/train/*.checkpoints/checkpoint-*/seal.json"))


def _flow_run(scheduling: dict, flow_run_id: str) -> dict:
    return httpx.get(f"{scheduling['api']}/flow_runs/{flow_run_id}", timeout=10).json()


def _until(condition, timeout: float, what: str) -> float:
    """Seconds until `condition()` held, polling every second; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)
    return time.monotonic() - started


def _automations(scheduling: dict) -> list[str]:
    return [a["name"] for a in httpx.post(f"{scheduling['api']}/automations/filter", json={}, timeout=10).json()]


def test_make_deploy_again_replaces_the_automations_rather_than_adding_copies(scheduling):
    assert _automations(scheduling).count("finetune-crash-silent-runs") == 1
    again = subprocess.run(["make", "-s", "deploy"], cwd=ROOT, env=scheduling["env"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert _automations(scheduling).count("finetune-crash-silent-runs") == 1


def test_a_lost_worker_ends_crashed_frees_the_slot_and_the_next_runs_resume_once(scheduling):
    workspace, processes = scheduling["workspace"], scheduling["processes"]
    lost_id = trigger(scheduling, *STEPS)
    _until(lambda: len(_sealed_checkpoints(workspace)) >= 2, 300, "two sealed checkpoints")
    assert slots_taken(scheduling) == 1
    flow_pid = run_record(scheduling, lost_id)["process"]["pid"]

    worker = processes.pop("worker")
    os.killpg(worker.pid, signal.SIGKILL)  # make, the worker, and what runs in their process group
    os.kill(flow_pid, signal.SIGKILL)  # the flow-run process, wherever the worker started it
    worker.wait()
    killed_at = time.monotonic()
    sealed_when_killed = max(int(p.parent.name.removeprefix("checkpoint-")) for p in _sealed_checkpoints(workspace))

    # The UI shows it Crashed: no heartbeat for 90 s (one every 30 s), then the automation of `make deploy`.
    crashed_after = _until(lambda: _flow_run(scheduling, lost_id)["state"]["type"] == "CRASHED", 240, "the lost run shown Crashed")
    state = _flow_run(scheduling, lost_id)["state"]
    assert "No heartbeat for 90 s" in state["message"], state
    # The slot comes free by itself: the dead run stopped renewing its lease, and the server took it back.
    freed_after = _until(lambda: slots_taken(scheduling) == 0, LEASE_SECONDS + 60, "the training slot freed") + crashed_after
    print(f"lost run shown Crashed {crashed_after:.0f} s after the kill; slot free after {freed_after:.0f} s")
    assert time.monotonic() - killed_at < 240 + LEASE_SECONDS + 60

    # A second machine joins: two workers on the pool, and two runs of the same inputs, one for each.
    scheduling["start_worker"]("worker-b")
    scheduling["start_worker"]("worker-c")
    ids = [trigger(scheduling, *STEPS) for _ in range(2)]
    runs = [wait(scheduling, flow_run_id) for flow_run_id in ids]

    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"], [run["state"] for run in runs]
    lost = run_record(scheduling, lost_id)
    assert lost["status"] == "crashed" and f"pid {flow_pid} on " in lost["error"]
    records = [run_record(scheduling, flow_run_id) for flow_run_id in ids]
    trained = {record["stages"]["train"]["output_dir"] for record in records}
    assert len(trained) == 1  # one output, the key the lost run was training
    resumed = records[0]["metrics"]["resumed_from_step"]
    assert resumed == records[1]["metrics"]["resumed_from_step"] and sealed_when_killed <= resumed < 26, (resumed, sealed_when_killed)
    assert records[0]["metrics"]["train_steps"] == 26
    logs = "".join((scheduling["home"] / f"{name}.log").read_text() for name in ("worker-b", "worker-c"))
    assert logs.count(f"step {resumed + 1}/26") == 1, "the remaining steps were trained more than once"  # nothing twice
    assert slots_taken(scheduling) == 0

    decisions = [record["promotion"]["decision"] for record in records]
    history = json.loads((workspace / "models" / "champion.json").read_text())["history"]
    assert decisions.count("promoted") == 1 and len(history) == 1, (decisions, history)  # promoted once, by one of them
