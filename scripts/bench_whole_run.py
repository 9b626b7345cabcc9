"""Whole runs, end to end: clbench's l2p against Avalanche's own LearningToPrompt, and
clbench's hide-prompt / norga with and without their caches.

Every configuration runs the same stream (scikit-learn's digits at 224 px, a subset:
``--train-per-class`` / ``--test-per-class`` images per class, 5 tasks x 2 classes),
with the same ViT (one random timm ViT saved once and loaded by every side: the same
weights, checked through the query features of two test images), batch, epochs, pool
(M, L_p, N) and learning rate, from the first experience to the last evaluation, each
side as it runs:

* clbench: a real run (``clbench.runner.execute``: run folder, progress records, a
  checkpoint after every experience), evaluating the seen test experiences after each
  experience (``clbench run``'s default);
* Avalanche: ``strategy.train(experience)`` then ``strategy.eval(test_stream)``, the loop
  of Avalanche's examples, in its peer venv (timm 0.6.13, scripts/_peer_venv.py);
  ``--avalanche-evaluate all seen`` adds rows that evaluate the seen experiences only,
  clbench's evaluation work;
* the floor (``--sides l2p-floor``): only the work no exact L2P run can skip, timed
  alone in the same process setting: each item's query pass once, the prompted forward
  and its backward for every training batch, the prompted forward of every seen test
  item after every experience (no optimizer, loader, checkpoint or metrics). Its "x Avalanche" is the
  highest whole-run ratio any exact implementation of L2P can reach on this machine.

clbench's l2p runs with Avalanche's L2P settings (Adam lr 0.03, pull weight 0.1, the
prompt tokens' mean as the head input, no batch-wise selection, training logits masked
to the task's classes) and reuses training queries across epochs (the stream is not
augmented). hide-prompt and norga run their end-of-task stages for one epoch each
(``--stage-epochs``); "caches off" turns off the query cache (``cache_queries``,
``cache_train_queries``) and, where the strategy has it, the prompted-feature cache
(``prompted_cache``).

Each run is a fresh process. The configurations are interleaved (A B C, A B C, ...)
over ``--repeats`` rounds, so a change in the machine's load falls on every side alike,
and the table gives medians. "run s" is the wall time from building the data and the
model to the last evaluation (interpreter start and imports are apart, in "process s");
"train items/s" is training items x epochs over the run time, the whole run's
throughput; the ratio is Avalanche's median run time at the same precision (evaluating
the whole stream) over this configuration's. Peak memory is the process's peak resident
set during the run on a CPU, CUDA allocated bytes on a GPU; "ckpt MiB" is what clbench's
run folder holds to resume (the last checkpoint and its query-cache parts).

    python scripts/bench_whole_run.py                                # CPU, ViT-Ti/16, fp32
    python scripts/bench_whole_run.py --precisions fp32 bf16 --avalanche-evaluate all seen
    python scripts/bench_whole_run.py --sides l2p norga --depth 4 --train-per-class 8
    python scripts/bench_whole_run.py --sides avalanche l2p l2p-floor   # how far from the floor
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from _avalanche_l2p_worker import (  # noqa: E402  (the scripts folder is not a package)
    VIT_SIZES,
    PeakMemory,
    add_common_arguments,
    check_arguments,
    prepare_process,
    synchronize,
)
from _peer_venv import DEFAULT_VENV, ensure_peer_venv, peer_environment  # noqa: E402
from _whole_run_report import (  # noqa: E402
    Configuration,
    eval_cost_table,
    load_average,
    weight_check,
    whole_run_table,
)
from _whole_run_worker import (  # noqa: E402
    DIGITS_CLASSES,
    add_whole_run_arguments,
    class_order_argument,
    digits_datasets,
    digits_stream,
    probe_batch,
)

from clbench.config import Options, option  # noqa: E402
from clbench.scenario import Scenario, seeded_class_order, split_into_tasks  # noqa: E402

WORKER = SCRIPTS / "_whole_run_worker.py"
SIDES = ("avalanche", "l2p", "hide-prompt", "norga", "l2p-floor")
BENCH_SCENARIO = "bench-digits"
BACKBONE = "vit-tiny-random"  # timm's ViT at any size, from a local weights file


# -- clbench's side (runs in a child process) ---------------------------------------------


@dataclass
class BenchDigitsOptions(Options):
    train_per_class: int = option(16, "training images per class")
    test_per_class: int = option(4, "test images per class")
    num_experiences: int = option(5, "tasks (10 classes split equally)")


def bench_digits(options: BenchDigitsOptions, encoder: Any, seed: int) -> Scenario:
    """The whole-run benchmark's stream as a clbench scenario (classes in clbench's
    seeded order, which the parent gives Avalanche's side too)."""
    class_order = seeded_class_order(DIGITS_CLASSES, seed)
    benchmark = digits_stream(
        train_per_class=options.train_per_class,
        test_per_class=options.test_per_class,
        class_order=class_order,
        num_experiences=options.num_experiences,
    )
    return Scenario(
        name=BENCH_SCENARIO,
        benchmark=benchmark,
        classes_per_experience=[
            sorted(c) for c in split_into_tasks(class_order, options.num_experiences)
        ],
        class_names=[str(c) for c in range(DIGITS_CLASSES)],
        modality="vision",
        details={"class_order": class_order, "seed": seed},
    )


def register_bench_scenario() -> None:
    """Registered in the child process only: the benchmark's stream is no user scenario."""
    from clbench.registry import SCENARIOS
    from clbench.scenario import ScenarioSpec

    if BENCH_SCENARIO not in SCENARIOS:
        spec = ScenarioSpec(default_backbone=BACKBONE, modality="vision", family="vision")
        SCENARIOS.register(BENCH_SCENARIO, "bench_whole_run.py's digits subset", spec=spec)(
            bench_digits
        )


def backbone_overrides(args: argparse.Namespace) -> dict[str, str]:
    width, depth, heads = VIT_SIZES[args.model]
    return {
        "img_size": "224",
        "patch_size": "16",
        "depth": str(args.depth or depth),
        "embed_dim": str(width),
        "num_heads": str(heads),
        "checkpoint": str(args.weights),
    }


def strategy_overrides(args: argparse.Namespace, prompted_cache_known: bool) -> dict[str, Any]:
    caches = args.caches == "on"
    common: dict[str, Any] = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.workers,
        precision=args.precision,
        lr_schedule="constant",
        cache_queries=caches,
        cache_train_queries=caches,  # the stream is not augmented
    )
    if args.run_one == "l2p":  # Avalanche's LearningToPrompt's settings
        return common | dict(
            pool_size=args.pool_size,
            prompt_length=args.prompt_length,
            top_k=args.top_k,
            lr=0.03,
            pull_weight=0.1,
            head_input="prompt_mean",
            batchwise_selection=False,
            mask_train_logits=True,
        )
    blocks = args.depth or VIT_SIZES[args.model][1]
    specific = dict(
        # HiDe-Prompt's layers 0-4, fewer on a shallower ViT (--depth)
        prompt_layers=",".join(str(layer) for layer in range(min(5, blocks))),
        prompt_length=args.prompt_length,
        tii_epochs=args.stage_epochs,
        tii_align_epochs=args.stage_epochs,
        tap_epochs=args.stage_epochs,
        samples_per_class=args.batch_size,
    )
    if prompted_cache_known:
        specific["prompted_cache"] = caches
    return common | specific


def option_text(value: Any) -> str:
    """A value as ``--set`` takes it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def probe_then_measure(
    args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, PeakMemory, float]:
    """The weight probe's query features (from an encoder built and dropped before the
    clock starts), then the memory meter, reset: every side measures from there."""
    from clbench.api import create_encoder

    encoder = create_encoder(BACKBONE, **backbone_overrides(args)).to(device)
    with torch.no_grad():
        probe = encoder.query(probe_batch(args.test_per_class).to(device))
    del encoder
    gc.collect()
    memory = PeakMemory(device)
    memory.reset()
    return probe, memory, memory.current_mib()


def process_facts(memory: PeakMemory, baseline: float, probe: Tensor) -> dict[str, Any]:
    """What every side's result reports of its process: memory, the weight probe, torch."""
    return {
        "peak_mib": memory.peak_mib(),
        "baseline_mib": baseline,
        "memory_kind": memory.kind,
        "probe": probe.float().cpu().tolist(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_clbench_whole(args: argparse.Namespace) -> dict[str, Any]:
    from clbench.registry import STRATEGIES
    from clbench.runner import RunRequest, execute, new_run_folder, resolve_run

    device = prepare_process(args)
    register_bench_scenario()
    known = {f for f in STRATEGIES.get(args.run_one).Config.__dataclass_fields__}
    overrides = strategy_overrides(args, "prompted_cache" in known)
    request = RunRequest(
        strategy=args.run_one,
        scenario=BENCH_SCENARIO,
        backbone=BACKBONE,
        seed=args.seed,
        preset="default",
        strategy_overrides={k: option_text(v) for k, v in overrides.items()},
        scenario_overrides={
            "train_per_class": str(args.train_per_class),
            "test_per_class": str(args.test_per_class),
            "num_experiences": str(args.tasks),
        },
        backbone_overrides=backbone_overrides(args),
        device=args.device,
    )
    config = resolve_run(request)
    probe, memory, baseline = probe_then_measure(args, device)
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        folder = execute(new_run_folder(Path(out), config), config, echo=lambda line: None)
        run_s = time.perf_counter() - began
        records = folder.records()
        # the last checkpoint and the query-cache parts it lists (clbench.results.checkpoint)
        saved = [folder.path / "checkpoint.pt", *(folder.path / "query_cache").glob("*")]
        checkpoint_mib = sum(f.stat().st_size for f in saved if f.is_file()) / 2**20
    train_items = args.train_per_class * DIGITS_CLASSES * args.epochs
    return {
        "name": f"clbench {args.run_one}",
        "precision": args.precision,
        "caches": args.caches,
        "prompted_cache": overrides.get("prompted_cache"),
        "evaluate": "seen",
        "run_s": run_s,
        "train_s": [r.train_seconds for r in records],
        "eval_s": [r.eval_seconds for r in records],
        "accuracy": [r.accuracy for r in records],
        "train_items": train_items,
        "evaluated_items": sum(n for r in records for n in r.counts if n is not None),
        "checkpoint_mib": checkpoint_mib,
        **process_facts(memory, baseline, probe),
    }


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The work no exact L2P run can skip, timed alone: the query pass of every item
    once (training items in their first epoch, test items at the first evaluation that
    sees them: prompt selection needs it, and it never changes after), the prompted
    forward and its backward to the prompt tokens for every training batch, and the
    prompted forward of every seen test item after every experience, on the same weights,
    data, batches and prompt length (N x L_p tokens after [CLS], the last block cut to
    the rows the head reads), and building the data and the model, which every side's
    run time counts. Nothing else: no optimizer, loader, selection, checkpoint or
    metrics. A real run's time is at least this, so Avalanche's run time over it
    bounds the whole-run ratio any exact L2P can reach here."""
    from clbench.api import create_encoder
    from clbench.encoders import Prompt
    from clbench.training import resolve_precision

    device = prepare_process(args)
    probe, memory, baseline = probe_then_measure(args, device)
    # from here as the other sides count: building the data and the model is in the run
    began = time.perf_counter()
    encoder = create_encoder(BACKBONE, **backbone_overrides(args)).to(device)
    dtype = resolve_precision(args.precision, device)
    train, test = digits_datasets(args.train_per_class, args.test_per_class)
    order = args.class_order or seeded_class_order(DIGITS_CLASSES, args.seed)
    tasks = split_into_tasks(order, args.tasks)

    def task_images(dataset: Any, classes: list[int]) -> Tensor:
        rows = [i for i, y in enumerate(dataset.targets) if y in classes]
        return torch.stack([dataset[i][0] for i in rows]).to(device)

    train_sets = [task_images(train, t) for t in tasks]
    test_sets = [task_images(test, t) for t in tasks]
    tokens = args.top_k * args.prompt_length
    torch.manual_seed(args.seed)
    rows = max(args.batch_size, args.eval_batch_size)  # L2P's prompts are gathered per sample
    prompt = 0.02 * torch.randn(rows, tokens, encoder.embed_dim, device=device)
    prompt.requires_grad_(True)
    head = torch.nn.Linear(encoder.embed_dim, DIGITS_CLASSES).to(device)
    train_s: list[float] = []
    eval_s: list[float] = []

    def in_precision() -> contextlib.AbstractContextManager[Any]:
        # as CLStrategy.autocast: bf16 autocast when asked for, else nothing
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)

    def prompted(x: Tensor) -> Tensor:
        with in_precision():
            output = encoder(x, Prompt(tokens=prompt[: len(x)]), readout="prompt")
            return head(output.prompt_token_states().mean(dim=1)).float()

    def query(x: Tensor) -> Tensor:
        with in_precision():
            return encoder.query(x)

    for task, images in enumerate(train_sets):
        started = time.perf_counter()
        for epoch in range(args.epochs):
            for batch in images.split(args.batch_size):
                if epoch == 0:
                    query(batch)
                prompted(batch).logsumexp(dim=1).mean().backward()
        synchronize(device)
        train_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            for seen, items in enumerate(test_sets[: task + 1]):
                for batch in items.split(args.eval_batch_size):
                    if seen == task:
                        query(batch)
                    prompted(batch)
        synchronize(device)
        eval_s.append(time.perf_counter() - started)
    run_s = time.perf_counter() - began
    seen_items = sum(len(t) * (args.tasks - i) for i, t in enumerate(test_sets))
    return {
        "name": "floor",
        "precision": args.precision,
        "run_s": run_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "accuracy": None,
        "train_items": args.train_per_class * DIGITS_CLASSES * args.epochs,
        "evaluated_items": seen_items,
        "checkpoint_mib": None,
        **process_facts(memory, baseline, probe),
    }


# -- the configurations and their processes -----------------------------------------------------


def configurations(args: argparse.Namespace) -> list[Configuration]:
    found = []
    for precision in args.precisions:
        for side in args.sides:
            if side == "avalanche":
                found += [
                    Configuration(side, precision, evaluate=e) for e in args.avalanche_evaluate
                ]
            elif side in ("l2p", "l2p-floor"):
                found.append(Configuration(side, precision))
            else:
                found += [Configuration(side, precision, caches=c) for c in args.cache_variants]
    return found


def shared_arguments(args: argparse.Namespace, weights: Path, class_order: list[int]) -> list[str]:
    values = {
        "--model": args.model,
        "--depth": args.depth,
        "--device": args.device,
        "--batch-size": args.batch_size,
        "--eval-batch-size": args.eval_batch_size,
        "--pool-size": args.pool_size,
        "--prompt-length": args.prompt_length,
        "--top-k": args.top_k,
        "--workers": args.workers,
        "--threads": args.threads,
        "--seed": args.seed,
        "--train-per-class": args.train_per_class,
        "--test-per-class": args.test_per_class,
        "--tasks": args.tasks,
        "--epochs": args.epochs,
        "--weights": weights,
        "--class-order": ",".join(map(str, class_order)),
    }
    return [str(part) for pair in values.items() for part in pair]


def command_for(
    configuration: Configuration, shared: list[str], args: argparse.Namespace, peer: Path | None
) -> tuple[list[str], dict[str, str]]:
    precision = ["--precision", configuration.precision]
    if configuration.side == "avalanche":
        assert peer is not None
        command = [
            str(peer),
            str(WORKER),
            *shared,
            *precision,
            "--evaluate",
            configuration.evaluate,
        ]
        return command, peer_environment()
    command = [sys.executable, __file__, *shared, *precision, "--run-one", configuration.side]
    command += ["--caches", configuration.caches, "--stage-epochs", str(args.stage_epochs)]
    return command, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def run_child(command: list[str], environment: dict[str, str], what: str) -> dict[str, Any]:
    """Run one configuration; its stdout ends with a line "RESULT {json}"."""
    began = time.perf_counter()
    # the runs' own progress lines stay out of the report, unless a run fails
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stdout.write(done.stdout + done.stderr[-20000:])
        raise SystemExit(f"{what} failed (exit code {done.returncode}): {' '.join(command)}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["process_s"] = time.perf_counter() - began
    print(f"  {what}: run {result['run_s']:.1f}s, process {result['process_s']:.1f}s", flush=True)
    return result


def save_shared_weights(path: Path, args: argparse.Namespace) -> None:
    """One random timm ViT (no hub: ``pretrained=False``) that every side loads."""
    import timm

    from clbench.fileio import atomic_write_with

    torch.manual_seed(args.seed)
    depth = {"depth": args.depth} if args.depth else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=0, **depth)
    atomic_write_with(path, lambda target: torch.save(model.state_dict(), target))


# -- the command line ---------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    add_whole_run_arguments(parser)
    parser.set_defaults(batch_size=16, eval_batch_size=32)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    parser.add_argument(
        "--avalanche-evaluate",
        nargs="+",
        choices=["all", "seen"],
        default=["all"],
        help="Avalanche's evaluation after each experience: the whole test stream (its "
        "examples' loop) and/or the seen experiences (clbench's work)",
    )
    parser.add_argument(
        "--cache-variants",
        nargs="+",
        choices=["on", "off"],
        default=["on", "off"],
        help="hide-prompt / norga with their caches on and/or off",
    )
    parser.add_argument(
        "--stage-epochs",
        type=int,
        default=1,
        help="epochs of hide-prompt / norga's end-of-task stages (task identity, alignment, TAP)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Avalanche's peer venv")
    parser.add_argument("--wheels", type=Path, help="install its timm 0.6.13 from this folder")
    parser.add_argument("--json", type=Path, help="also write every result to this file")
    # internal: one clbench run in this (child) process
    parser.add_argument("--run-one", choices=SIDES[1:], help=argparse.SUPPRESS)
    parser.add_argument("--caches", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--class-order", type=class_order_argument, help=argparse.SUPPRESS)
    counts = (
        "batch_size",
        "eval_batch_size",
        "train_per_class",
        "test_per_class",
        "tasks",
        "epochs",
        "repeats",
        "stage_epochs",
    )
    return check_arguments(parser, parser.parse_args(argv), counts)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_arguments(argv)
    if args.run_one:
        run = run_floor if args.run_one == "l2p-floor" else run_clbench_whole
        print("RESULT " + json.dumps(run(args)), flush=True)
        return
    planned = configurations(args)
    width, depth, _ = VIT_SIZES[args.model]
    print(
        f"whole runs: digits at 224 px, {args.train_per_class} train / {args.test_per_class} "
        f"test images per class, {args.tasks} tasks, {args.epochs} epoch(s); {args.model} "
        f"({args.depth or depth} blocks, width {width}, random weights shared by every side) "
        f"on {args.device}, batch {args.batch_size} (eval {args.eval_batch_size}), "
        f"M={args.pool_size}, L_p={args.prompt_length}, N={args.top_k}, "
        f"{args.threads or torch.get_num_threads()} thread(s); {len(planned)} configurations "
        f"x {args.repeats} interleaved rounds; {load_average()}",
        flush=True,
    )
    peer = None
    if "avalanche" in args.sides:
        peer = ensure_peer_venv(args.venv, wheels=args.wheels)
    class_order = seeded_class_order(DIGITS_CLASSES, args.seed)
    runs: dict[Configuration, list[dict[str, Any]]] = {c: [] for c in planned}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / "vit.pth"
        save_shared_weights(weights, args)
        shared = shared_arguments(args, weights, class_order)
        for round_index in range(args.repeats):
            print(f"round {round_index + 1}/{args.repeats} ({load_average()})", flush=True)
            for configuration in planned:
                command, environment = command_for(configuration, shared, args, peer)
                runs[configuration].append(run_child(command, environment, configuration.label))
    memory_kind = next(iter(runs.values()))[0]["memory_kind"]
    print(
        f"\nwhole runs, medians over {args.repeats} interleaved rounds (peak memory: {memory_kind}):"
    )
    print(whole_run_table(runs))
    print("\nevaluation seconds after each experience (medians):")
    print(eval_cost_table(runs))
    check = weight_check(runs)
    if check:
        print("\n" + check)
    print(f"\n{time.perf_counter() - began:.0f}s in all; {load_average()}")
    if args.json:
        from clbench.fileio import atomic_write_json

        payload = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": [
                {"configuration": vars(c) | {"label": c.label}, "results": rs}
                for c, rs in runs.items()
            ],
        }
        atomic_write_json(args.json, payload)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
