"""Readers of the formats small image data sets ship in, each returning uint8 images
[N, C, H, W] and int64 labels as tensors:

- the python-pickle CIFAR batches (CIFAR-10 ``data_batch_*``, CIFAR-100 ``train``);
- the IDX files of MNIST and Fashion-MNIST (``*-ubyte.gz``);
- the MATLAB files of SVHN (``train_32x32.mat``: X [32, 32, 3, N], y [N, 1], 10 for "0");
- one folder of images per class (notMNIST's ``Train/A`` ... ``Train/J``).

A file that is missing or not in its format is a DataNotFoundError that names it and
says how to get it again (``clbench download <scenario>``).
"""

from __future__ import annotations

import gzip
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.errors import DataNotFoundError

log = logging.getLogger(__name__)

ImagesAndLabels = tuple[Tensor, Tensor]


def _again(path: Path, scenario: str) -> str:
    return f"delete {path.parent} and run `clbench download {scenario}` again"


def unpickle_cifar(path: Path, title: str, scenario: str) -> dict[str, Any]:
    """One python-format CIFAR file (a pickled dict)."""
    if not path.is_file():
        raise DataNotFoundError(f"{title} file {path} not found; {_again(path, scenario)}")
    try:
        # The python-pickle format is how CIFAR ships; the archive was checksum-verified.
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataNotFoundError(
            f"{title} file {path} is corrupt ({error}); {_again(path, scenario)}"
        ) from error


def load_cifar_batches(
    folder: Path, files: Sequence[str], label_key: str, title: str, scenario: str
) -> ImagesAndLabels:
    """The images [N, 3, 32, 32] and labels of CIFAR batch files, concatenated in order."""
    images, labels = [], []
    for name in files:
        raw = unpickle_cifar(folder / name, title, scenario)
        try:
            images.append(np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(raw[label_key], dtype=np.int64))
        except (KeyError, ValueError) as error:
            raise DataNotFoundError(
                f"{title} file {folder / name} is not in the python {title} format "
                f"({error}); delete {folder} and download it again"
            ) from error
        if len(images[-1]) != len(labels[-1]):
            raise DataNotFoundError(
                f"{folder / name}: {len(images[-1])} images, {len(labels[-1])} labels"
            )
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# IDX: a big-endian header (0, 0, type 0x08 = ubyte, number of dimensions), the sizes,
# then the bytes. http://yann.lecun.com/exdb/mnist/ documents it.
IDX_UBYTE = 0x08


def read_idx(path: Path, scenario: str) -> np.ndarray:
    """An IDX file (gzip-compressed when its name ends in .gz) as a uint8 array."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found; {_again(path, scenario)}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataNotFoundError(
            f"{path} is unreadable ({error}); {_again(path, scenario)}"
        ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise DataNotFoundError(f"{path} is not an IDX file of bytes; {_again(path, scenario)}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataNotFoundError(
            f"{path} holds {body.size} bytes for a shape {shape}; {_again(path, scenario)}"
        )
    return body.reshape(shape)


def load_idx_pair(images_file: Path, labels_file: Path, scenario: str) -> ImagesAndLabels:
    """MNIST-format images [N, 1, 28, 28] and their labels."""
    images = read_idx(images_file, scenario)
    labels = read_idx(labels_file, scenario)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataNotFoundError(
            f"{images_file} ({images.shape}) and {labels_file} ({labels.shape}) are not "
            f"images and their labels; {_again(images_file, scenario)}"
        )
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def load_svhn_mat(path: Path, scenario: str) -> ImagesAndLabels:
    """SVHN's cropped digits: images [N, 3, 32, 32]; the label 10 of the digit 0 becomes 0
    (as torchvision's SVHN does)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DataNotFoundError(f"{path} not found; {_again(path, scenario)}")
    try:
        mat = loadmat(str(path))
        images = np.asarray(mat["X"], dtype=np.uint8)  # [32, 32, 3, N]
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise DataNotFoundError(
            f"{path} is not SVHN's MATLAB format ({error}); {_again(path, scenario)}"
        ) from error
    if images.ndim != 4 or images.shape[3] != len(labels):
        raise DataNotFoundError(f"{path}: X {images.shape} does not match y {labels.shape}")
    labels = np.where(labels == 10, 0, labels)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), torch.from_numpy(
        labels
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_class_folders(folder: Path, classes: Sequence[str], scenario: str) -> ImagesAndLabels:
    """Grey images [N, 1, H, W] from ``folder/<class>/*`` (label = index in ``classes``),
    files sorted by name. A file that does not decode is left out with a warning (the
    notMNIST release has a few broken PNGs, which the prompt papers' loaders skip too)."""
    from PIL import Image, UnidentifiedImageError

    images: list[np.ndarray] = []
    labels: list[int] = []
    broken: list[str] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataNotFoundError(f"{class_dir} not found (expected one folder per class)")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("L"), dtype=np.uint8))
            except (OSError, UnidentifiedImageError, SyntaxError):
                broken.append(f"{name}/{path.name}")
                continue
            labels.append(label)
    if broken:
        log.warning(f"{folder}: left out {len(broken)} unreadable image(s): {', '.join(broken)}")
    if not images:
        raise DataNotFoundError(f"no images under {folder}/<class>/")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise DataNotFoundError(f"{folder}: images of several sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(images)).unsqueeze(1), torch.tensor(labels, dtype=torch.long)
