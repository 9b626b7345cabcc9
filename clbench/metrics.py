"""Continual-learning metrics computed from the accuracy matrix, as the prompt-CL papers do.

A[t, i] = top-1 accuracy (in %) on the test set of experience i after training experience
t; rows exist for the experiences finished so far, every row covers all experiences.
Avalanche's own forgetting is measured from the diagonal A[i, i]; the papers' (and ours)
from the best accuracy ever reached, so the two can differ.
"""

from __future__ import annotations

import numpy as np


def _rows(accuracy: np.ndarray) -> np.ndarray:
    matrix = np.asarray(accuracy, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[0] > matrix.shape[1]:
        raise ValueError(f"expected a [t, T] accuracy matrix with 1 <= t <= T, got {matrix.shape}")
    return matrix


def final_average_accuracy(accuracy: np.ndarray) -> float:
    """FAA = (1/t) sum_{i<=t} A[t, i] for the last finished experience t (unweighted)."""
    matrix = _rows(accuracy)
    t = matrix.shape[0]
    return float(matrix[t - 1, :t].mean())


def average_incremental_accuracy(accuracy: np.ndarray) -> float:
    """CAA = (1/t) sum_{s<=t} (1/s) sum_{i<=s} A[s, i]."""
    matrix = _rows(accuracy)
    return float(np.mean([matrix[s, : s + 1].mean() for s in range(matrix.shape[0])]))


def final_forgetting(accuracy: np.ndarray) -> float:
    """FFM = (1/(t-1)) sum_{i<t} (max_{s<=t} A[s, i] - A[t, i]); 0 after one experience.

    The max runs over s >= i (an experience cannot be forgotten before it is learned).
    """
    matrix = _rows(accuracy)
    t = matrix.shape[0]
    if t < 2:
        return 0.0
    drops = [matrix[i:t, i].max() - matrix[t - 1, i] for i in range(t - 1)]
    return float(np.mean(drops))


def seen_accuracy(correct: np.ndarray, counts: np.ndarray) -> list[float]:
    """Sample-weighted accuracy (%) over the pooled test items of all seen experiences,
    after each experience: the metric of continual relation extraction papers."""
    correct = np.asarray(correct, dtype=float)
    counts = np.asarray(counts, dtype=float)
    return [
        float(100.0 * correct[t, : t + 1].sum() / counts[: t + 1].sum())
        for t in range(correct.shape[0])
    ]


def summarise(accuracy: np.ndarray, correct: np.ndarray, counts: np.ndarray) -> dict[str, object]:
    """All metrics of a (possibly partial) run."""
    return {
        "faa": final_average_accuracy(accuracy),
        "caa": average_incremental_accuracy(accuracy),
        "ffm": final_forgetting(accuracy),
        "seen_accuracy": seen_accuracy(correct, counts),
        "experiences_finished": int(np.asarray(accuracy).shape[0]),
    }
