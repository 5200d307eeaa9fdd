"""The data stages at production size: prepare (read, validate, dedupe, conflict and leak checks) and
tokenize of a raw folder, each in a fresh process, with its seconds, rows per second and peak resident
memory of the stage alone (from its start: imports and the tokenizer's model folder are not counted).

    python benchmarks/make_rows.py --rows 1000000 --out /tmp/rows-1m
    python benchmarks/data_speed.py --raw /tmp/rows-1m --out benchmarks/results/cpu-data-1m.json

The held-out set is the project's 25 prompts; the tokenizer is the embedded model's (resolved once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from finetune.core.config import ModelConfig, load_config
from finetune.core.measure import PeakMemory
config = load_config(Path({root!r}) / "configs/default.yaml", [])
started = time.perf_counter()
if {stage!r} == "prepare":
    from finetune.stages.prepare import PrepareInputs, prepare_dataset
    memory = PeakMemory()
    out = prepare_dataset(PrepareInputs(raw_dir=Path({raw!r}), heldout_path=Path({root!r}) / "data/eval/heldout.jsonl",
                                        data=config.data, template=config.tokenize.template), Path({work!r}))
    rows = json.loads((out / "manifest.json").read_text()).get("train_rows")
else:
    from finetune.stages.resolve import ResolveInputs, resolve_model
    from finetune.stages.tokenize import TokenizeInputs, tokenize_dataset
    model_dir = resolve_model(ResolveInputs.of(ModelConfig()), Path({work!r}))
    prepared = sorted(Path({work!r}, "prepare").glob("*/manifest.json"))[-1].parent
    started = time.perf_counter()
    memory = PeakMemory()
    out = tokenize_dataset(TokenizeInputs(prepared_dir=prepared, model_dir=model_dir, tokenize=config.tokenize), Path({work!r}))
    rows = json.loads((out / "stats.json").read_text())["train"]["examples"]
print(json.dumps({{"seconds": round(time.perf_counter() - started, 1), "rows": rows, "peak_rss_bytes": memory.read()["peak_rss_bytes"], "output": str(out)}}))
"""


def run_stage(stage: str, raw: Path, work: Path) -> dict:
    code = STAGE.format(root=str(ROOT), raw=str(raw), work=str(work), stage=stage)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak = result.pop("peak_rss_bytes")  # of the stage alone, from its start (finetune.core.measure)
    result["peak_rss_gib"] = round(peak / 2**30, 2) if peak else None
    result["rows_per_second"] = round(result["rows"] / result["seconds"]) if result["rows"] else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-data-bench"))
    parser.add_argument("--stages", default="prepare,tokenize", help="tokenize alone: --work is a folder a run prepared")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stages = args.stages.split(",")
    work = args.work / str(time.time_ns()) if "prepare" in stages else args.work
    files = sorted(p for p in args.raw.iterdir() if p.is_file())
    result = {
        "raw_files": len(files), "raw_bytes": sum(p.stat().st_size for p in files),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    if args.out.is_file():  # keep the figures of stages not run now
        result = {**json.loads(args.out.read_text()), **result}
    for stage in stages:
        result[stage] = {**run_stage(stage, args.raw, work), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(json.dumps({stage: result[stage]}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
