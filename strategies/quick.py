"""The data subset every strategy's ``quick`` preset runs on.

``quick`` is for a first real run (the README's quick start) and for tests: a few minutes
on 2 CPU cores. A ``scenario.<option>`` key applies to the scenarios that have that option
(see clbench.runner.split_preset): on fewrel-offline / fewrel these cut the relation data
to 16 train / 0 validation / 8 test sentences per relation, windowed to 48 tokens
around the entity markers (about 25x fewer encoder passes than the full split); digits-offline has no such options
and runs whole. A user's ``--set scenario.n_train=...`` still wins.
"""

from __future__ import annotations

from typing import Any

QUICK_DATA: dict[str, Any] = {
    "scenario.n_train": 16,
    "scenario.n_val": 0,
    "scenario.n_test": 8,
    "scenario.max_length": 48,
}
