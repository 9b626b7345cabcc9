"""NoRGa: non-linear residual gates on prefix logits (Le et al., NeurIPS 2024, arXiv 2405.14124).

HiDe-Prompt with one change in attention: for query token i and prefix key j the logit
s_ij = q_i . pK_j / sqrt(d) becomes s_ij + alpha_l * act(tau_l * s_ij); token-to-token
logits and prefix values are unchanged, one softmax runs over [prefix ; tokens]. One
learnable (tau_l, alpha_l) per prompted layer, initialised to 1, shared by heads and
tasks, trained in the first task only and frozen afterwards. The gate lives in clbench's
shared attention path (clbench.encoders.attention.ResidualGate), not in a copied module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clbench.config import option
from clbench.registry import STRATEGIES
from clbench.strategies.hide_prompt import HIDE_PRESETS, HiDePrompt, HiDePromptConfig


@dataclass
class NoRGaConfig(HiDePromptConfig):
    gate_activation: Literal["sigmoid", "tanh", "gelu", "relu", "identity"] = option(
        "sigmoid",
        "act of the gate: sigmoid for supervised ImageNet-21k weights, tanh for iBOT / DINO, "
        "gelu for MoCo (the authors' choices)",
        symbol="sigma",
    )

    @property
    def prefix_gate(self) -> str | None:
        return self.gate_activation


@STRATEGIES.register(
    "norga", "NoRGa: HiDe-Prompt with non-linear residual gates on the prefix logits"
)
class NoRGa(HiDePrompt):
    Config = NoRGaConfig
    presets = HIDE_PRESETS
    config: NoRGaConfig

    def begin_task(self, task: int, classes: list[int]) -> None:
        super().begin_task(task, classes)
        # tau and alpha are learned in the first task only, then shared by every task
        self.model.prompts.gates.requires_grad_(task == 0)
