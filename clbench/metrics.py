"""Continual-learning metrics computed from the accuracy matrix, as the prompt-CL papers do.

A[t, i] = top-1 accuracy (in %) on the test set of experience i after training experience
t; rows exist for the experiences finished so far, every row covers all experiences.
Avalanche's own forgetting is measured from the diagonal A[i, i]; the papers' (and ours)
from the best accuracy ever reached, so the two can differ.

Entries of test experiences not evaluated are NaN (``null`` in progress.json): by default
the run loop evaluates after experience t only the test experiences 0..t, whose entries
are the only ones any metric here reads (i <= t; unseen classes are masked, so the rest
would be 0). Runs made before, or with ``evaluate="all"``, hold those zeros instead;
both read the same.

The run loop (metrics.json), the tables and the figures all take their numbers from here:
the per-task curves and forgetting bars are the terms of the same FAA and FFM.
"""

from __future__ import annotations

import numpy as np

# What each scenario family reports: continual relation extraction reports the pooled
# seen-class accuracy beside FAA / CAA / FFM; for equal-size class-incremental vision
# tasks it equals FAA and is left out. Written into config.json (key "metrics") by the
# run loop, and assumed ("vision") for runs made before the key existed.
FAMILY_METRICS: dict[str, tuple[str, ...]] = {
    "vision": ("faa", "caa", "ffm"),
    "relation-extraction": ("faa", "caa", "ffm", "seen"),
}


def _rows(accuracy: np.ndarray) -> np.ndarray:
    matrix = np.asarray(accuracy, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[0] > matrix.shape[1]:
        raise ValueError(f"expected a [t, T] accuracy matrix with 1 <= t <= T, got {matrix.shape}")
    return matrix


def average_accuracy_curve(accuracy: np.ndarray) -> np.ndarray:
    """(1/s) sum_{i<=s} A[s, i] after each finished experience s: the FAA of the run
    stopped there (its last value is FAA, its mean CAA)."""
    matrix = _rows(accuracy)
    return np.array([matrix[s, : s + 1].mean() for s in range(matrix.shape[0])])


def final_average_accuracy(accuracy: np.ndarray) -> float:
    """FAA = (1/t) sum_{i<=t} A[t, i] for the last finished experience t (unweighted)."""
    matrix = _rows(accuracy)
    t = matrix.shape[0]
    return float(matrix[t - 1, :t].mean())


def average_incremental_accuracy(accuracy: np.ndarray) -> float:
    """CAA = (1/t) sum_{s<=t} (1/s) sum_{i<=s} A[s, i]."""
    return float(np.mean(average_accuracy_curve(accuracy)))


def forgetting_terms(accuracy: np.ndarray) -> np.ndarray:
    """max_{i<=s<=t} A[s, i] - A[t, i] for each experience i < t: the terms whose mean is
    FFM (the max runs over s >= i: an experience cannot be forgotten before it is learned).
    Empty after one experience."""
    matrix = _rows(accuracy)
    t = matrix.shape[0]
    return np.array([matrix[i:t, i].max() - matrix[t - 1, i] for i in range(t - 1)])


def final_forgetting(accuracy: np.ndarray) -> float:
    """FFM = (1/(t-1)) sum_{i<t} (max_{s<=t} A[s, i] - A[t, i]); 0 after one experience."""
    terms = forgetting_terms(accuracy)
    return float(np.mean(terms)) if terms.size else 0.0


def seen_accuracy(correct: np.ndarray, counts: np.ndarray) -> list[float]:
    """Sample-weighted accuracy (%) over the pooled test items of all seen experiences,
    after each experience: the metric of continual relation extraction papers.

    ``counts``: test items per experience, one row for all ([T]) or one row per finished
    experience ([t, T], NaN where not evaluated); only the seen entries are read.
    """
    correct = np.asarray(correct, dtype=float)
    counts = np.asarray(counts, dtype=float)
    if counts.ndim == 1:
        counts = np.broadcast_to(counts, correct.shape)
    return [
        float(100.0 * correct[t, : t + 1].sum() / counts[t, : t + 1].sum())
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
