"""Pictures of a run, drawn with matplotlib from stage outputs: the training curve and the evaluation's
differences with their intervals. PNG bytes, so that the run folder and the Prefect UI show the same image.

Figures are made with matplotlib's object API (no pyplot): nothing global, safe in a worker's threads.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from finetune.reporting.stats import LABELS


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def training_curve(log_history: list[dict[str, Any]]) -> bytes:
    """Loss per optimizer step (with the gradient norm before clipping) over the learning rate."""
    steps = [entry["step"] for entry in log_history]
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    losses = [entry["loss"] for entry in log_history]
    loss_axes.plot(steps, losses, marker=".", color="tab:blue", alpha=0.45, label="training loss")
    window = max(1, len(losses) // 10)
    if window > 1:  # a trailing mean over a tenth of the run shows the trend through step-to-step noise
        means = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        loss_axes.plot(steps, means, color="tab:blue", linewidth=2, label=f"mean of last {window} steps")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("Training curve")
    if all(entry.get("grad_norm") is not None for entry in log_history):
        norm_axes = loss_axes.twinx()
        norm_axes.plot(steps, [entry["grad_norm"] for entry in log_history], color="tab:gray", alpha=0.35, linewidth=1)
        norm_axes.set_ylabel("gradient norm before clipping (gray)", color="tab:gray")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(loc="upper right")
    lr_axes.plot(steps, [entry.get("learning_rate", 0.0) for entry in log_history], color="tab:orange")
    lr_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.1e}" if value else "0"))
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_axes.grid(alpha=0.3)
    return _png(figure)


def evaluation_chart(metrics: dict[str, Any]) -> bytes:
    """One row per metric: tuned - base with its interval, against the zero line."""
    found = metrics["differences"]
    figure = Figure(figsize=(7.5, 1.2 * len(found) + 0.8), layout="constrained")
    rows = figure.subplots(len(found), 1, squeeze=False)[:, 0]
    for axes, (name, d) in zip(rows, found.items()):
        color = "tab:green" if d["excludes_zero"] else "tab:gray"
        axes.errorbar([d["delta"]], [0], xerr=[[d["delta"] - d["low"]], [d["high"] - d["delta"]]], fmt="o", color=color, capsize=6)
        axes.axvline(0, color="black", linewidth=0.8)
        span = max(abs(d["low"]), abs(d["high"]), 1e-3) * 1.3
        axes.set_xlim(-span, span)
        axes.set_yticks([])
        axes.set_title(
            f"{LABELS.get(name, name)}: {d['base']:.3g} -> {d['tuned']:.3g}, difference {d['delta']:+.3g} "
            f"[{d['low']:+.3g}, {d['high']:+.3g}]", fontsize=9, loc="left",
        )
    rows[-1].set_xlabel(f"tuned - base, paired {metrics.get('confidence', 0.95):.0%} interval")
    figure.suptitle(f"Held-out evaluation ({metrics['examples']} prompts)")
    return _png(figure)


def history_chart(entries: list[dict[str, Any]]) -> bytes:
    """Held-out loss across retrains: each candidate (a dot, starred where promoted, a ring where a rollback
    put it back), and the champion's loss after each decision as a step line."""
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = figure.subplots()
    champion_line, champion = [], None
    for entry in entries:
        candidate = (entry.get("candidate") or {}).get("loss")
        if entry.get("decision") in ("promoted", "rollback"):
            champion = candidate
        elif (entry.get("champion") or {}).get("loss") is not None:
            champion = entry["champion"]["loss"]
        champion_line.append(champion)
    runs = list(range(1, len(entries) + 1))
    axes.step(runs, [c if c is not None else float("nan") for c in champion_line], where="post", color="tab:green", label="champion after the decision")
    styles = {"promoted": ("*", "tab:green", 160), "rollback": ("o", "tab:orange", 90), "kept": ("o", "tab:gray", 40), "no change": ("o", "tab:blue", 25)}
    for decision, (marker, color, size) in styles.items():
        points = [(run, (e.get("candidate") or {}).get("loss")) for run, e in zip(runs, entries) if e.get("decision") == decision]
        points = [(run, loss) for run, loss in points if loss is not None]
        if points:
            axes.scatter(*zip(*points), marker=marker, s=size, color=color, label=decision, zorder=3)
    axes.set_xlabel("decision (oldest first)")
    axes.set_ylabel("held-out loss per response token")
    axes.set_title("Retraining history")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(0.5, len(entries) + 0.5)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return _png(figure)
