"""The whole-run benchmark's stream, and Avalanche's side of it (scripts/bench_whole_run.py).

This file runs in both environments and imports nothing from clbench: bench_whole_run.py
imports the stream for clbench's side (timm 1.x), and the peer venv (timm 0.6.13,
scripts/_peer_venv.py) runs it as a script for Avalanche's own LearningToPrompt, which
prints one ``RESULT {json}`` line.

The stream: scikit-learn's bundled 8x8 digits, ``train_per_class`` / ``test_per_class``
images of each class (a fixed per-class draw, the same on both sides), upsampled to
224 px once (bilinear, as clbench's digits-offline does), standardised with mean = std =
0.5 (timm's ViT configs) in three channels; classes in the given order, equal tasks.
Both sides build it with :func:`digits_stream`, so they train and test on the same items.

The weights: one timm 1.x ViT saved by bench_whole_run.py; clbench loads the file as
``backbone.checkpoint``, :func:`load_shared_weights` loads it into both of Avalanche's
ViTs (the frozen query model ``original_vit`` and the prompted one). timm 0.6.13 and 1.x
name a ViT's weights alike; Avalanche's prompted ViT also has position embeddings for its
L_p * N prompt tokens (between [CLS] and the patches), which are set to zero, so its
prompts carry no position, as clbench's do. Both sides report the query feature of two
test images (:func:`probe_batch`), and bench_whole_run.py checks they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _avalanche_l2p_worker import (  # noqa: E402  (the scripts folder is not a package)
    IMAGE_SIZE,
    PeakMemory,
    add_common_arguments,
    build_avalanche_l2p,
    prepare_process,
    synchronize,
)

DIGITS_CLASSES = 10
SPLIT_SEED = 0  # the per-class draw never moves with the run seed


class StandardisedImages(Dataset):
    """Items (image, label, task label 0) from uint8 [N, 1, H, W] grey images.

    Each image is expanded to three channels and standardised when read, as clbench's
    digits-offline does (one stored channel: 50 KB an image at 224 px, not 600 KB).
    """

    def __init__(self, images: Tensor, labels: list[int]) -> None:
        self.images = images
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = self.images[index].float().div(255.0).sub(0.5).div(0.5).expand(3, -1, -1)
        # task label 0 as a third element: Avalanche's L2P reads ``mb_task_id``
        return image, self.targets[index], 0


def digits_datasets(
    train_per_class: int, test_per_class: int
) -> tuple[StandardisedImages, StandardisedImages]:
    """Train and test sets: for each class, its images in a fixed shuffled order, the
    first ``test_per_class`` for testing and the next ``train_per_class`` for training."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [int(y) for y in digits.target]
    rng = random.Random(SPLIT_SEED)
    train: list[int] = []
    test: list[int] = []
    for label in range(DIGITS_CLASSES):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        if len(members) < train_per_class + test_per_class:
            raise SystemExit(
                f"digit {label} has {len(members)} images: ask for fewer than "
                f"{train_per_class} + {test_per_class} per class"
            )
        test += members[:test_per_class]
        train += members[test_per_class : test_per_class + train_per_class]

    def dataset(indices: list[int]) -> StandardisedImages:
        grey = torch.from_numpy(digits.images[sorted(indices)] / 16.0).float().unsqueeze(1)
        size = (IMAGE_SIZE, IMAGE_SIZE)
        resized = torch.nn.functional.interpolate(
            grey, size=size, mode="bilinear", align_corners=False
        )
        images = resized.clamp(0, 1).mul(255).round().to(torch.uint8)
        return StandardisedImages(images, [labels[i] for i in sorted(indices)])

    return dataset(train), dataset(test)


def digits_stream(
    *, train_per_class: int, test_per_class: int, class_order: list[int], num_experiences: int
) -> Any:
    """The class-incremental Avalanche benchmark both sides run."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    if sorted(class_order) != list(range(DIGITS_CLASSES)):
        raise SystemExit(f"--class-order must order the classes 0..9, got {class_order}")
    if DIGITS_CLASSES % num_experiences:
        raise SystemExit(f"{DIGITS_CLASSES} classes do not split into {num_experiences} tasks")
    train, test = digits_datasets(train_per_class, test_per_class)
    return class_incremental_benchmark(
        {"train": as_classification_dataset(train), "test": as_classification_dataset(test)},
        class_order=class_order,
        num_experiences=num_experiences,
    )


def probe_batch(test_per_class: int) -> Tensor:
    """Two test images whose query features both sides report (the same weights give
    the same features)."""
    _, test = digits_datasets(0, test_per_class)
    return torch.stack([test[0][0], test[1][0]])


# -- Avalanche's side --------------------------------------------------------------------------


def load_shared_weights(strategy: Any, path: Path, prompt_tokens: int) -> None:
    """The benchmark's ViT weights into Avalanche's two ViTs; any other mismatch than
    the prompt pool and the heads is an error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for model, extra_tokens in ((strategy.original_vit, 0), (strategy.model, prompt_tokens)):
        weights = dict(state)
        if extra_tokens:
            position = weights["pos_embed"]
            prompts = position.new_zeros(1, extra_tokens, position.shape[-1])
            weights["pos_embed"] = torch.cat([position[:, :1], prompts, position[:, 1:]], dim=1)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(("head.", "prompt."))]
        if missing or unexpected:
            raise SystemExit(
                f"{path} does not fit Avalanche's {type(model).__name__}: missing {missing}, "
                f"unexpected {unexpected}"
            )


def accuracy_row(metrics: dict[str, Any], evaluated: list[int], experiences: int) -> list[Any]:
    """Avalanche's per-experience accuracy (%) of the evaluated test experiences; None
    for the others."""
    row: list[Any] = [None] * experiences
    for index in evaluated:
        # "Top1_Acc_Exp/eval_phase/test_stream/Exp003", with "/Task000" before "/Exp"
        # where the stream has task labels
        (key,) = [
            k
            for k in metrics
            if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/")
            and k.endswith(f"/Exp{index:03d}")
        ]
        row[index] = 100.0 * float(metrics[key])
    return row


def run_avalanche_whole(args: argparse.Namespace) -> dict[str, Any]:
    """Train each experience, then evaluate as Avalanche's examples do (the whole test
    stream, ``--evaluate all``) or the seen experiences only (``seen``)."""
    import timm
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    device = prepare_process(args)
    memory = PeakMemory(device)
    memory.reset()
    baseline = memory.current_mib()
    began = time.perf_counter()
    benchmark = digits_stream(
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        class_order=args.class_order,
        num_experiences=args.tasks,
    )
    strategy = build_avalanche_l2p(
        args,
        device,
        train_epochs=args.epochs,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    load_shared_weights(strategy, args.weights, args.prompt_length * args.top_k)
    probing = time.perf_counter()  # the probe is the benchmark's check, not the run's work
    with torch.no_grad():
        probe = strategy.original_vit(probe_batch(args.test_per_class).to(device))["pre_logits"]
    probe_s = time.perf_counter() - probing
    train_s, eval_s, matrix, evaluated_items = [], [], [], 0
    for index, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience, num_workers=args.workers)
        synchronize(device)
        train_s.append(time.perf_counter() - start)
        seen = list(range(index + 1)) if args.evaluate == "seen" else list(range(args.tasks))
        start = time.perf_counter()
        metrics = strategy.eval([benchmark.test_stream[i] for i in seen], num_workers=args.workers)
        synchronize(device)
        eval_s.append(time.perf_counter() - start)
        matrix.append(accuracy_row(metrics, seen, args.tasks))
        evaluated_items += sum(len(benchmark.test_stream[i].dataset) for i in seen)
    return {
        "name": "avalanche l2p",
        "precision": args.precision,
        "evaluate": args.evaluate,
        "run_s": time.perf_counter() - began - probe_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "accuracy": matrix,
        "train_items": sum(len(e.dataset) for e in benchmark.train_stream) * args.epochs,
        "evaluated_items": evaluated_items,
        "peak_mib": memory.peak_mib(),
        "baseline_mib": baseline,
        "memory_kind": memory.kind,
        "probe": probe.float().cpu().tolist(),
        "timm": timm.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def add_whole_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The stream's and the run's settings, the same on both sides."""
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=5, help="experiences (10 classes)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")


def class_order_argument(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    add_whole_run_arguments(parser)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--class-order", type=class_order_argument, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="the shared ViT weights")
    parser.add_argument("--evaluate", choices=["all", "seen"], default="all")
    args = parser.parse_args()
    print("RESULT " + json.dumps(run_avalanche_whole(args)), flush=True)


if __name__ == "__main__":
    main()
