"""Input normalisation per paper (scenario option ``normalize``): the backbone's mean / std
(default), CIFAR-100's mean / std, or pixels left in [0, 1]."""

from __future__ import annotations

import pytest
import test_download
import torch
from test_scenarios_real import cifar_options, data_root  # noqa: F401 (fixtures)

from clbench.config import authors_quirks
from clbench.data.vision import CIFAR100_MEAN, CIFAR100_STD, input_statistics, vit_transforms
from clbench.errors import UsageError
from clbench.registry import SCENARIOS, options_class
from clbench.scenarios.split_cifar100 import SplitCIFAR100Options, split_cifar100

server = test_download.server  # the local HTTP server fixture
IMAGE_SCENARIOS = ("split-cifar100", "imagenet-r", "split-cub200", "5-datasets")


class Backbone:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_the_three_normalisations_transform_the_same_pixels_as_expected():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    by_name = {}
    for name in ("backbone", "cifar100", "none"):
        train, evaluation = vit_transforms((32, 32), Backbone, name, augment=False)
        assert train is evaluation  # no augmentation: the test transform
        by_name[name] = evaluation(image)
    unit = by_name["none"]
    assert unit.dtype == torch.float32 and 0 <= unit.min() and unit.max() <= 1
    assert "Normalize" not in repr(vit_transforms((32, 32), Backbone, "none", augment=True)[0])
    cifar_mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    cifar_std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    torch.testing.assert_close(by_name["cifar100"], (unit - cifar_mean) / cifar_std)
    torch.testing.assert_close(by_name["backbone"], (unit - 0.5) / 0.25)
    assert not torch.allclose(by_name["cifar100"], by_name["backbone"])


def test_augmented_training_images_are_normalised_alike():
    image = torch.full((3, 36, 36), 128, dtype=torch.uint8)  # a constant image: crops agree
    for name, expected in (("none", 128 / 255), ("backbone", (128 / 255 - 0.5) / 0.25)):
        train, _ = vit_transforms((32, 32), Backbone, name, augment=True, crop_scale=(0.5, 1.0))
        assert "RandomResizedCrop" in repr(train)
        torch.testing.assert_close(train(image), torch.full((3, 32, 32), expected))
    with pytest.raises(UsageError, match="expected one of backbone, cifar100, none"):
        input_statistics("imagenet", Backbone)


@pytest.mark.parametrize("scenario", IMAGE_SCENARIOS)
def test_every_image_scenario_declares_the_option_as_an_authors_quirk(scenario):
    options = options_class(SCENARIOS.get(scenario))
    defaults = options()
    assert defaults.normalize == "backbone"  # the corrected default: what the weights expect
    assert authors_quirks(defaults) == []
    changed = options(normalize="none")
    assert "scenario.normalize" in authors_quirks(changed, "scenario.")


def test_split_cifar100_tensors_follow_the_option(cifar_options, data_root, tiny_vit):  # noqa: F811
    def first_test_image(normalize: str) -> tuple[torch.Tensor, int]:
        options = SplitCIFAR100Options(**{**cifar_options.to_dict(), "normalize": normalize})
        scenario = split_cifar100(options, tiny_vit, seed=42)
        x, y = scenario.benchmark.test_stream[0].dataset[0]
        return x, int(y)

    unit, label = first_test_image("none")
    # every pixel of the test archive holds its class id
    torch.testing.assert_close(unit, torch.full_like(unit, label / 255), atol=1e-6, rtol=0)
    cifar, _ = first_test_image("cifar100")
    expected = (unit - torch.tensor(CIFAR100_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR100_STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(cifar, expected)
    backbone, _ = first_test_image("backbone")
    mean = torch.tensor(tiny_vit.mean).view(3, 1, 1)
    torch.testing.assert_close(backbone, (unit - mean) / torch.tensor(tiny_vit.std).view(3, 1, 1))
