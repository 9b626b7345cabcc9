"""Does data loading keep up with the model? Items/s of each scenario's train loader.

Builds small data sets in the real formats in a temporary data root (a CIFAR-100 python
tarball, an ImageNet-R-shaped tar of 500x375 JPEGs, FewRel's val_wiki from ../shared,
a synthetic TACRED in the LDC JSON format), builds each scenario through its registered
function, prints its per-task counts (``Scenario.summary``, as ``clbench run`` prints
them) and times its training DataLoader, then times a prompt-tuning training step of the
models (query pass without grad + prompted pass + backward into the prompt tokens):

    python scripts/bench_data_loading.py                 # loaders at 32 px and 224 px
    python scripts/bench_data_loading.py --workers 0 2 --skip-vit-b

Numbers are for this machine's CPU; a GPU raises the model's rate, the loader's stays.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_FEWREL = REPO.parent / "shared" / "data" / "fewrel" / "val_wiki.json"


@dataclass
class Row:
    scenario: str
    setting: str
    items_per_s: float


# ------------------------------------------------------------------------- fake data


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar100(path: Path, train_per_class: int, test_per_class: int) -> str:
    rng = np.random.default_rng(0)

    def split(per_class: int) -> bytes:
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return pickle.dumps({"fine_labels": labels.tolist(), "data": data})

    meta = {"fine_label_names": [f"class{c}" for c in range(100)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, "cifar-100-python/train", split(train_per_class))
        add_file(tar, "cifar-100-python/test", split(test_per_class))
        add_file(tar, "cifar-100-python/meta", pickle.dumps(meta))
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_imagenet_r(path: Path, classes: int, per_class: int) -> str:
    """500x375 JPEGs (smooth gradients plus noise: realistic file sizes, ~60 KB)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for c in range(classes):
            for i in range(per_class):
                base = (x * (c + 1) + y * (i + 1)) % 256
                noise = rng.integers(0, 40, (375, 500, 3))
                pixels = ((base[..., None] + noise) % 256).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                add_file(tar, f"imagenet-r/n{c:08d}/art_{i}.jpg", buffer.getvalue())
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tacred(folder: Path, relations: int, per_relation: int) -> None:
    """LDC-format records of ~36 tokens (TACRED's mean sentence length)."""
    rng = random.Random(0)
    vocabulary = [f"word{i}" for i in range(2000)]
    records = []
    for r in range(relations):
        for _ in range(per_relation):
            tokens = [rng.choice(vocabulary) for _ in range(rng.randint(20, 52))]
            s, o = rng.sample(range(len(tokens) - 2), 2)
            records.append(
                {
                    "relation": f"rel:{r}",
                    "token": tokens,
                    "subj_start": s,
                    "subj_end": s + 1,
                    "obj_start": o,
                    "obj_end": o,
                }
            )
    folder.mkdir(parents=True, exist_ok=True)
    third = len(records) // 3
    for name, part in (
        ("train.json", records[:third]),
        ("dev.json", records[third : 2 * third]),
        ("test.json", records[2 * third :]),
    ):
        (folder / name).write_text(json.dumps(part))


# --------------------------------------------------------------------------- timings


def loader_rate(dataset: Any, batch_size: int, workers: int, max_items: int) -> float:
    """Items/s of a shuffled DataLoader over ``dataset`` (worker start-up included)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False
    )
    began, items = time.perf_counter(), 0
    for x, *_ in loader:
        items += len(x)
        if items >= max_items:
            break
    return items / (time.perf_counter() - began)


def step_rate(encoder: Any, batch: torch.Tensor, repeats: int) -> float:
    """Items/s of a prompt-tuning step: query pass, prompted pass, backward to the prompts."""
    from clbench.encoders.attention import Prompt

    tokens = torch.zeros(1, 5, encoder.embed_dim, requires_grad=True)
    head = torch.nn.Linear(encoder.embed_dim, 10)

    def step() -> None:
        encoder.query(batch)
        output = encoder(batch, Prompt(tokens=tokens), readout="prompt")  # as l2p runs
        head(output.prompt_token_states().mean(dim=1)).sum().backward()

    step()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * len(batch) / (time.perf_counter() - began)


def train_datasets(scenario: Any) -> Any:
    return scenario.benchmark.train_stream[0].dataset.train()


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--items", type=int, default=1024, help="items timed per loader")
    parser.add_argument("--skip-vit-b", action="store_true", help="no 224 px / ViT-B timings")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from clbench.encoders.zoo import TextOptions, TinyViTOptions, minilm_l6, vit_tiny_random
    from clbench.scenarios.imagenet_r import ImageNetROptions, imagenet_r
    from clbench.scenarios.relation_extraction import FewRelOptions, fewrel
    from clbench.scenarios.split_cifar100 import SplitCIFAR100Options, split_cifar100
    from clbench.scenarios.tacred import TACREDOptions, tacred

    rows: list[Row] = []
    tiny_vit = vit_tiny_random(TinyViTOptions())
    vit_b_input = SimpleNamespace(
        modality="vision", input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3
    )
    vision_inputs = [("32px", tiny_vit)] + ([] if args.skip_vit_b else [("224px", vit_b_input)])
    minilm = minilm_l6(TextOptions())

    with tempfile.TemporaryDirectory(prefix="clbench-bench-") as tmp:
        root = Path(tmp)
        os.environ["CLBENCH_DATA"] = str(root)

        def time_loaders(name: str, scenario: Any, size: str) -> None:
            dataset = train_datasets(scenario)
            for workers in args.workers:
                rate = loader_rate(dataset, args.batch_size, workers, args.items)
                rows.append(Row(name, f"{size}, {workers} workers", rate))

        # Split CIFAR-100: 100 classes x 50 train images (1 % of the real set)
        digest = write_cifar100(root / "cifar100" / "cifar-100-python.tar.gz", 50, 10)
        for size, encoder in vision_inputs:
            scenario = split_cifar100(SplitCIFAR100Options(md5=digest), encoder, seed=42)
            if size == "32px":
                print(scenario.summary(), "\n")
            time_loaders("split-cifar100", scenario, size)

        # ImageNet-R: 20 classes x 40 JPEGs of 500x375, 2 tasks
        digest = write_imagenet_r(root / "imagenet-r" / "imagenet-r.tar", 20, 40)
        options = ImageNetROptions(md5=digest, num_experiences=2)
        for size, encoder in vision_inputs:
            scenario = imagenet_r(options, encoder, seed=0)
            if size == "32px":
                print(scenario.summary(), "\n")
            time_loaders("imagenet-r", scenario, size)

        # FewRel: the real val_wiki (16 relations x 700), MiniLM tokenizer
        fewrel_options = FewRelOptions(data_file=str(SHARED_FEWREL), num_experiences=4)
        began = time.perf_counter()
        scenario = fewrel(fewrel_options, minilm, seed=2021)
        first = time.perf_counter() - began
        began = time.perf_counter()
        scenario = fewrel(fewrel_options, minilm, seed=2021)
        second = time.perf_counter() - began
        print(scenario.summary(), "\n")
        fewrel_batch = scenario.details["validation"].inputs[: args.batch_size]
        n = 16 * 700
        rows.append(Row("fewrel", "first build: read + tokenise 11,200 sentences", n / first))
        rows.append(Row("fewrel", "later builds: read + token cache", n / second))
        time_loaders("fewrel", scenario, "tokens")

        # TACRED: synthetic LDC JSON, 40 relations x 150
        write_tacred(root / "tacred", 40, 150)
        began = time.perf_counter()
        scenario = tacred(TACREDOptions(), minilm, seed=1)
        first = time.perf_counter() - began
        print(scenario.summary(), "\n")
        rows.append(Row("tacred", "first build: read + tokenise 6,000 sentences", 6000 / first))
        time_loaders("tacred", scenario, "tokens")

    models = [
        ("vit-tiny-random step (32px)", tiny_vit, torch.randn(args.batch_size, 3, 32, 32), 5),
        ("minilm-l6 step (FewRel batch)", minilm, fewrel_batch, 3),
    ]
    if not args.skip_vit_b:
        from clbench.encoders.vit import create_vit

        vit_b = create_vit("vit_base_patch16_224", pretrained=False)  # ViT-B/16 cost, no weights
        models.append(("vit-b16 step (224px)", vit_b, torch.randn(8, 3, 224, 224), 2))
    for name, encoder, batch, repeats in models:
        rows.append(Row("model", name, step_rate(encoder, batch, repeats)))

    print(f"{'scenario':<16} {'setting':<50} {'items/s':>10}")
    for row in rows:
        print(f"{row.scenario:<16} {row.setting:<50} {row.items_per_s:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
