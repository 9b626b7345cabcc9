"""Avalanche's own ``LearningToPrompt``, timed exactly as bench_l2p_vs_avalanche.py times
clbench; run by that script inside its own virtual environment, prints one JSON line.

Avalanche's built-in L2P (avalanche.models.timm_vit) is written against timm 0.6.13,
while clbench needs timm 1.x, so this file runs in a peer venv that holds timm 0.6.13 and
sees the benchmark's environment for everything else (scripts/_peer_venv.py), and imports
nothing from clbench. The measuring code (synthetic benchmark, iteration clock, peak memory, weight bytes) lives
here and the main script imports it too, so both sides are measured by the same lines.

Two things make Avalanche's L2P runnable offline and at any ViT width:

* ``pretrained=False`` is a constructor argument of ``LearningToPrompt``, passed to both
  timm models it builds (the prompted ViT and the frozen ``original_vit`` it queries), so
  timm builds random weights and never contacts the hub (``HF_HUB_OFFLINE=1`` is set
  as well, so any attempt would fail at once instead of hanging). Throughput and memory
  do not depend on the weights' values.
* ``LearningToPrompt`` hard-codes its classifier as ``nn.Linear(768, num_classes)``, which
  only fits ViT-B; the head is replaced by one of the model's width right after
  construction (its optimizer is rebuilt at every experience, so the new head trains).
  Avalanche's model list also lacks ``vit_small_patch16_224`` and ViTs of other depths
  (``--depth``, for quick runs); they are added to ``avalanche.models.vit`` with timm's
  sizes (:func:`avalanche_model_name`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

# The ViT sizes both sides accept: (embed_dim, depth, heads) at patch 16, 224 px.
VIT_SIZES = {
    "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
}
IMAGE_SIZE = 224  # Avalanche's prompted ViT is built for 224 px only


# -- the shared measuring code ---------------------------------------------------------


class SyntheticImages(Dataset):
    """Random uint8 RGB images, standardised per item as a real image pipeline would.

    Labels cycle through the classes so every experience of a class-incremental split
    gets the same number of items; items are (image, label, task label 0).
    """

    def __init__(self, count: int, num_classes: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (count, 3, IMAGE_SIZE, IMAGE_SIZE)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        self.targets = [index % num_classes for index in range(count)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.images[index].float().div(255.0).sub(0.5).div(0.5)
        # task label 0 as a third element: Avalanche's L2P reads ``mb_task_id``
        return image, self.targets[index], 0


def synthetic_benchmark(
    *, train_items: int, test_items: int, num_classes: int, num_experiences: int, seed: int
) -> Any:
    """A class-incremental Avalanche benchmark over :class:`SyntheticImages`.

    ``train_items`` / ``test_items`` are totals; classes 0..C-1 in order, C / E per
    experience.
    """
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    if num_classes % num_experiences:
        raise ValueError(f"{num_classes} classes do not split into {num_experiences} experiences")
    datasets = {
        "train": as_classification_dataset(SyntheticImages(train_items, num_classes, seed)),
        "test": as_classification_dataset(SyntheticImages(test_items, num_classes, seed + 1)),
    }
    return class_incremental_benchmark(
        datasets, class_order=list(range(num_classes)), num_experiences=num_experiences
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plugin_base() -> type:
    from avalanche.core import SupervisedPlugin

    return SupervisedPlugin


class IterationClock(_plugin_base()):
    """A timestamp (after a device sync) and the batch size after every iteration."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stamps: list[tuple[float, int]] = []

    def _stamp(self, strategy: Any) -> None:
        synchronize(self.device)
        self.stamps.append((time.perf_counter(), int(strategy.mb_y.shape[0])))

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._stamp(strategy)

    def after_eval_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._stamp(strategy)


class StopAfter(_plugin_base()):
    """Ends an experience's training after ``iterations`` batches (cheap training for the
    evaluation-cost curve, whose subject is evaluation)."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.count = 0

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.count = 0

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.count += 1
        if self.count >= self.iterations:
            strategy.stop_training()


def items_per_second(stamps: list[tuple[float, int]], warmup: int) -> float:
    """Items after the first ``warmup`` batches over the time they took: from the end of
    the last warm-up batch to the end of the last batch (loading included)."""
    if warmup < 1:
        raise ValueError("at least one warm-up batch is needed: timing starts at its end")
    if len(stamps) <= warmup:
        raise ValueError(
            f"{len(stamps)} batches ran but {warmup} are warm-up: ask for more batches"
        )
    items = sum(size for _, size in stamps[warmup:])
    return items / (stamps[-1][0] - stamps[warmup - 1][0])


class PeakMemory:
    """Peak memory since the last ``reset``: CUDA allocated bytes on a GPU, the process's
    resident set on the CPU (Linux ``VmHWM``, reset through /proc/self/clear_refs; where
    that is not allowed, the process's lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = True

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "CUDA allocated"
        return "process RSS" if self.resettable else "process RSS (lifetime peak)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.resettable = False

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_mib("VmHWM")

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _status_mib("VmRSS")


def _status_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def weights_mib(modules: Iterable[nn.Module]) -> float:
    """Bytes of every distinct parameter and buffer storage held by ``modules``: a second
    copy of the backbone counts twice, a shared one once."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def measure(
    strategy: Any,
    benchmark: Any,
    *,
    device: torch.device,
    warmup: int,
    num_workers: int,
    modules: Iterable[nn.Module],
    baseline_mib: float,
) -> dict[str, Any]:
    """Train on the first experience twice (two epochs' worth), then evaluate its test set
    twice.

    The first pass of each is what a run pays the first time it sees an item (clbench
    computes and caches its query then: test items always, training items of text or of
    an un-augmented image stream with ``cache_train_queries``); the second is every later
    epoch / evaluation. Rates exclude the first ``warmup`` batches of each pass.
    """
    clock, memory = IterationClock(device), PeakMemory(device)
    strategy.plugins.append(clock)
    loader = {"num_workers": num_workers}
    memory.reset()
    began = time.perf_counter()
    strategy.train(benchmark.train_stream[0], **loader)
    synchronize(device)
    result: dict[str, Any] = {
        "train_call_s": time.perf_counter() - began,
        "train_items_per_s": items_per_second(clock.stamps, warmup),
        "train_batches": len(clock.stamps),
        "train_peak_mib": memory.peak_mib(),
    }
    clock.stamps = []
    strategy.train(benchmark.train_stream[0], **loader)
    synchronize(device)
    result["train_again_items_per_s"] = items_per_second(clock.stamps, warmup)
    for name in ("eval_first", "eval_again"):
        clock.stamps = []
        memory.reset()
        strategy.eval([benchmark.test_stream[0]], **loader)
        synchronize(device)
        result[f"{name}_items_per_s"] = items_per_second(clock.stamps, warmup)
        result[f"{name}_peak_mib"] = memory.peak_mib()
    result.update(
        eval_batches=len(clock.stamps),
        weights_mib=weights_mib(modules),
        baseline_mib=baseline_mib,
        memory_kind=memory.kind,
        device=str(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    strategy.plugins.remove(clock)
    return result


def check_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, counts: tuple[str, ...]
) -> argparse.Namespace:
    """``args`` after the checks every benchmark script makes: each of ``counts`` at
    least 1, and a device torch can name; a bad one ends with the parser's usage error."""
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: valid choices are cpu, cuda, cuda:N")
    return args


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings both sides take, with the same names and defaults."""
    parser.add_argument("--model", default="vit_tiny_patch16_224", choices=sorted(VIT_SIZES))
    parser.add_argument(
        "--depth", type=int, default=0, help="blocks of the ViT (0: the model's own, 12)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per pass")
    parser.add_argument("--pool-size", type=int, default=10, help="L2P's M")
    parser.add_argument("--prompt-length", type=int, default=5, help="L2P's L_p")
    parser.add_argument("--top-k", type=int, default=5, help="L2P's N")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)


def throughput_benchmark(args: argparse.Namespace) -> Any:
    """One experience of (warmup + batches) training batches and as many test batches."""
    warm_and_timed = args.warmup + args.batches
    return synthetic_benchmark(
        train_items=warm_and_timed * args.batch_size,
        test_items=warm_and_timed * args.eval_batch_size,
        num_classes=args.num_classes,
        num_experiences=1,
        seed=args.seed,
    )


def prepare_process(args: argparse.Namespace) -> torch.device:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    return device


# -- Avalanche's side ----------------------------------------------------------------------


def avalanche_model_name(model: str, depth: int = 0) -> str:
    """The name under which Avalanche's ``create_model`` builds ``model`` with ``depth``
    blocks (0: its own 12): Avalanche's own names, and otherwise one added to
    ``avalanche.models.vit`` (where ``create_model`` looks names up), such as ViT-S/16,
    which Avalanche lacks, or a shallower ViT for quick runs."""
    import avalanche.models.vit as avalanche_vit

    width, own_depth, heads = VIT_SIZES[model]
    depth = depth or own_depth
    name = model if depth == own_depth else f"{model}_depth{depth}"
    if hasattr(avalanche_vit, name):
        return name

    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from avalanche.models.timm_vit import _create_vision_transformer

        sizes = dict(patch_size=16, embed_dim=width, depth=depth, num_heads=heads)
        # timm 0.6.13 knows the model's own name (its pretrained config, never fetched)
        return _create_vision_transformer(model, pretrained=pretrained, **sizes, **kwargs)

    setattr(avalanche_vit, name, build)
    return name


def autocast_forward(strategy: Any, device: torch.device, precision: str) -> None:
    """Run ``strategy.forward`` (the frozen query pass and the prompted pass) under bf16
    autocast, logits back in fp32 for the loss: Avalanche's L2P has no precision option,
    so its bf16 rows are this, added here, as clbench's ``precision=bf16`` does it."""
    if precision == "fp32":
        return
    forward = strategy.forward

    def forward_in_bf16() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward()
        return logits.float()

    strategy.forward = forward_in_bf16


def build_avalanche_l2p(args: argparse.Namespace, device: torch.device, **settings: Any) -> Any:
    """Avalanche's LearningToPrompt with the benchmark's settings, random weights, a head
    of the model's width and ``args.precision``; ``settings`` go to its constructor."""
    from avalanche.training import LearningToPrompt

    strategy = LearningToPrompt(
        model_name=avalanche_model_name(args.model, args.depth),
        pretrained=False,  # random weights, no hub (see the module docstring)
        num_classes=args.num_classes,
        pool_size=args.pool_size,
        prompt_length=args.prompt_length,
        top_k=args.top_k,
        train_mb_size=args.batch_size,
        eval_mb_size=args.eval_batch_size,
        device=device,
        # L2P's defaults, spelled out: prompt-token mean head, learnable keys, [CLS] query
        head_type="prompt",
        prompt_key=True,
        embedding_key="cls",
        batchwise_prompt=False,
        use_cls_features=True,
        **settings,
    )
    width = strategy.model.embed_dim
    if width != VIT_SIZES[args.model][0]:
        raise RuntimeError(f"Avalanche built {args.model} with width {width}")
    strategy.model.head = nn.Linear(width, args.num_classes).to(device)  # it hard-codes 768
    autocast_forward(strategy, device, args.precision)
    return strategy


def run_avalanche(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    from avalanche.training.plugins import EvaluationPlugin

    device = prepare_process(args)
    benchmark = throughput_benchmark(args)
    memory = PeakMemory(device)
    baseline = memory.current_mib()
    strategy = build_avalanche_l2p(
        args,
        device,
        train_epochs=1,
        # the same as clbench's quiet evaluator: no metrics, no loggers in the timed loop
        evaluator=EvaluationPlugin(loggers=[]),
    )
    result = measure(
        strategy,
        benchmark,
        device=device,
        warmup=args.warmup,
        num_workers=args.workers,
        modules=[strategy.model, strategy.original_vit],
        baseline_mib=baseline,
    )
    result.update(
        name="avalanche l2p",
        timm=timm.__version__,
        precision=args.precision,
        python=sys.executable,
        note="Avalanche LearningToPrompt, timm 0.6.13 venv",
    )
    return result


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    import timm

    if not timm.__version__.startswith("0.6."):
        raise SystemExit(
            f"Avalanche's LearningToPrompt needs timm 0.6.x; this interpreter ({sys.executable}) "
            f"has timm {timm.__version__}: run it through bench_l2p_vs_avalanche.py"
        )
    print("RESULT " + json.dumps(run_avalanche(args)), flush=True)


if __name__ == "__main__":
    main()
