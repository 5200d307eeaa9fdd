"""The promotion gate as a Prefect task: never cached (it reads and may switch the champion)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_run_logger

from finetune.core.champion import gate
from finetune.core.config import PromoteConfig
from finetune.core.history import read_history
from finetune.reporting.history import history_markdown
from finetune.reporting.plots import history_chart
from finetune.reporting.run_card import promotion_markdown
from finetune.reporting.stats import compare_models


def _metrics(score_dir: Path | None) -> dict | None:
    if score_dir is None:
        return None
    metrics = json.loads((Path(score_dir) / "metrics.json").read_text(encoding="utf-8"))
    return {"loss": metrics["loss"], "format_adherence": metrics["format_adherence"]}


def _examples(score_dir: Path) -> pd.DataFrame:
    """score's per-prompt figures, in the held-out set's order."""
    return pd.read_json(Path(score_dir) / "samples.jsonl", lines=True)[["loss", "tokens", "format_adherence"]]


HISTORY_ARTIFACT = "retraining-history"  # a keyed artifact: the UI lists its versions, one per run


def publish_history(models_dir: Path) -> None:
    """The retraining history (models_dir/history.jsonl) as a new version of the keyed artifact."""
    entries, unreadable = read_history(models_dir)
    picture = f"![held-out loss across retrains](data:image/png;base64,{base64.b64encode(history_chart(entries)).decode('ascii')})" if entries else ""
    create_markdown_artifact(
        history_markdown(entries, unreadable, picture), key=HISTORY_ARTIFACT,
        description=f"Every gate decision and rollback of {models_dir}, oldest first",
    )  # fmt: skip


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    models_dir: Path, candidate_dir: Path, candidate_score_dir: Path, champion_dir: Path | None,
    champion_score_dir: Path | None, cfg: PromoteConfig, run_name: str, about: dict | None = None,
) -> dict:  # fmt: skip
    """`champion_score_dir` holds the score of `champion_dir`, the champion when the run looked (or None);
    `about`: what the history keeps of the run (its data key and rows)."""
    candidate, champion = _metrics(candidate_score_dir), _metrics(champion_score_dir)
    compared = compare_models(_examples(candidate_score_dir), _examples(champion_score_dir)) if champion_score_dir else None
    decision = gate(models_dir, candidate_dir, candidate, champion_dir, champion, cfg, run_name, compared, about)
    get_run_logger().info("promotion: %s (%s)", decision["decision"], decision["reason"])
    create_markdown_artifact(promotion_markdown(decision), key="promotion", description="Candidate vs champion")
    publish_history(Path(models_dir))
    _announce(Path(models_dir), decision, run_name)
    return decision


def _announce(models_dir: Path, decision: dict, run_name: str) -> None:
    """The decision as a Prefect event, `finetune.champion.<decision>` (promoted, kept, no-change), about the
    champion of `models_dir`: automations can act on it (`make deploy NOTIFY_BLOCK=...` alerts on promotions)."""
    from prefect.runtime import flow_run

    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run.get_id()}", "prefect.resource.role": "flow-run",
                "prefect.resource.name": str(flow_run.get_name())}] if flow_run.get_id() else []  # fmt: skip
    emit_event(
        event=f"finetune.champion.{decision['decision'].replace(' ', '-')}",
        resource={"prefect.resource.id": f"finetune.champion.{models_dir.resolve()}", "prefect.resource.name": str(models_dir)},
        related=related,
        payload={"run_name": run_name, "decision": decision["decision"], "reason": decision["reason"], "model_dir": str(decision["candidate_dir"])},
    )
