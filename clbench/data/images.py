"""Image datasets the vision scenarios share: images decoded from files on access
(ImageNet-R, CUB-200) and images of several sources with their own sizes (5-datasets).

Both yield uint8 [3, H, W] tensors and keep a ``targets`` list, which is what
:func:`clbench.data.vision.class_incremental_with_transforms` takes; the ViT transforms
then bring every image to the backbone's input size, per item, in the DataLoader workers.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


class ImageFileDataset(torch.utils.data.Dataset):
    """(uint8 [3, H, W] image, label) read from disk on access, with ``targets``.

    Decoding happens in ``__getitem__`` so that it runs in the DataLoader's workers.
    """

    def __init__(self, root: Path, files: Sequence[str], labels: Sequence[int]) -> None:
        self.root = Path(root)
        self.files = list(files)
        self.targets = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return decode_rgb(self.root / self.files[index]), self.targets[index]


def decode_rgb(path: Path) -> Tensor:
    """libjpeg through torchvision (fast); PIL for what it cannot read (CMYK, palettes)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))


class StackedImages(torch.utils.data.Dataset):
    """Several (uint8 images [N, C, H, W], labels [N]) parts as one dataset, each part
    keeping its own size; grey images (C = 1) come out as three equal channels."""

    def __init__(self, parts: Sequence[tuple[Tensor, Tensor]]) -> None:
        for images, labels in parts:
            if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
                raise ValueError("each part must be uint8 images [N, C, H, W] with N labels")
        self.parts = [(images, labels.long()) for images, labels in parts]
        self.starts = [0]
        for images, _ in self.parts:
            self.starts.append(self.starts[-1] + len(images))
        self.targets = [int(y) for _, labels in self.parts for y in labels.tolist()]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        images, labels = self.parts[part]
        row = index - self.starts[part]
        image = images[row]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image, labels[row]
