"""The per-run record `runs/<run-name>/`: resolved config, run.json and the human reports.

Stage outputs are referenced by path, never copied; only the small markdown reports are copied so the
record reads on its own.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.core.config import FinetuneConfig, dump_config
from finetune.core.outputs import read_manifest, write_text_atomic

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "prefect", "pandera", "pandas")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


@dataclass
class RunRecord:
    run_dir: Path
    run_name: str
    flow_run_id: str
    config_path: str | None
    started_at: str
    started: float = field(default_factory=time.monotonic)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    promotion: dict[str, Any] | None = None  # the gate's decision, with the numbers it compared
    data_changes: dict[str, Any] | None = None  # the data against the champion's (finetune.reporting.data_changes)
    environment: dict[str, Any] = field(default_factory=lambda: {"versions": versions(), "hardware": hardware()})
    process: dict[str, Any] = field(default_factory=lambda: {"host": socket.gethostname(), "pid": os.getpid()})

    @classmethod
    def begin(
        cls, config: FinetuneConfig, config_path: str | None, run_name: str, flow_run_id: str,
        flow_run_state: Callable[[str], str | None] | None = None,
    ) -> RunRecord:  # fmt: skip
        """A new record, `running`; earlier records whose run died are marked crashed first (reconcile_crashed)."""
        reconcile_crashed(Path(config.paths.runs_dir), flow_run_state)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_dir = Path(config.paths.runs_dir) / f"{stamp}-{run_name}"
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        record = cls(run_dir, run_dir.name, flow_run_id, config_path, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        record.save()
        return record

    def stage_done(
        self, stage: str, state: str, seconds: float, output_dir: Path | None, memory: dict[str, Any] | None = None
    ) -> None:
        """`memory`: the stage's peak_rss_bytes and peak_gpu_bytes (finetune.core.measure.PeakMemory), None where not measured."""
        manifest = read_manifest(output_dir) if output_dir else None
        self.stages[stage] = {
            "state": state,
            "key": manifest["key"] if manifest else None,
            "seconds": round(seconds, 2),
            "output_dir": str(Path(output_dir).resolve()) if output_dir else None,
            **(memory or {"peak_rss_bytes": None, "peak_gpu_bytes": None}),
        }
        self.save()

    def output(self, stage: str) -> Path | None:
        entry = self.stages.get(stage)
        return Path(entry["output_dir"]) if entry and entry["output_dir"] else None

    def metrics(self) -> dict[str, Any]:
        train = read_json(self.output("train") / "summary.json") if self.output("train") else {}
        evaluation = read_json(self.output("evaluate") / "metrics.json") if self.output("evaluate") else {}
        base, tuned = evaluation.get("base", {}), evaluation.get("tuned", {})
        return {
            "train_steps": train.get("train_steps"),
            "resumed_from_step": train.get("resumed_from_step"),
            "micro_batch": train.get("micro_batch"),
            "micro_batch_adjustments": train.get("micro_batch_adjustments"),
            "final_train_loss": train.get("final_train_loss"),
            "eval_loss_base": base.get("loss"),
            "eval_loss_tuned": tuned.get("loss"),
            "eval_perplexity_base": base.get("perplexity"),
            "eval_perplexity_tuned": tuned.get("perplexity"),
            "format_adherence_base": base.get("format_adherence"),
            "format_adherence_tuned": tuned.get("format_adherence"),
            "rouge_l_base": base.get("rouge_l"),
            "rouge_l_tuned": tuned.get("rouge_l"),
            "eval_examples": evaluation.get("examples"),
            "eval_differences": evaluation.get("differences"),  # tuned - base with paired 95% intervals
            "trainable_params": train.get("trainable_params"),
            "total_params": train.get("total_params"),
            "peak_memory_bytes": train.get("peak_memory_bytes"),
            "peak_memory_kind": train.get("peak_memory_kind"),
            "base_memory_bytes_loaded": train.get("base_memory_bytes_loaded"),
            "base_memory_bytes_16bit": train.get("base_memory_bytes_16bit"),
            "train_seconds": train.get("train_seconds"),
            "compute_dtype": train.get("compute_dtype"),
            "device": train.get("device"),
            "exported": (read_json(self.output("export") / "export_check.json") or {}).get("files") if self.output("export") else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "run_dir": str(self.run_dir.resolve()),
            "flow_run_id": self.flow_run_id,
            "status": self.status,
            "error": self.error,
            "config_path": self.config_path,
            "started_at": self.started_at,
            "seconds": round(time.monotonic() - self.started, 2),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # last seen alive, while it runs
            "stages": self.stages,
            "promotion": self.promotion,
            "data_changes": self.data_changes,
            "process": self.process,  # who writes this record while it runs: reconcile_crashed checks it
            "metrics": self.metrics(),
            **self.environment,
        }

    def save(self) -> None:
        write_text_atomic(self.run_dir / "run.json", json.dumps(self.as_dict(), indent=2))

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        self.status, self.error = status, error
        for stage, name in (("prepare", "data_report.md"), ("evaluate", "evaluation.md")):
            source = self.output(stage)
            if source and (source / "report.md").is_file():
                shutil.copyfile(source / "report.md", self.run_dir / name)
        record = self.as_dict()
        write_text_atomic(self.run_dir / "run.json", json.dumps(record, indent=2))
        return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


ENDED_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}  # Prefect's final state types


def _last_seen(record: dict, path: Path) -> str:
    """When the record was last written by its run: its `updated_at`, or the file's time for older records."""
    return record.get("updated_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


def reconcile_crashed(runs_dir: Path, flow_run_state: Callable[[str], str | None] | None = None) -> list[Path]:
    """Mark as crashed every record still `running` that its run can no longer finish: its process, on this
    host, is gone (killed, or its machine restarted); or, for a run of another host, the Prefect server that
    `flow_run_state(flow_run_id)` asks says its flow run has ended (a machine lost with its worker: the
    server marks the run Crashed when its heartbeats stop). Each says when the run was last seen alive.
    Records of other hosts are otherwise left to their own. Returns the record folders it changed."""
    host, changed = socket.gethostname(), []
    for path in sorted(Path(runs_dir).glob("*/run.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a record being written right now, or not a record
        process = record.get("process") or {}
        if record.get("status") != "running":
            continue
        if process.get("host") == host:
            if _alive(int(process.get("pid", 0))):
                continue
            why = f"the run's process (pid {process['pid']} on {host}) ended without finishing this record: it was killed or its machine stopped"
        else:
            state = flow_run_state(str(record.get("flow_run_id"))) if flow_run_state and record.get("flow_run_id") else None
            if state not in ENDED_STATES:
                continue
            why = f"the run's process (pid {process.get('pid')} on {process.get('host')}) never finished this record; Prefect reports its flow run {state}"
        record["status"] = "crashed"
        record["error"] = f"{why}; last seen alive at {_last_seen(record, path)}; run again to resume from the stages and checkpoints it left"
        write_text_atomic(path, json.dumps(record, indent=2))
        changed.append(path.parent)
    return changed
