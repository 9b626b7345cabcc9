"""WAVE-CRE: within-task variance awareness for continual relation extraction
(Le et al., AAAI 2025, arXiv 2412.08285). Rehearsal-free: no example of a past task is kept.

* **Task-specific prompt pools** (Sec. 3.1): task t owns a pool P_t of M prompts, each with
  a learnable key k_m in the space of the query q(x), the frozen encoder's un-prompted
  feature (for relation extraction the [E11];[E21] states). The K keys most cosine-similar
  to q(x) pick K prompts, each L prefix keys and values at the prompted layers (the paper's
  best: L = 1, K = 8, i.e. K one-expert prompts chosen per input). Loss (eq. 15):
  CE(g_phi(f(x_p)), y) + lambda * sum_{k in K_x} (1 - cos(q(x), k)). Only P_t and the
  relation classifier g_phi train; the encoder and the pools of earlier tasks are frozen.
* **Generative models** (Sec. 3.2): after task t, per relation a full-covariance Gaussian
  over the query features and one over the prompted features f(x_p) (P_t selected by q(x)).
* **Task predictor and relation classifier** (Sec. 3.3): an MLP over all seen relations,
  trained on Gaussian query samples, predicts a relation whose task names the pool (eq. 18);
  g_phi is retrained on prompted-feature samples of every seen relation (eq. 19).
* At test time: q(x) -> task predictor -> task -> that task's pool, top-K on q(x) ->
  encoder(x, prompts) -> g_phi, batched over inputs whose predicted tasks differ.

``prompt_variant=soft-tokens`` is the prompt the authors' code uses instead of prefixes
(prompt tuning): the top-K prompts are weighted by the softmax of their similarities and
averaged into one prompt of L tokens prepended to the input. Deviations from that code:
the four entity-marker embeddings stay frozen (the encoder is shared and frozen, and the
query cache relies on it), no SWAG averaging of the heads, and the heads' sample training
uses the shared recipe of clbench.consolidation (cosine learning-rate schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from clbench.config import option
from clbench.consolidation import GaussianConsolidation, RelationMLP, reset_linear_layers
from clbench.errors import UsageError
from clbench.prompted_cache import PromptedFeatureCache, Rows, flat_parameters
from clbench.prompts import PromptVariant, TaskPromptPools, require_layers
from clbench.prompts.reparam import PrefixParamOptions
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
class WaveCREConfig(PrefixParamOptions, StrategyConfig):
    num_tasks: int = option(
        0, "prompt pools, one per task (0: the scenario's number of tasks)", symbol="T"
    )
    prompt_variant: PromptVariant = option(
        "prefix",
        "prefix: top-K prefixes (the paper); soft-tokens: softmax-weighted mean of the "
        "top-K prompts as input tokens (the authors' code)",
    )
    pool_size: int = option(20, "prompts per task pool", symbol="M")
    prompt_length: int = option(
        1,
        "prefix: keys (and values) per prompt, L = L_p / 2 (1 in the paper); soft-tokens: "
        "tokens per prompt (8 in the authors' code)",
        symbol="L",
    )
    top_k: int = option(
        8, "prompts chosen per input (8 in the paper, 4 in the authors' code)", symbol="K"
    )
    prompt_layers: list[int] = option([], "layers with the prefixes (empty: every layer)")
    pull_weight: float = option(0.1, "weight of the key-query pull term", symbol="lambda")
    mask_train_logits: bool = option(
        True, "CE over the current task's relations while a pool trains"
    )
    head: Literal["mlp", "linear"] = option(
        "mlp", "task predictor and relation classifier: the authors' MLP, or linear"
    )
    reset_heads: bool = option(
        True, "heads start fresh for each task's training and refit (authors' code)"
    )
    head_epochs: int = option(250, "epochs fitting the heads on Gaussian samples after each task")
    samples_per_class: int = option(100, "Gaussian samples per relation and epoch")
    head_batch_size: int = option(16, "mini-batch of the heads' sample training")
    head_lr: float = option(5e-5, "learning rate of the heads' sample training")
    head_optimizer: Literal["adam", "sgd"] = option("adam", "optimizer of the sample training")
    shrinkage: float = option(1e-4, "added to each covariance diagonal")
    prompted_cache: bool = option(
        True,
        "keep each test input's prompted feature per frozen task pool (exact: a pool that "
        "changes drops its entries), so an evaluation runs the encoder only on inputs that "
        "pick a pool they had not used",
    )
    # the authors' code: Adam, lr 1e-4 for the pool and classifier, batch 16, clip 10
    lr: float = option(1e-4, "learning rate of the current pool and the classifier", symbol="eta")
    batch_size: int = option(16, "training mini-batch size")
    epochs: int = option(25, "epochs per task")
    grad_clip: float = option(10.0, "gradient-norm clip")


# The paper's variant with the authors' code's other settings (pool 20, lr 1e-4 and 5e-5,
# batch 16, 25 pool epochs, 250 head epochs of 100 samples per relation: their README).
PAPER = {"prompt_variant": "prefix", "prompt_length": 1, "top_k": 8}
AUTHORS_CODE = {"prompt_variant": "soft-tokens", "prompt_length": 8, "top_k": 4}
CPU_HEADS = {"head_epochs": 50, "samples_per_class": 128, "head_batch_size": 64, "head_lr": 1e-3}

# fmt: off
WAVE_PRESETS: dict[str, dict[str, Any]] = {
    # the heads' refit grows with the seen relations: 20 epochs of it were ~2/3 of a quick
    # fewrel-offline run on 2 CPU cores, so a few larger-step epochs
    "quick": {"epochs": 1, "batch_size": 32, "lr": 0.01, "pool_size": 10, "top_k": 4,
              "head_epochs": 4, "samples_per_class": 32, "head_batch_size": 64,
              "head_lr": 1e-2, **QUICK_DATA},
    "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01, "pool_size": 10, "top_k": 4,
                       **CPU_HEADS, "samples_per_class": 160},
    # MiniLM-L6 on 2 CPU cores, the cost of hide-prompt's fewrel-offline preset
    "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01, **CPU_HEADS},
    "fewrel": {**PAPER},
    "tacred": {**PAPER},
    "fewrel-code": {**AUTHORS_CODE},
    "tacred-code": {**AUTHORS_CODE},
}
# fmt: on


@STRATEGIES.register(
    "wave-cre",
    "WAVE-CRE: a prompt pool per task, task predictor and classifier refit on Gaussian samples",
)
class WaveCRE(CLStrategy):
    Config = WaveCREConfig
    infers_task = True  # the task predictor picks the pool
    presets = WAVE_PRESETS
    config: WaveCREConfig

    def task_slots(self) -> TaskSlots:
        return TaskSlots("num_tasks", self.config.num_tasks, "prompt pools")

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        layers = tuple(c.prompt_layers) or tuple(range(encoder.num_layers))
        if c.prompt_variant == "prefix":
            require_layers(layers, encoder.num_layers, "prompt_layers")
        if not 1 <= c.top_k <= c.pool_size:
            raise UsageError(f"top_k must be in 1..pool_size ({c.pool_size}), got {c.top_k}")
        model.pools = TaskPromptPools(
            self.num_task_slots(),
            variant=c.prompt_variant,
            pool_size=c.pool_size,
            prompt_length=c.prompt_length,
            top_k=c.top_k,
            embed_dim=encoder.embed_dim,
            key_dim=encoder.feature_dim,
            layers=layers,
            reparam=c.prefix_reparam,
        )
        model.pools.requires_grad_(False)  # nothing trains before the first task
        model.classifier = self._make_head()
        model.task_predictor = self._make_head()
        model.task_predictor.requires_grad_(False)  # fitted on samples only, in end_task
        self.consolidation = GaussianConsolidation(encoder.feature_dim, shrinkage=c.shrinkage)
        self.prompted_cache = PromptedFeatureCache(self.num_task_slots())

    def _make_head(self) -> nn.Module:
        dim = self.encoder.feature_dim
        if self.config.head == "linear":
            return nn.Linear(dim, self.num_classes)
        return RelationMLP(dim, self.encoder.embed_dim, self.num_classes)

    # -- training a task's pool (eq. 15) --------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        self.model.pools.begin_task(task)  # only P_t trains
        if self.config.reset_heads:
            # the classifier that trains with P_t starts fresh, as in the authors' code:
            # it is refit at the end of the task anyway, and the refit one's grown hidden
            # layers give the new relations' untrained rows huge logits (CE ~9 at first)
            reset_linear_layers(self.model.classifier)
        self.model.classifier.requires_grad_(True)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        pool = self.model.pools.pools[self.current_task]
        generator = self.model.pools.generator_parameters()  # prefix_param=mlp / linear
        return [{"params": [*pool.parameters(), *generator, *self.model.classifier.parameters()]}]

    def train_logits(self, x: Tensor) -> TrainOutput:
        query = self.query(x)
        selection = self.model.pools(query, task=self.current_task, train=True)
        logits = self.model.classifier(self.encoder(x, selection.prompt).pooled)
        return TrainOutput(logits, self.config.pull_weight * selection.aux_loss)

    # -- end of task: Gaussians (eqs. 16-17), task predictor (18), classifier (19) ------
    def end_task(self, task: int, classes: list[int]) -> None:
        self.model.pools.end_task(task)  # P_t is final

        def prompted(x: Tensor, query: Tensor) -> Tensor:
            return self.encoder(x, self.model.pools(query, task=task).prompt).pooled

        # after the task nothing per-example of its data is kept, cached queries included:
        # the Gaussians replace them
        self.consolidation.fit_task(self, prompted, forget_queries=True)
        seen = self.seen_class_list
        self.fit_head(self.model.task_predictor, "query", seen)
        self.fit_head(self.model.classifier, "prompted", seen)
        self.model.task_predictor.requires_grad_(False)
        self.model.classifier.requires_grad_(False)

    def fit_head(
        self, head: nn.Module, features: Literal["query", "prompted"], classes: list[int]
    ) -> None:
        """Cross-entropy over all seen relations on Gaussian samples (eqs. 18, 19)."""
        c = self.config
        if c.reset_heads:
            reset_linear_layers(head)
        head.requires_grad_(True)
        self.consolidation.refit(
            head,
            features,
            classes,
            epochs=c.head_epochs,
            samples_per_class=c.samples_per_class,
            lr=c.head_lr,
            batch_size=c.head_batch_size,
            weight_decay=0.0,
            device=self.device,
            allowed=self.seen_classes,
            optimizer_name=c.head_optimizer,
        )

    # -- prediction ---------------------------------------------------------------------
    def infer_tasks(self, query: Tensor) -> Tensor:
        """The task of the relation the task predictor picks among the seen ones: [B]."""
        return self.task_of_best_class(self.model.task_predictor(query))

    def predict(self, x: Tensor) -> Prediction:
        query = self.query(x)
        inferred = self.infer_tasks(query)
        features = self.prompted_features(x, query, inferred)
        return Prediction(self.model.classifier(features), tasks=inferred)

    def prompted_features(self, x: Tensor, query: Tensor, tasks: Tensor) -> Tensor:
        """encoder(x, top-K prompts of the task's pool) per input. The pool's choice reads
        only the input's (frozen) query and the pool's keys, so with ``prompted_cache`` an
        input runs the encoder once per pool version it picks; the classifier, refit after
        every task, reads the kept features."""
        pools = self.model.pools

        def compute(rows: Rows) -> Tensor:
            selection = pools(query[rows], task=tasks[rows])
            return self.encoder(x[rows], selection.prompt).pooled

        if not self.config.prompted_cache:
            return compute(slice(None))
        slots = torch.stack([flat_parameters(pool.parameters()) for pool in pools.pools])
        self.prompted_cache.sync(slots)
        return self.prompted_cache.features(x, tasks, compute)

    # -- checkpoints ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return self.consolidation.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.consolidation.load_state_dict(state)
