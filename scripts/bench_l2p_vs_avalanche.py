"""Throughput and memory of clbench's l2p against Avalanche's own LearningToPrompt.

In one invocation, on one machine, with the same ViT size (224 px), batch, pool size M,
prompt length L_p and top-k N, it measures training items/s, evaluation items/s and peak
memory of

* Avalanche's ``avalanche.training.LearningToPrompt``, which needs timm 0.6.13: it runs
  in a peer virtual environment made on first use at ~/.cache/clbench/bench-venv
  (``--venv``), which holds timm 0.6.13 alone and sees every other package of the
  environment this script runs in (scripts/_peer_venv.py says how), in a subprocess that
  prints JSON (scripts/_avalanche_l2p_worker.py; that file says how its random-init model
  is built offline); ``--wheels DIR`` installs that timm offline;
* clbench's l2p, hide-prompt and norga,

each in a fresh process, timed by the same code (the worker's ``measure``), and prints a
table and the clbench / Avalanche ratios. Then, on a small 5-task synthetic scenario, it
times the evaluation of the seen test experiences after each task with and without the
query cache, showing the evaluation cost per seen test item.

    python scripts/bench_l2p_vs_avalanche.py                           # CPU, ViT-Ti/16
    python scripts/bench_l2p_vs_avalanche.py --device cuda --model vit_base_patch16_224 \\
        --batch-size 64 --eval-batch-size 128 --batches 20 --warmup 3 --curve-test-items 256

Rates exclude the first ``--warmup`` batches of each pass. "train, 1st" is the first
epoch over a training set, "train, again" every later one (the synthetic images are not
augmented, so clbench runs with ``cache_train_queries`` and reuses their queries, as it
always does for text); "eval, 1st" is the first evaluation of a test set (clbench computes
and caches each item's query then), "eval, again" every later one. Every side runs at each
of ``--precisions`` (fp32 on a CPU, bf16 and fp32 on a GPU). Memory is CUDA allocated
bytes on a GPU; on a CPU the process's peak resident set, also shown above the process's
footprint before the model was built. scripts/bench_whole_run.py times whole runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from _avalanche_l2p_worker import (  # noqa: E402  (the scripts folder is not a package)
    PeakMemory,
    StopAfter,
    add_common_arguments,
    check_arguments,
    measure,
    prepare_process,
    synchronize,
    synthetic_benchmark,
    throughput_benchmark,
)
from _peer_venv import (  # noqa: E402
    AVALANCHE_TIMM,
    DEFAULT_VENV,
    ensure_peer_venv,
    peer_environment,
)

WORKER = SCRIPTS / "_avalanche_l2p_worker.py"
CLBENCH_STRATEGIES = ("l2p", "hide-prompt", "norga")


# -- running one side in a fresh process ---------------------------------------------------


def child_environment() -> dict[str, str]:
    # no hub access (random weights everywhere); keep timm's and Avalanche's deprecation
    # warnings out of the table
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def common_arguments(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--depth",
        str(args.depth),
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--eval-batch-size",
        str(args.eval_batch_size),
        "--batches",
        str(args.batches),
        "--warmup",
        str(args.warmup),
        "--pool-size",
        str(args.pool_size),
        "--prompt-length",
        str(args.prompt_length),
        "--top-k",
        str(args.top_k),
        "--num-classes",
        str(args.num_classes),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]


def run_child(
    command: list[str],
    what: str,
    environment: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``command``; its stdout ends with a line "RESULT {json}". Past ``timeout``
    seconds it is killed (``subprocess.TimeoutExpired``)."""
    began = time.perf_counter()
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        text=True,
        env=environment or child_environment(),
        timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stdout.write(done.stdout)
        raise SystemExit(f"{what} failed (exit code {done.returncode}): {' '.join(command)}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"  {what}: done in {time.perf_counter() - began:.0f}s", flush=True)
    return result


# -- clbench's side (runs in a child process) ---------------------------------------------


def build_clbench_strategy(
    name: str,
    encoder: Any,
    args: argparse.Namespace,
    *,
    num_classes: int,
    num_tasks: int = 1,
    precision: str = "fp32",
    cache_queries: bool = True,
    plugins: list[Any] | None = None,
) -> Any:
    """clbench's ``name`` with the benchmark's settings (and L2P's, for l2p)."""
    from clbench.registry import STRATEGIES

    common = dict(
        epochs=1,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.workers,
        precision=precision,
        cache_queries=cache_queries,
        # the synthetic stream is not augmented, so later epochs may reuse training queries
        cache_train_queries=cache_queries,
    )
    if name == "l2p":
        # Avalanche's L2P: lr 0.03, pull weight 0.1, prompt-token mean head, no batchwise
        specific = dict(
            pool_size=args.pool_size,
            prompt_length=args.prompt_length,
            top_k=args.top_k,
            lr=0.03,
            pull_weight=0.1,
            head_input="prompt_mean",
            batchwise_selection=False,
        )
    elif name in ("hide-prompt", "norga"):
        # end-of-task stages shortened: they are not part of the per-item rates
        specific = dict(
            num_tasks=num_tasks,
            prompt_length=args.prompt_length,
            lr_schedule="constant",
            tii_epochs=1,
            tii_align_epochs=1,
            tap_epochs=1,
            samples_per_class=args.batch_size,
        )
    else:
        raise SystemExit(f"unknown strategy {name!r}; valid: {', '.join(CLBENCH_STRATEGIES)}")
    strategy_class = STRATEGIES.get(name)
    config = strategy_class.Config(**common, **specific)
    return strategy_class(
        encoder=encoder, num_classes=num_classes, config=config, device=args.device, plugins=plugins
    )


def make_encoder(args: argparse.Namespace) -> Any:
    from clbench.encoders.vit import create_vit

    depth = {"depth": args.depth} if args.depth else {}
    return create_vit(args.model, pretrained=False, **depth)  # timm 1.x, the same architecture


def run_clbench(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    device = prepare_process(args)
    benchmark = throughput_benchmark(args)
    baseline = PeakMemory(device).current_mib()
    encoder = make_encoder(args)
    strategy = build_clbench_strategy(
        args.run_one, encoder, args, num_classes=args.num_classes, precision=args.precision
    )
    result = measure(
        strategy,
        benchmark,
        device=device,
        warmup=args.warmup,
        num_workers=args.workers,
        modules=[strategy.model],
        baseline_mib=baseline,
    )
    resolved = "bf16" if strategy.amp_dtype == torch.bfloat16 else "fp32"
    result.update(
        name=f"clbench {args.run_one}",
        timm=timm.__version__,
        precision=resolved,
        python=sys.executable,
        query_cache_items=len(strategy.query_cache),
    )
    return result


def run_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluation of the seen test experiences after each task, with and without the cache."""
    device = prepare_process(args)
    tasks, per_task = args.curve_tasks, args.curve_test_items
    benchmark = synthetic_benchmark(
        train_items=tasks * args.batch_size * args.curve_train_batches,
        test_items=tasks * per_task,
        num_classes=2 * tasks,
        num_experiences=tasks,
        seed=args.seed,
    )
    encoder = make_encoder(args)
    rows: list[dict[str, Any]] = []
    for cached in (True, False):
        torch.manual_seed(args.seed)
        strategy = build_clbench_strategy(
            args.curve_strategy,
            encoder,
            args,
            num_classes=2 * tasks,
            num_tasks=tasks,
            precision=args.precision,
            cache_queries=cached,
            plugins=[StopAfter(args.curve_train_batches)],
        )
        for task in range(tasks):
            strategy.train(benchmark.train_stream[task])
            misses = strategy.query_cache.misses
            synchronize(device)
            began = time.perf_counter()
            strategy.eval(benchmark.test_stream[: task + 1])
            synchronize(device)
            seconds = time.perf_counter() - began
            rows.append(
                {
                    "cache": cached,
                    "task": task,
                    "seen_items": (task + 1) * per_task,
                    "eval_s": seconds,
                    "queries_computed": (
                        strategy.query_cache.misses - misses if cached else (task + 1) * per_task
                    ),
                }
            )
    return {
        "strategy": args.curve_strategy,
        "tasks": tasks,
        "items_per_task": per_task,
        "rows": rows,
    }


# -- the report ------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths))
            )
        )
    return "\n".join(lines)


def label(result: dict[str, Any]) -> str:
    return f"{result['name']} {result['precision']}"


def throughput_table(results: list[dict[str, Any]], on_cpu: bool) -> str:
    header = [
        "",
        "train items/s, 1st",
        "train items/s, again",
        "eval items/s, 1st",
        "eval items/s, again",
        "peak MiB train",
        "peak MiB eval",
        "weights MiB",
    ]
    if on_cpu:
        header.append("MiB before model")
    rows = []
    for r in results:
        row = [
            label(r),
            f"{r['train_items_per_s']:.2f}",
            f"{r['train_again_items_per_s']:.2f}",
            f"{r['eval_first_items_per_s']:.2f}",
            f"{r['eval_again_items_per_s']:.2f}",
            f"{r['train_peak_mib']:.0f}",
            f"{max(r['eval_first_peak_mib'], r['eval_again_peak_mib']):.0f}",
            f"{r['weights_mib']:.1f}",
        ]
        if on_cpu:
            row.append(f"{r['baseline_mib']:.0f}")
        rows.append(row)
    return format_table(header, rows)


def ratio_lines(results: list[dict[str, Any]], on_cpu: bool) -> list[str]:
    """Each clbench l2p row against Avalanche's row at the same precision (its first row
    where that precision was not run)."""
    references = {r["precision"]: r for r in results if r["name"] == "avalanche l2p"}
    if not references:
        return []
    lines = [
        "ratios, clbench l2p / Avalanche LearningToPrompt at the same precision (throughput: "
        "higher is better; memory: lower is better):"
    ]

    def eval_peak(r: dict[str, Any]) -> float:
        return max(r["eval_first_peak_mib"], r["eval_again_peak_mib"])

    for r in results:
        if not r["name"].startswith("clbench l2p"):
            continue
        reference = references.get(r["precision"], next(iter(references.values())))
        parts = [
            f"train 1st {r['train_items_per_s'] / reference['train_items_per_s']:.2f}x",
            f"train again {r['train_again_items_per_s'] / reference['train_again_items_per_s']:.2f}x",
            f"eval 1st {r['eval_first_items_per_s'] / reference['eval_first_items_per_s']:.2f}x",
            f"eval again {r['eval_again_items_per_s'] / reference['eval_again_items_per_s']:.2f}x",
            f"peak memory train {r['train_peak_mib'] / reference['train_peak_mib']:.2f}x",
            f"eval {eval_peak(r) / eval_peak(reference):.2f}x",
            f"weights {r['weights_mib'] / reference['weights_mib']:.2f}x",
        ]
        if on_cpu:  # the part a model adds to the process: peak minus the pre-model footprint
            above = (r["train_peak_mib"] - r["baseline_mib"]) / max(
                reference["train_peak_mib"] - reference["baseline_mib"], 1e-9
            )
            parts.append(f"train peak above pre-model footprint {above:.2f}x")
        lines.append(f"  {label(r)} / {label(reference)}: " + ", ".join(parts))
    return lines


def curve_table(curve: dict[str, Any]) -> str:
    by_task: dict[int, dict[bool, dict[str, Any]]] = {}
    for row in curve["rows"]:
        by_task.setdefault(row["task"], {})[row["cache"]] = row
    header = [
        "after task",
        "seen test items",
        "cached: eval s",
        "ms/item",
        "queries computed",
        "no cache: eval s",
        "ms/item",
        "queries computed",
    ]
    rows = []
    for task, pair in sorted(by_task.items()):
        cached, plain = pair[True], pair[False]
        rows.append(
            [
                str(task),
                str(cached["seen_items"]),
                f"{cached['eval_s']:.2f}",
                f"{1000 * cached['eval_s'] / cached['seen_items']:.1f}",
                str(cached["queries_computed"]),
                f"{plain['eval_s']:.2f}",
                f"{1000 * plain['eval_s'] / plain['seen_items']:.1f}",
                str(plain["queries_computed"]),
            ]
        )
    return format_table(header, rows)


# -- the command line --------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(CLBENCH_STRATEGIES),
        choices=CLBENCH_STRATEGIES,
        help="clbench strategies to time",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        default=None,
        help="precisions every side runs at (default: fp32 on a CPU, bf16 and fp32 on a "
        "GPU); Avalanche's L2P has no precision option: its bf16 is its forward under "
        "torch.autocast, added by the worker",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help=f"the timm {AVALANCHE_TIMM} venv for Avalanche, made on first use (default "
        f"{DEFAULT_VENV})",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        help=f"install timm {AVALANCHE_TIMM} into that venv offline, from this wheel folder",
    )
    parser.add_argument("--skip-avalanche", action="store_true", help="time clbench only")
    parser.add_argument("--no-curve", action="store_true", help="skip the eval-cost curve")
    parser.add_argument("--curve-strategy", default="l2p", choices=CLBENCH_STRATEGIES)
    parser.add_argument("--curve-tasks", type=int, default=5)
    parser.add_argument("--curve-test-items", type=int, default=16, help="test items per task")
    parser.add_argument(
        "--curve-train-batches",
        type=int,
        default=1,
        help="training batches per task in the curve (its subject is evaluation)",
    )
    parser.add_argument("--json", type=Path, help="also write every result to this file")
    # internal: one measurement in this (child) process
    parser.add_argument("--run-one", choices=CLBENCH_STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--run-curve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    return check_arguments(
        parser,
        parser.parse_args(argv),
        (
            "batch_size",
            "eval_batch_size",
            "batches",
            "warmup",
            "curve_tasks",
            "curve_test_items",
            "curve_train_batches",
        ),
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_arguments(argv)
    if args.run_one:
        print("RESULT " + json.dumps(run_clbench(args)), flush=True)
        return
    if args.run_curve:
        print("RESULT " + json.dumps(run_curve(args)), flush=True)
        return

    on_cpu = args.device == "cpu"
    precisions = args.precisions or (["fp32"] if on_cpu else ["bf16", "fp32"])
    common = common_arguments(args)
    print(
        f"clbench vs Avalanche L2P: {args.model} at 224 px on {args.device}, batch "
        f"{args.batch_size} (eval {args.eval_batch_size}), M={args.pool_size}, "
        f"L_p={args.prompt_length}, N={args.top_k}, {args.warmup} warm-up + {args.batches} "
        f"timed batches per pass, {args.workers} loader workers, random weights",
        flush=True,
    )
    results = []
    if not args.skip_avalanche:
        python = ensure_peer_venv(args.venv, wheels=args.wheels)
        print(
            f"Avalanche's LearningToPrompt runs in its own venv {args.venv} (timm "
            f"{AVALANCHE_TIMM}, every other package from this environment), in a subprocess",
            flush=True,
        )
        for precision in precisions:
            command = [str(python), str(WORKER), *common, "--precision", precision]
            results.append(
                run_child(command, f"avalanche l2p {precision}", environment=peer_environment())
            )
    for name in args.strategies:
        for precision in precisions:
            command = [
                sys.executable,
                __file__,
                *common,
                "--run-one",
                name,
                "--precision",
                precision,
            ]
            results.append(run_child(command, f"clbench {name} {precision}"))
    memory_kind = results[0]["memory_kind"] if results else ""
    print(f"\nthroughput (items/s) and peak memory ({memory_kind}), each row a fresh process:")
    print(throughput_table(results, on_cpu))
    for line in ratio_lines(results, on_cpu):
        print(line)

    curve = None
    if not args.no_curve:
        command = [
            sys.executable,
            __file__,
            *common,
            "--run-curve",
            "--precision",
            precisions[0],
            "--curve-strategy",
            args.curve_strategy,
            "--curve-tasks",
            str(args.curve_tasks),
            "--curve-test-items",
            str(args.curve_test_items),
            "--curve-train-batches",
            str(args.curve_train_batches),
        ]
        curve = run_child(command, "evaluation-cost curve")
        print(
            f"\nevaluation of the seen test experiences after each task: clbench "
            f"{curve['strategy']}, {curve['tasks']} tasks x {curve['items_per_task']} test "
            f"items, {args.model}, with and without the query cache:"
        )
        print(curve_table(curve))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "results": results,
                    "curve": curve,
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
