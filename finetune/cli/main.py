"""`finetune run [--config PATH] [--set key=value ...]`: run the flow once and say where its record is.
`finetune validate`: the data contract alone. `finetune chat [PROMPT]`: talk to a run's model.
`finetune export` / `finetune push`: a finished run's model as checked GGUF files, or on a hub.
`finetune history` / `finetune rollback [--to RUN]`: the gate's decisions over time; an earlier champion back.

Runs against the Prefect server in PREFECT_API_URL when set, else in Prefect's ephemeral mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from finetune.core.config import ConfigError, load_config
from finetune.core.preflight import check_hardware
from finetune.data.readers import check_inputs
from finetune.reporting.stats import format_difference

DEFAULT_CONFIG = Path("configs/default.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="QLoRA fine-tuning as a cached, retryable Prefect flow.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole pipeline; finished stages come from cache")
    validate = commands.add_parser("validate", help="check the config and the data contract only; print the data report")
    chat = commands.add_parser("chat", help="talk to a run's model, in the prompt format it was trained on")
    chat.add_argument("prompt", nargs="?", help="one prompt; without it (and without --file), an interactive loop")
    chat.add_argument("--run", help="the run's name (default: the latest completed run in paths.runs_dir)")
    chat.add_argument("--adapter", action="store_true", help="the base with the adapter (4-bit) instead of the merged model")
    chat.add_argument("--file", type=Path, help="a file of prompts, one per line")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
    export = commands.add_parser("export", help="GGUF files and an Ollama Modelfile of a finished run's merged model, checked")
    export.add_argument("--run", help="the run's name (default: the latest completed run); --set export.gguf=[q8_0,bf16] picks the types")
    push = commands.add_parser("push", help="upload a finished run's merged model (or adapter) with a model card to a hub repository")
    push.add_argument("--run", help="the run's name (default: the latest completed run)")
    push.add_argument("--repo", required=True, help="the hub repository, e.g. you/my-model (created if missing)")
    push.add_argument("--adapter", action="store_true", help="upload the LoRA adapter alone instead of the merged model")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    history = commands.add_parser("history", help="every gate decision and rollback of paths.models_dir, oldest first")
    rollback = commands.add_parser("rollback", help="make an earlier champion current again (default: the one before the current)")
    rollback.add_argument("--to", dest="to_run", help="the run whose champion to put back (see `finetune history`)")
    for command in (run, validate, chat, export, push, history, rollback):
        command.add_argument("--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG} if present)")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one config value, e.g. --set lora.r=16 (repeatable)",
        )  # fmt: skip
    return parser


def _summary(record: dict) -> str:
    lines = [f"run {record['run_name']}: {record['status']} in {record['seconds']:.0f} s"]
    for name, stage in record["stages"].items():
        lines.append(f"  {name:<14} {stage['state']:<10} {stage['seconds']:>8.1f} s  {stage['output_dir']}")
    m = record["metrics"]
    for name, d in (m.get("eval_differences") or {}).items():
        lines.append(
            f"  held-out {name:<16} {d['base']:.3f} -> {d['tuned']:.3f}  difference {format_difference(d)}"
        )
    if record.get("promotion"):
        lines.append(f"  promotion: {record['promotion']['decision']} ({record['promotion']['reason']})")
    return "\n".join(lines)


def _read_secret(name: str) -> str:
    from tasks.stages import load_secret  # Prefect, only where a config names a Secret block

    return load_secret(name)


def _validate(config) -> int:
    """The data contract alone (no model; Prefect only for a named Secret block): data.sources listed, then
    the prepare stage, cached by its key like in a run."""
    from finetune.core.stage import Hooks
    from finetune.data.sources import list_sources
    from finetune.stages.prepare import DataError, PrepareInputs, prepare_dataset

    paths = config.paths
    try:
        inputs = PrepareInputs.of(config, *list_sources(config.data, _read_secret, config.model.token_secret))
        prepared = prepare_dataset(inputs, paths.processed_dir, hooks=Hooks(secret=_read_secret))
    except DataError as error:
        print(f"finetune: data error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a store that could not be reached: the same command later may work
        print(f"finetune: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print((prepared / "report.md").read_text(encoding="utf-8"), end="")
    print(f"\nprepared splits: {prepared}")
    return 0


def _chat(config, args) -> int:
    from finetune.cli.chat import ChatError, chat

    try:
        chat(config.paths.runs_dir, args.run, args.adapter, args.prompt, args.file, args.max_new_tokens)
    except ChatError as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    return 0


def _publish(config, args) -> int:
    """`finetune export` and `finetune push`: a finished run's model, taken elsewhere."""
    from finetune.cli.chat import ChatError
    from finetune.cli.publish import export_run, push_run
    from finetune.core.errors import PermanentError

    try:
        if args.command == "export":
            folder = export_run(config.paths.runs_dir, args.run, args.overrides, config.paths.output_dir)
        else:
            from tasks.stages import load_secret

            url = push_run(config.paths.runs_dir, args.run, args.repo, args.adapter, args.private, load_secret)
    except ChatError as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    except (PermanentError, ConfigError) as error:
        print(f"finetune: {args.command} failed: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.command == "push":
        print(f"pushed to {url}")
        return 0
    for entry in json.loads((folder / "export_check.json").read_text(encoding="utf-8"))["files"]:
        print(f"{folder / entry['file']}  {entry['bytes'] / 1e6:.1f} MB  next-token agreement {100 * entry['token_agreement']:.1f}%  "
              f"same answers {entry['same_answers']} of {entry['answers']}")  # fmt: skip
    print(f"ollama create <name> -f {folder / 'Modelfile'}")
    return 0


def _history(config) -> int:
    from finetune.core.champion import ChampionRecordError, read_record
    from finetune.core.history import HISTORY, read_history
    from finetune.reporting.history import history_rows

    entries, unreadable = read_history(config.paths.models_dir)
    rows = history_rows(entries)
    if not rows:
        print(f"no decisions yet in {config.paths.models_dir / HISTORY}")
        return 0
    widths = {name: max(len(name), *(len(row[name]) for row in rows)) for name in rows[0]}
    print("  ".join(name.ljust(width) for name, width in widths.items()))
    for row in rows:
        print("  ".join(row[name].ljust(width) for name, width in widths.items()))
    if unreadable:
        print(f"lines {', '.join(map(str, unreadable))} of {config.paths.models_dir / HISTORY} could not be read and are left out")
    try:
        record = read_record(config.paths.models_dir)
    except ChampionRecordError as error:  # the history is still shown; the champion's record needs repair
        print(f"finetune: {error}", file=sys.stderr)
        return 1
    if record is not None:
        print(f"champion: {record['current'].get('run_name')} ({record['current']['model_dir']})")
    return 0


def _rollback(config, to_run: str | None) -> int:
    from finetune.core.champion import LINK, ChampionRecordError, RollbackError, rollback

    try:
        entry = rollback(config.paths.models_dir, to_run)
    except (RollbackError, ChampionRecordError) as error:
        print(f"finetune: rollback failed: {error}", file=sys.stderr)
        return 1
    print(f"champion: {entry['run_name']} ({entry['model_dir']}), {entry['reason']}")
    print(f"{config.paths.models_dir / LINK} -> {entry['model_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        config = load_config(config_path, args.overrides)  # fail here, before Prefect starts, on a bad key
        if args.command in ("run", "validate"):
            check_inputs(config)
        if args.command == "run":
            check_hardware(config)  # imports torch; validate needs no model
    except ConfigError as error:
        print(f"finetune: config error:\n{error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        return _validate(config)
    if args.command == "chat":
        return _chat(config, args)
    if args.command in ("export", "push"):
        return _publish(config, args)
    if args.command == "history":
        return _history(config)
    if args.command == "rollback":
        return _rollback(config, args.to_run)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network on most training boxes
    # Without a server (PREFECT_API_URL unset) Prefect starts one for the run and waits 20 s for it by default. A
    # first run on a fresh PREFECT_HOME creates its database first: 23 s on a 2-core CPU, which failed the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.finetune_flow import StageFailed, finetune

    try:
        record = finetune(str(config_path) if config_path else None, args.overrides)
    except StageFailed as failure:
        print(f"finetune: {failure} (record: {failure.run_dir / 'run.json'})", file=sys.stderr)
        return 1
    print(_summary(record))
    print(f"run record: {record['run_dir']}/run.json")
    return 0

