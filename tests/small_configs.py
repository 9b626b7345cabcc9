"""Small strategy settings the HiDe-family tests share (tiny ViT, digits, CPU)."""

from __future__ import annotations

from typing import Any

# hide-prompt / norga: one epoch, two prompted layers, one epoch of each sample stage
HIDE_SMALL: dict[str, Any] = dict(
    epochs=1,
    batch_size=64,
    eval_batch_size=256,
    num_tasks=5,
    prompt_layers=[0, 1],
    prompt_length=3,
    tii_epochs=1,
    tii_align_epochs=1,
    tap_epochs=1,
    samples_per_class=16,
    lr_schedule="constant",
)
# hier-ot: the same, with few pseudo-features and OT samples and small leaf groups
HIER_SMALL: dict[str, Any] = dict(HIDE_SMALL, pseudo_features=48, ot_samples=48, group_size=2.0)
