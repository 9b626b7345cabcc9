"""Small files in the real formats of CUB-200-2011 and the five data sets of 5-datasets,
for tests that serve them from 127.0.0.1 (test_download.LocalServer) through the real
download code. Each image carries its label in its pixels, so tests can check labels.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile

import numpy as np
from test_download import jpeg_bytes, tar_bytes


def cub_tarball(classes: int = 200, train_per_class: int = 1, test_per_class: int = 1) -> bytes:
    """CUB_200_2011.tgz: attributes.txt beside CUB_200_2011/ (as in the real archive),
    which holds images/<NNN.Name>/*.jpg and the metadata files."""
    entries = {"attributes.txt": b"1 has_bill_shape::curved\n"}
    images, labels, split, names = [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for i in range(train_per_class + test_per_class):
            image_id += 1
            path = f"{folder}/Bird_{c}_{i:04d}.jpg"
            entries[f"CUB_200_2011/images/{path}"] = jpeg_bytes(image_id, size=(10, 8))
            images.append(f"{image_id} {path}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if i < train_per_class else 0}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", names),
    ):
        entries[f"CUB_200_2011/{name}"] = ("\n".join(lines) + "\n").encode()
    entries["CUB_200_2011/README"] = b"CUB-200-2011 (a test's copy)\n"
    return tar_bytes(entries, mode="w:gz")


def labelled_images(
    per_class: int, shape: tuple[int, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose every pixel holds 20 x their label, labels shuffled."""
    labels = np.repeat(np.arange(10), per_class)
    np.random.default_rng(seed).shuffle(labels)
    images = np.broadcast_to((20 * labels).reshape(-1, *([1] * len(shape))), (len(labels), *shape))
    return np.ascontiguousarray(images, dtype=np.uint8), labels


def cifar10_tarball(train_per_class: int = 5, test_per_class: int = 2) -> bytes:
    """cifar-10-python.tar.gz: five training batches, test_batch and batches.meta."""
    train, train_labels = labelled_images(train_per_class, (3072,), seed=1)
    test, test_labels = labelled_images(test_per_class, (3072,), seed=2)

    def batch(data: np.ndarray, labels: np.ndarray) -> bytes:
        return pickle.dumps({"data": data, "labels": labels.tolist(), "batch_label": "b"})

    entries = {}
    for i, (data, labels) in enumerate(
        zip(np.array_split(train, 5), np.array_split(train_labels, 5)), 1
    ):
        entries[f"cifar-10-batches-py/data_batch_{i}"] = batch(data, labels)
    entries["cifar-10-batches-py/test_batch"] = batch(test, test_labels)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    entries["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": names})
    return tar_bytes(entries, mode="w:gz")


def idx_gz(array: np.ndarray) -> bytes:
    """An IDX file of bytes, gzip-compressed (MNIST's format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def mnist_files(
    train_per_class: int = 3, test_per_class: int = 2, seed: int = 3
) -> dict[str, bytes]:
    train, train_labels = labelled_images(train_per_class, (28, 28), seed)
    test, test_labels = labelled_images(test_per_class, (28, 28), seed + 1)
    return {
        "train-images-idx3-ubyte.gz": idx_gz(train),
        "train-labels-idx1-ubyte.gz": idx_gz(train_labels),
        "t10k-images-idx3-ubyte.gz": idx_gz(test),
        "t10k-labels-idx1-ubyte.gz": idx_gz(test_labels),
    }


def svhn_mat(per_class: int, seed: int) -> bytes:
    """{train,test}_32x32.mat: X [32, 32, 3, N], y [N, 1] with 10 for the digit 0."""
    from scipy.io import savemat

    images, labels = labelled_images(per_class, (3, 32, 32), seed)
    buffer = io.BytesIO()
    y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
    savemat(buffer, {"X": images.transpose(2, 3, 1, 0), "y": y})
    return buffer.getvalue()


def notmnist_zip(train_per_class: int = 3, test_per_class: int = 1, broken: bool = True) -> bytes:
    """notMNIST.zip: notMNIST/{Train,Test}/{A..J}/*.png, 28 x 28 grey (one broken PNG, as
    the release has)."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for side, count in (("Train", train_per_class), ("Test", test_per_class)):
            for label, letter in enumerate("ABCDEFGHIJ"):
                for i in range(count):
                    png = io.BytesIO()
                    Image.fromarray(np.full((28, 28), 20 * label, np.uint8)).save(png, "PNG")
                    bundle.writestr(f"notMNIST/{side}/{letter}/{letter}{i}.png", png.getvalue())
        if broken:
            bundle.writestr("notMNIST/Train/A/broken.png", b"not a png")
    return buffer.getvalue()


def five_datasets_files() -> dict[str, dict[str, bytes]]:
    """{data set: {file name: bytes}} for the four downloadable sources of 5-datasets."""
    return {
        "svhn": {"train_32x32.mat": svhn_mat(3, 5), "test_32x32.mat": svhn_mat(2, 6)},
        "mnist": mnist_files(seed=3),
        "cifar10": {"cifar-10-python.tar.gz": cifar10_tarball()},
        "fashion-mnist": mnist_files(seed=7),
    }
