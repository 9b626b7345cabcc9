"""The data settings every strategy's ``quick`` preset runs with.

``quick`` is for a first real run (the README's quick start) and for tests: a few minutes
on 2 CPU cores, and a result above chance. A ``scenario.<option>`` key applies to the
scenarios that have that option (see clbench.runner.split_preset):

* fewrel-offline / fewrel: a subset, 16 train / 0 validation / 8 test sentences per
  relation, windowed to 48 tokens around the entity markers (about 25x fewer encoder
  passes than the full split);
* digits-offline runs whole (its 1438 training images are already small); the scenario
  itself adds ``normalize=none`` to every ``quick`` run (pixels in [0, 1], which the
  random tiny ViT separates better: see its ``preset_options`` in
  scenarios/offline_vision.py). Other image scenarios keep the backbone's statistics.

A user's ``--set scenario.n_train=...`` still wins.
"""

from __future__ import annotations

from typing import Any

QUICK_DATA: dict[str, Any] = {
    "scenario.n_train": 16,
    "scenario.n_val": 0,
    "scenario.n_test": 8,
    "scenario.max_length": 48,
}
