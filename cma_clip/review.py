"""Which items a labeler reviews first, and which items a filter picks.

Pure functions over the model's outputs, with no store and no UI: a review queue orders
its items with `rank` (by `uncertainty`), and a queue filter or a bulk accept ("every item
whose colour clears its threshold") picks items with `select`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import CMAClipError

STRATEGIES = ("least_confidence", "margin", "entropy")
SUM_TOLERANCE = 1e-3  # probabilities stored rounded to 4 decimals still sum to 1 within this


class ReviewError(CMAClipError, ValueError):
    """Probabilities or a strategy a review queue cannot use, with the reason."""


def uncertainty(probabilities: np.ndarray, strategy: str = "least_confidence") -> np.ndarray:
    """How unsure the model is of each item, in [0, 1]; higher = review first.

    `probabilities` is items x classes. least_confidence: 1 - p1; margin: 1 - (p1 - p2),
    p1 and p2 the two highest probabilities; entropy: -sum(p log p) / log(classes).
    Least confidence and margin also take the top-k probabilities only (rows summing to
    less than 1); entropy needs each row's full distribution.
    """
    if strategy not in STRATEGIES:
        raise ReviewError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ReviewError(f"probabilities must be items x classes, not of shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p.sum(axis=1) > 1 + SUM_TOLERANCE).any():
        raise ReviewError("probabilities must be finite, non-negative and sum to at most 1 per item")
    if strategy == "entropy":
        if (np.abs(p.sum(axis=1) - 1) > SUM_TOLERANCE).any():
            raise ReviewError("entropy needs every class's probability (each item's must sum to 1); "
                              "ask the predictor for all classes, not the top k")
        if p.shape[1] == 1:
            return np.zeros(len(p))
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p), 0.0)
        return np.clip(-terms.sum(axis=1) / np.log(p.shape[1]), 0.0, 1.0)
    top = -np.sort(-p, axis=1)
    if strategy == "least_confidence":
        return np.clip(1.0 - top[:, 0], 0.0, 1.0)
    second = top[:, 1] if p.shape[1] > 1 else np.zeros(len(p))
    return np.clip(1.0 - (top[:, 0] - second), 0.0, 1.0)


def rank(probabilities: Mapping[str, np.ndarray], strategy: str = "least_confidence",
         task: str | None = None) -> np.ndarray:
    """Item indices, the most uncertain first (ties in item order): by `task`'s
    uncertainty, or by each item's highest uncertainty over the tasks.
    `probabilities` maps each task to its items x classes array."""
    tasks = [task] if task is not None else list(probabilities)
    if not tasks or any(t not in probabilities for t in tasks):
        raise ReviewError(f"no probabilities for task {task!r}" if task is not None else "no task to rank by")
    return order([uncertainty(probabilities[t], strategy) for t in tasks])


def order(uncertainties: Sequence[np.ndarray]) -> np.ndarray:
    """Item indices, the most uncertain first (ties in item order), by each item's highest
    uncertainty over the tasks; `uncertainties` holds one array of items per task (what `rank`
    computes, or what a review queue kept of it)."""
    if not len(uncertainties):
        raise ReviewError("no task to rank by")
    if len({len(u) for u in uncertainties}) > 1:
        raise ReviewError("every task needs one row of probabilities per item")
    return np.argsort(-np.max(np.asarray(uncertainties, dtype=np.float64), axis=0), kind="stable")


def select(confidences: Sequence[Mapping[str, float]], task: str | None = None,
           min_conf: float | Mapping[str, float | None] | None = None, max_conf: float | None = None) -> list[int]:
    """Indices of the items a confidence filter keeps, in order.

    `confidences` holds each item's task -> top-1 probability. With `task`, only that
    task counts (items without it are left out); without, every task of the item does.
    `min_conf`: every counted task's confidence is at least it, or, given as task ->
    threshold, at least that task's threshold (a task without one never clears it).
    `max_conf`: some counted task's confidence is at most it.
    """
    picked = []
    for index, by_task in enumerate(confidences):
        tasks = [task] if task is not None else list(by_task)
        if not tasks or any(t not in by_task for t in tasks):
            continue
        values = [float(by_task[t]) for t in tasks]
        if min_conf is not None and not all(v >= _threshold(min_conf, t) for t, v in zip(tasks, values)):
            continue
        if max_conf is not None and not min(values) <= max_conf:
            continue
        picked.append(index)
    return picked


def _threshold(min_conf: float | Mapping[str, float | None], task: str) -> float:
    if isinstance(min_conf, Mapping):
        threshold = min_conf.get(task)
        return float("inf") if threshold is None else float(threshold)
    return float(min_conf)
