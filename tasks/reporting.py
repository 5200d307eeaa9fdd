"""Prefect artifacts of a run, made from the stage outputs so that cached runs show them too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from finetune.record import run_card


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


@task(name="publish-reports")
def publish_reports(record: dict[str, Any]) -> None:
    """Run card, data report, training loss table, evaluation, and links to the adapter and merged model."""
    outputs = {name: Path(stage["output_dir"]) for name, stage in record["stages"].items() if stage.get("output_dir")}
    create_markdown_artifact(run_card(record), key="run-card", description=f"Run card of {record['run_name']}")
    if "prepare" in outputs and (text := _read(outputs["prepare"] / "report.md")):
        create_markdown_artifact(text, key="data-report", description="Rows per topic and split, lengths, rejects")
    rejected = [
        {"stage": stage, **row}
        for stage in ("prepare", "tokenize")
        if stage in outputs and (outputs[stage] / "rejected.parquet").is_file()
        for row in pd.read_parquet(outputs[stage] / "rejected.parquet").astype(str).to_dict("records")
    ]
    if rejected:
        create_table_artifact(rejected, key="rejected-rows", description="Rows left out, with file, line and reason")
    if "train" in outputs and (text := _read(outputs["train"] / "log_history.json")):
        rows = [
            {"step": entry["step"], "loss": round(entry["loss"], 4), "learning_rate": entry.get("learning_rate"),
             "grad_norm": round(entry["grad_norm"], 4) if entry.get("grad_norm") is not None else None}
            for entry in json.loads(text)
        ]  # fmt: skip
        create_table_artifact(rows, key="training-loss", description="Training loss per optimizer step")
        create_link_artifact(
            (outputs["train"] / "adapter").as_uri(), link_text="LoRA adapter", key="adapter", description="Adapter folder"
        )
    if "evaluate" in outputs and (text := _read(outputs["evaluate"] / "report.md")):
        create_markdown_artifact(text, key="evaluation", description="Held-out metrics, base vs tuned, and samples")
    if "merge" in outputs:
        create_link_artifact(
            (outputs["merge"] / "model").as_uri(), link_text="Merged model", key="merged-model",
            description="Standalone model: AutoModelForCausalLM.from_pretrained(<this folder>)",
        )  # fmt: skip
