"""The human side of a run record: the run card, the promotion section, and the pictures beside them.

Made from the record's dict (run.json) and the stage outputs it points to, so a cached run gets the same
reports as the run that computed them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finetune.core.outputs import digest_cache_dir, write_bytes_atomic, write_text_atomic
from finetune.core.stage import code_digest, library_version
from finetune.reporting.stats import LABELS, format_difference

TRAINING_CURVE, EVALUATION_CHART = "training_curve.png", "evaluation.png"  # in the run folder


def _output(record: dict[str, Any], stage: str) -> Path | None:
    folder = record["stages"].get(stage, {}).get("output_dir")
    return Path(folder) if folder else None


def figures_cache_dir() -> Path:
    """Pictures already drawn, by what they were drawn from: beside the remembered file digests."""
    return digest_cache_dir().parent / "figures"


def _figure(source: Path, draw: str) -> bytes | None:
    """PNG of `draw` (a function of finetune.reporting.plots) over the JSON file `source`, or None when the
    file has nothing to draw. A cached run draws the same pictures from the same outputs: they are kept
    by the bytes they come from, the plotting code and matplotlib's version, and a rerun copies them
    instead of importing matplotlib and drawing again (a second of a cached rerun on a 2-core CPU)."""
    try:
        data = source.read_bytes()
    except OSError:
        return None
    identity = f"{draw}\0{code_digest('finetune.reporting.plots')}\0{library_version('matplotlib')}\0".encode() + data
    cached = figures_cache_dir() / f"{hashlib.sha256(identity).hexdigest()}.png"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    from finetune.reporting import plots

    value = json.loads(data)
    if not value or (draw == "evaluation_chart" and not value.get("differences")):
        return None
    picture = getattr(plots, draw)(value)
    try:
        write_bytes_atomic(cached, picture)
    except OSError:  # a read-only home: draw again next time
        pass
    return picture


def draw_figures(record: dict[str, Any]) -> None:
    """training_curve.png and evaluation.png in the run folder, from the stage outputs the run has."""
    run_dir, train, evaluate = Path(record["run_dir"]), _output(record, "train"), _output(record, "evaluate")
    if train and (picture := _figure(train / "log_history.json", "training_curve")):
        write_bytes_atomic(run_dir / TRAINING_CURVE, picture)
    if evaluate and (picture := _figure(evaluate / "metrics.json", "evaluation_chart")):
        write_bytes_atomic(run_dir / EVALUATION_CHART, picture)


def write_run_reports(record: dict[str, Any]) -> None:
    """The pictures and run_card.md of a finished (or failed) run, in its run folder."""
    draw_figures(record)
    write_text_atomic(Path(record["run_dir"]) / "run_card.md", run_card(record))


def _gib(value: int | None) -> str:
    return f"{value / 2**30:.2f} GiB" if value else "-"


def promotion_markdown(decision: dict[str, Any]) -> str:
    """The gate's decision as a small markdown section: verdict, reason, and the two models' numbers."""
    lines = [f"## Promotion: **{decision['decision']}**", "", decision["reason"], ""]
    candidate, champion = decision.get("candidate") or {}, decision.get("champion") or {}
    if candidate:
        lines += ["| held-out, merged models (score) | candidate | champion |", "|---|---:|---:|"]
        lines += [f"| {name.replace('_', ' ')} | {candidate.get(name, '-')} | {champion.get(name, '-')} |" for name in ("loss", "format_adherence")]
        lines.append("")
    if compared := decision.get("compared"):
        lines += [
            f"Per prompt, paired 95% intervals (promote.rule: {decision.get('rule')}, min_loss_gain {decision.get('min_loss_gain')}): "
            f"loss gain, champion - candidate, {format_difference(compared['loss_gain'], 4)}; "
            f"format adherence, candidate - champion, {format_difference(compared['format_adherence'])}.",
            "",
        ]
    lines.append(f"Champion before this run: `{decision.get('champion_dir') or 'none'}`")
    return "\n".join(lines) + "\n"


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def held_out_table(m: dict[str, Any]) -> list[str]:
    """Base, tuned and the difference with its interval (marked * where it excludes 0), as markdown rows."""
    found = m.get("eval_differences") or {}
    lines = [
        f"| held-out ({m.get('eval_examples') or '-'} prompts; 4-bit base, adapter off and on) | base | tuned | tuned - base [95% interval] |",
        "|---|---:|---:|---:|",
    ]
    for name, d in found.items():
        lines.append(f"| {LABELS.get(name, name)} | {d['base']:.3f} | {d['tuned']:.3f} | {format_difference(d)} |")
    if not found:  # a run that stopped before evaluation
        return [*lines, "| loss | - | - | - |"]
    return [*lines, "", "\\* the interval excludes 0: the difference is larger than the held-out sample's noise."]


def export_table(files: list[dict] | None, folder: str | None) -> list[str]:
    """The GGUF files of the export stage, with their sizes and how they read back."""
    if not files:
        return []
    lines = ["", f"GGUF export (`{folder}`, with a Modelfile for `ollama create`):", "",
             "| file | size | next-token agreement | same greedy answers | check |", "|---|---:|---:|---:|---|"]  # fmt: skip
    lines += [
        f"| {f['file']} | {f['bytes'] / 1e6:.1f} MB | {100 * f['token_agreement']:.1f}% | {f['same_answers']} of {f['answers']} | "
        f"{'passed' if f['passed'] else 'failed'} (bar {100 * f['bar']:.0f}%) |"
        for f in files
    ]
    return lines


def run_card(record: dict[str, Any]) -> str:
    m = record["metrics"]
    ratio = f"{100 * m['trainable_params'] / m['total_params']:.3f}%" if m.get("trainable_params") and m.get("total_params") else "-"
    lines = [
        f"# Run card: {record['run_name']}",
        "",
        f"Status: **{record['status']}**" + (f" ({record['error']})" if record.get("error") else "")
        + f"; {record['seconds']:.0f} s in all; device {m.get('device') or '-'}, compute dtype {m.get('compute_dtype') or '-'}.",
        "",
        "| stage | state | seconds | peak resident | peak GPU | key |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {name} | {s['state']} | {s['seconds']} | {_gib(s.get('peak_rss_bytes'))} | {_gib(s.get('peak_gpu_bytes'))} | `{s['key']}` |"
        for name, s in record["stages"].items()
    ]
    lines += [
        "",
        "| model | |",
        "|---|---|",
        f"| parameters | {m['total_params']:,} total, {m['trainable_params']:,} trainable ({ratio}) |"
        if m.get("total_params")
        else "| parameters | - |",
        f"| base in memory | {_gib(m.get('base_memory_bytes_loaded'))} loaded (4-bit) vs {_gib(m.get('base_memory_bytes_16bit'))} in 16-bit |",
        f"| peak training memory | {_gib(m.get('peak_memory_bytes'))} ({m.get('peak_memory_kind') or '-'}) |",
        f"| optimizer steps | {m.get('train_steps') or '-'} in {_fixed(m.get('train_seconds'), 1)} s; final loss {_fixed(m.get('final_train_loss'), 4)} |",
        "",
        *held_out_table(m),
        *export_table(m.get("exported"), record["stages"].get("export", {}).get("output_dir")),
    ]
    if changes := record.get("data_changes"):
        rows = changes["rows"]
        lengths = f", token lengths shifted {changes['lengths']['ks']:.3f} (KS)" if changes.get("lengths") else ""
        lines += ["", f"Data since the champion (run {changes['champion_run']}): {rows['added']} rows added, {rows['removed']} removed, "
                  f"{rows['edited']} edited; topic shift {changes['topic_shift']:.3f}{lengths} (`data_changes.md`)."]  # fmt: skip
    if record.get("promotion"):
        lines += ["", promotion_markdown(record["promotion"]).rstrip("\n")]
    return "\n".join(lines) + "\n"
