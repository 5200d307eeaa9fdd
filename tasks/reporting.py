"""Prefect artifacts of a run, made from the stage outputs so that cached runs show them too."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from finetune.reporting.run_card import EVALUATION_CHART, TRAINING_CURVE, run_card


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _image(path: Path, alt: str) -> str:
    """The PNG inline as a data URI: the UI's markdown artifacts render it, and no file server is needed."""
    if not path.is_file():
        return ""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')})\n\n"


def _loss_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"step": entry["step"], "loss": f"{entry['loss']:.4f}", "learning rate": f"{entry.get('learning_rate', 0.0):.2e}",
         "gradient norm": f"{entry['grad_norm']:.3f}" if entry.get("grad_norm") is not None else "-"}
        for entry in log_history
    ]  # fmt: skip


@task(name="publish-reports")
def publish_reports(record: dict[str, Any]) -> None:
    """Run card, data report, training loss table, evaluation, and links to the adapter and merged model."""
    outputs = {name: Path(stage["output_dir"]) for name, stage in record["stages"].items() if stage.get("output_dir")}
    create_markdown_artifact(run_card(record), key="run-card", description=f"Run card of {record['run_name']}")
    run_dir = Path(record["run_dir"])
    changes = _read(run_dir / "data_changes.md")
    if "prepare" in outputs and (text := _read(outputs["prepare"] / "report.md")):
        text += f"\n{changes.replace('# Data since', '## Data since', 1)}" if changes else ""
        create_markdown_artifact(text, key="data-report", description="Rows per topic and split, lengths, rejects, and what changed since the champion")
    if changes:
        create_markdown_artifact(changes, key="data-changes", description="Rows, files, rejects, topics and lengths against the champion's data")
    rejected = [
        {"stage": stage, **row}
        for stage in ("prepare", "tokenize")
        if stage in outputs and (outputs[stage] / "rejected.parquet").is_file()
        for row in pd.read_parquet(outputs[stage] / "rejected.parquet").astype(str).to_dict("records")
    ]
    if rejected:
        create_table_artifact(rejected, key="rejected-rows", description="Rows left out, with file, line and reason")
    if "train" in outputs and (text := _read(outputs["train"] / "log_history.json")):
        history = json.loads(text)
        create_markdown_artifact(
            f"# Training curve\n\n{_image(run_dir / TRAINING_CURVE, 'training loss and learning rate per step')}"
            f"{len(history)} optimizer steps; final loss {history[-1]['loss']:.4f}. Image: `{run_dir / TRAINING_CURVE}`\n",
            key="training-curve", description="Loss, gradient norm and learning rate per optimizer step",
        )  # fmt: skip
        create_table_artifact(_loss_rows(history), key="training-loss", description="Training loss per optimizer step")
        create_link_artifact(
            (outputs["train"] / "adapter").as_uri(), link_text="LoRA adapter", key="adapter", description="Adapter folder"
        )
    if "evaluate" in outputs and (text := _read(outputs["evaluate"] / "report.md")):
        title, _, rest = text.partition("\n")
        create_markdown_artifact(
            f"{title}\n\n{_image(run_dir / EVALUATION_CHART, 'tuned minus base with 95% intervals')}{rest.lstrip()}",
            key="evaluation", description="Held-out metrics, base vs tuned with 95% intervals, and samples",
        )
    if "merge" in outputs:
        create_link_artifact(
            (outputs["merge"] / "model").as_uri(), link_text="Merged model", key="merged-model",
            description="Standalone model: AutoModelForCausalLM.from_pretrained(<this folder>)",
        )  # fmt: skip
