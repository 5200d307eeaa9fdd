"""Paired bootstrap intervals for base-vs-tuned differences on the same held-out examples.

Both models answer the same prompts, so the examples are resampled once per bootstrap draw and the
statistic is computed on both sides of that draw: the interval is for the difference, and what the two
models share (an easy or a hard prompt) cancels. Percentile intervals, numpy's seeded generator: the
same inputs and seed give the same interval on every rerun.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.core.errors import InternalError

# What each evaluated difference is called in reports, charts and the run card.
LABELS = {"loss": "loss per response token", "rouge_l": "ROUGE-L F1 vs reference", "format_adherence": "format adherence",
          "new_tokens": "answer length (tokens)"}  # fmt: skip


@dataclass(frozen=True)
class Difference:
    """tuned - base of one statistic, with its paired bootstrap interval."""

    base: float
    tuned: float
    delta: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self, digits: int = 4) -> dict[str, float | bool]:
        values = {name: round(float(getattr(self, name)), digits) for name in ("base", "tuned", "delta", "low", "high")}
        return {**values, "excludes_zero": self.excludes_zero}


def paired_difference(
    base: np.ndarray,
    tuned: np.ndarray,
    weights: np.ndarray | None = None,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Difference:
    """Difference of (weighted) means, tuned - base, over the same examples, and its bootstrap interval.

    `weights` makes the mean a ratio of sums: per-example summed loss with token counts as weights gives
    the loss per token, the way the whole-set loss is defined."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.shape != tuned.shape or base.ndim != 1 or len(base) == 0:
        raise InternalError(f"paired values need two equal non-empty 1-D arrays, got {base.shape} and {tuned.shape}")
    weights = np.ones_like(base) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != base.shape:
        raise InternalError(f"one weight per example expected, got {weights.shape} for {base.shape}")

    def mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (values * w).sum(axis=-1) / w.sum(axis=-1)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(base), size=(samples, len(base)))
    deltas = mean(tuned[draws], weights[draws]) - mean(base[draws], weights[draws])
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    base_mean, tuned_mean = float(mean(base, weights)), float(mean(tuned, weights))
    return Difference(base_mean, tuned_mean, tuned_mean - base_mean, float(low), float(high))


def format_difference(found: dict, digits: int = 3) -> str:
    """`delta [low, high]` of a `Difference.as_dict()`, signed, with `*` where the interval excludes 0."""
    mark = " *" if found["excludes_zero"] else ""
    return f"{found['delta']:+.{digits}f} [{found['low']:+.{digits}f}, {found['high']:+.{digits}f}]{mark}"
