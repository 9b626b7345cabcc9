"""HiDe-Prompt: hierarchical decomposition of prompt-based continual learning
(Wang et al., NeurIPS 2023), and the shared per-task prefix prompts NoRGa builds on.

The objective splits into three parts, each trained on its own:

* **Task-identity inference (TII)**: an auxiliary classifier reads the frozen encoder's
  un-prompted feature (the same encoder run without prompt); trained per task with
  cross-entropy over the task's classes, then aligned on Gaussian samples of every seen
  class. Predicted class -> its task -> that task's prompt.
* **Within-task prediction (WTP)**: one prefix prompt per task (layers 0-4, length L_p),
  initialised from the previous task's prompt, trained with cross-entropy over the task's
  classes plus a contrastive regulariser that keeps batch features away from the stored
  means of old classes; after training, prompt momentum m mixes the mean of the old
  prompts into the stored prompt (as the authors' code does).
* **Task-adaptive prediction (TAP)**: after each task, class-wise statistics of the
  prompted features are stored and the head alone is retrained on samples of all seen
  classes (no stored data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.encoders.attention import Prompt, ResidualGate
from clbench.errors import UsageError
from clbench.prompts import PromptModule, PromptSelection
from clbench.registry import STRATEGIES
from clbench.statistics import ClassStatistics, extract_features, train_on_samples
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel


class TaskPrefixPrompts(PromptModule):
    """One prefix prompt per task at ``layers`` (HiDe-Prompt, NoRGa).

    ``task`` is an int while training (the task is known) or a tensor [B] of inferred
    tasks at test time, gathered per sample in one indexing op. With ``gate_activation``
    each prompted layer gets NoRGa's residual gate on its prefix logits.
    """

    def __init__(self, num_tasks: int, layers: list[int], length: int, embed_dim: int,
                 momentum: float = 0.0, gate_activation: str | None = None) -> None:
        super().__init__()
        self.layers = list(layers)
        self.momentum = momentum
        shape = (len(self.layers), 2, length, embed_dim)
        # uniform(-1, 1) as in the authors' code (inherited from L2P / DualPrompt)
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.empty(shape).uniform_(-1, 1)) for _ in range(num_tasks)
        )
        self.gates = nn.ModuleDict()
        if gate_activation is not None:
            self.gates = nn.ModuleDict({str(layer): ResidualGate(gate_activation) for layer in self.layers})

    def start_task(self, task: int) -> None:
        """Initialise the new prompt from the previous one; only the new one trains."""
        if task > 0:
            with torch.no_grad():
                self.prompts[task].copy_(self.prompts[task - 1])
        for index, prompt in enumerate(self.prompts):
            prompt.requires_grad_(index == task)

    def finish_task(self, task: int) -> None:
        """P_t <- (1 - m) P_t + m mean(P_<t), then freeze P_t (HiDe's prompt momentum)."""
        prompt = self.prompts[task]
        if self.momentum > 0 and task > 0:
            with torch.no_grad():
                previous = torch.stack(list(self.prompts[:task])).mean(0)
                prompt.copy_((1 - self.momentum) * prompt + self.momentum * previous)
        prompt.requires_grad_(False)

    def forward(self, query: Tensor | None = None, *, task: Any = None, train: bool = False) -> PromptSelection:
        if isinstance(task, int):
            per_sample = self.prompts[task].unsqueeze(0)  # [1, layers, 2, L, D]
        else:
            per_sample = torch.stack(list(self.prompts))[task]  # [B, layers, 2, L, D]
        prefixes = {layer: per_sample[:, i] for i, layer in enumerate(self.layers)}
        gates = {int(layer): gate for layer, gate in self.gates.items()}
        zero = per_sample.new_zeros(())
        return PromptSelection(Prompt(prefixes=prefixes, gates=gates), zero)


class TaskIdentityHead(nn.Module):
    """HiDe's auxiliary classifier: MLP D-2D-D with a residual and LayerNorm, then linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.norm(features + self.mlp(features)))


@dataclass
class HiDePromptConfig(StrategyConfig):
    num_tasks: int = option(10, "prompt slots, one per task", symbol="T")
    prompt_layers: list[int] = option([0, 1, 2, 3, 4], "layers with a task prefix")
    prompt_length: int = option(5, "prefix length (5 CIFAR, 20 ImageNet-R)", symbol="L_p")
    prompt_momentum: float = option(0.01, "weight of the old prompts' mean while training", symbol="m")
    contrastive_weight: float = option(0.1, "WTP contrastive regulariser (0.1 CIFAR, 0.5 ImageNet-R)", symbol="reg")
    contrastive_temperature: float = option(0.8, "temperature of the contrastive regulariser")
    head_lr_scale: float = option(0.1, "head learning rate = lr x this")
    tii_epochs: int = option(20, "epochs of the task-identity classifier per task (Adam)")
    tii_lr: float = option(5e-4, "learning rate of the task-identity classifier (Adam)")
    tii_align_epochs: int = option(30, "epochs aligning the task-identity classifier on samples")
    tap_epochs: int = option(30, "epochs retraining the head on samples of all seen classes")
    replay_lr: float = option(0.005, "SGD learning rate of the two sample-trained stages")
    samples_per_class: int = option(640, "Gaussian samples per class and epoch (5 x batch)")
    statistics: Literal["covariance", "centroids"] = option("covariance", "class statistics")
    num_centroids: int = option(10, "k of the centroids mode")
    shrinkage: float = option(1e-4, "added to the covariance diagonal")
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")
    # the authors' CIFAR setting: Adam, lr 0.03 x 128 / 256, clip 1.0, 50 epochs, x0.1 at 30
    lr: float = option(0.015, "prompt learning rate (0.03 x batch / 256)", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")
    epochs: int = option(50, "epochs per experience")
    grad_clip: float = option(1.0, "gradient-norm clip")
    lr_schedule: Literal["constant", "cosine", "step"] = option("step", "lr schedule")
    lr_step_epoch: int = option(30, "step schedule: x0.1 after this epoch")


HIDE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 1, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
              "tii_epochs": 2, "tii_align_epochs": 2, "tap_epochs": 2, "samples_per_class": 64},
    "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
                       "num_tasks": 5, "tii_epochs": 10, "tii_align_epochs": 10,
                       "tap_epochs": 10, "samples_per_class": 160},
    "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
                       "num_tasks": 4, "samples_per_class": 160},
    "split-cifar100": {},  # the defaults are the authors' CIFAR setting
    "imagenet-r": {"epochs": 150, "lr_schedule": "cosine", "prompt_length": 20,
                   "contrastive_weight": 0.5},
}


@STRATEGIES.register("hide-prompt", "HiDe-Prompt: task prefixes, task-identity inference, Gaussian head consolidation")
class HiDePrompt(CLStrategy):
    name = "hide-prompt"
    Config = HiDePromptConfig
    infers_task = True  # the TII head picks the task prompt
    presets = HIDE_PRESETS
    config: HiDePromptConfig
    gate_activation: str | None = None

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        bad = [layer for layer in c.prompt_layers if not 0 <= layer < encoder.num_layers]
        if bad:
            raise UsageError(f"prompt_layers {bad} outside the encoder's {encoder.num_layers} layers")
        model.prompts = TaskPrefixPrompts(c.num_tasks, c.prompt_layers, c.prompt_length,
                                          encoder.embed_dim, c.prompt_momentum, self.gate_activation)
        model.head = nn.Linear(encoder.feature_dim, self.num_classes)
        model.task_identity = TaskIdentityHead(encoder.feature_dim, self.num_classes)
        model.task_identity.requires_grad_(False)
        statistics = {"shrinkage": c.shrinkage, "num_centroids": c.num_centroids}
        self.query_statistics = ClassStatistics(encoder.feature_dim, c.statistics, **statistics)
        self.prompted_statistics = ClassStatistics(encoder.feature_dim, c.statistics, **statistics)
        # the prompted features of the last training or test batch
        self.batch_features: Tensor | None = None

    # -- training (WTP) -----------------------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        if task >= self.config.num_tasks:
            raise UsageError(f"{self.name} has {self.config.num_tasks} prompt slots (num_tasks) "
                             f"but the scenario has more experiences")
        self.model.prompts.start_task(task)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        prompts = [p for p in self.model.prompts.parameters() if p.requires_grad]  # NoRGa: + gates
        return [{"params": prompts, "lr": self.config.lr},
                {"params": list(self.model.head.parameters()),
                 "lr": self.config.lr * self.config.head_lr_scale}]

    def train_logits(self, x: Tensor) -> Tensor:
        selection = self.model.prompts(task=self.current_task, train=True)
        features = self.encoder(x, selection.prompt).pooled
        self.batch_features = features  # subclasses add losses on them (hier-ot)
        if self.config.contrastive_weight > 0:
            old_classes = [c for classes in self.task_classes[: self.current_task] for c in classes]
            old_means = self.prompted_statistics.class_means(old_classes, self.device)
            self.auxiliary_loss = self.config.contrastive_weight * self.contrastive(features, old_means)
        return self.model.head(features)

    def contrastive(self, features: Tensor, old_means: Tensor) -> Tensor:
        """CE((M M^T) / temperature, I) over M = [old class means; batch features].

        As in the authors' code: raw (un-normalised) features, and in the first task, with
        no old class yet, over the batch features alone.
        """
        stacked = torch.cat([old_means.to(features.dtype), features])
        logits = stacked @ stacked.T / self.config.contrastive_temperature
        return F.cross_entropy(logits, torch.arange(len(stacked), device=logits.device))

    # -- end of task: statistics, TII, TAP ------------------------------------------------
    def end_task(self, task: int, classes: list[int]) -> None:
        c = self.config
        self.model.prompts.finish_task(task)  # momentum: the stored prompt is final now
        selection = self.model.prompts(task=task)

        def query_and_prompted(x: Tensor) -> tuple[Tensor, Tensor]:
            # the pass costs as much as an evaluation, so it runs at the same precision;
            # the statistics (means, covariances) are accumulated in fp32
            with self.autocast():
                return self.query(x).float(), self.encoder(x, selection.prompt).pooled.float()

        (query, prompted), labels = extract_features(
            query_and_prompted, self.experience.dataset.eval(),
            batch_size=c.eval_batch_size, device=self.device, num_workers=c.num_workers,
        )
        self.query_statistics.update(query, labels)
        self.prompted_statistics.update(prompted, labels)
        self.train_task_identity(query.to(self.device), labels.to(self.device), classes)
        if task > 0:
            # consolidation on samples of every seen class, old and new; as in the authors'
            # code, batches of 5 x batch_size samples, one step per old class per epoch
            replay = {"samples_per_class": c.samples_per_class, "lr": c.replay_lr,
                      "batch_size": c.samples_per_class, "device": self.device,
                      "steps_per_epoch": sum(len(t) for t in self.task_classes[:task]),
                      "allowed": self.seen_classes}
            seen = self.seen_class_list
            train_on_samples(self.model.task_identity, self.query_statistics, seen,
                             epochs=c.tii_align_epochs, **replay)
            train_on_samples(self.model.head, self.prompted_statistics, seen,
                             epochs=c.tap_epochs, **replay)

    def train_task_identity(self, query: Tensor, labels: Tensor, classes: list[int]) -> None:
        """Cross-entropy over the task's classes on its (fixed) un-prompted features."""
        head = self.model.task_identity
        head.requires_grad_(True)
        optimizer = torch.optim.Adam(head.parameters(), lr=self.config.tii_lr)
        allowed = self.current_class_mask
        head.train()
        for _ in range(self.config.tii_epochs):
            order = torch.randperm(len(labels), device=query.device)
            for start in range(0, len(order), self.config.batch_size):
                batch = order[start : start + self.config.batch_size]
                loss = F.cross_entropy(self.mask_to(head(query[batch]), allowed), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        head.eval()

    # -- prediction -------------------------------------------------------------------------
    def predict(self, x: Tensor) -> Tensor:
        lookup = self.class_to_task()
        query = self.query(x)
        inferred = lookup[self.mask_unseen(self.model.task_identity(query)).argmax(1)]
        selection = self.model.prompts(task=inferred)
        self.batch_features = self.encoder(x, selection.prompt).pooled
        logits = self.mask_unseen(self.model.head(self.batch_features))
        self.score_task_identity(x, inferred, lookup)  # TII accuracy, in evaluation only
        return logits

    # -- checkpoints ------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"query_statistics": self.query_statistics.state_dict(),
                "prompted_statistics": self.prompted_statistics.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.query_statistics.load_state_dict(state["query_statistics"])
        self.prompted_statistics.load_state_dict(state["prompted_statistics"])
