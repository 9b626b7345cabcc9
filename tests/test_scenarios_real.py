"""The real-data scenarios (split-cifar100, imagenet-r, fewrel, tacred) on small files in
the real formats, served from 127.0.0.1 through the real download code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import test_download
import torch
from test_download import IMAGENET_R_SIZES, cifar100_tarball, imagenet_r_tar, md5

from clbench.data import fewrel_files
from clbench.data.relations import split_relation_examples
from clbench.data.splits import automatic_split, resolve_task_split
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import seeded_class_order
from clbench.scenarios import imagenet_r as inr
from clbench.scenarios import relation_extraction as rex
from clbench.scenarios.imagenet_r import ImageNetROptions, imagenet_r, make_split
from clbench.scenarios.relation_extraction import FewRelOptions, fewrel, fit_per_relation
from clbench.scenarios.split_cifar100 import SplitCIFAR100Options, split_cifar100
from clbench.scenarios.tacred import TACREDOptions, tacred

server = test_download.server  # the local HTTP server fixture

NORGA_SEED_42_TASK_1 = [42, 41, 91, 9, 65, 50, 1, 70, 15, 78]


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("CLBENCH_DATA", str(root))
    return root


def experience_sizes(scenario) -> list[tuple[int, int, int]]:
    """(classes, train items, test items) per experience."""
    return [
        (len(classes), len(train.dataset), len(test.dataset))
        for classes, train, test in zip(
            scenario.classes_per_experience,
            scenario.benchmark.train_stream,
            scenario.benchmark.test_stream,
        )
    ]


# ----------------------------------------------------------------------- split-cifar100


@pytest.fixture
def cifar_options(server) -> SplitCIFAR100Options:
    archive = cifar100_tarball(train_per_class=3, test_per_class=1)
    server.files["/cifar-100-python.tar.gz"] = archive
    return SplitCIFAR100Options(url=server.url("/cifar-100-python.tar.gz"), md5=md5(archive))


def test_norga_class_order():
    assert seeded_class_order(100, 42)[:10] == NORGA_SEED_42_TASK_1


def test_split_cifar100(cifar_options, data_root, tiny_vit, server):
    scenario = split_cifar100(cifar_options, tiny_vit, seed=42)
    assert scenario.details["class_order"][:10] == NORGA_SEED_42_TASK_1
    assert scenario.classes_per_experience[0] == sorted(NORGA_SEED_42_TASK_1)
    assert experience_sizes(scenario) == [(10, 30, 10)] * 10
    assert scenario.class_names[:2] == ["class00", "class01"]
    assert (data_root / "cifar100" / "cifar-100-python" / ".clbench-complete").is_file()

    first = scenario.benchmark.train_stream[0].dataset
    labels = {int(first[i][1]) for i in range(len(first))}
    assert labels == set(NORGA_SEED_42_TASK_1)
    x, y = first.eval()[0]
    assert x.shape == tuple(tiny_vit.input_size) and x.dtype == torch.float32
    # every pixel of the tiny archive holds the class id: the image is the label
    assert abs(float(x[0, 16, 16]) * tiny_vit.std[0] + tiny_vit.mean[0] - int(y) / 255) < 0.02
    test = scenario.benchmark.test_stream[0].dataset
    assert torch.equal(test[0][0], test[0][0])  # the test stream is not augmented

    same = split_cifar100(cifar_options, tiny_vit, seed=42)
    assert same.classes_per_experience == scenario.classes_per_experience
    assert split_cifar100(cifar_options, tiny_vit, seed=40).details["class_order"][:10] != (
        NORGA_SEED_42_TASK_1
    )
    # class_order_seed: one class order for every run seed (hier-ot's authors trees)
    pinned = SplitCIFAR100Options(**{**cifar_options.to_dict(), "class_order_seed": 42})
    for seed in (0, 7):
        assert split_cifar100(pinned, tiny_vit, seed=seed).details["class_order"][:10] == (
            NORGA_SEED_42_TASK_1
        )
    assert "class_order_seed" not in cifar_options.to_dict()  # recorded only when set
    hide = split_cifar100(
        SplitCIFAR100Options(**{**cifar_options.to_dict(), "class_order": "natural"}),
        tiny_vit,
        seed=42,
    )
    assert hide.classes_per_experience[0] == list(range(10))
    five = split_cifar100(
        SplitCIFAR100Options(**{**cifar_options.to_dict(), "num_experiences": 5}), tiny_vit, 0
    )
    assert experience_sizes(five) == [(20, 60, 20)] * 5
    assert server.count("/cifar-100-python.tar.gz") == 1  # downloaded once, then reused


def test_split_cifar100_train_transform_augments(cifar_options, data_root, tiny_vit):
    scenario = split_cifar100(cifar_options, tiny_vit, seed=0)
    train = scenario.benchmark.train_stream[0].dataset.train()
    assert "RandomResizedCrop" in scenario.details["train_transform"]
    assert "CenterCrop" in scenario.details["eval_transform"]
    x, _ = train[0]
    assert x.shape == tuple(tiny_vit.input_size)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_experiences": 7}, "100 classes into 7"),
        ({"class_order": "random"}, "class_order"),
        ({"class_order": "natural", "class_order_seed": 3}, "needs class_order=seed"),
        ({"class_order_seed": -2}, "a seed >= 0"),
    ],
)
def test_split_cifar100_bad_options_fail_before_download(
    cifar_options,
    data_root,
    tiny_vit,
    server,
    change,
    problem,
):
    options = SplitCIFAR100Options(**{**cifar_options.to_dict(), **change})
    with pytest.raises(UsageError, match=problem):
        split_cifar100(options, tiny_vit, seed=0)
    with pytest.raises(UsageError, match=problem):  # what a runner can check up front
        SCENARIOS.spec("split-cifar100").check_options(options)
    assert server.requests == [] and not data_root.exists()


def test_split_cifar100_missing_and_corrupt_data(cifar_options, data_root, tiny_vit, minilm):
    offline = SplitCIFAR100Options(**{**cifar_options.to_dict(), "download": False})
    with pytest.raises(DataNotFoundError) as info:
        split_cifar100(offline, tiny_vit, seed=0)
    message = str(info.value)
    assert str(data_root / "cifar100" / "cifar-100-python") in message
    assert "clbench download split-cifar100" in message and "cifar-100-python.tar.gz" in message
    with pytest.raises(UsageError, match="vision backbone"):
        split_cifar100(cifar_options, minilm, seed=0)

    split_cifar100(cifar_options, tiny_vit, seed=0)
    train_file = data_root / "cifar100" / "cifar-100-python" / "train"
    train_file.write_bytes(train_file.read_bytes()[:1000])
    with pytest.raises(DataNotFoundError, match=f"{train_file} is corrupt"):
        split_cifar100(cifar_options, tiny_vit, seed=0)


def test_split_cifar100_checksum_mismatch(cifar_options, data_root, tiny_vit):
    wrong = SplitCIFAR100Options(**{**cifar_options.to_dict(), "md5": "f" * 32})
    with pytest.raises(DataNotFoundError, match="f" * 32):
        split_cifar100(wrong, tiny_vit, seed=0)
    assert not (data_root / "cifar100").exists()


# --------------------------------------------------------------------------- imagenet-r


@pytest.fixture
def imagenet_r_options(server) -> ImageNetROptions:
    archive = imagenet_r_tar()
    server.files["/imagenet-r.tar"] = archive
    return ImageNetROptions(url=server.url("/imagenet-r.tar"), md5=md5(archive), num_experiences=2)


def test_imagenet_r(imagenet_r_options, data_root, tiny_vit, server, monkeypatch):
    scenario = imagenet_r(imagenet_r_options, tiny_vit, seed=1)
    folder = data_root / "imagenet-r"
    split_file = folder / "split-80-20.json"
    split = json.loads(split_file.read_text())
    # 40 images, 8 test: 2 + 2.2 + 2.4 + 1.4 -> 2, 2, 3, 1 by largest remainders
    assert split["counts"] == {"train": 32, "test": 8}
    per_class = {w: sum(p.startswith(w) for p in split["test"]) for w in IMAGENET_R_SIZES}
    assert per_class == {"n01443537": 2, "n01484850": 2, "n01494475": 3, "n01498041": 1}
    assert not set(split["train"]) & set(split["test"])
    assert scenario.num_classes == 4 and scenario.num_experiences == 2
    assert scenario.class_names[:2] == ["goldfish", "great_white_shark"]  # from README.txt
    assert scenario.class_names[2] == "n01494475"  # no name given: its WordNet id
    assert sum(s[1] for s in experience_sizes(scenario)) == 32
    assert sum(s[2] for s in experience_sizes(scenario)) == 8

    x, y = scenario.benchmark.test_stream[0].dataset[0]
    assert x.shape == tuple(tiny_vit.input_size) and x.dtype == torch.float32
    assert int(y) in scenario.classes_per_experience[0]
    assert "scale=(0.05, 1.0)" in scenario.details["train_transform"]

    # decoding and augmentation run in a worker process
    loader = torch.utils.data.DataLoader(
        scenario.benchmark.train_stream[1].dataset.train(), batch_size=4, num_workers=1
    )
    images, labels = next(iter(loader))
    assert images.shape == (4, *tiny_vit.input_size)

    # a second run reuses download, extraction and split file
    mtime = split_file.stat().st_mtime_ns
    monkeypatch.setattr(inr, "make_split", lambda *a, **k: pytest.fail("split again"))
    again = imagenet_r(imagenet_r_options, tiny_vit, seed=1)
    assert again.classes_per_experience == scenario.classes_per_experience
    assert split_file.stat().st_mtime_ns == mtime
    assert server.count("/imagenet-r.tar") == 1

    # images gone missing: the split no longer matches, and says so
    next((folder / "images" / "n01443537").glob("*.jpg")).unlink()
    with pytest.raises(DataNotFoundError, match="another set of images"):
        imagenet_r(imagenet_r_options, tiny_vit, seed=1)


def test_imagenet_r_split_protocol_numbers():
    """200 classes of uneven size, 30,000 images -> exactly 24,000 / 6,000."""
    rng = random.Random(5)
    sizes = [rng.randint(50, 250) for _ in range(199)]
    sizes.append(30_000 - sum(sizes))
    files = [f"n{c:08d}/img_{i}.jpg" for c, n in enumerate(sizes) for i in range(n)]
    split = make_split(files)
    assert (len(split["train"]), len(split["test"])) == (24_000, 6_000)
    for c, n in enumerate(sizes[:20]):
        test = sum(p.startswith(f"n{c:08d}/") for p in split["test"])
        assert abs(test - 0.2 * n) < 1
    # a function of the set of files: listing order (file system) does not matter
    shuffled = list(files)
    random.Random(0).shuffle(shuffled)
    assert make_split(shuffled) == split


def test_imagenet_r_bad_options_and_missing_data(imagenet_r_options, data_root, tiny_vit, server):
    for change, problem in (
        ({"num_experiences": 3}, "200 classes into 3"),
        ({"class_order": "alphabetic"}, "class_order"),
    ):
        options = ImageNetROptions(**{**imagenet_r_options.to_dict(), **change})
        with pytest.raises(UsageError, match=problem):
            imagenet_r(options, tiny_vit, seed=0)
    assert server.requests == []
    offline = ImageNetROptions(**{**imagenet_r_options.to_dict(), "download": False})
    with pytest.raises(DataNotFoundError) as info:
        imagenet_r(offline, tiny_vit, seed=0)
    assert str(data_root / "imagenet-r" / "images") in str(info.value)
    assert "clbench download imagenet-r" in str(info.value)
    assert inr.IMAGENET_R_URL in str(info.value)


# ------------------------------------------------------------------------------ fewrel


def fewrel_example(rng: random.Random, relation: str) -> dict:
    words = [rng.choice(["alpha", "beta", "gamma", "delta", "river", "city"]) for _ in range(12)]
    return {"tokens": words, "h": [words[1], "Q1", [[1]]], "t": [words[8], "Q2", [[8, 9]]]}


def fewrel_file(relations: list[str], per_relation: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    data = {r: [fewrel_example(rng, r) for _ in range(per_relation)] for r in relations}
    return json.dumps(data).encode()


@pytest.fixture
def fewrel_mirror(server, monkeypatch, tmp_path) -> FewRelOptions:
    """train_wiki (8 relations) + val_wiki (2) + pid2name, 10 sentences each, on 127.0.0.1."""
    files = {
        "train_wiki.json": fewrel_file([f"P{i}" for i in range(1, 9)], 10, seed=1),
        "val_wiki.json": fewrel_file(["P9", "P10"], 10, seed=2),
        "pid2name.json": json.dumps({f"P{i}": [f"rel{i}", "..."] for i in range(1, 11)}).encode(),
    }
    for name, body in files.items():
        server.files[f"/fewrel/{name}"] = body
    monkeypatch.setattr(rex, "FEWREL_MD5", {name: md5(body) for name, body in files.items()})
    monkeypatch.setattr(fewrel_files, "REPO_ROOT", tmp_path / "no-repo")  # ignore ../shared copies
    return FewRelOptions(base_url=server.url("/fewrel"), max_length=32)


def test_fewrel_downloads_and_fits_tasks(fewrel_mirror, data_root, minilm, server):
    scenario = fewrel(fewrel_mirror, minilm, seed=2021)
    # 10 relations of 10 sentences: 5 tasks x 2 relations, 6 / 2 / 2 per relation
    assert scenario.num_classes == 10
    assert experience_sizes(scenario) == [(2, 12, 4)] * 5
    assert scenario.details["per_relation"] == {"train": 6, "val": 2, "test": 2}
    assert len(scenario.details["validation"]) == 20
    assert "rel1" in scenario.class_names
    assert scenario.details["paper_seeds"] == [2021, 2121, 2221, 2321, 2421]
    assert sorted(p.name for p in (data_root / "fewrel").glob("*.json")) == [
        "pid2name.json",
        "train_wiki.json",
        "val_wiki.json",
    ]
    fewrel(fewrel_mirror, minilm, seed=2121)
    assert len(server.requests) == 3  # nothing downloaded twice


def test_fewrel_protocol_numbers():
    """80 relations x 700 sentences: 10 tasks x 8, 420 / 140 / 140 per relation."""
    data = {f"P{i}": [{}] * 700 for i in range(80)}
    assert automatic_split(80, "fewrel").sizes == (8,) * 10
    assert fit_per_relation(data, None, None, None) == (420, 140, 140)
    splits = split_relation_examples(data, 2021, 420, 140, 140)
    assert splits.counts() == {"train": 33_600, "val": 11_200, "test": 11_200}
    assert automatic_split(16, "x").num_tasks == 8 and automatic_split(10, "x").num_tasks == 5
    assert fit_per_relation({"P1": [{}] * 100}, None, None, None) == (60, 20, 20)
    assert fit_per_relation(data, 100, None, 50) == (100, 140, 50)
    with pytest.raises(UsageError, match="80 relations into 3"):
        resolve_task_split(80, num_experiences=3, scenario="fewrel", unit="relations")
    # 7 relations: no count divides them, so the automatic split is uneven (was an error)
    assert automatic_split(7, "fewrel").sizes == (3, 2, 2)
    with pytest.raises(UsageError, match="set scenario.num_experiences"):
        automatic_split(3, "fewrel")


def test_fewrel_bad_input(fewrel_mirror, data_root, minilm, server, tmp_path):
    bad_count = FewRelOptions(**{**fewrel_mirror.to_dict(), "num_experiences": 3})
    with pytest.raises(UsageError, match="80 relations into 3"):
        fewrel(bad_count, minilm, seed=0)
    assert server.requests == []
    offline = FewRelOptions(**{**fewrel_mirror.to_dict(), "download": False})
    with pytest.raises(DataNotFoundError) as info:
        fewrel(offline, minilm, seed=0)
    assert str(data_root / "fewrel" / "train_wiki.json") in str(info.value)
    assert "clbench download fewrel" in str(info.value)
    # a file in the data root that is not the published one
    (data_root / "fewrel").mkdir(parents=True)
    (data_root / "fewrel" / "train_wiki.json").write_text("{}")
    with pytest.raises(DataNotFoundError, match="not the published FewRel train_wiki.json"):
        fewrel(fewrel_mirror, minilm, seed=0)


def test_fewrel_any_fewrel_format_file(tmp_path, data_root, minilm):
    """A FewRel 2.0-like domain file: 10 relations x 100 -> 5 tasks x 2, 60 / 20 / 20."""
    path = tmp_path / "val_pubmed.json"
    path.write_bytes(fewrel_file([f"D{i}" for i in range(10)], 100))
    options = FewRelOptions(data_file=str(path), max_length=32, download=False)
    scenario = fewrel(options, minilm, seed=0)
    assert experience_sizes(scenario) == [(2, 120, 40)] * 5
    assert scenario.class_names[0] == "D0"  # no pid2name.json: relation ids
    with pytest.raises(UsageError, match="10 relations into 4"):
        fewrel(FewRelOptions(**{**options.to_dict(), "num_experiences": 4}), minilm, seed=0)
    with pytest.raises(UsageError, match="text backbone"):
        fewrel(options, object(), seed=0)


# ------------------------------------------------------------------------------ tacred


def tacred_record(rng: random.Random, relation: str) -> dict:
    tokens = ["-LRB-", "Alice", "Smith", "-RRB-", "works", "for", "Acme", "Corp", "in", "Ohio"]
    rng.shuffle(tokens[4:6])
    return {
        "id": f"{rng.random():.12f}",
        "relation": relation,
        "token": tokens,
        "subj_start": 1,
        "subj_end": 2,
        "obj_start": 6,
        "obj_end": 7,
        "subj_type": "PERSON",
        "obj_type": "ORGANIZATION",
    }


TACRED_SIZES = {
    **{f"org:rel{i}": 12 for i in range(38)},
    "per:big": 400,  # -> 41 test, 320 train
    "per:mid": 100,  # -> 20 test, 80 train
    "no_relation": 50,
    "per:country_of_death": 6,
}


@pytest.fixture
def tacred_folder(tmp_path) -> Path:
    rng = random.Random(0)
    records = [tacred_record(rng, r) for r, n in TACRED_SIZES.items() for _ in range(n)]
    rng.shuffle(records)
    folder = tmp_path / "ldc" / "tacred" / "data" / "json"
    folder.mkdir(parents=True)
    third = len(records) // 3
    parts = {
        "train.json": records[:third],
        "dev.json": records[third : 2 * third],
        "test.json": records[2 * third :],
    }
    for name, part in parts.items():
        (folder / name).write_text(json.dumps(part))
    return folder


def test_tacred_protocol(tacred_folder, data_root, minilm):
    options = TACREDOptions(data_file=str(tacred_folder), max_length=32)
    scenario = tacred(options, minilm, seed=1)
    assert scenario.num_classes == 40 and scenario.num_experiences == 10
    assert all(size[0] == 4 for size in experience_sizes(scenario))
    assert "no_relation" not in scenario.class_names
    assert "per:country_of_death" not in scenario.class_names
    ids = scenario.details["relation_ids"]
    train = torch.cat([torch.tensor(e.dataset.targets) for e in scenario.benchmark.train_stream])
    test = torch.cat([torch.tensor(e.dataset.targets) for e in scenario.benchmark.test_stream])
    for relation, train_n, test_n in (
        ("per:big", 320, 41),
        ("per:mid", 80, 20),
        ("org:rel0", 10, 2),
    ):
        class_id = ids.index(relation)
        assert int((train == class_id).sum()) == train_n
        assert int((test == class_id).sum()) == test_n
    assert len(scenario.details["validation"]) == 0  # no validation set
    # the entity markers wrap "Alice Smith"; PTB brackets came back as characters
    row = scenario.benchmark.test_stream[0].dataset[0][0].tolist()
    text = minilm.tokenizer.decode(
        row[row.index(minilm.marker_ids["[E11]"]) + 1 : row.index(minilm.marker_ids["[E12]"])]
    )
    assert text == "alice smith"
    assert "(" in minilm.tokenizer.decode(row) and "lrb" not in minilm.tokenizer.decode(row)


def test_tacred_missing_explains_the_license(data_root, minilm, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        tacred(TACREDOptions(), minilm, seed=0)
    message = str(info.value)
    assert "LDC2018T24" in message and str(data_root / "tacred" / "train.json") in message
    assert "scenario.data_file" in message
    with pytest.raises(UsageError, match="40 relations into 3"):
        tacred(TACREDOptions(num_experiences=3), minilm, seed=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"token": ["a"], "relation": "r"}]))
    with pytest.raises(UsageError, match=f"{bad}: record 0"):
        tacred(TACREDOptions(data_file=str(bad), num_experiences=1), minilm, seed=0)


def test_tacred_accepts_fewrel_format(tmp_path, data_root, minilm):
    path = tmp_path / "tacred_fewrel_format.json"
    path.write_bytes(fewrel_file([f"r{i}" for i in range(8)], 30))
    scenario = tacred(
        TACREDOptions(data_file=str(path), num_experiences=2, max_length=32), minilm, seed=0
    )
    assert experience_sizes(scenario) == [(4, 4 * 24, 4 * 6)] * 2  # 30 -> 6 test, 24 train
