"""Shared fixtures: small models, built once per session (CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
FEWREL_FILE = REPO.parent / "shared" / "data" / "fewrel" / "val_wiki.json"


@pytest.fixture(scope="session")
def tiny_vit():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    torch.manual_seed(0)
    return vit_tiny_random(TinyViTOptions(depth=3, embed_dim=32, num_heads=4))


@pytest.fixture(scope="session")
def minilm():
    from clbench.encoders.zoo import TextOptions, minilm_l6

    return minilm_l6(TextOptions())
