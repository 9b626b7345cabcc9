"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024): B learns ``ratio`` times faster than A.

An optimiser option, not a parameterisation: :func:`loraplus_parameter_groups` splits a
model's trainable parameters into a base group (lr) and an "up" group (ratio * lr) for
``CLStrategy.trainable_parameters``, whose groups the strategy's optimiser and schedule
take as they are (a group's own "lr" overrides the strategy's lr; schedules scale every
group alike). The paper's rule of thumb is ratio ~ 2^4; its README example uses 20.

Which parameters are "B": every adapter's ``up_parameters()`` (LoRA / PiSSA / MiLoRA /
KaSA: B; RepLoRA: the B seed and generator). The official ``lora_plus.py`` also puts
*every* trainable 1-D parameter (biases, norms, a classifier's bias) in the fast group;
that is ``one_dimensional="up"``. The default keeps them in the base group, since a
classifier head's bias is not a LoRA factor.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from clbench.adapters.base import LowRankAdapter
from clbench.errors import UsageError


def loraplus_parameter_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    *,
    one_dimensional: Literal["base", "up"] = "base",
) -> list[dict[str, Any]]:
    """[{params: base, lr}, {params: up, lr: ratio * lr}] over ``model``'s trainable
    parameters; "up" are the B-side parameters of every adapter inside ``model``."""
    if ratio <= 0:
        raise UsageError(f"the LoRA+ ratio (lambda) must be positive, got {ratio}")
    if one_dimensional not in ("base", "up"):
        raise UsageError(f"one_dimensional must be base or up, got {one_dimensional!r}")
    up_ids = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, LowRankAdapter)
        for parameter in module.up_parameters()
    }
    base: list[nn.Parameter] = []
    up: list[nn.Parameter] = []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        fast = id(parameter) in up_ids or (one_dimensional == "up" and parameter.ndim == 1)
        (up if fast else base).append(parameter)
    return [{"params": base, "lr": lr}, {"params": up, "lr": ratio * lr}]
