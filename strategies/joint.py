"""The joint upper bound: the method's own trainable parts, trained on all tasks at once.

The papers' upper bound for a prompt method on a frozen encoder (L2P, DualPrompt,
HiDe-Prompt, CODA-Prompt) is the same prompted model trained on the union of every
task's data: nothing to forget, nothing to infer. A linear probe on frozen features
(``joint-linear``) is a weaker bound, and wave-cre already beats it. ``trainable`` says
which parts train:

* ``prefix`` (the default): one prefix prompt (L_p prefix keys and values at each of
  ``prefix_layers``, HiDe-Prompt's and DualPrompt's prefix tuning on layers 0-4) and
  the linear head on the prompted pooled feature ([CLS], or the entity markers for text);
* ``prompt``: one L2P-style prompt of ``prompt_tokens`` tokens at the input (L2P's N x L_p
  = 5 x 5 tokens, but a single prompt: no pool, no key, no selection) and the head;
* ``head``: the linear probe on frozen features, ``joint-linear`` bit for bit (the same
  class does it).

Why ``prefix`` is the default: most methods here prompt by prefixes (dualprompt,
hide-prompt, norga, hier-ot, wave-cre), so one shared prefix trained on everything is
the bound their tables compare with. Run folders of ``joint`` written before
``trainable`` existed (no such key in their config.json) were linear probes: they are
read as ``joint-linear`` (:data:`clbench.results.folder.RENAMED_STRATEGIES`), so old
tables keep their meaning.

The prefix changes the features, so past features cannot be kept: while experience t
trains, the training set is the union of the RAW training data of every experience seen
so far (replay of the inputs, so after the last experience it is one model trained on
all tasks at once). The loss is cross-entropy over every seen class. The prompt's
learning rate is ``prompt_lr`` and the head's ``lr`` (HiDe-Prompt's 10:1 ratio at
clbench's text setting: 0.01 and 0.001). A checkpoint keeps which experiences were seen
(indices), never their data: on resume the datasets are taken again from the stream of
the experience being trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from avalanche.benchmarks.utils import concat_datasets
from torch import Tensor, nn

from clbench.config import option
from clbench.encoders.attention import Prompt
from clbench.errors import UsageError
from clbench.prompts import PromptModule, PromptSelection, SharedPrefix, TaskIndex, require_layers
from clbench.registry import STRATEGIES
from clbench.strategies.baselines import JointLinear, LinearProbeConfig
from clbench.strategy import CLStrategy, StrategyModel

Trainable = Literal["prefix", "prompt", "head"]


@dataclass
class JointConfig(LinearProbeConfig):
    trainable: Trainable = option(
        "prefix",
        "what trains on all data seen so far: prefix = one prefix prompt + head, prompt = "
        "one L2P-style prompt of input tokens + head, head = the linear probe on frozen "
        "features (joint-linear)",
    )
    prefix_length: int = option(5, "prefix length at each prefix layer (prefix)", symbol="L_p")
    prefix_layers: tuple[int, ...] = option((0, 1, 2, 3, 4), "layers with the prefix (prefix)")
    prompt_tokens: int = option(
        25, "prompt tokens at the input (prompt; L2P's N x L_p = 5 x 5)", symbol="N x L_p"
    )
    prompt_lr: float = option(0.01, "learning rate of the prefix / prompt tokens (head's: lr)")


class SharedPromptTokens(PromptModule):
    """One prompt of L tokens at the input for every input and every task: L2P's prompt
    without the pool (no key, no selection, no auxiliary loss), initialised U(-1, 1) as
    L2P's prompts are."""

    def __init__(self, length: int, embed_dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(1, length, embed_dim).uniform_(-1, 1))

    def forward(
        self, query: Tensor | None = None, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        return PromptSelection(Prompt(tokens=self.tokens), self.tokens.new_zeros(()))


@STRATEGIES.register(
    "joint",
    "upper bound: the method's prefix / prompt tokens (trainable=) and head, trained on all "
    "data seen so far",
)
class Joint(JointLinear):
    Config = JointConfig
    config: JointConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # the experiences trained so far, in order: the union is re-derived from the stream
        self.seen_experiences: list[int] = []

    @property
    def tunes_prompt(self) -> bool:
        return self.config.trainable != "head"

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        if c.trainable == "prefix":
            require_layers(c.prefix_layers, encoder.num_layers, "prefix_layers")
            model.prompt = SharedPrefix(c.prefix_length, encoder.embed_dim, layers=c.prefix_layers)
        elif c.trainable == "prompt":
            if c.prompt_tokens < 1:
                raise UsageError(f"prompt_tokens must be at least 1, got {c.prompt_tokens}")
            model.prompt = SharedPromptTokens(c.prompt_tokens, encoder.embed_dim)
        super().setup(model)  # the head over all classes

    # -- the training set: every seen experience's raw inputs ---------------------------
    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        if not self.tunes_prompt:
            super().train_dataset_adaptation(**kwargs)  # frozen features (joint-linear)
            return
        CLStrategy.train_dataset_adaptation(self, **kwargs)  # Avalanche's: this experience
        if self.current_task not in self.seen_experiences:
            self.seen_experiences.append(self.current_task)
        if self.seen_experiences == [self.current_task]:
            return
        stream = getattr(self.experience, "origin_stream", None)
        if stream is None:
            raise RuntimeError(
                f"joint (trainable={self.config.trainable}) replays the experiences seen "
                "before, which it takes from the experience's origin_stream: train on "
                "experiences of an Avalanche stream"
            )
        union = concat_datasets([stream[i].dataset for i in self.seen_experiences])
        self.adapted_dataset = union.train()

    def begin_task(self, task: int, classes: list[int]) -> None:
        if self.tunes_prompt:
            self.model.prompt.begin_task(task)

    def end_task(self, task: int, classes: list[int]) -> None:
        if self.tunes_prompt:
            self.model.prompt.end_task(task)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        if not self.tunes_prompt:
            return super().trainable_parameters()
        prompt = [p for p in self.model.prompt.parameters() if p.requires_grad]
        return [
            {"params": prompt, "lr": self.config.prompt_lr},
            {"params": list(self.model.head.parameters()), "lr": self.config.lr},
        ]

    # -- forward ------------------------------------------------------------------------
    def prompted_logits(self, x: Tensor, train: bool) -> Tensor:
        # an empty query: neither shared prompt reads one (no key, no selection)
        nothing = self.model.head.weight.new_zeros(len(x), 0)
        selection = self.model.prompt(nothing, task=max(self.current_task, 0), train=train)
        return self.model.head(self.encoder(x, selection.prompt, readout="pooled").pooled)

    def train_logits(self, x: Tensor) -> Tensor:
        if not self.tunes_prompt:
            return super().train_logits(x)
        return self.prompted_logits(x, train=True)

    def predict(self, x: Tensor) -> Tensor:
        if not self.tunes_prompt:
            return super().predict(x)
        return self.prompted_logits(x, train=False)

    # -- checkpoints: indices of the seen experiences, never their data -----------------
    def extra_state(self) -> dict[str, Any]:
        if not self.tunes_prompt:
            return super().extra_state()
        return {"seen_experiences": list(self.seen_experiences)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not self.tunes_prompt:
            super().load_extra_state(state)
            return
        self.seen_experiences = [int(i) for i in state["seen_experiences"]]
