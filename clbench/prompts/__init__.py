"""Prompt modules: one contract for every method's prompts (see :mod:`clbench.prompts.base`).

* :mod:`~clbench.prompts.base`: the contract (``PromptModule``, ``PromptSelection``,
  ``TaskIndex``), ``merge_prompts`` and ``require_layers``;
* :mod:`~clbench.prompts.pools`: prompt pools with keys (L2P; WAVE-CRE's pool per task);
* :mod:`~clbench.prompts.prefixes`: prefix prompts (DualPrompt's G- and E-prompts,
  HiDe-Prompt's and NoRGa's task prefixes);
* :mod:`~clbench.prompts.components`: CODA-Prompt's components.
"""

from clbench.prompts.base import (
    PromptModule,
    PromptSelection,
    TaskIndex,
    merge_prompts,
    require_layers,
)
from clbench.prompts.components import ComponentPrompt, orthonormal_extension
from clbench.prompts.pools import PromptPool, PromptVariant, TaskPool, TaskPromptPools
from clbench.prompts.prefixes import SharedPrefix, TaskKeyedPrefixPool, TaskPrefixPrompts

__all__ = [
    "ComponentPrompt",
    "PromptModule",
    "PromptPool",
    "PromptSelection",
    "PromptVariant",
    "SharedPrefix",
    "TaskIndex",
    "TaskKeyedPrefixPool",
    "TaskPool",
    "TaskPrefixPrompts",
    "TaskPromptPools",
    "merge_prompts",
    "orthonormal_extension",
    "require_layers",
]
