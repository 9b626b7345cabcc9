"""The five data sets' files: where they come from, where they lie under the data root,
and whether they are there.

Torch-free, so that ``clbench list`` can ask :func:`data_status` without importing the
scenario module (scenarios/five_datasets.py downloads and reads the files; its docstring
has the sources and the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clbench.data.download import DataStatus, Resource, is_complete, is_verified

SCENARIO = "5-datasets"
FOLDER = "5-datasets"
NOTMNIST_URL = (
    "https://github.com/facebookresearch/Adversarial-Continual-Learning/raw/main/data/notMNIST.zip"
)
CIFAR10_TOP_LEVEL = "cifar-10-batches-py"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass(frozen=True)
class Source:
    """One data set of the five: where its files come from and their md5s (an empty
    md5: none is published)."""

    title: str
    base_url: str
    md5: dict[str, str]
    class_names: tuple[str, ...] = ()  # empty: read from the data (CIFAR-10's meta)


SOURCES: dict[str, Source] = {
    "svhn": Source(
        "SVHN",
        "http://ufldl.stanford.edu/housenumbers/",
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
        tuple(str(d) for d in range(10)),
    ),
    "mnist": Source(
        "MNIST",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        dict(
            zip(
                MNIST_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            )
        ),
        tuple(str(d) for d in range(10)),
    ),
    "cifar10": Source(
        "CIFAR-10",
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    ),
    "notmnist": Source("notMNIST", NOTMNIST_URL.rsplit("/", 1)[0] + "/", {"notMNIST.zip": ""}),
    "fashion-mnist": Source(
        "Fashion-MNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        dict(
            zip(
                MNIST_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            )
        ),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
        + ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


class FiveDatasetsFileOptions(Protocol):
    """What the file helpers read of the scenario's options."""

    datasets: list[str]
    mirror: str
    notmnist_url: str
    notmnist_md5: str


def source_url(key: str, filename: str, options: FiveDatasetsFileOptions) -> str:
    if options.mirror:
        return f"{options.mirror.rstrip('/')}/{key}/{filename}"
    if key == "notmnist":
        return options.notmnist_url
    return SOURCES[key].base_url + filename


def resources(key: str, options: FiveDatasetsFileOptions) -> list[Resource]:
    """The verified files of a source (notMNIST's only with the user's md5)."""
    listed = []
    for filename, md5 in SOURCES[key].md5.items():
        checksum = options.notmnist_md5 if key == "notmnist" else md5
        if checksum:
            listed.append(Resource(filename, source_url(key, filename, options), md5=checksum))
    return listed


def notmnist_folder(folder: Path) -> Path:
    return folder / "notMNIST"


def source_present(key: str, folder: Path, options: FiveDatasetsFileOptions) -> bool:
    if key == "cifar10":
        return is_complete(folder / CIFAR10_TOP_LEVEL, resources(key, options)[0])
    if key == "notmnist":
        extracted = notmnist_folder(folder)
        zipped = folder / "notMNIST.zip"
        if (extracted / "Train").is_dir() and (extracted / "Test").is_dir():
            return True
        return zipped.is_file() and all(is_verified(zipped, r) for r in resources(key, options))
    return all(is_verified(folder / r.filename, r) for r in resources(key, options))


def notmnist_how_to(folder: Path) -> str:
    return (
        "notMNIST has no source that publishes a checksum, so clbench does not download it "
        f"unasked. The prompt papers' code takes notMNIST.zip from {NOTMNIST_URL}: put that "
        f"file at {folder / 'notMNIST.zip'} (or its extracted notMNIST/Train and "
        f"notMNIST/Test folders in {folder}), or let clbench download and check it with "
        "--set scenario.notmnist_md5=<the md5 you trust>; or leave it out with --set "
        "scenario.datasets=svhn,mnist,cifar10,fashion-mnist"
    )


def data_status(options: FiveDatasetsFileOptions, data_root: Path) -> DataStatus:
    root = Path(data_root) / FOLDER
    present = all(source_present(key, root / key, options) for key in options.datasets)
    how = (
        f"run `clbench download {SCENARIO}` (SVHN, MNIST, CIFAR-10 and Fashion-MNIST from "
        "their publishers, md5-checked); " + notmnist_how_to(root / "notmnist")
    )
    return DataStatus(present, root, how)
