"""Paired intervals for differences between two models on the same held-out examples.

Means (loss, ROUGE-L, answer length): paired bootstrap. Both models answer the same prompts, so the
examples are resampled once per bootstrap draw and the statistic is computed on both sides of that draw:
the interval is for the difference, and what the two models share (an easy or a hard prompt) cancels.
Percentile intervals, numpy's seeded generator: the same inputs and seed give the same interval on every
rerun.

Proportions (format adherence, a yes or no per example): Newcombe's interval for a difference of paired
proportions, built from Wilson score intervals (Newcombe 1998, Statistics in Medicine 17:2635, method
10). A bootstrap has no width when every pair moves the same way (25 of 25 prompts going from 0 to 1
gave [+1.000, +1.000]); this interval stays honest at small n and at 0 and 1 ([+0.812, +1.000] there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from finetune.core.errors import InternalError

# What each evaluated difference is called in reports, charts and the run card.
LABELS = {"loss": "loss per response token", "rouge_l": "ROUGE-L F1 vs reference", "format_adherence": "format adherence",
          "new_tokens": "answer length (tokens)"}  # fmt: skip


@dataclass(frozen=True)
class Difference:
    """tuned - base of one statistic, with its paired interval."""

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
        return {**values, "excludes_zero": bool(self.excludes_zero)}


def _paired(base, tuned) -> tuple[np.ndarray, np.ndarray]:
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.shape != tuned.shape or base.ndim != 1 or len(base) == 0:
        raise InternalError(f"paired values need two equal non-empty 1-D arrays, got {base.shape} and {tuned.shape}")
    return base, tuned


def paired_difference(
    base: np.ndarray,
    tuned: np.ndarray,
    weights: np.ndarray | None = None,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    tuned_weights: np.ndarray | None = None,
) -> Difference:
    """Difference of (weighted) means, tuned - base, over the same examples, and its bootstrap interval.

    `weights` makes the mean a ratio of sums: per-example summed loss with token counts as weights gives
    the loss per token, the way the whole-set loss is defined. `tuned_weights`: the tuned side's own,
    where the two count differently (two models with different tokenizers); `weights` otherwise."""
    base, tuned = _paired(base, tuned)
    weights = np.ones_like(base) if weights is None else np.asarray(weights, dtype=np.float64)
    tuned_weights = weights if tuned_weights is None else np.asarray(tuned_weights, dtype=np.float64)
    if weights.shape != base.shape or tuned_weights.shape != base.shape:
        raise InternalError(f"one weight per example expected, got {weights.shape} and {tuned_weights.shape} for {base.shape}")

    def mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (values * w).sum(axis=-1) / w.sum(axis=-1)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(base), size=(samples, len(base)))
    deltas = mean(tuned[draws], tuned_weights[draws]) - mean(base[draws], weights[draws])
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    base_mean, tuned_mean = float(mean(base, weights)), float(mean(tuned, tuned_weights))
    return Difference(base_mean, tuned_mean, tuned_mean - base_mean, float(low), float(high))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`: inside [0, 1], never of zero width."""
    z = float(NormalDist().inv_cdf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_proportion_difference(base: np.ndarray, tuned: np.ndarray, confidence: float = 0.95) -> Difference:
    """tuned - base of two proportions measured on the same examples (each value 0 or 1), with Newcombe's
    interval for paired proportions (method 10: Wilson intervals of each, joined through the correlation
    of the pairs)."""
    base, tuned = _paired(base, tuned)
    if not np.isin(base, (0, 1)).all() or not np.isin(tuned, (0, 1)).all():
        raise InternalError("paired proportions need values of 0 or 1")
    n = len(base)
    both, only_tuned = float((base * tuned).sum()), float(((1 - base) * tuned).sum())
    only_base, neither = float((base * (1 - tuned)).sum()), float(((1 - base) * (1 - tuned)).sum())
    p_tuned, p_base = tuned.mean(), base.mean()
    low_t, high_t = wilson_interval(tuned.sum(), n, confidence)
    low_b, high_b = wilson_interval(base.sum(), n, confidence)
    spread = (both + only_tuned) * (only_base + neither) * (both + only_base) * (only_tuned + neither)
    phi = (both * neither - only_tuned * only_base) / math.sqrt(spread) if spread > 0 else 0.0
    delta = p_tuned - p_base
    low = delta - math.sqrt(max(0.0, (p_tuned - low_t) ** 2 - 2 * phi * (p_tuned - low_t) * (high_b - p_base) + (high_b - p_base) ** 2))
    high = delta + math.sqrt(max(0.0, (high_t - p_tuned) ** 2 - 2 * phi * (high_t - p_tuned) * (p_base - low_b) + (p_base - low_b) ** 2))
    return Difference(float(p_base), float(p_tuned), float(delta), max(-1.0, float(low)), min(1.0, float(high)))


def format_difference(found: dict, digits: int = 3) -> str:
    """`delta [low, high]` of a `Difference.as_dict()`, signed, with `*` where the interval excludes 0."""
    mark = " *" if found["excludes_zero"] else ""
    return f"{found['delta']:+.{digits}f} [{found['low']:+.{digits}f}, {found['high']:+.{digits}f}]{mark}"


def compare_models(candidate: pd.DataFrame, champion: pd.DataFrame) -> dict[str, dict]:
    """The two models per held-out prompt (score's samples: mean loss per response token, the response's
    tokens, format adherence), in the same order: the loss gain, champion - candidate per response token, with its
    paired bootstrap interval, and candidate - champion format adherence with Newcombe's interval."""
    if len(candidate) != len(champion):
        raise InternalError(f"candidate and champion were scored on {len(candidate)} and {len(champion)} prompts; the gate needs the same set")
    gain = paired_difference(
        candidate.loss.to_numpy(), champion.loss.to_numpy(), weights=candidate.tokens.to_numpy(),
        tuned_weights=champion.tokens.to_numpy(),
    )  # fmt: skip
    adherence = paired_proportion_difference(champion.format_adherence.to_numpy(), candidate.format_adherence.to_numpy())
    return {"loss_gain": gain.as_dict(), "format_adherence": adherence.as_dict()}
