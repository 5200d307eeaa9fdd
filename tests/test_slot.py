"""The training slot: a run that waits for it says so, and takes it as soon as the holder gives it back."""

from __future__ import annotations

import logging
import threading
import time

import pytest


@pytest.fixture
def slot(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"test-slot-{time.monotonic_ns()}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_run_waiting_for_the_slot_says_what_it_waits_for_then_takes_it(slot, monkeypatch):
    import tasks.stages as stages

    monkeypatch.setattr(stages, "SLOT_WAIT_REPORT_SECONDS", 1)
    logger, seen = logging.getLogger("test.slot"), Lines()
    logger.setLevel(logging.INFO)
    logger.addHandler(seen)
    holder_done = threading.Event()

    def hold_for_three_seconds() -> None:
        with stages.holding(slot, logger):
            time.sleep(3)
        holder_done.set()

    holder = threading.Thread(target=hold_for_three_seconds)
    holder.start()
    time.sleep(0.5)  # the holder has the slot
    with stages.holding(slot, logger):
        assert holder_done.is_set()  # the slot was taken only after the holder gave it back
    holder.join()
    logger.removeHandler(seen)

    waits = [line for line in seen.lines if line.startswith(f"waiting for the training slot {slot}")]
    assert len(waits) >= 1
    assert "another run is training" in waits[0] and f"prefect gcl inspect {slot}" in waits[0] and "within 300 s" in waits[0]
    assert seen.lines[-1].startswith(f"training slot {slot} taken after")


def test_the_slot_lease_comes_from_the_worker_environment_within_prefects_bounds(monkeypatch):
    from finetune.core.config import ConfigError
    from tasks.stages import SLOT_LEASE_SECONDS, slot_lease_seconds

    monkeypatch.delenv("FINETUNE_SLOT_LEASE_SECONDS", raising=False)
    assert slot_lease_seconds() == SLOT_LEASE_SECONDS == 300
    monkeypatch.setenv("FINETUNE_SLOT_LEASE_SECONDS", "90")
    assert slot_lease_seconds() == 90
    for bad in ("30", "5m", ""):
        monkeypatch.setenv("FINETUNE_SLOT_LEASE_SECONDS", bad)
        with pytest.raises(ConfigError, match=f"FINETUNE_SLOT_LEASE_SECONDS='{bad}': .* from 60 to 86400"):
            slot_lease_seconds()
