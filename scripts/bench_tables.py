"""How fast ``clbench table`` builds tables from many run folders.

Writes N synthetic run folders (default 1,000: 4 scenarios x 5 strategies x 2 backbones x
25 seeds, 10 tasks each, ~3% of them failed or still running) into a temporary folder,
then times

* ``load_runs`` + the summary table in-process (config, status, metrics JSON per run),
* the same with ``--per-task`` (also every progress.json) and ``--reference``,
* the ``clbench table`` command end to end (a fresh Python process, imports included),
* ``clbench table --help`` (the import cost alone: no torch, no pandas).

Usage: python scripts/bench_tables.py [--runs 1000] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clbench.reporting.display import TableRequest, build_tables
from clbench.reporting.render import render
from clbench.results import write_run_folder

SCENARIOS = ("fewrel", "tacred", "split-cifar100", "imagenet-r")
# what each scenario's spec declares (config.json records it): the CRE ones have a Seen column
FAMILIES = {
    "fewrel": "relation-extraction",
    "tacred": "relation-extraction",
    "split-cifar100": "vision",
    "imagenet-r": "vision",
}
STRATEGIES = ("l2p", "dualprompt", "coda-prompt", "hide-prompt", "wave-cre")
BACKBONES = ("vit-b16-in21k", "bert-base-uncased")
TASKS = 10


def synthetic_config(scenario: str, strategy: str, backbone: str, seed: int) -> dict:
    # The size of a real config: ~15 strategy options, a few scenario / backbone ones.
    return {
        "clbench_version": "0.1.0",
        "protocol_version": 1,
        "strategy": strategy,
        "scenario": scenario,
        "backbone": backbone,
        "seed": seed,
        "preset": scenario,
        "device": "cuda",
        "strategy_options": {
            "epochs": 5,
            "batch_size": 128,
            "eval_batch_size": 256,
            "lr": 0.03,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "num_workers": 4,
            "pool_size": 10,
            "prompt_length": 5,
            "top_k": 5,
            "pull_weight": 0.1,
            "batchwise_selection": False,
            "mask_train_logits": True,
            "head_input": "pooled",
        },  # fmt: skip
        "scenario_options": {"data_file": None, "num_experiences": TASKS, "n_train": 420},
        "backbone_options": {"checkpoint": None, "img_size": 224},
    }


def write_runs(root: Path, count: int) -> int:
    rng = np.random.default_rng(0)
    combos = list(itertools.product(SCENARIOS, STRATEGIES, BACKBONES))
    seeds_per_combo = -(-count // len(combos))
    written = 0
    for (scenario, strategy, backbone), seed in itertools.product(combos, range(seeds_per_combo)):
        if written == count:
            break
        # lower-triangular accuracies: high on the newest task, decaying on older ones
        base = rng.uniform(60, 95)
        matrix = np.zeros((TASKS, TASKS))
        for t in range(TASKS):
            for i in range(t + 1):
                matrix[t, i] = max(0.0, base - 2.5 * (t - i) + rng.normal(0, 3))
        state = "complete"
        if written % 37 == 5:
            state, matrix = "failed", matrix[:4]
        elif written % 53 == 7:
            state, matrix = "running", matrix[:7]
        folder = root / scenario / strategy / f"{backbone}_seed{seed}_20260101-000000"
        config = synthetic_config(scenario, strategy, backbone, seed)
        write_run_folder(
            folder, config, matrix, [500] * TASKS, state=state, family=FAMILIES[scenario]
        )
        written += 1
    return written


def best_of(repeat: int, action: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return times


def report(label: str, times: list[float], runs: int) -> None:
    best, median = min(times), statistics.median(times)
    print(f"{label:<46} best {best:6.3f}s  median {median:6.3f}s  {runs / best:9.0f} runs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the runs here and keep them")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="clbench-bench-"))
    try:
        began = time.perf_counter()
        count = write_runs(root, args.runs)
        print(f"wrote {count} run folders ({TASKS} tasks each) in "
              f"{time.perf_counter() - began:.1f}s under {root}")  # fmt: skip

        def summary() -> str:
            request = TableRequest(paths=[root])
            return render(build_tables(request), "markdown")

        def everything() -> str:
            request = TableRequest(
                paths=[root], per_task=True, reference=True, include_incomplete=True
            )
            return render(build_tables(request), "markdown")

        report("in-process: summary table", best_of(args.repeat, summary), count)
        report("in-process: + per-task, reference, incomplete", best_of(args.repeat, everything),
               count)  # fmt: skip
        command = [sys.executable, "-m", "clbench.cli", "table", str(root)]
        run = lambda argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
        report("clbench table DIR (new process)", best_of(args.repeat, lambda: run(command)), count)
        extra = [*command, "--per-task", "--reference"]
        report("clbench table DIR --per-task --reference", best_of(args.repeat, lambda: run(extra)),
               count)  # fmt: skip
        help_times = best_of(args.repeat, lambda: run(command[:4] + ["--help"]))
        print(f"{'clbench table --help (imports only)':<46} best {min(help_times):6.3f}s")
        lines = summary().splitlines()
        print(
            f"\nsummary table: {sum(line.startswith('| ') for line in lines) - 1} rows; first rows:"
        )
        print("\n".join(lines[2:6]))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
