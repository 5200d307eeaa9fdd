"""`finetune chat`: talk to a run's model in the prompt format it was trained on, tokens streamed as
they are generated.

The merged model by default, or the base with the adapter (`--adapter`, 4-bit as in training); either
way the prompt is the tokenizer's chat template, which train and merge set from `tokenize.template`,
so chat sees exactly what any other tool that calls `apply_chat_template` sees.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from finetune.core.config import load_config
from finetune.core.errors import PermanentError
from finetune.core.record import reconcile_crashed


class ChatError(PermanentError, ValueError):
    """No model to talk to; the message says which run and what to do."""


def find_run(runs_dir: Path, name: str | None) -> Path:
    """The record folder of run `name` (its folder name, or the flow-run name at its end), else the
    newest completed run."""
    reconcile_crashed(Path(runs_dir))  # a run killed mid-way says crashed, not running
    folders = sorted(p.parent for p in Path(runs_dir).glob("*/run.json"))
    if not folders:
        raise ChatError(f"{runs_dir}: no runs yet; `finetune run` trains a model first")
    if name is not None:
        matching = [f for f in folders if f.name == name or f.name.endswith(f"-{name}")]
        if not matching:
            recent = ", ".join(f.name for f in folders[-5:])
            raise ChatError(f"--run {name}: no such run in {runs_dir}; the newest are {recent}")
        return matching[-1]
    completed = [f for f in folders if json.loads((f / "run.json").read_text(encoding="utf-8"))["status"] == "completed"]
    if not completed:
        raise ChatError(f"{runs_dir}: no completed run yet; name one with --run, or use --adapter once training finished")
    return completed[-1]


def _output(run: dict, stage: str) -> Path | None:
    entry = run["stages"].get(stage)
    return Path(entry["output_dir"]) if entry and entry.get("output_dir") else None


def load_chat_model(run_dir: Path, adapter: bool):
    """(model, tokenizer) of a run: its merged model, or its base with the adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.training.modeling import device_name, load_base

    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    if adapter:
        train_dir = _output(run, "train")
        saved_base = _output(run, "quantize_base")  # the 4-bit base train loaded; else quantized while loading
        base_dir = saved_base if saved_base is not None and saved_base.is_dir() else _output(run, "resolve_model")
        if train_dir is None or not (train_dir / "adapter").is_dir():
            raise ChatError(f"run {run_dir.name} has no adapter: its train stage did not complete")
        from peft import PeftModel

        quant = load_config(run_dir / "config.yaml").quant
        model = PeftModel.from_pretrained(load_base(base_dir, quant), train_dir / "adapter")
        return model.eval(), AutoTokenizer.from_pretrained(train_dir / "adapter")
    merge_dir = _output(run, "merge")
    if merge_dir is None or not (merge_dir / "model").is_dir():
        raise ChatError(
            f"run {run_dir.name} has no merged model: its merge stage did not complete; "
            "--adapter talks to the base with the adapter once training finished"
        )
    model = AutoModelForCausalLM.from_pretrained(merge_dir / "model", dtype="auto").to(device_name())
    return model.eval(), AutoTokenizer.from_pretrained(merge_dir / "model")


def reply(model, tokenizer, prompt: str, max_new_tokens: int) -> None:
    """Answer one prompt greedily, printing tokens to stdout as they come."""
    import torch
    from transformers import TextStreamer

    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**batch, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def prompts_from(args_prompt: str | None, file: Path | None, stdin: TextIO) -> Iterable[str]:
    """One prompt from the command line, every non-blank line of a file, or an interactive loop."""
    if args_prompt is not None:
        yield args_prompt
        return
    if file is not None:
        yield from (line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
        return
    while True:
        print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in {"exit", "quit"}:
            return
        if line.strip():
            yield line.strip()


def chat(runs_dir: Path, run: str | None, adapter: bool, prompt: str | None, file: Path | None, max_new_tokens: int) -> None:
    run_dir = find_run(runs_dir, run)
    model, tokenizer = load_chat_model(run_dir, adapter)
    print(f"[{run_dir.name}: {'base + adapter' if adapter else 'merged model'}]", file=sys.stderr)
    for text in prompts_from(prompt, file, sys.stdin):
        if prompt is None:
            print(f"> {text}" if file is not None else "model> ", end="\n" if file is not None else "", flush=True)
        reply(model, tokenizer, text, max_new_tokens)
