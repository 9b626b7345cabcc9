"""The whole-run benchmark's configurations and its report (scripts/bench_whole_run.py).

Pure functions of the runs' results: the table of medians with the ratio to Avalanche at
the same precision, the evaluation seconds after each experience, and the check that
every side ran with the same weights.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Configuration:
    side: str  # avalanche, l2p, hide-prompt, norga or l2p-floor
    precision: str
    caches: str = "on"  # clbench: its caches on or off
    evaluate: str = "all"  # Avalanche: the whole test stream or the seen experiences

    @property
    def label(self) -> str:
        if self.side == "avalanche":
            return f"avalanche l2p {self.precision}, eval {self.evaluate}"
        if self.side == "l2p-floor":
            return f"floor: l2p's unavoidable passes, {self.precision}"
        caches = "" if self.side == "l2p" else f", caches {self.caches}"
        return f"clbench {self.side} {self.precision}{caches}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def final_average_accuracy(matrix: list[list[Any]] | None) -> str:
    if matrix is None:  # the floor trains nothing
        return "-"
    last = [a for a in matrix[-1] if a is not None]
    return f"{sum(last) / len(last):.1f}"


def whole_run_table(runs: dict[Configuration, list[dict[str, Any]]]) -> str:
    header = [
        "",
        "runs",
        "run s (median)",
        "min-max",
        "process s",
        "train items/s",
        "x Avalanche",
        "items evaluated",
        "peak MiB",
        "ckpt MiB",
        "FAA",
    ]
    references = {
        c.precision: median([r["run_s"] for r in rs])
        for c, rs in runs.items()
        if c.side == "avalanche" and c.evaluate == "all"
    }
    rows = []
    for configuration, results in runs.items():
        seconds = [r["run_s"] for r in results]
        run_s = median(seconds)
        reference = references.get(configuration.precision)
        first = results[0]
        checkpoint = first.get("checkpoint_mib")
        rows.append(
            [
                configuration.label,
                str(len(results)),
                f"{run_s:.1f}",
                f"{min(seconds):.1f}-{max(seconds):.1f}",
                f"{median([r['process_s'] for r in results]):.1f}",
                f"{first['train_items'] / run_s:.2f}",
                f"{reference / run_s:.2f}x" if reference else "-",
                str(first["evaluated_items"]),
                f"{median([r['peak_mib'] for r in results]):.0f}",
                f"{checkpoint:.2f}" if checkpoint is not None else "-",
                final_average_accuracy(first["accuracy"]),
            ]
        )
    return format_table(header, rows)


def eval_cost_table(runs: dict[Configuration, list[dict[str, Any]]]) -> str:
    """Median evaluation seconds after each experience, per configuration."""
    tasks = len(next(iter(runs.values()))[0]["eval_s"])
    header = ["eval s after experience", *map(str, range(tasks)), "total"]
    rows = []
    for configuration, results in runs.items():
        per_task = [median([r["eval_s"][t] for r in results]) for t in range(tasks)]
        rows.append([configuration.label, *(f"{s:.1f}" for s in per_task), f"{sum(per_task):.1f}"])
    return format_table(header, rows)


def weight_check(runs: dict[Configuration, list[dict[str, Any]]]) -> str | None:
    """The largest query-feature difference between any two sides (the same weights
    give the same features; fp32 rows only, bf16 runs its query pass in bf16)."""
    probes = [torch.tensor(rs[0]["probe"]) for c, rs in runs.items() if c.precision == "fp32"]
    if len(probes) < 2:
        return None
    gap = max(float((p - probes[0]).abs().max()) for p in probes[1:])
    scale = float(probes[0].abs().max())
    return f"same weights on every side: query features of 2 test images differ by at most {gap:.2e} (scale {scale:.2f})"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
