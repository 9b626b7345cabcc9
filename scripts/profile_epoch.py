"""Where the time of one norga training epoch goes: data, forward (selection, prompted
encoder pass, contrastive term), loss, backward, optimizer, and the end-of-task stages
(feature extraction, class statistics, task-identity training, sample replay).

Trains norga on a synthetic class-incremental scenario (random 224-px images, the
benchmark's data) for ``--tasks`` experiences and reports the last one, the first that
has every stage (old-class means in the contrastive term, alignment and TAP on samples):

    python scripts/profile_epoch.py                          # CPU, ViT-Ti/16
    python scripts/profile_epoch.py --device cuda --model vit_base_patch16_224 \\
        --batch-size 128 --batches 20 --torch-profile

Phases are timed by wrapping the strategy's own methods (after a device sync, so GPU
time lands in the phase that queued it); a phase's time includes its sub-phases, and
"other" is the parent's time no sub-phase explains. ``--torch-profile`` adds
torch.profiler's operator table (the phases appear there as record_function ranges),
``--cprofile`` the Python functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from _avalanche_l2p_worker import (  # noqa: E402
    VIT_SIZES,
    check_arguments,
    synchronize,
    synthetic_benchmark,
)

from clbench.strategy import CLStrategy  # noqa: E402


class PhaseTimer:
    """Inclusive wall time per nested phase ("epoch/forward/encoder"), and call counts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def add(self, path: str, seconds: float) -> None:
        self.seconds[path] += seconds
        self.calls[path] += 1

    def wrap(self, owner: Any, attribute: str, phase: str) -> None:
        """Time every call of ``owner.attribute`` as ``phase`` (nested under the caller)."""
        function = getattr(owner, attribute)

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return function(*args, **kwargs)
            self.stack.append(phase)
            path = "/".join(self.stack)
            synchronize(self.device)
            began = time.perf_counter()
            try:
                with torch.profiler.record_function(phase):
                    return function(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.add(path, time.perf_counter() - began)
                self.stack.pop()

        setattr(owner, attribute, timed)


def data_plugin(timer: PhaseTimer) -> Any:
    """Time between batches: the loader producing the next batch and its copy to the device
    (Avalanche's loop moves the batch before ``before_training_iteration``)."""
    from avalanche.core import SupervisedPlugin

    class DataTime(SupervisedPlugin):
        def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            synchronize(timer.device)
            self.last = time.perf_counter()

        def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            if timer.enabled:
                timer.add("epoch/data", time.perf_counter() - self.last)

        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            synchronize(timer.device)
            self.last = time.perf_counter()

    return DataTime()


def instrument(strategy: CLStrategy, timer: PhaseTimer) -> None:
    import clbench.consolidation.gaussian as gaussian
    import clbench.strategies.hide_prompt as hide_prompt

    wrap = timer.wrap
    wrap(strategy, "training_epoch", "epoch")
    wrap(strategy, "forward", "forward")
    wrap(strategy.model.prompts, "forward", "selection")  # the prompt assembly
    wrap(strategy.encoder, "forward", "encoder")
    wrap(strategy, "query", "query")
    wrap(strategy, "contrastive", "contrastive")
    wrap(strategy, "criterion", "loss")
    wrap(strategy, "backward", "backward")
    wrap(strategy, "optimizer_step", "optimizer")
    wrap(strategy, "end_task", "end of task")
    wrap(gaussian, "extract_features", "feature extraction")
    wrap(strategy.consolidation.query_statistics, "update", "statistics")
    wrap(strategy.consolidation.prompted_statistics, "update", "statistics")
    wrap(hide_prompt, "train_on_features", "task-identity training")
    wrap(gaussian, "train_on_samples", "sample replay (TII alignment, TAP)")


def report(timer: PhaseTimer, items: int) -> str:
    paths = sorted(timer.seconds, key=lambda p: (p.split("/")[0] != "epoch", p))
    lines = [f"{'phase':<58}{'seconds':>9}{'% parent':>10}{'calls':>7}"]
    for path in paths:
        parts = path.split("/")
        parent = "/".join(parts[:-1])
        share = 100 * timer.seconds[path] / timer.seconds[parent] if parent else 100.0
        name = "  " * (len(parts) - 1) + parts[-1]
        lines.append(f"{name:<58}{timer.seconds[path]:>9.2f}{share:>9.1f}%{timer.calls[path]:>7}")
    for parent in paths:
        children = [p for p in paths if p.rsplit("/", 1)[0] == parent and p != parent]
        rest = timer.seconds[parent] - sum(timer.seconds[c] for c in children)
        if children and rest > 0.01 * timer.seconds[parent]:
            lines.append(
                f"{'other time in ' + parent:<58}{rest:>9.2f}"
                f"{100 * rest / timer.seconds[parent]:>9.1f}%"
            )
    epoch = timer.seconds.get("epoch", 0.0)
    if epoch:
        lines.append(f"training epoch: {items} items in {epoch:.2f}s = {items / epoch:.2f} items/s")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny_patch16_224", choices=sorted(VIT_SIZES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="training batches per task")
    parser.add_argument("--tasks", type=int, default=2, help="experiences; the last is reported")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: auto)")
    parser.add_argument("--tii-epochs", type=int, default=2)
    parser.add_argument(
        "--replay-epochs", type=int, default=2, help="epochs of TII alignment and of TAP on samples"
    )
    parser.add_argument("--samples-per-class", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-profile", action="store_true", help="torch.profiler op table")
    parser.add_argument("--cprofile", action="store_true", help="Python functions, cumulative")
    return check_arguments(parser, parser.parse_args(argv), ("batch_size", "batches", "tasks"))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_arguments(argv)
    from clbench.encoders.vit import create_vit
    from clbench.registry import STRATEGIES

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    per_task = args.batch_size * args.batches
    benchmark = synthetic_benchmark(
        train_items=args.tasks * per_task,
        test_items=args.tasks * 2,
        num_classes=2 * args.tasks,
        num_experiences=args.tasks,
        seed=args.seed,
    )
    encoder = create_vit(args.model, pretrained=False)
    timer = PhaseTimer(device)
    strategy_class = STRATEGIES.get("norga")
    config = strategy_class.Config(
        epochs=1,
        batch_size=args.batch_size,
        num_tasks=args.tasks,
        lr_schedule="constant",
        precision=args.precision,
        num_workers=args.workers,
        tii_epochs=args.tii_epochs,
        tii_align_epochs=args.replay_epochs,
        tap_epochs=args.replay_epochs,
        samples_per_class=args.samples_per_class,
    )
    strategy = strategy_class(
        encoder=encoder,
        num_classes=2 * args.tasks,
        config=config,
        device=device,
        plugins=[data_plugin(timer)],
    )
    instrument(strategy, timer)
    for task in range(args.tasks - 1):  # earlier tasks: warm-up and old classes
        strategy.train(benchmark.train_stream[task])

    timer.enabled = True
    profiler = cprofiler = None
    if args.torch_profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
    if args.cprofile:
        cprofiler = cProfile.Profile()
        cprofiler.enable()
    synchronize(device)
    began = time.perf_counter()
    strategy.train(benchmark.train_stream[args.tasks - 1])
    synchronize(device)
    total = time.perf_counter() - began
    if cprofiler is not None:
        cprofiler.disable()
    if profiler is not None:
        profiler.__exit__(None, None, None)
    timer.enabled = False

    resolved = "bf16" if strategy.amp_dtype == torch.bfloat16 else "fp32"
    print(
        f"norga, experience {args.tasks - 1} of {args.tasks}: {args.model} at 224 px on "
        f"{device} ({resolved}, {strategy.config.num_workers} loader workers, "
        f"{torch.get_num_threads()} threads), {per_task} training items in batches of "
        f"{args.batch_size}; strategy.train() took {total:.2f}s"
    )
    print(report(timer, per_task))
    if profiler is not None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("\ntorch.profiler, top operators by self time:")
        print(profiler.key_averages().table(sort_by=sort, row_limit=20))
    if cprofiler is not None:
        stream = io.StringIO()
        pstats.Stats(cprofiler, stream=stream).sort_stats("cumulative").print_stats(25)
        print("\ncProfile, top functions by cumulative time:")
        print(stream.getvalue())


if __name__ == "__main__":
    main()
