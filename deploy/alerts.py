"""Alerts of scheduled retraining: Prefect automations that send a notification through a block you name
when a `finetune` flow run fails or crashes, and when a run promotes a new champion.

    make deploy NOTIFY_BLOCK=slack-webhook/ml-team       # <block type slug>/<block name>

The block is any of Prefect's notification blocks (Slack, Microsoft Teams, a custom webhook, e-mail
through Apprise, ...), created first in the UI (Blocks) or in Python. `make deploy` runs this script when
NOTIFY_BLOCK is set; automations of the same names are replaced, so running it again is safe. A promotion
is the event `finetune.champion.promoted` that the gate emits (tasks/promotion.py).
"""

from __future__ import annotations

import sys

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

FAILED, PROMOTED = "finetune-alert-failed", "finetune-alert-promoted"
OF_FINETUNE = {"prefect.resource.role": "flow", "prefect.resource.name": "finetune"}


def block_document_id(spec: str):
    slug, _, name = spec.partition("/")
    if not slug or not name:
        raise SystemExit(f"NOTIFY_BLOCK={spec!r}: write it as <block type slug>/<block name>, e.g. slack-webhook/ml-team")
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(name=name, block_type_slug=slug).id
        except ObjectNotFound:
            raise SystemExit(f"NOTIFY_BLOCK={spec}: no {slug} block named {name!r} on this server; create it in the UI (Blocks) first") from None


def replace(automation: Automation) -> None:
    while True:  # names need not be unique on the server: remove every earlier one
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:
            break
    automation.create()


def main(spec: str) -> None:
    block = block_document_id(spec)
    replace(Automation(
        name=FAILED, description="Notify when a finetune flow run fails or crashes.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=OF_FINETUNE, posture=Posture.Reactive, threshold=1, within=0,
        ),
        actions=[SendNotification(
            block_document_id=block, subject="finetune run {{ flow_run.name }}: {{ flow_run.state.name }}",
            body="The retrain {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}",
        )],
    ))  # fmt: skip
    replace(Automation(
        name=PROMOTED, description="Notify when a finetune run promotes a new champion.",
        trigger=EventTrigger(
            expect={"finetune.champion.promoted"}, match={"prefect.resource.id": "finetune.champion.*"},
            posture=Posture.Reactive, threshold=1, within=0,
        ),
        actions=[SendNotification(
            block_document_id=block, subject="finetune: {{ event.payload.run_name }} promoted",
            body="The retrain {{ event.payload.run_name }} is the new champion ({{ event.payload.model_dir }}): {{ event.payload.reason }}",
        )],
    ))  # fmt: skip
    print(f"alerts: {FAILED} and {PROMOTED} notify through {spec}")


if __name__ == "__main__":
    main(sys.argv[1])
