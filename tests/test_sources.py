"""Training data from where teams keep it (data.sources): a bucket on an S3-compatible server, a local
dataset repository read through `datasets`, a hub dataset id. The server is moto's, started as its own
process on loopback with credentials enforced (an IAM user's key); its access log says which objects were
read."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, workspace_overrides

TINY = str(ROOT / "configs" / "tiny.yaml")
BUCKET, PREFIX = "pairs", "nightly"
NEW_ROW = {"instruction": "What does a rain garden do?", "response": "It holds storm water so that it soaks into the ground.", "topic": "environment"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server, whose first three requests (the IAM user, its key and its policy) are the last it takes
    without a valid signature; a bucket with the project's training files under nightly/ and an empty export."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "access.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=out)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.2)
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(allow))
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    for path in sorted((ROOT / "data/raw").iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/2026-12-02-export.jsonl", Body=b"")  # nothing new that day
    yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "client": client, "log": log}
    server.terminate()
    server.wait(timeout=30)


def _object_reads(s3, since: int) -> list[str]:
    """The objects of the bucket read (GET of a key, not a listing) since byte `since` of the access log."""
    text = s3["log"].read_bytes()[since:].decode(errors="replace")
    return re.findall(rf'"GET /{BUCKET}/([^?\s]+) HTTP', text)


def _listings(s3, since: int) -> int:
    return len(re.findall(rf'"GET /{BUCKET}/?\?[^"]*list-type=2', s3["log"].read_bytes()[since:].decode(errors="replace")))


def _bucket_overrides(workspace: Path, s3, secret_block: str, url: str = f"s3://{BUCKET}/{PREFIX}/") -> list[str]:
    no_model = workspace / "no-model"
    no_model.mkdir(exist_ok=True)  # resolve fails at once after prepare: these runs are about the data
    source = {"url": url, "storage_options": {"endpoint_url": s3["endpoint"]}, "credentials_secret": secret_block}
    return [*workspace_overrides(workspace), "paths.raw_dir=null", f"data.sources=[{json.dumps(source)}]", f"model.base={no_model}"]


def _run(overrides: list[str]) -> dict:
    from flows.finetune_flow import StageFailed, finetune

    with pytest.raises(StageFailed) as failure:
        finetune(TINY, overrides)
    return json.loads((failure.value.run_dir / "run.json").read_text())


def _flow_logs(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_a_run_reads_a_bucket_and_an_unchanged_bucket_is_not_read_again(prefect_server, workspace, s3):
    """Three runs through the flow (prepare, then a model folder that resolve refuses): the first reads every
    object once, the empty export listed with 0 rows; the second lists the bucket and takes prepare from
    cache without one object read; after an object is edited, the third prepares again with the new row.
    The credentials come from a Prefect Secret block and appear in no log or record."""
    from prefect.blocks.system import Secret

    Secret(value=json.dumps({"key": s3["key"], "secret": s3["secret"]})).save("data-bucket", overwrite=True)
    overrides = _bucket_overrides(workspace, s3, "data-bucket")

    since = s3["log"].stat().st_size
    first = _run(overrides)
    assert first["stages"]["prepare"]["state"] == "completed" and first["error"].startswith("resolve_model:")
    objects = sorted(p.name for p in (ROOT / "data/raw").iterdir()) + ["2026-12-02-export.jsonl"]
    assert sorted(key.rsplit("/", 1)[-1] for key in _object_reads(s3, since)) == sorted(objects)
    prepared = Path(first["stages"]["prepare"]["output_dir"])
    report = json.loads((prepared / "report.json").read_text())
    (source,) = report["sources"]
    assert source["source"] == f"s3://{BUCKET}/{PREFIX}/" and source["config"] == "data.sources[0]" and source["rows"] == 104
    assert {"file": f"s3://{BUCKET}/{PREFIX}/2026-12-02-export.jsonl", "rows": 0, "rejected": 0} in report["files"]
    assert set(pd.read_parquet(prepared / "train.parquet").source_file) == {f"s3://{BUCKET}/{PREFIX}/{name}" for name in objects[:-1]}

    since = s3["log"].stat().st_size
    second = _run(overrides)
    assert second["stages"]["prepare"]["state"] == "cached"
    assert second["stages"]["prepare"]["output_dir"] == first["stages"]["prepare"]["output_dir"]
    assert _listings(s3, since) >= 1 and _object_reads(s3, since) == []

    body = s3["client"].get_object(Bucket=BUCKET, Key=f"{PREFIX}/environment.jsonl")["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=f"{PREFIX}/environment.jsonl", Body=body + json.dumps(NEW_ROW).encode() + b"\n")
    third = _run(overrides)
    assert third["stages"]["prepare"]["state"] == "completed"
    assert third["stages"]["prepare"]["output_dir"] != first["stages"]["prepare"]["output_dir"]
    train = pd.read_parquet(Path(third["stages"]["prepare"]["output_dir"]) / "train.parquet")
    assert NEW_ROW["instruction"] in set(train.instruction) and len(train) == 105

    written = "\n".join(p.read_text(errors="replace") for p in workspace.rglob("*") if p.is_file() and p.suffix in {".json", ".md", ".yaml", ".jsonl"})
    logs = "\n".join(_flow_logs(run["flow_run_id"]) for run in (first, second, third))
    assert "data.sources[0]: s3://pairs/nightly/, 6 object(s)" in logs  # the logs were read
    for text in (logs, written):
        assert s3["secret"] not in text


@pytest.mark.parametrize("problem", ["missing bucket", "wrong secret", "unknown key"])
def test_a_bucket_that_cannot_be_read_fails_prepare_with_one_line_naming_the_source(prefect_server, workspace, s3, problem):
    from prefect.blocks.system import Secret

    key, secret, url = s3["key"], s3["secret"], f"s3://{BUCKET}/{PREFIX}/"
    if problem == "missing bucket":
        url = "s3://no-such-bucket/nightly/"
    elif problem == "wrong secret":
        secret = "wrongSecretValue0123456789"
    else:
        key = "AKIANOTAKEY000000000"
    Secret(value=json.dumps({"key": key, "secret": secret})).save("data-bucket-bad", overwrite=True)

    record = _run(_bucket_overrides(workspace, s3, "data-bucket-bad", url))

    assert record["stages"]["prepare"]["state"] == "failed" and "\n" not in record["error"]
    expected = {"missing bucket": "not found", "wrong secret": "access refused", "unknown key": "access refused"}[problem]
    assert record["error"].startswith(f"prepare: data.sources[0].url={url}: {expected}"), record["error"]
    text = json.dumps(record) + _flow_logs(record["flow_run_id"])
    assert secret not in text


def test_finetune_validate_reads_a_bucket_with_the_machines_own_credentials(workspace, s3):
    """`finetune validate` with the key in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (no Secret block): the
    data report names the bucket's files; a wrong prefix is exit 1 with one line."""
    source = {"url": f"s3://{BUCKET}/{PREFIX}/", "storage_options": {"endpoint_url": s3["endpoint"]}}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3["key"], "AWS_SECRET_ACCESS_KEY": s3["secret"], "AWS_DEFAULT_REGION": "us-east-1"}

    def validate(source: dict) -> subprocess.CompletedProcess:
        overrides = [*workspace_overrides(workspace), "paths.raw_dir=null", f"data.sources=[{json.dumps(source)}]"]
        args = [sys.executable, "-m", "finetune.cli", "validate", *(f"--set={item}" for item in overrides)]
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    done = validate(source)
    assert done.returncode == 0, done.stderr
    assert f"| s3://{BUCKET}/{PREFIX}/ | data.sources[0] | 6 object(s) by ETag | 10" in done.stdout  # 104 or 105 rows
    assert "| 2026-12-02-export.jsonl | 0 | 0 |" in done.stdout

    missing = validate({**source, "url": f"s3://{BUCKET}/no-such-prefix/"})
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"finetune: data error: data.sources[0].url=s3://{BUCKET}/no-such-prefix/: no data files (.jsonl, .json, .csv, .parquet, .txt (also compressed: *.gz, *.bz2, *.xz)) under it; check the prefix"
    assert s3["secret"] not in done.stdout + done.stderr + missing.stderr


def _dataset_repo(folder: Path) -> Path:
    """A dataset repository as the hub lays it out: data files per config and split, and a README.md card
    whose YAML header declares them."""
    (folder / "data").mkdir(parents=True)
    rows = [json.loads(line) for path in sorted((ROOT / "data/raw").iterdir()) for line in path.read_text().splitlines() if line.strip()]
    chat = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]} for r in rows]
    pd.DataFrame(rows[:90]).to_parquet(folder / "data/pairs-train.parquet")
    pd.DataFrame(rows[90:]).to_parquet(folder / "data/pairs-extra.parquet")
    pd.DataFrame(chat).to_parquet(folder / "data/chat-train.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: pairs\n  data_files:\n  - split: train\n    path: data/pairs-train.parquet\n  - split: extra\n    path: data/pairs-extra.parquet\n"
        "- config_name: chat\n  data_files:\n  - split: train\n    path: data/chat-train.parquet\n"
        "---\n# Support pairs\n"
    )
    return folder


def _prepare_from(workspace: Path, heldout: dict | None = None, **source) -> tuple[Path, str]:
    """(prepared folder, prepare key) of one dataset source (and a held-out source), through list_sources and
    the prepare stage."""
    from finetune.core.config import load_config
    from finetune.data.sources import list_sources
    from finetune.stages.prepare import PrepareInputs, prepare_dataset

    overrides = [*workspace_overrides(workspace), "paths.raw_dir=null", f"data.sources=[{json.dumps(source)}]"]
    if heldout is not None:
        overrides += ["paths.heldout_path=/nowhere/heldout.jsonl", f"data.heldout_source={json.dumps(heldout)}"]
    config = load_config(Path(TINY), overrides)
    inputs = PrepareInputs.of(config, *list_sources(config.data, secret=lambda name: ""))
    return prepare_dataset(inputs, config.paths.processed_dir), prepare_dataset.key(inputs)


def test_a_local_dataset_repository_is_read_through_datasets_by_config_and_split(workspace):
    """The card's configs and splits pick the rows (a chat config in messages layout, a pairs config in
    Parquet); the report names the dataset, and an edited data file (a new revision) changes the key."""
    repo = _dataset_repo(workspace / "support-pairs")

    prepared, key = _prepare_from(workspace, dataset=str(repo), name="pairs", split="train")
    train = pd.read_parquet(prepared / "train.parquet")
    assert len(train) == 90 and set(train.source_file) == {f"{repo}[pairs]:train"}
    assert sorted(train.source_line)[:2] == [1, 2]
    (source,) = json.loads((prepared / "report.json").read_text())["sources"]
    assert source["kind"] == "dataset" and source["rows"] == 90 and source["source"] == f"{repo}[pairs]:train"

    chat, chat_key = _prepare_from(workspace, dataset=str(repo), name="chat", split="train")
    assert len(pd.read_parquet(chat / "train.parquet")) == 104 and chat_key != key

    pairs = pd.read_parquet(repo / "data/pairs-train.parquet")
    pd.concat([pairs, pd.DataFrame([NEW_ROW])], ignore_index=True).to_parquet(repo / "data/pairs-train.parquet")
    edited, edited_key = _prepare_from(workspace, dataset=str(repo), name="pairs", split="train")
    assert edited_key != key and NEW_ROW["instruction"] in set(pd.read_parquet(edited / "train.parquet").instruction)


def test_the_held_out_pairs_can_come_from_a_dataset_split(workspace):
    """data.heldout_source: the card's other split is the held-out set (paths.heldout_path is not read)."""
    repo = _dataset_repo(workspace / "support-pairs")

    prepared, key = _prepare_from(workspace, {"dataset": str(repo), "name": "pairs", "split": "extra"}, dataset=str(repo), name="pairs")

    evaluation = pd.read_parquet(prepared / "eval.parquet")
    assert len(evaluation) == 14 and set(evaluation.source_file) == {f"{repo}[pairs]:extra"}
    assert len(pd.read_parquet(prepared / "train.parquet")) == 90
    _, plain_key = _prepare_from(workspace, dataset=str(repo), name="pairs")
    assert plain_key != key


def test_a_dataset_split_or_hub_id_that_cannot_be_read_names_the_source(workspace, monkeypatch):
    from finetune.data.readers import DataError

    repo = _dataset_repo(workspace / "support-pairs")
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*Bad split: validation. Available splits: \['train', 'extra'\]"):
        _prepare_from(workspace, dataset=str(repo), name="pairs", split="validation")

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.sources\[0\].dataset=acme/support-pairs: the hub is off on this machine \(HF_HUB_OFFLINE=1\)"):
        _prepare_from(workspace, dataset="acme/support-pairs")


def test_a_store_that_cannot_be_reached_is_retried_and_bad_options_are_not():
    """A closed port is StoreUnreachable (not a PermanentError: the list-sources task retries it); an option
    the filesystem does not take is a DataError naming data.sources[i].storage_options."""
    from finetune.core.config import DataConfig, DataSource
    from finetune.core.errors import PermanentError
    from finetune.data.readers import DataError
    from finetune.data.sources import StoreUnreachable, list_sources

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe is closed
    options = {"endpoint_url": f"http://127.0.0.1:{closed}", "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}}

    with pytest.raises(StoreUnreachable, match=r"data.sources\[0\].url=s3://pairs/nightly/: the store could not be reached") as failure:
        list_sources(DataConfig(sources=[DataSource(url="s3://pairs/nightly/", storage_options=options)]), secret=lambda name: "")
    assert not isinstance(failure.value, PermanentError)

    with pytest.raises(DataError, match=r"data.sources\[0\].storage_options: TypeError: .*'no_such_option'"):
        list_sources(DataConfig(sources=[DataSource(url="s3://pairs/nightly/", storage_options={**options, "no_such_option": 1})]), secret=lambda name: "")
