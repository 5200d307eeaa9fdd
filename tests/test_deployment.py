"""Scheduled retraining as a user sets it up: `make server`, `make deploy`, `make worker` (real processes,
a real Prefect server on loopback with its own PREFECT_HOME), then `prefect deployment run` of the
`nightly-retrain` deployment from prefect.yaml with the tiny config, and `prefect flow-run retry`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.scheduling import (
    PREFECT,
    run_record,
    service,
    WebhookReceiver,
    slots_taken,
    stage_states,
    task_states,
    trigger,
    wait,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alerts() -> WebhookReceiver:
    return WebhookReceiver()


@pytest.fixture(scope="module")
def scheduling(tmp_path_factory, tiny_model_dir, alerts):
    with service(tmp_path_factory, tiny_model_dir, alerts=alerts) as running:
        yield running


@pytest.fixture(scope="module")
def first_run(scheduling) -> tuple[str, dict]:
    """(id, flow run) of the first deployment run: it trains, and is the one the browser looks at."""
    flow_run_id = trigger(scheduling)
    return flow_run_id, wait(scheduling, flow_run_id)


def test_a_deployment_runs_through_the_worker_and_an_unchanged_retrain_is_no_change(scheduling, first_run, alerts):
    first_id, first = first_run

    assert first["state"]["type"] == "COMPLETED", first["state"]
    assert first["work_pool_name"] == "finetune-local" and first["infrastructure_pid"]  # run by the worker's process
    record = run_record(scheduling, first_id)
    assert set(stage_states(record).values()) == {"completed"}
    assert record["promotion"]["decision"] == "promoted"
    promoted = alerts.wait_for(f"{record['run_name']} promoted")  # make deploy NOTIFY_BLOCK=...: the automation's notification
    assert promoted["body"].startswith(f"The retrain {record['run_name']} is the new champion (") and "no champion yet" in promoted["body"]

    second_id = trigger(scheduling)
    second = wait(scheduling, second_id)

    assert second["state"]["type"] == "COMPLETED", second["state"]
    record = run_record(scheduling, second_id)
    assert set(stage_states(record).values()) == {"cached"} and len(record["stages"]) == 8
    assert {name: state for name, state in task_states(scheduling, second_id).items() if name in record["stages"]} == dict.fromkeys(
        record["stages"], "Cached"
    )
    assert record["promotion"]["decision"] == "no change"
    assert record["seconds"] < 30


def test_two_runs_triggered_together_never_train_at_once(scheduling):
    ids = [trigger(scheduling, f"train.seed={seed}", "train.epochs=0.25") for seed in (1, 2)]  # 4 steps each
    runs = [wait(scheduling, flow_run_id) for flow_run_id in ids]

    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"]
    records = [run_record(scheduling, flow_run_id) for flow_run_id in ids]
    assert [r["stages"]["train"]["state"] for r in records] == ["completed", "completed"]
    spans = sorted(
        (summary["trained_from"], summary["trained_until"])
        for summary in (json.loads(Path(r["stages"]["train"]["output_dir"], "summary.json").read_text()) for r in records)
    )
    assert spans[0][1] <= spans[1][0], spans  # the second training started after the first ended
    history = json.loads((scheduling["workspace"] / "models" / "champion.json").read_text())["history"]
    assert len(history) == 1 + sum(r["promotion"]["decision"] == "promoted" for r in records)  # no promotion lost


def test_retrying_a_run_that_failed_after_training_reruns_only_the_failed_stage(scheduling, alerts):
    outputs = scheduling["workspace"] / "outputs-retry"
    outputs.mkdir()
    (outputs / "merge").write_text("a file where merge's folder of outputs belongs")  # merge cannot write
    flow_run_id = trigger(scheduling, f"paths.output_dir={outputs}", "train.seed=3", "train.epochs=0.25")
    failed = wait(scheduling, flow_run_id)
    assert failed["state"]["type"] == "FAILED"
    alert = alerts.wait_for(f"finetune run {failed['name']}: Failed")
    assert alert["body"].startswith(f"The retrain {failed['name']} ended Failed: ") and "stage merge failed" in alert["body"]
    record = run_record(scheduling, flow_run_id)
    assert stage_states(record)["train"] == "completed" and stage_states(record)["merge"] == "failed"
    trained = json.loads(Path(record["stages"]["train"]["output_dir"], "summary.json").read_text())["trained_from"]

    (outputs / "merge").unlink()
    retried = subprocess.run([PREFECT, "flow-run", "retry", flow_run_id], cwd=ROOT, env=scheduling["env"], capture_output=True, text=True)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    done = wait(scheduling, flow_run_id)

    assert done["state"]["type"] == "COMPLETED", done["state"]
    retry = run_record(scheduling, flow_run_id)
    assert stage_states(retry) == {"prepare": "cached", "resolve_model": "cached", "tokenize": "cached", "quantize_base": "cached", "train": "cached",
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
    record = run_record(scheduling, flow_run_id)
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

        open_artifact("retraining-history")  # the keyed artifact: the history as of this run, with its picture
        history = page.get_by_role("img", name="held-out loss across retrains")
        expect(history).to_be_visible()
        assert history.evaluate("image => image.complete && image.naturalWidth") > 0
        expect(page.get_by_role("row").filter(has_text=record["run_name"])).to_contain_text("promoted")
        page.screenshot(path=tmp_path / "retraining-history.png", full_page=True)
        browser.close()


def test_deployed_runs_send_heartbeats_and_a_silent_one_is_marked_crashed(scheduling):
    """A run whose process dies with its worker cannot report its own crash: `make deploy` sets up the
    heartbeats and the automation that marks such a run Crashed (exercised end to end by `make faults`)."""
    for name in ("nightly-retrain", "llama2-7b-chat", "cluster-retrain", "cluster-retrain-from-bucket"):
        deployment = httpx.get(f"{scheduling['api']}/deployments/name/finetune/{name}", timeout=10).json()
        assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name
    automations = httpx.post(f"{scheduling['api']}/automations/filter", json={}, timeout=10).json()
    (crash,) = [a for a in automations if a["name"] == "finetune-crash-silent-runs"]
    assert crash["enabled"] and crash["trigger"]["posture"] == "Proactive" and crash["trigger"]["within"] == 90
    assert crash["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    assert crash["actions"] == [{**crash["actions"][0], "type": "change-flow-run-state", "state": "CRASHED"}]


def test_the_cluster_deployment_renders_a_gpu_job_that_mounts_the_shared_volume(scheduling):
    """`make deploy` created the Kubernetes pool from deploy/kubernetes-gpu-job-template.json and the
    cluster-retrain deployment of prefect.yaml. A flow run of it is rendered into the Job that the
    Kubernetes worker would submit, the way the worker does (pool template + deployment's job variables,
    then prepare_for_flow_run): it asks for the GPU, runs the project's image in the code's folder, and
    mounts the shared volume where every path of the run points. No cluster is needed to render it."""
    from finetune.core.config import PathsConfig

    deployment, pool, flow_run, job = _rendered(scheduling, "finetune/cluster-retrain")

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
    # The image's caches (hub downloads, file digests, compiled kernels) are on the volume as well.
    image_env = dict(re.findall(r"^\s*(\w+)=(\S+?)\s*\\?$", (ROOT / "Dockerfile").read_text(), re.M))
    caches = {name: image_env.get(name) for name in ("HF_HOME", "FINETUNE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    assert all(value and value.startswith("/workspace/") for value in caches.values()), caches


def _rendered(scheduling, name: str):
    """(deployment, pool, flow run, Job configuration) of a new flow run of deployment `name`, rendered the way
    the Kubernetes worker does: pool template + the deployment's job variables, then prepare_for_flow_run."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def render():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            pool = await client.read_work_pool(deployment.work_pool_name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            flow = await client.read_flow(deployment.flow_id)
            values = {**deployment.job_variables, **(flow_run.job_variables or {})}
            job = await KubernetesWorkerJobConfiguration.from_template_and_values(pool.base_job_template, values, client=client)
            job.prepare_for_flow_run(flow_run=flow_run, deployment=deployment, flow=flow, work_pool=pool)
            return deployment, pool, flow_run, job

    with temporary_settings({PREFECT_API_URL: scheduling["api"]}):  # this module's server, not the test harness's
        return asyncio.run(render())


def test_the_cluster_deployment_can_take_its_data_from_a_bucket(scheduling):
    """cluster-retrain-from-bucket renders into the same GPU Job on the shared volume, and its parameters load
    as a config that reads the training pairs from the bucket alone, with credentials from a Secret block;
    everything else the run reads or writes is still on the volume."""
    from finetune.core.config import PathsConfig, load_config

    deployment, pool, flow_run, job = _rendered(scheduling, "finetune/cluster-retrain-from-bucket")

    assert pool.type == "kubernetes"
    (container,) = job.job_manifest["spec"]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["volumeMounts"][0]["mountPath"] == "/workspace"
    config = load_config(ROOT / deployment.parameters["config_path"], deployment.parameters["overrides"])
    (source,) = config.data.sources
    assert source.url.startswith("s3://") and source.credentials_secret == "data-bucket" and config.paths.raw_dir is None
    for field in set(PathsConfig.model_fields) - {"raw_dir"}:
        assert str(getattr(config.paths, field)).startswith("/workspace/"), field
    assert "[kubernetes,s3]" in (ROOT / "Dockerfile").read_text()  # the image can read s3://


def test_a_server_killed_and_restarted_while_training_leaves_the_training_slot_free(scheduling):
    """The server dies (SIGKILL) while a run holds the training slot and starts again on the same database:
    the run carries on and completes, and it gives the slot back, so the next run does not wait for it.
    Last in this module: it restarts the module's server."""
    flow_run_id = trigger(scheduling, "train.seed=6", "train.epochs=2")  # 26 steps: still training after the restart
    deadline = time.monotonic() + 300
    while slots_taken(scheduling) == 0:
        assert time.monotonic() < deadline, "the run never took the training slot"
        time.sleep(0.5)

    server = scheduling["processes"]["server"]
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    time.sleep(3)
    scheduling["start_server"]()
    assert slots_taken(scheduling) == 1  # the lease survived the restart (kept on disk)

    done = wait(scheduling, flow_run_id)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    record = run_record(scheduling, flow_run_id)
    assert record["stages"]["train"]["state"] == "completed" and record["metrics"]["train_steps"] == 26
    assert slots_taken(scheduling) == 0  # given back: the next run trains at once
    assert not list((scheduling["home"] / "concurrency_leases").glob("*-*-*-*-*.json"))  # no lease left behind
