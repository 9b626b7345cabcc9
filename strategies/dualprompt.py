"""DualPrompt: Complementary Prompting for Rehearsal-free CL (Wang et al., ECCV 2022).

Two kinds of prefix prompts on a frozen encoder (prefix tuning: a prompt of length L holds
L extra keys and L extra values that every token of its layer attends to):

* the G-prompt g (length L_g, layers 0-1), shared by all tasks: task-invariant knowledge;
* one E-prompt e_t per task (length L_e, layers 2-4) with a learnable key k_t:
  task-specific knowledge.

Training on task t uses e_t (task identity is known while training). The loss is the
cross-entropy of a linear classifier on the prompted pooled feature ([CLS] for a ViT,
the entity markers for text) over task t's classes, plus the matching term
lambda * (1 - cos(q, k_t)) that pulls k_t toward the queries q of task t, where q is the
frozen encoder's un-prompted pooled feature. At the end of a task nothing is consolidated:
its E-prompt and key simply leave the optimizer. At test time every input takes e_t* with
t* = argmax_t cos(q, k_t) over the tasks learnt so far (top-1 key match, batched).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from clbench.config import option
from clbench.prompts import SharedPrefix, TaskKeyedPrefixPool, merge_prompts, require_layers
from clbench.registry import STRATEGIES
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import (
    CLStrategy,
    Prediction,
    StrategyConfig,
    StrategyModel,
    TaskSlots,
    TrainOutput,
)


@dataclass
class DualPromptConfig(StrategyConfig):
    g_length: int = option(5, "G-prompt length (prefix keys and values each)", symbol="L_g")
    g_layers: tuple[int, ...] = option((0, 1), "layers with the G-prompt", symbol="start_g..end_g")
    e_length: int = option(
        5, "E-prompt length: 5 in the authors' CIFAR config, 20 for ImageNet-R", symbol="L_e"
    )
    e_layers: tuple[int, ...] = option(
        (2, 3, 4), "layers with the E-prompts", symbol="start_e..end_e"
    )
    # 10 as in the paper rather than 0 (one per task): unused slots are never candidates,
    # and a count that follows the scenario would change every run's random initialisation
    pool_size: int = option(
        10, "E-prompt slots, one per task (>= number of tasks; 0: one per task)", symbol="M"
    )
    pull_weight: float = option(
        1.0, "weight of the query-key matching loss 1 - cos(q, k_t)", symbol="lambda"
    )
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")
    # the paper's settings: Adam (0.9, 0.999), constant lr 0.005, batch 128; 5 epochs for
    # Split CIFAR-100, 50 for ImageNet-R
    lr: float = option(0.005, "learning rate of prompts, keys and classifier", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")


@STRATEGIES.register(
    "dualprompt",
    "DualPrompt: shared G-prompt + per-task E-prompts with keys (prefix tuning), top-1 key match",
)
class DualPrompt(CLStrategy):
    Config = DualPromptConfig
    infers_task = True  # by the top-1 key match (its E-prompt choice)
    presets = {
        "quick": {"epochs": 1, "batch_size": 32, **QUICK_DATA},
        "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01},
        # MiniLM-L6 on 2 CPU cores: one epoch of 1680 sentences per task, ~6-8 min a run
        "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01},
        "split-cifar100": {"epochs": 5, "batch_size": 128, "lr": 0.005, "e_length": 5},
        "imagenet-r": {"epochs": 50, "batch_size": 128, "lr": 0.005, "e_length": 20},
    }
    config: DualPromptConfig

    def task_slots(self) -> TaskSlots:
        return TaskSlots("pool_size", self.config.pool_size, "E-prompt slots")

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        require_layers(tuple(c.g_layers), encoder.num_layers, "g_layers")
        require_layers(tuple(c.e_layers), encoder.num_layers, "e_layers")
        model.g_prompt = SharedPrefix(c.g_length, encoder.embed_dim, layers=c.g_layers)
        model.e_prompts = TaskKeyedPrefixPool(
            self.num_task_slots(),
            c.e_length,
            encoder.embed_dim,
            encoder.feature_dim,
            layers=c.e_layers,
        )
        model.head = nn.Linear(encoder.feature_dim, self.num_classes)

    def begin_task(self, task: int, classes: list[int]) -> None:
        # only e_t and k_t train (with g and the classifier); older slots stay as learnt
        self.model.e_prompts.begin_task(task)

    def _forward(self, x: Tensor, train: bool) -> tuple[TrainOutput, Tensor]:
        """Logits (+ the matching loss) and the index of the E-prompt each input used."""
        query = self.query(x)  # frozen, un-prompted, cached
        task = max(self.current_task, 0)
        expert = self.model.e_prompts(query, task=task, train=train)
        general = self.model.g_prompt(query)
        output = self.encoder(x, merge_prompts(general.prompt, expert.prompt))
        logits = self.model.head(output.pooled)
        return TrainOutput(logits, self.config.pull_weight * expert.aux_loss), expert.selected[:, 0]

    def train_logits(self, x: Tensor) -> TrainOutput:
        return self._forward(x, train=True)[0]

    def predict(self, x: Tensor) -> Prediction:
        output, chosen = self._forward(x, train=False)
        # the key match is dualprompt's task identity: how often the top-1 key picks the
        # input's own task's E-prompt (evaluation_summary reports it)
        return Prediction(output.logits, tasks=chosen)
