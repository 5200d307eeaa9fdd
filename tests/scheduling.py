"""A scheduling service for tests, set up the way the README says: `make server`, `make deploy`, `make worker`
(real processes, a real Prefect server on loopback with its own PREFECT_HOME), and the calls a user makes on
it: `prefect deployment run` of a deployment from prefect.yaml with the tiny config, and the server's API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, workspace_overrides

PREFECT = str(ROOT / ".venv" / "bin" / "prefect")
DEPLOYMENT = "finetune/nightly-retrain"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(*processes: subprocess.Popen | None) -> None:
    """SIGTERM to every process group at once, SIGKILL to what is still there 5 s later."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class WebhookReceiver:
    """An HTTP endpoint on loopback that keeps the JSON of every POST it receives: where the alerts go."""

    def __init__(self) -> None:
        received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 90) -> dict:
        """The first message whose subject or body contains `text`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.received):
                if text in message.get("subject", "") + message.get("body", ""):
                    return message
            time.sleep(0.5)
        pytest.fail(f"no alert with {text!r} in {timeout} s; received: {self.received}")


# A custom-webhook notification block, as a user creates it (here in Python; the UI's Blocks page does the same).
_SAVE_BLOCK = (
    "import sys; from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
    "B(name='finetune-alerts', url=sys.argv[1], json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('finetune-alerts')"
)


@contextmanager
def service(
    tmp_path_factory, tiny_model_dir: Path, worker_env: dict[str, str] | None = None, alerts: WebhookReceiver | None = None
) -> Iterator[dict]:
    """Server, pools, training slot, automations, deployments and a worker, each started the way the README
    says; `worker_env`: extra environment of the worker (and so of the flow runs it starts); `alerts`: a
    receiver that a notification block is made for, named in `make deploy NOTIFY_BLOCK=...`."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    processes: dict[str, subprocess.Popen] = {}

    def start_server() -> None:
        processes["server"] = start_process(["make", "-s", "server", f"PREFECT_PORT={port}"], env, home / "server.log")
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail("the server did not start: " + (home / "server.log").read_text()[-2000:])

    try:
        start_server()
        notify = []
        if alerts is not None:
            saved = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", _SAVE_BLOCK, alerts.url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert saved.returncode == 0, saved.stderr[-2000:]
            notify = ["NOTIFY_BLOCK=custom-webhook/finetune-alerts"]
        deployed = subprocess.run(["make", "-s", "deploy", *notify], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", **(worker_env or {})}

        def start_worker(name: str = "worker") -> subprocess.Popen:
            processes[name] = start_process(["make", "-s", "worker"], worker_env, home / f"{name}.log")
            return processes[name]

        start_worker()
        workspace = tmp_path_factory.mktemp("retrain")
        shutil.copytree(ROOT / "data" / "raw", workspace / "data" / "raw")
        shutil.copytree(ROOT / "data" / "eval", workspace / "data" / "eval")
        overrides = [*workspace_overrides(workspace), f"model.base={tiny_model_dir}"]
        yield {"env": env, "api": api, "workspace": workspace, "overrides": overrides, "home": home,
               "processes": processes, "start_server": start_server, "start_worker": start_worker}  # fmt: skip
    finally:
        stop(*processes.values())


def trigger(scheduling: dict, *extra: str) -> str:
    params = {"config_path": str(ROOT / "configs" / "tiny.yaml"), "overrides": [*scheduling["overrides"], *extra]}
    started = subprocess.run(
        [PREFECT, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params)],
        cwd=ROOT, env=scheduling["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def wait(scheduling: dict, flow_run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{scheduling['api']}/flow_runs/{flow_run_id}", timeout=10).json()
        if flow_run["state"]["type"] in TERMINAL:
            return flow_run
        time.sleep(1)
    worker_log = (scheduling["home"] / "worker.log").read_text()[-3000:]
    pytest.fail(f"flow run {flow_run_id} did not finish in {timeout} s; worker log:\n{worker_log}")


def run_record(scheduling: dict, flow_run_id: str) -> dict:
    """The newest run record of a flow run (a retried run has one per attempt)."""
    records = [json.loads(p.read_text()) for p in sorted((scheduling["workspace"] / "runs").glob("*/run.json"))]
    return [r for r in records if r["flow_run_id"] == flow_run_id][-1]


def stage_states(record: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in record["stages"].items()}


def task_states(scheduling: dict, flow_run_id: str) -> dict[str, str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = httpx.post(f"{scheduling['api']}/task_runs/filter", json=body, timeout=10).json()
    return {run["name"].rsplit("-", 1)[0]: run["state"]["name"] for run in runs}


def slots_taken(scheduling: dict) -> int:
    return httpx.get(f"{scheduling['api']}/v2/concurrency_limits/finetune-training", timeout=10).json()["active_slots"]
