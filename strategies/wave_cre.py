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
uses the shared recipe of clbench.statistics (cosine learning-rate schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.encoders.attention import Prompt
from clbench.errors import UsageError
from clbench.prompts import PromptModule, PromptPool, PromptSelection, require_layers
from clbench.registry import STRATEGIES
from clbench.statistics import ClassStatistics, extract_features, train_on_samples
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel

PromptVariant = Literal["prefix", "soft-tokens"]


class TaskPool(PromptPool):
    """One task's pool: L2P's keys, cosine top-K and pull term (:class:`PromptPool`), with
    the K chosen prompts assembled by :meth:`assemble` so that a batch whose inputs use
    different pools (:class:`TaskPromptPools`) is assembled by the same code."""

    def __init__(self, variant: PromptVariant, pool_size: int, prompt_length: int, top_k: int,
                 embed_dim: int, key_dim: int, layers: tuple[int, ...]) -> None:
        mode = "prefix" if variant == "prefix" else "tokens"
        super().__init__(pool_size, prompt_length, top_k, embed_dim, key_dim, mode=mode,
                         layers=layers if mode == "prefix" else ())

    def assemble(self, picked: Tensor, scores: Tensor) -> Prompt:
        """The prompt from the chosen prompts ``picked`` [B, K, ...] and their cosines [B, K]."""
        if self.mode == "prefix":
            # the paper: the K prompts' prefixes side by side, [B, K, layers, 2, L, D] ->
            # per layer [B, 2, K*L, D]
            batch, dim = picked.shape[0], picked.shape[-1]
            per_layer = picked.permute(2, 0, 3, 1, 4, 5).reshape(len(self.layers), batch, 2, -1, dim)
            return Prompt(prefixes={layer: per_layer[i] for i, layer in enumerate(self.layers)})
        # the authors' code: softmax over the K cosines, then the mean of the weighted
        # prompts (their 1/K scale included) -> one prompt of L tokens
        weights = scores.softmax(dim=1)
        return Prompt(tokens=(weights[:, :, None, None] * picked).mean(dim=1))

    def forward(self, query: Tensor, *, task: int | None = None, train: bool = False) -> PromptSelection:
        similarity = self.similarity(query)
        chosen = self.select(similarity)
        scores = similarity.gather(1, chosen)
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(self.assemble(self.prompts[chosen], scores), pull, chosen)


class TaskPromptPools(PromptModule):
    """One :class:`TaskPool` per task. ``task`` an int: that task's pool for the whole batch
    (training); a tensor [B]: each input queries its own (predicted) task's pool, gathered
    in one indexing op over the stacked pools (test time)."""

    def __init__(self, num_tasks: int, **pool_options: Any) -> None:
        super().__init__()
        self.pools = nn.ModuleList(TaskPool(**pool_options) for _ in range(num_tasks))

    def train_only(self, task: int) -> None:
        """Only pool ``task`` requires grad, so the others never reach the optimizer."""
        for index, pool in enumerate(self.pools):
            pool.requires_grad_(index == task)

    def forward(self, query: Tensor, *, task: Any, train: bool = False) -> PromptSelection:
        if isinstance(task, int):
            return self.pools[task](query, train=train)
        keys = torch.stack([pool.keys for pool in self.pools])[task]  # [B, M, Dq]
        similarity = torch.einsum(
            "bd,bmd->bm", F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
        )
        first = self.pools[0]
        chosen = first.select(similarity)
        scores = similarity.gather(1, chosen)
        prompts = torch.stack([pool.prompts for pool in self.pools])  # [T, M, ...]
        picked = prompts[task[:, None], chosen]  # [B, K, ...]
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(first.assemble(picked, scores), pull, chosen)


class RelationMLP(nn.Module):
    """The authors' heads: Linear(Dq, D) - ReLU - Linear(D, D) - ReLU - Linear(D, C)."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def reset_linear_layers(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()


@dataclass
class WaveCREConfig(StrategyConfig):
    num_tasks: int = option(10, "prompt pools, one per task", symbol="T")
    prompt_variant: PromptVariant = option(
        "prefix", "prefix: top-K prefixes (the paper); soft-tokens: softmax-weighted mean of the "
        "top-K prompts as input tokens (the authors' code)")
    pool_size: int = option(20, "prompts per task pool", symbol="M")
    prompt_length: int = option(
        1, "prefix: keys (and values) per prompt, L = L_p / 2 (1 in the paper); soft-tokens: "
        "tokens per prompt (8 in the authors' code)", symbol="L")
    top_k: int = option(8, "prompts chosen per input (8 in the paper, 4 in the authors' code)",
                        symbol="K")
    prompt_layers: list[int] = option([], "layers with the prefixes (empty: every layer)")
    pull_weight: float = option(0.1, "weight of the key-query pull term", symbol="lambda")
    mask_train_logits: bool = option(True, "CE over the current task's relations while a pool trains")
    head: Literal["mlp", "linear"] = option(
        "mlp", "task predictor and relation classifier: the authors' MLP, or linear")
    reset_heads: bool = option(
        True, "heads start fresh for each task's training and refit (authors' code)")
    head_epochs: int = option(250, "epochs fitting the heads on Gaussian samples after each task")
    samples_per_class: int = option(100, "Gaussian samples per relation and epoch")
    head_batch_size: int = option(16, "mini-batch of the heads' sample training")
    head_lr: float = option(5e-5, "learning rate of the heads' sample training")
    head_optimizer: Literal["adam", "sgd"] = option("adam", "optimizer of the sample training")
    shrinkage: float = option(1e-4, "added to each covariance diagonal")
    # the authors' code: Adam, lr 1e-4 for the pool and classifier, batch 16, clip 10
    lr: float = option(1e-4, "learning rate of the current pool and the classifier", symbol="eta")
    batch_size: int = option(16, "training mini-batch size")
    epochs: int = option(25, "epochs per task")
    grad_clip: float = option(10.0, "gradient-norm clip")


# The paper's variant with the authors' code's other settings (pool 20, lr 1e-4 and 5e-5,
# batch 16, 25 pool epochs, 250 head epochs of 100 samples per relation: their README).
PAPER = {"prompt_variant": "prefix", "prompt_length": 1, "top_k": 8}
AUTHORS_CODE = {"prompt_variant": "soft-tokens", "prompt_length": 8, "top_k": 4}
CPU_HEADS = {"head_epochs": 50, "samples_per_class": 128, "head_batch_size": 64,
             "head_lr": 1e-3}

WAVE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 1, "batch_size": 32, "lr": 0.01, "pool_size": 10, "top_k": 4,
              "head_epochs": 20, "samples_per_class": 64, "head_batch_size": 32,
              "head_lr": 3e-3},
    "digits-offline": {"num_tasks": 5, "epochs": 3, "batch_size": 32, "lr": 0.01,
                       "pool_size": 10, "top_k": 4, **CPU_HEADS, "samples_per_class": 160},
    # MiniLM-L6 on 2 CPU cores, the cost of hide-prompt's fewrel-offline preset
    "fewrel-offline": {"num_tasks": 4, "epochs": 1, "batch_size": 32, "lr": 0.01, **CPU_HEADS},
    "fewrel": {**PAPER},
    "tacred": {**PAPER},
    "fewrel-code": {**AUTHORS_CODE},
    "tacred-code": {**AUTHORS_CODE},
}


@STRATEGIES.register(
    "wave-cre",
    "WAVE-CRE: a prompt pool per task, task predictor and classifier refit on Gaussian samples",
)
class WaveCRE(CLStrategy):
    name = "wave-cre"
    Config = WaveCREConfig
    infers_task = True  # the task predictor picks the pool
    presets = WAVE_PRESETS
    config: WaveCREConfig

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        layers = tuple(c.prompt_layers) or tuple(range(encoder.num_layers))
        if c.prompt_variant == "prefix":
            require_layers(layers, encoder.num_layers, "prompt_layers")
        if not 1 <= c.top_k <= c.pool_size:
            raise UsageError(f"top_k must be in 1..pool_size ({c.pool_size}), got {c.top_k}")
        model.pools = TaskPromptPools(
            c.num_tasks, variant=c.prompt_variant, pool_size=c.pool_size,
            prompt_length=c.prompt_length, top_k=c.top_k, embed_dim=encoder.embed_dim,
            key_dim=encoder.feature_dim, layers=layers,
        )
        model.pools.train_only(-1)  # nothing trains before the first task
        model.classifier = self._make_head()
        model.task_predictor = self._make_head()
        model.task_predictor.requires_grad_(False)  # fitted on samples only, in end_task
        self.query_statistics = ClassStatistics(encoder.feature_dim, shrinkage=c.shrinkage)
        self.prompted_statistics = ClassStatistics(encoder.feature_dim, shrinkage=c.shrinkage)

    def _make_head(self) -> nn.Module:
        dim = self.encoder.feature_dim
        if self.config.head == "linear":
            return nn.Linear(dim, self.num_classes)
        return RelationMLP(dim, self.encoder.embed_dim, self.num_classes)

    # -- training a task's pool (eq. 15) --------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        num_tasks = self.scenario_tasks(task)
        if num_tasks > self.config.num_tasks:
            raise UsageError(
                f"wave-cre has {self.config.num_tasks} prompt pools (num_tasks) but the "
                f"scenario has {num_tasks} tasks: use --set num_tasks={num_tasks}"
            )
        self.model.pools.train_only(task)
        if self.config.reset_heads:
            # the classifier that trains with P_t starts fresh, as in the authors' code:
            # it is refit at the end of the task anyway, and the refit one's grown hidden
            # layers give the new relations' untrained rows huge logits (CE ~9 at first)
            reset_linear_layers(self.model.classifier)
        self.model.classifier.requires_grad_(True)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        pool = self.model.pools.pools[self.current_task]
        return [{"params": [*pool.parameters(), *self.model.classifier.parameters()]}]

    def train_logits(self, x: Tensor) -> Tensor:
        query = self.query(x)
        selection = self.model.pools(query, task=self.current_task, train=True)
        self.auxiliary_loss = self.config.pull_weight * selection.aux_loss
        return self.model.classifier(self.encoder(x, selection.prompt).pooled)

    # -- end of task: Gaussians (eqs. 16-17), task predictor (18), classifier (19) ------
    def end_task(self, task: int, classes: list[int]) -> None:
        c = self.config
        self.model.pools.train_only(-1)  # P_t is final
        fingerprints: list[Tensor] = []

        def query_and_prompted(x: Tensor) -> tuple[Tensor, Tensor]:
            keys = self.query_cache.fingerprint(x)
            if keys is not None:
                fingerprints.append(keys)
            with self.autocast():  # as at evaluation; statistics accumulate in fp32
                query = self.query(x)
                selection = self.model.pools(query, task=task)
                return query.float(), self.encoder(x, selection.prompt).pooled.float()

        (query, prompted), labels = extract_features(
            query_and_prompted, self.experience.dataset.eval(),
            batch_size=c.eval_batch_size, device=self.device, num_workers=c.num_workers,
        )
        self.query_statistics.update(query, labels)
        self.prompted_statistics.update(prompted, labels)
        if fingerprints:
            self._forget_queries(torch.cat(fingerprints))
        seen = self.seen_class_list
        self.fit_head(self.model.task_predictor, self.query_statistics, seen)
        self.fit_head(self.model.classifier, self.prompted_statistics, seen)
        self.model.task_predictor.requires_grad_(False)
        self.model.classifier.requires_grad_(False)

    def _forget_queries(self, fingerprints: Tensor) -> None:
        """Drop this task's training inputs from the query cache: after the task nothing
        per-example of its data is kept, features included (the Gaussians replace them)."""
        self.query_cache.forget(fingerprints)

    def fit_head(self, head: nn.Module, statistics: ClassStatistics, classes: list[int]) -> None:
        """Cross-entropy over all seen relations on Gaussian samples (eqs. 18, 19)."""
        c = self.config
        if c.reset_heads:
            reset_linear_layers(head)
        head.requires_grad_(True)
        train_on_samples(
            head, statistics, classes, epochs=c.head_epochs,
            samples_per_class=c.samples_per_class, lr=c.head_lr, batch_size=c.head_batch_size,
            weight_decay=0.0, device=self.device, allowed=self.seen_classes,
            optimizer_name=c.head_optimizer,
        )

    # -- prediction ---------------------------------------------------------------------
    def infer_tasks(self, query: Tensor) -> Tensor:
        """The task of the relation the task predictor picks among the seen ones: [B]."""
        relation = self.mask_unseen(self.model.task_predictor(query)).argmax(dim=1)
        return self.class_to_task()[relation]

    def predict(self, x: Tensor) -> Tensor:
        query = self.query(x)
        inferred = self.infer_tasks(query)
        selection = self.model.pools(query, task=inferred)
        logits = self.mask_unseen(self.model.classifier(self.encoder(x, selection.prompt).pooled))
        self.score_task_identity(x, inferred)  # task-prediction accuracy, in evaluation only
        return logits

    # -- checkpoints ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"query_statistics": self.query_statistics.state_dict(),
                "prompted_statistics": self.prompted_statistics.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.query_statistics.load_state_dict(state["query_statistics"])
        self.prompted_statistics.load_state_dict(state["prompted_statistics"])
