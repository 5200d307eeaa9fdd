"""Scheduled retraining as a user sets it up: `make server`, `make deploy`, `make worker` (real processes,
a real Prefect server on loopback with its own PREFECT_HOME), then `prefect deployment run` of the
`nightly-retrain` deployment from prefect.yaml with the tiny config, and `prefect flow-run retry`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, workspace_overrides

pytestmark = pytest.mark.slow
PREFECT = str(ROOT / ".venv" / "bin" / "prefect")
DEPLOYMENT = "finetune/nightly-retrain"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(*processes: subprocess.Popen | None) -> None:
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


@pytest.fixture(scope="module")
def scheduling(tmp_path_factory, tiny_model_dir):
    """Server, pool, training slot, deployments and a worker, each started the way the README says."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    processes: dict[str, subprocess.Popen] = {}

    def start_server() -> None:
        processes["server"] = _start(["make", "-s", "server", f"PREFECT_PORT={port}"], env, home / "server.log")
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail("the server did not start: " + (home / "server.log").read_text()[-2000:])

    try:
        start_server()
        deployed = subprocess.run(["make", "-s", "deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        processes["worker"] = _start(["make", "-s", "worker"], {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, home / "worker.log")
        workspace = tmp_path_factory.mktemp("retrain")
        shutil.copytree(ROOT / "data" / "raw", workspace / "data" / "raw")
        shutil.copytree(ROOT / "data" / "eval", workspace / "data" / "eval")
        overrides = [*workspace_overrides(workspace), f"model.base={tiny_model_dir}"]
        yield {"env": env, "api": api, "workspace": workspace, "overrides": overrides, "home": home,
               "processes": processes, "start_server": start_server}  # fmt: skip
    finally:
        _stop(*processes.values())


def _trigger(scheduling: dict, *extra: str) -> str:
    params = {"config_path": str(ROOT / "configs" / "tiny.yaml"), "overrides": [*scheduling["overrides"], *extra]}
    started = subprocess.run(
        [PREFECT, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params)],
        cwd=ROOT, env=scheduling["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def _wait(scheduling: dict, flow_run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{scheduling['api']}/flow_runs/{flow_run_id}", timeout=10).json()
        if flow_run["state"]["type"] in TERMINAL:
            return flow_run
        time.sleep(1)
    worker_log = (scheduling["home"] / "worker.log").read_text()[-3000:]
    pytest.fail(f"flow run {flow_run_id} did not finish in {timeout} s; worker log:\n{worker_log}")


def _record(scheduling: dict, flow_run_id: str) -> dict:
    """The newest run record of a flow run (a retried run has one per attempt)."""
    records = [json.loads(p.read_text()) for p in sorted((scheduling["workspace"] / "runs").glob("*/run.json"))]
    return [r for r in records if r["flow_run_id"] == flow_run_id][-1]


def _states(record: dict) -> dict[str, str]:
    return {name: stage["state"] for name, stage in record["stages"].items()}


def _task_states(scheduling: dict, flow_run_id: str) -> dict[str, str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = httpx.post(f"{scheduling['api']}/task_runs/filter", json=body, timeout=10).json()
    return {run["name"].rsplit("-", 1)[0]: run["state"]["name"] for run in runs}


@pytest.fixture(scope="module")
def first_run(scheduling) -> tuple[str, dict]:
    """(id, flow run) of the first deployment run: it trains, and is the one the browser looks at."""
    flow_run_id = _trigger(scheduling)
    return flow_run_id, _wait(scheduling, flow_run_id)


def test_a_deployment_runs_through_the_worker_and_an_unchanged_retrain_is_no_change(scheduling, first_run):
    first_id, first = first_run

    assert first["state"]["type"] == "COMPLETED", first["state"]
    assert first["work_pool_name"] == "finetune-local" and first["infrastructure_pid"]  # run by the worker's process
    record = _record(scheduling, first_id)
    assert set(_states(record).values()) == {"completed"}
    assert record["promotion"]["decision"] == "promoted"

    second_id = _trigger(scheduling)
    second = _wait(scheduling, second_id)

    assert second["state"]["type"] == "COMPLETED", second["state"]
    record = _record(scheduling, second_id)
    assert set(_states(record).values()) == {"cached"} and len(record["stages"]) == 7
    assert {name: state for name, state in _task_states(scheduling, second_id).items() if name in record["stages"]} == dict.fromkeys(
        record["stages"], "Cached"
    )
    assert record["promotion"]["decision"] == "no change"
    assert record["seconds"] < 30


def test_two_runs_triggered_together_never_train_at_once(scheduling):
    ids = [_trigger(scheduling, f"train.seed={seed}", "train.epochs=0.25") for seed in (1, 2)]  # 4 steps each
    runs = [_wait(scheduling, flow_run_id) for flow_run_id in ids]

    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"]
    records = [_record(scheduling, flow_run_id) for flow_run_id in ids]
    assert [r["stages"]["train"]["state"] for r in records] == ["completed", "completed"]
    spans = sorted(
        (summary["trained_from"], summary["trained_until"])
        for summary in (json.loads(Path(r["stages"]["train"]["output_dir"], "summary.json").read_text()) for r in records)
    )
    assert spans[0][1] <= spans[1][0], spans  # the second training started after the first ended
    history = json.loads((scheduling["workspace"] / "models" / "champion.json").read_text())["history"]
    assert len(history) == 1 + sum(r["promotion"]["decision"] == "promoted" for r in records)  # no promotion lost


def test_retrying_a_run_that_failed_after_training_reruns_only_the_failed_stage(scheduling):
    outputs = scheduling["workspace"] / "outputs-retry"
    outputs.mkdir()
    (outputs / "merge").write_text("a file where merge's folder of outputs belongs")  # merge cannot write
    flow_run_id = _trigger(scheduling, f"paths.output_dir={outputs}", "train.seed=3", "train.epochs=0.25")
    failed = _wait(scheduling, flow_run_id)
    assert failed["state"]["type"] == "FAILED"
    record = _record(scheduling, flow_run_id)
    assert _states(record)["train"] == "completed" and _states(record)["merge"] == "failed"
    trained = json.loads(Path(record["stages"]["train"]["output_dir"], "summary.json").read_text())["trained_from"]

    (outputs / "merge").unlink()
    retried = subprocess.run([PREFECT, "flow-run", "retry", flow_run_id], cwd=ROOT, env=scheduling["env"], capture_output=True, text=True)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    done = _wait(scheduling, flow_run_id)

    assert done["state"]["type"] == "COMPLETED", done["state"]
    retry = _record(scheduling, flow_run_id)
    assert _states(retry) == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached", "train": "cached",
                              "evaluate": "cached", "merge": "completed", "score": "completed",
                              "score_champion": "completed"}  # fmt: skip  (the champion's score in this output_dir)
    summary = json.loads(Path(retry["stages"]["train"]["output_dir"], "summary.json").read_text())
    assert summary["trained_from"] == trained  # the same training, not a second one


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("FINETUNE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.mark.browser
def test_the_ui_shows_the_run_its_card_its_intervals_and_its_curve(scheduling, first_run, tmp_path):
    """What a person checks in the Prefect UI, in headless Chromium: the run completed, the run card
    carries run.json's numbers, the evaluation shows its interval row, and the training curve loaded."""
    from playwright.sync_api import expect, sync_playwright

    flow_run_id, _ = first_run
    record = _record(scheduling, flow_run_id)
    loss = record["metrics"]["eval_differences"]["loss"]
    ui = scheduling["api"].removesuffix("/api")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)

        def open_artifact(key: str) -> None:
            page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text(key, exact=True).first.click()
            page.wait_for_url("**/artifacts/artifact/**")
            expect(page.get_by_text("Show raw data")).to_be_visible()  # the artifact page has rendered

        page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.screenshot(path=tmp_path / "flow-run.png", full_page=True)

        open_artifact("run-card")
        expect(page.get_by_text(record["stages"]["train"]["key"])).to_be_visible()  # the train key from run.json
        expect(page.get_by_text(f"{loss['delta']:+.3f} [{loss['low']:+.3f}, {loss['high']:+.3f}]").first).to_be_visible()
        page.screenshot(path=tmp_path / "run-card.png", full_page=True)

        open_artifact("evaluation")
        row = page.get_by_role("row").filter(has_text="loss per response token")
        expect(row).to_contain_text(f"[{loss['low']:+.3f}, {loss['high']:+.3f}]")
        page.screenshot(path=tmp_path / "evaluation.png", full_page=True)

        open_artifact("training-curve")
        curve = page.get_by_role("img", name="training loss and learning rate per step")
        expect(curve).to_be_visible()
        assert curve.evaluate("image => image.complete && image.naturalWidth") > 0
        page.screenshot(path=tmp_path / "training-curve.png", full_page=True)
        browser.close()


def test_the_cluster_deployment_renders_a_gpu_job_that_mounts_the_shared_volume(scheduling):
    """`make deploy` created the Kubernetes pool from deploy/kubernetes-gpu-job-template.json and the
    cluster-retrain deployment of prefect.yaml. A flow run of it is rendered into the Job that the
    Kubernetes worker would submit, the way the worker does (pool template + deployment's job variables,
    then prepare_for_flow_run): it asks for the GPU, runs the project's image in the code's folder, and
    mounts the shared volume where every path of the run points. No cluster is needed to render it."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from finetune.core.config import PathsConfig

    async def render():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("finetune/cluster-retrain")
            pool = await client.read_work_pool(deployment.work_pool_name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            flow = await client.read_flow(deployment.flow_id)
            values = {**deployment.job_variables, **(flow_run.job_variables or {})}
            job = await KubernetesWorkerJobConfiguration.from_template_and_values(pool.base_job_template, values, client=client)
            job.prepare_for_flow_run(flow_run=flow_run, deployment=deployment, flow=flow, work_pool=pool)
            return deployment, pool, flow_run, job

    with temporary_settings({PREFECT_API_URL: scheduling["api"]}):  # this module's server, not the test harness's
        deployment, pool, flow_run, job = asyncio.run(render())

    assert pool.type == "kubernetes"
    pod = job.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "qlora-flow:0.1.0"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1 == int(container["resources"]["requests"]["nvidia.com/gpu"])
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "qlora-flow-workspace"
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/workspace"}]
    assert {"name": "PREFECT__FLOW_RUN_ID", "value": str(flow_run.id)} in container["env"]
    # Every path the run reads or writes is on the volume, so outputs and cache records outlive the pod.
    overrides = dict(item.split("=", 1) for item in deployment.parameters["overrides"])
    assert {key.removeprefix("paths.") for key in overrides} == set(PathsConfig.model_fields)
    assert all(value.startswith("/workspace/") for value in overrides.values())
    # The code is where the image puts it (Dockerfile WORKDIR), and the pull step goes there.
    workdir = re.search(r"^WORKDIR (\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    assert container["workingDir"] == workdir


def _slots_taken(scheduling: dict) -> int:
    return httpx.get(f"{scheduling['api']}/v2/concurrency_limits/finetune-training", timeout=10).json()["active_slots"]


def test_a_server_killed_and_restarted_while_training_leaves_the_training_slot_free(scheduling):
    """The server dies (SIGKILL) while a run holds the training slot and starts again on the same database:
    the run carries on and completes, and it gives the slot back, so the next run does not wait for it.
    Last in this module: it restarts the module's server."""
    flow_run_id = _trigger(scheduling, "train.seed=6", "train.epochs=2")  # 26 steps: still training after the restart
    deadline = time.monotonic() + 300
    while _slots_taken(scheduling) == 0:
        assert time.monotonic() < deadline, "the run never took the training slot"
        time.sleep(0.5)

    server = scheduling["processes"]["server"]
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    time.sleep(3)
    scheduling["start_server"]()
    assert _slots_taken(scheduling) == 1  # the lease survived the restart (kept on disk)

    done = _wait(scheduling, flow_run_id)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    record = _record(scheduling, flow_run_id)
    assert record["stages"]["train"]["state"] == "completed" and record["metrics"]["train_steps"] == 26
    assert _slots_taken(scheduling) == 0  # given back: the next run trains at once
    assert not list((scheduling["home"] / "concurrency_leases").glob("*-*-*-*-*.json"))  # no lease left behind
