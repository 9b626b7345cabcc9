"""Shared fixtures: small models, built once per session (CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
FEWREL_FILE = REPO.parent / "shared" / "data" / "fewrel" / "val_wiki.json"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a loaded 2-core machine two threads spin against the other jobs, and small models or
    whole tiny runs take many times longer (~15x for the run-loop tests); comparisons inside
    a module then run at one setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_vit():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    torch.manual_seed(0)
    return vit_tiny_random(TinyViTOptions(depth=3, embed_dim=32, num_heads=4))


@pytest.fixture(scope="session")
def minilm():
    from clbench.encoders.zoo import TextOptions, minilm_l6

    return minilm_l6(TextOptions())
