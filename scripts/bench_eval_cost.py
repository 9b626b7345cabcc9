"""What evaluating a whole run costs with and without the prompted-feature cache.

Each strategy runs on one scenario as ``clbench run`` builds and seeds it: train
experience t, then evaluate the seen test experiences 0..t, once without the cache and
once with it (``prompted_cache``), on the same trained state; the queries of the new test
items are computed first, untimed, so that neither evaluation pays them and the seconds
compare the prompted passes. Per experience it prints the test items evaluated, the
prompted encoder forwards (rows, counted by wrapping the encoder's forward) and the
evaluation seconds, then the run's totals, the cache's memory and whether the two
accuracy matrices are identical. Without the cache the forwards grow with tasks x items
(every seen item after every task); with it, with the items (each item once per prompt
it picks). ``--separate-runs`` makes two independent runs instead (each evaluation then
also pays its queries), the end-to-end check that a run's accuracy matrix does not
change.

    python scripts/bench_eval_cost.py                  # digits-offline quick, 4 strategies
    python scripts/bench_eval_cost.py --scenario fewrel-offline --strategies hide-prompt
    python scripts/bench_eval_cost.py --scenario fewrel-offline --scenario-set n_test=32
    python scripts/bench_eval_cost.py --set eval_batch_size=64 --json cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from clbench.fileio import atomic_write_json
from clbench.runner import RunRequest, build_components, resolve_run, seed_everything

STRATEGIES = ("hide-prompt", "norga", "hier-ot", "wave-cre")


class ForwardCounter:
    """Counts the rows of the encoder's prompted forwards (``prompt`` given)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.forward = encoder.forward
        self.rows = 0
        encoder.forward = self  # an instance attribute: nn.Module.__call__ finds it first

    def __call__(self, x: torch.Tensor, prompt: Any = None, **options: Any) -> Any:
        if prompt is not None:
            self.rows += len(x)
        return self.forward(x, prompt, **options)  # readout= and whatever forward takes

    def remove(self) -> None:
        del self.encoder.forward


def build(args: argparse.Namespace, strategy_name: str, cache: bool) -> tuple[Any, Any, Any]:
    """Strategy, scenario and configuration exactly as ``clbench run`` builds them."""
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides["prompted_cache"] = str(cache).lower()
    request = RunRequest(
        strategy=strategy_name,
        scenario=args.scenario,
        backbone=args.backbone,
        seed=args.seed,
        preset=args.preset,
        strategy_overrides=overrides,
        scenario_overrides=dict(item.split("=", 1) for item in args.scenario_set),
        device=args.device,
    )
    config = resolve_run(request)
    strategy, scenario = build_components(config)
    return strategy, scenario, config


def set_cache(strategy: Any, on: bool) -> None:
    strategy.config = dataclasses.replace(strategy.config, prompted_cache=on)


def evaluate(strategy: Any, stream: Any, counter: ForwardCounter) -> dict[str, Any]:
    """One evaluation of ``stream`` as the run loop makes it: items, forwards, seconds."""
    tally = AccuracyTally()
    strategy.plugins.append(tally)
    rows_before = counter.rows
    synchronize(strategy.device)
    began, began_cpu = time.perf_counter(), time.process_time()
    try:
        strategy.eval(stream)
        synchronize(strategy.device)
    finally:
        strategy.plugins.remove(tally)
    return {
        "items": sum(tally.counts.values()),
        "forwards": counter.rows - rows_before,
        "eval_seconds": time.perf_counter() - began,
        # CPU seconds of every thread of this process: on a shared machine the wall time
        # is mostly the other jobs' load
        "eval_cpu_seconds": time.process_time() - began_cpu,
        "accuracy": tally.accuracy(),
    }


@torch.no_grad()
def compute_queries(strategy: Any, stream: Any) -> None:
    """Fill the query cache for ``stream``'s items (the un-prompted pass, untimed)."""
    for experience in stream:
        loader = DataLoader(experience.dataset.eval(), batch_size=strategy.config.eval_batch_size)
        for batch in loader:
            with strategy.autocast():
                strategy.query(batch[0].to(strategy.device))


def run(args: argparse.Namespace, strategy_name: str) -> dict[str, Any]:
    """Per experience the evaluation with and without the cache (``--separate-runs``: of
    two runs, else of one run's trained state)."""
    runs = [build(args, strategy_name, cache=True)]
    if args.separate_runs:
        runs.append(build(args, strategy_name, cache=False))
    counters = [ForwardCounter(strategy.encoder) for strategy, _, _ in runs]
    scenario, config = runs[0][1], runs[0][2]
    train_streams = [s.benchmark.train_stream for _, s, _ in runs]
    test_streams = [s.benchmark.test_stream for _, s, _ in runs]
    cached, uncached = [], []
    try:
        for index in range(scenario.num_experiences):
            for (strategy, _, _), train_stream in zip(runs, train_streams, strict=True):
                seed_everything(config["seed"] * 1000 + index)  # as the run loop does
                strategy.train(train_stream[index])
            seen = [stream[: index + 1] for stream in test_streams]
            if args.separate_runs:
                cached.append(evaluate(runs[0][0], seen[0], counters[0]))
                uncached.append(evaluate(runs[1][0], seen[1], counters[1]))
                continue
            strategy = runs[0][0]
            compute_queries(strategy, seen[0])
            set_cache(strategy, False)
            uncached.append(evaluate(strategy, seen[0], counters[0]))
            set_cache(strategy, True)
            cached.append(evaluate(strategy, seen[0], counters[0]))
    finally:
        for counter in counters:
            counter.remove()
    strategy = runs[0][0]
    prompted_cache = strategy.prompted_cache
    return {
        "strategy": strategy_name,
        "backbone": config["backbone"],
        "preset": config["preset"],
        "separate_runs": args.separate_runs,
        "with_cache": cached,
        "without_cache": uncached,
        "cache_entries": len(prompted_cache),
        "cache_megabytes": prompted_cache.nbytes / 2**20,
        "feature_dim": strategy.encoder.feature_dim,
    }


class AccuracyTally(SupervisedPlugin):
    """Correct predictions and items per evaluated test experience."""

    def __init__(self) -> None:
        super().__init__()
        self.correct: dict[int, int] = {}
        self.counts: dict[int, int] = {}

    def after_eval_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        index = int(strategy.experience.current_experience)
        hits = int((strategy.mb_output.argmax(1) == strategy.mb_y).sum())
        self.correct[index] = self.correct.get(index, 0) + hits
        self.counts[index] = self.counts.get(index, 0) + len(strategy.mb_y)

    def accuracy(self) -> list[float]:
        return [100.0 * self.correct[i] / self.counts[i] for i in sorted(self.counts)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(result: dict[str, Any], scenario: str) -> None:
    on, off = result["with_cache"], result["without_cache"]
    how = "two runs" if result["separate_runs"] else "one run, queries precomputed"
    print(
        f"\n{result['strategy']} on {scenario} ({result['backbone']}, preset "
        f"{result['preset']}; {how}): prompted encoder forwards (rows), eval wall and CPU seconds"
    )
    print(
        f"{'exp':>4} {'items':>6} | {'fwd cache':>9} {'fwd none':>9} | {'s cache':>8} "
        f"{'s none':>8} | {'cpu cache':>9} {'cpu none':>9}"
    )
    keys = ("items", "forwards", "eval_seconds", "eval_cpu_seconds")
    totals = [{key: sum(e[key] for e in side) for key in keys} for side in (on, off)]
    rows = [(str(i), a, b) for i, (a, b) in enumerate(zip(on, off, strict=True))]
    for label, cached, uncached in [*rows, ("all", *totals)]:
        print(
            f"{label:>4} {cached['items']:>6} | {cached['forwards']:>9} "
            f"{uncached['forwards']:>9} | {cached['eval_seconds']:>8.2f} "
            f"{uncached['eval_seconds']:>8.2f} | {cached['eval_cpu_seconds']:>9.2f} "
            f"{uncached['eval_cpu_seconds']:>9.2f}"
        )
    cached, uncached = totals
    distinct = on[-1]["items"]

    def ratio(key: str) -> float:
        return uncached[key] / max(cached[key], 1e-9)

    print(
        f"forwards per test item over the run: {cached['forwards'] / max(distinct, 1):.2f} "
        f"with the cache, {uncached['forwards'] / max(distinct, 1):.2f} without ({distinct} "
        f"test items; {ratio('forwards'):.2f}x); eval seconds {ratio('eval_seconds'):.2f}x, "
        f"CPU seconds {ratio('eval_cpu_seconds'):.2f}x"
    )
    print(
        f"cache at the end: {result['cache_entries']} entries x {result['feature_dim']} "
        f"= {result['cache_megabytes']:.2f} MB"
    )
    same = [e["accuracy"] for e in on] == [e["accuracy"] for e in off]
    print(f"accuracy matrices identical: {'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="digits-offline")
    parser.add_argument("--backbone", default=None, help="default: the scenario's")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a strategy option for every run (repeatable)")  # fmt: skip
    parser.add_argument("--scenario-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a scenario option, e.g. n_test=32 (repeatable)")  # fmt: skip
    parser.add_argument("--separate-runs", action="store_true",
                        help="two runs (with, without) instead of two evaluations of one")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()
    results = []
    for name in args.strategies:
        result = run(args, name)
        report(result, args.scenario)
        results.append(result)
    if args.json:
        atomic_write_json(args.json, {"scenario": args.scenario, "runs": results})


if __name__ == "__main__":
    main()
