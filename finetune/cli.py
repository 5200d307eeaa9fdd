"""`finetune run [--config PATH] [--set key=value ...]`: run the flow once and say where its record is.
`finetune validate`: the data contract alone. `finetune chat [PROMPT]`: talk to a run's model.

Runs against the Prefect server in PREFECT_API_URL when set, else in Prefect's ephemeral mode.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune.config import ConfigError, check_hardware, check_inputs, load_config
from finetune.stats import format_difference

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
    for command in (run, validate, chat):
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


def _validate(config) -> int:
    """The data contract alone (no model, no Prefect): the prepare stage, cached by its key like in a run."""
    from finetune.prepare import DataError, PrepareInputs, prepare_dataset

    paths = config.paths
    inputs = PrepareInputs(raw_dir=paths.raw_dir, heldout_path=paths.heldout_path, data=config.data, template=config.tokenize.template)
    try:
        prepared = prepare_dataset(inputs, paths.processed_dir)
    except DataError as error:
        print(f"finetune: data error: {error}", file=sys.stderr)
        return 1
    print((prepared / "report.md").read_text(encoding="utf-8"), end="")
    print(f"\nprepared splits: {prepared}")
    return 0


def _chat(config, args) -> int:
    from finetune.chat import ChatError, chat

    try:
        chat(config.paths.runs_dir, args.run, args.adapter, args.prompt, args.file, args.max_new_tokens)
    except ChatError as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        config = load_config(config_path, args.overrides)  # fail here, before Prefect starts, on a bad key
        if args.command != "chat":
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

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network on most training boxes
    from flows.finetune_flow import StageFailed, finetune

    try:
        record = finetune(str(config_path) if config_path else None, args.overrides)
    except StageFailed as failure:
        print(f"finetune: {failure} (record: {failure.run_dir / 'run.json'})", file=sys.stderr)
        return 1
    print(_summary(record))
    print(f"run record: {record['run_dir']}/run.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
