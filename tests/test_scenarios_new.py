"""split-cub200 and 5-datasets on small files in the real formats, served from 127.0.0.1
through the real download code (and ``clbench download`` / ``clbench list``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import test_download
import torch
from real_formats import cub_tarball, five_datasets_files, notmnist_zip
from test_download import md5, run_cli

from clbench.data import five_datasets_files as five_layout
from clbench.data.download import ChecksumMismatchError
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import seeded_class_order
from clbench.scenarios import five_datasets as five
from clbench.scenarios.five_datasets import FiveDatasetsOptions, five_datasets
from clbench.scenarios.split_cub200 import SplitCUB200Options, split_cub200

server = test_download.server  # the local HTTP server fixture


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("CLBENCH_DATA", str(root))
    return root


def task_counts(scenario) -> list[tuple[int, int, int]]:
    """(classes, train images, test images) of each task."""
    return [
        (len(classes), len(train.dataset), len(test.dataset))
        for classes, train, test in zip(
            scenario.classes_per_experience,
            scenario.benchmark.train_stream,
            scenario.benchmark.test_stream,
        )
    ]


# ------------------------------------------------------------------------- split-cub200


@pytest.fixture(scope="module")
def cub_archive() -> bytes:
    return cub_tarball(classes=200, train_per_class=1, test_per_class=1)


@pytest.fixture
def cub_options(server, cub_archive) -> SplitCUB200Options:
    server.files["/CUB_200_2011.tgz"] = cub_archive
    return SplitCUB200Options(url=server.url("/CUB_200_2011.tgz"), md5=md5(cub_archive))


def test_split_cub200_protocol(cub_options, data_root, tiny_vit, server):
    scenario = split_cub200(cub_options, tiny_vit, seed=42)
    assert scenario.num_classes == 200 and scenario.num_experiences == 10
    assert task_counts(scenario) == [(20, 20, 20)] * 10  # 1 train + 1 test image per class
    order = seeded_class_order(200, 42)
    assert scenario.details["class_order"] == order
    assert scenario.classes_per_experience[0] == sorted(order[:20])
    assert scenario.class_names[:2] == ["Bird_1", "Bird_2"]  # classes.txt, number dropped
    assert scenario.details["counts"] == {"train": 200, "test": 200}
    assert "scale=(0.05, 1.0)" in scenario.details["train_transform"]
    folder = data_root / "cub200" / "CUB_200_2011"
    assert (folder / ".clbench-complete").is_file()
    assert not (data_root / "cub200" / "attributes.txt").exists()  # outside the top folder
    x, y = scenario.benchmark.test_stream[3].dataset[0]
    assert x.shape == tuple(tiny_vit.input_size) and x.dtype == torch.float32
    assert int(y) in scenario.classes_per_experience[3]
    # HiDe-Prompt's natural order, and a base-plus-increment split
    natural = split_cub200(dataclasses.replace(cub_options, class_order="natural"), tiny_vit, 0)
    assert natural.classes_per_experience[0] == list(range(20))
    b100 = split_cub200(
        dataclasses.replace(cub_options, initial_classes=100, increment=20), tiny_vit, 0
    )
    assert [c for c, _, _ in task_counts(b100)] == [100, 20, 20, 20, 20, 20]
    assert server.count("/CUB_200_2011.tgz") == 1  # downloaded once, then reused


def test_split_cub200_user_folder_and_missing_data(cub_options, data_root, tiny_vit, tmp_path):
    offline = dataclasses.replace(cub_options, download=False)
    with pytest.raises(DataNotFoundError) as info:
        split_cub200(offline, tiny_vit, seed=0)
    assert "clbench download split-cub200" in str(info.value)
    assert "data.caltech.edu" in str(info.value)  # the published source and its md5
    assert "97eceeb196236b17998738112f37df78" in str(info.value)
    assert str(data_root / "cub200" / "CUB_200_2011") in str(info.value)
    split_cub200(cub_options, tiny_vit, seed=0)
    # an extracted folder elsewhere, used as it is
    moved = tmp_path / "mine" / "CUB_200_2011"
    moved.parent.mkdir()
    (data_root / "cub200" / "CUB_200_2011").rename(moved)
    own = SplitCUB200Options(data_folder=str(moved), download=False)
    assert split_cub200(own, tiny_vit, seed=0).details["data_folder"] == str(moved)
    next((moved / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DataNotFoundError, match="is missing"):
        split_cub200(own, tiny_vit, seed=0)
    with pytest.raises(DataNotFoundError, match="CUB-200-2011 not found"):
        split_cub200(SplitCUB200Options(data_folder=str(tmp_path / "none")), tiny_vit, 0)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_experiences": 7}, "200 classes into 7 equal tasks.*task_sizes=29,29,29,29,28"),
        ({"task_sizes": [100, 50]}, "adds up to 150 classes, but there are 200"),
        ({"initial_classes": 50, "increment": 40}, "150 remain: not a whole number"),
        ({"class_order": "random"}, "class_order"),
    ],
)
def test_split_cub200_impossible_splits_fail_before_download(
    cub_options, data_root, tiny_vit, server, change, problem
):
    options = dataclasses.replace(cub_options, **change)
    with pytest.raises(UsageError, match=problem):
        SCENARIOS.spec("split-cub200").check_options(options)
    with pytest.raises(UsageError, match=problem):
        split_cub200(options, tiny_vit, seed=0)
    assert server.requests == [] and not data_root.exists()


def test_cli_download_split_cub200(server, cub_archive, tmp_path, capsys):
    server.files["/CUB_200_2011.tgz"] = cub_archive
    root = tmp_path / "data"
    argv = ["download", "split-cub200", "--data-root", str(root)]
    argv += ["--set", f"url={server.url('/CUB_200_2011.tgz')}"]
    code, out, err = run_cli([*argv, "--set", f"md5={md5(cub_archive)}"], capsys)
    assert code == 0, err
    assert "data ready" in out and (root / "cub200" / "CUB_200_2011" / "images.txt").is_file()
    code, _, _ = run_cli([*argv, "--set", f"md5={md5(cub_archive)}"], capsys)
    assert code == 0 and server.count("/CUB_200_2011.tgz") == 1
    code, _, err = run_cli([*argv, "--set", "md5=" + "2" * 32], capsys)
    assert code == 2 and "2" * 32 in err  # a mirror serving other bytes


# --------------------------------------------------------------------------- 5-datasets


@pytest.fixture(scope="module")
def five_files() -> dict[str, dict[str, bytes]]:
    return five_datasets_files()


@pytest.fixture
def five_mirror(server, five_files, monkeypatch) -> str:
    """The four downloadable sources under /mirror/<data set>/, with their test md5s."""
    sources = dict(five.SOURCES)
    for key, files in five_files.items():
        for name, body in files.items():
            server.files[f"/mirror/{key}/{name}"] = body
        md5s = {name: md5(body) for name, body in files.items()}
        sources[key] = dataclasses.replace(five.SOURCES[key], md5=md5s)
    monkeypatch.setattr(five_layout, "SOURCES", sources)  # what the downloads read
    return server.url("/mirror")


def test_five_datasets_sources_are_torchvisions():
    from torchvision.datasets import CIFAR10, MNIST, SVHN, FashionMNIST

    assert five.SOURCES["cifar10"].md5 == {CIFAR10.filename: CIFAR10.tgz_md5}
    assert five.SOURCES["mnist"].md5 == dict(MNIST.resources)
    assert five.SOURCES["mnist"].base_url == MNIST.mirrors[0]
    assert five.SOURCES["fashion-mnist"].md5 == dict(FashionMNIST.resources)
    assert five.SOURCES["fashion-mnist"].base_url == FashionMNIST.mirrors[0]
    for split in ("train", "test"):
        url, filename, checksum = SVHN.split_list[split]
        assert five.SOURCES["svhn"].md5[filename] == checksum
        assert five.SOURCES["svhn"].base_url + filename == url
    assert five.SOURCES["notmnist"].md5 == {"notMNIST.zip": ""}  # none published


def test_five_datasets_without_notmnist_explains_the_manual_step(
    five_mirror, data_root, tiny_vit, server
):
    options = FiveDatasetsOptions(mirror=five_mirror)
    with pytest.raises(DataNotFoundError) as info:
        five_datasets(options, tiny_vit, seed=0)
    message = str(info.value)
    folder = data_root / "5-datasets" / "notmnist"
    assert five.NOTMNIST_URL in message and str(folder / "notMNIST.zip") in message
    assert "scenario.notmnist_md5" in message and "scenario.datasets=" in message
    # the four others were fetched first, and are not fetched again
    assert (data_root / "5-datasets" / "svhn" / "train_32x32.mat").is_file()
    assert (data_root / "5-datasets" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    requests = len(server.requests)
    four = FiveDatasetsOptions(mirror=five_mirror, datasets=["svhn", "mnist", "cifar10"])
    scenario = five_datasets(four, tiny_vit, seed=0)
    assert len(server.requests) == requests
    assert task_counts(scenario) == [(10, 30, 20), (10, 30, 20), (10, 50, 20)]


def test_five_datasets_protocol(five_mirror, data_root, tiny_vit, server):
    # notMNIST.zip put in place by hand (with one broken PNG, as the release has)
    folder = data_root / "5-datasets" / "notmnist"
    folder.mkdir(parents=True)
    (folder / "notMNIST.zip").write_bytes(notmnist_zip())
    scenario = five_datasets(FiveDatasetsOptions(mirror=five_mirror), tiny_vit, seed=3)
    assert scenario.num_classes == 50
    assert scenario.classes_per_experience == [list(range(10 * t, 10 * t + 10)) for t in range(5)]
    # SVHN 3 + 2, MNIST 3 + 2, CIFAR-10 5 + 2, notMNIST 3 + 1, Fashion-MNIST 3 + 2 per class
    assert task_counts(scenario) == [(10, 30, 20), (10, 30, 20), (10, 50, 20), (10, 30, 10)] + [
        (10, 30, 20)
    ]
    assert scenario.class_names[0] == "SVHN 0" and scenario.class_names[20] == "CIFAR-10 airplane"
    assert scenario.class_names[30] == "notMNIST A"
    assert scenario.class_names[49] == "Fashion-MNIST Ankle boot"
    # every image holds 20 x its label within its data set: labels were offset, not mixed
    for task, experience in enumerate(scenario.benchmark.test_stream):
        dataset = experience.dataset
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == tuple(tiny_vit.input_size)
            pixel = float(x[0, 16, 16]) * tiny_vit.std[0] + tiny_vit.mean[0]
            assert abs(pixel - 20 * (int(y) - 10 * task) / 255) < 0.02
    # the order is the data sets' (never the seed's); a base-plus-increment split too
    again = five_datasets(FiveDatasetsOptions(mirror=five_mirror), tiny_vit, seed=4)
    assert again.classes_per_experience == scenario.classes_per_experience
    b20 = five_datasets(
        FiveDatasetsOptions(mirror=five_mirror, initial_classes=20, increment=10), tiny_vit, 0
    )
    assert [c for c, _, _ in task_counts(b20)] == [20, 10, 10, 10]


def test_cli_download_five_datasets_with_a_notmnist_md5(
    five_mirror, server, tmp_path, capsys, monkeypatch
):
    zipped = notmnist_zip()
    server.files["/mirror/notmnist/notMNIST.zip"] = zipped
    root = tmp_path / "data"
    argv = ["download", "5-datasets", "--data-root", str(root), "--set", f"mirror={five_mirror}"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "notMNIST has no source that publishes a checksum" in err
    code, out, err = run_cli([*argv, "--set", f"notmnist_md5={md5(zipped)}"], capsys)
    assert code == 0, err
    assert (root / "5-datasets" / "notmnist" / "notMNIST" / "Test" / "J").is_dir()
    assert server.count("/mirror/notmnist/notMNIST.zip") == 1
    code, _, err = run_cli([*argv, "--set", "notmnist_md5=abc"], capsys)
    assert code == 2 and "32 hex digits" in err

    monkeypatch.setenv("CLBENCH_DATA", str(root))
    code, out, _ = run_cli(["list", "scenarios"], capsys)
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert f"[data: present in {root / '5-datasets'}]" in lines["5-datasets"]
    assert "[data: missing; `clbench download split-cub200`]" in lines["split-cub200"]


def test_five_datasets_checksum_mismatch_keeps_nothing(five_mirror, server, data_root, tiny_vit):
    server.files["/mirror/svhn/test_32x32.mat"] = b"other bytes"
    options = FiveDatasetsOptions(mirror=five_mirror, datasets=["svhn"])
    with pytest.raises(ChecksumMismatchError):
        five_datasets(options, tiny_vit, seed=0)
    assert not (data_root / "5-datasets" / "svhn" / "test_32x32.mat").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"datasets": ["svhn", "svhn"]}, "at most once"),
        ({"datasets": ["kmnist"]}, "at most once"),
        ({"num_experiences": 3}, "50 classes into 3 equal tasks.*task_sizes=17,17,16"),
        ({"task_sizes": [20, 20]}, "adds up to 40 classes, but there are 50"),
        ({"crop_scale_min": 0.0}, "crop_scale_min"),
    ],
)
def test_five_datasets_bad_options_fail_first(data_root, tiny_vit, server, change, problem):
    options = dataclasses.replace(FiveDatasetsOptions(mirror=server.url("/m")), **change)
    with pytest.raises(UsageError, match=problem):
        SCENARIOS.spec("5-datasets").check_options(options)
    with pytest.raises(UsageError, match=problem):
        five_datasets(options, tiny_vit, seed=0)
    assert server.requests == [] and not data_root.exists()


def test_new_scenarios_describe_their_protocol():
    describe = {name: SCENARIOS.spec(name).describe for name in ("split-cub200", "5-datasets")}
    assert describe["split-cub200"](SplitCUB200Options()).startswith(
        "200 classes, 10 tasks x 20 classes"
    )
    assert describe["5-datasets"](FiveDatasetsOptions()) == (
        "50 classes, 5 tasks x 10 classes: SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST"
    )
    assert describe["5-datasets"](FiveDatasetsOptions(task_sizes=[20, 20, 10])) == (
        "50 classes, 3 tasks of 20, 20, 10 classes: SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST"
    )
