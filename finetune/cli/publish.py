"""A finished run's model, taken elsewhere: `finetune export` (GGUF files and an Ollama Modelfile, through
the export stage) and `finetune push` (the merged model, or the adapter alone, to a hub repository with a
model card made from the run card).

Both read the run's record (runs/<run>/run.json) for the folders its stages wrote, and the run's own
config (runs/<run>/config.yaml) for the prompt format it was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from finetune.cli.chat import ChatError, find_run
from finetune.core.config import FinetuneConfig, load_config
from finetune.core.errors import PermanentError

DEFAULT_EXPORT = ["q8_0"]  # `finetune export` without export.gguf in the config


class PushError(PermanentError, RuntimeError):
    """Nothing was uploaded; the message says why and what to do (never the token)."""


def _stage_dir(run: dict, stage: str, run_dir: Path) -> Path:
    entry = run["stages"].get(stage) or {}
    folder = Path(entry["output_dir"]) if entry.get("output_dir") else None
    if folder is None or not folder.is_dir():
        raise ChatError(f"{run_dir.name}: no {stage} output (stage {entry.get('state', 'not run')}); `finetune run` finishes it first")
    return folder


def run_config(run_dir: Path, overrides: list[str]) -> FinetuneConfig:
    """The run's own config, with `overrides` on top (export.* for `finetune export`)."""
    return load_config(run_dir / "config.yaml", overrides)


def export_run(runs_dir: Path, name: str | None, overrides: list[str], output_dir: Path) -> Path:
    """The export stage on run `name`'s merged model (cached by key like in a run); its output folder."""
    from finetune.stages.export import ExportInputs, export_gguf

    run_dir = find_run(runs_dir, name)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    config = run_config(run_dir, overrides)
    export = config.export if config.export.gguf else config.export.model_copy(update={"gguf": DEFAULT_EXPORT})
    inputs = ExportInputs(
        merged_dir=_stage_dir(run, "merge", run_dir), prepared_dir=_stage_dir(run, "prepare", run_dir),
        template=config.tokenize.template, export=export,
    )  # fmt: skip
    return export_gguf(inputs, output_dir)


def model_card(run_dir: Path, base: str, adapter: bool) -> str:
    """README.md for the hub: metadata the hub reads, then the run card."""
    card = (run_dir / "run_card.md").read_text(encoding="utf-8") if (run_dir / "run_card.md").is_file() else ""
    library = "peft" if adapter else "transformers"
    header = ["---", f"library_name: {library}", "tags: [qlora, fine-tuned]"]
    if not base.startswith("builtin:") and not Path(base).exists():
        header.append(f"base_model: {base}")
    return "\n".join([*header, "---", "", card])


def _token(config: FinetuneConfig, secret: Callable[[str], str]) -> str:
    from finetune.core.stage import Hooks
    from finetune.stages.resolve import hub_token

    token = hub_token(config.model, Hooks(secret=secret))
    if not token:
        raise PushError("no hub token: set HF_TOKEN to a token with write access, or model.token_secret to a Prefect Secret block holding one")
    return token


def push_run(runs_dir: Path, name: str | None, repo: str, adapter: bool, private: bool, secret: Callable[[str], str]) -> str:
    """Upload run `name`'s merged model (or adapter) and its model card to `repo`; the repository's URL.
    `secret(name)`: the value of a Prefect Secret block, for model.token_secret."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = find_run(runs_dir, name)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    config = run_config(run_dir, [])
    folder = _stage_dir(run, "train", run_dir) / "adapter" if adapter else _stage_dir(run, "merge", run_dir) / "model"
    token = _token(config, secret)
    operations = [CommitOperationAdd(str(p.relative_to(folder)), str(p)) for p in sorted(folder.rglob("*")) if p.is_file()]
    operations.append(CommitOperationAdd("README.md", model_card(run_dir, config.model.base, adapter).encode("utf-8")))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.create_commit(repo, operations, commit_message=f"{run_dir.name}: {'adapter' if adapter else 'merged model'}")
    except Exception as error:  # network, auth and hub errors: one message, never the token
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        reason = str(error).splitlines()[0].replace(token, "***") if str(error) else type(error).__name__
        raise PushError(
            f"{repo} at {endpoint}: {type(error).__name__}: {reason}; nothing was uploaded. Check the network, HF_ENDPOINT "
            "and that the token may write to that repository"
        ) from None
    return str(url)
