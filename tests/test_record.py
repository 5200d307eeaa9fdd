"""Run records over time: a record that its run's process can no longer finish says crashed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from finetune.core.record import reconcile_crashed


def _record(runs_dir, name: str, status: str, host: str, pid: int) -> None:
    (runs_dir / name).mkdir(parents=True)
    (runs_dir / name / "run.json").write_text(json.dumps({"run_name": name, "status": status, "process": {"host": host, "pid": pid}}))


def test_a_running_record_whose_process_is_gone_is_marked_crashed_and_no_other(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    host = socket.gethostname()
    _record(tmp_path, "killed", "running", host, int(gone))
    _record(tmp_path, "alive", "running", host, os.getpid())
    _record(tmp_path, "elsewhere", "running", f"not-{host}", int(gone))  # another machine's run: not ours to judge
    _record(tmp_path, "finished", "completed", host, int(gone))

    assert reconcile_crashed(tmp_path) == [tmp_path / "killed"]

    status = {p.parent.name: json.loads(p.read_text())["status"] for p in tmp_path.glob("*/run.json")}
    assert status == {"killed": "crashed", "alive": "running", "elsewhere": "running", "finished": "completed"}
    error = json.loads((tmp_path / "killed" / "run.json").read_text())["error"]
    assert f"pid {int(gone)} on {host}" in error and "run again to resume" in error and "; last seen alive at 20" in error
    assert reconcile_crashed(tmp_path) == []  # once
