"""A hub token from a Prefect Secret block (or HF_TOKEN) reaches the hub and nothing else: not the logs,
not the run record. The hub here is a local HTTP server that records what it is sent and answers
"repository not found"."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT, workspace_overrides

TINY = str(ROOT / "configs" / "tiny.yaml")
SECRET = "hf_secretFromBlock_7Q2x"
ENV_TOKEN = "hf_secretFromEnv_9Z4k"


@pytest.fixture
def hub(monkeypatch):
    """A stand-in hub endpoint on loopback: records (path, Authorization header), answers 404 RepoNotFound."""
    import huggingface_hub.constants

    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            seen.append((self.path, self.headers.get("authorization", "")))
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield seen
    server.shutdown()


def _flow_logs(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs go to the API in batches; send what is queued before reading
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _everything_written(workspace) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workspace.rglob("*") if p.is_file() and p.suffix in {".json", ".md", ".yaml", ".jsonl"})


@pytest.mark.parametrize("source", ["secret block", "environment"])
def test_the_hub_token_reaches_the_hub_and_no_log_or_record(prefect_server, workspace, hub, monkeypatch, source):
    import json

    from prefect.blocks.system import Secret

    from flows.finetune_flow import StageFailed, finetune

    overrides = [*workspace_overrides(workspace), "model.base=acme/gated-model"]
    if source == "secret block":
        Secret(value=SECRET).save("hub-token", overwrite=True)
        overrides.append("model.token_secret=hub-token")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        token = SECRET
    else:
        monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
        token = ENV_TOKEN

    with pytest.raises(StageFailed, match="acme/gated-model: not found on the hub") as failure:
        finetune(TINY, overrides)

    assert ("/api/models/acme/gated-model/revision/main", f"Bearer {token}") in hub  # the token went to the hub
    record = json.loads((failure.value.run_dir / "run.json").read_text())
    logs = _flow_logs(record["flow_run_id"])
    assert "resolve_model" in logs  # the logs were read
    if source == "secret block":
        assert "hub token from the Prefect Secret block 'hub-token'" in logs
    for text in (logs, _everything_written(workspace)):
        assert token not in text
