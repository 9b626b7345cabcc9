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

``--preset authors`` (``authors:fewrel``, ``authors:tacred``; fewrel-offline takes a CPU-sized
copy) runs the authors' code instead, the closest public one being hide-prompt-cre
(e5de6bb, the WAVE-CRE pipeline; the same at a8daee7 and in WAVE++), each difference a
named option (``clbench list --options`` marks the quirks):

* ``prompt_variant=pool-average`` (input prompt tuning, methods/prompt.py lines 39-60):
  the softmax over all M key cosines weights the mean of the whole pool,
  (1/M) sum_m w_m P_m, one prompt of L tokens prepended to the input; the top-K keys
  enter only the pull term, while every key gets the CE gradient through its weight;
* ``embedding_epochs``: in task 1 the embedding layer (marker rows, position and
  token-type embeddings, LayerNorm) trains with a fresh MLP for 30 epochs at 2e-5
  (methods/manager.py lines 86-142); every later query uses the tuned layer;
* ``attend_padding``: no attention mask, [PAD] attended (methods/backbone.py 131-149);
* ``head_weight_average``, ``head_schedule=constant``, ``head_grad_clip=10``: the heads'
  refit keeps the running mean of their weights over the epochs (SWAG at scale 0,
  manager.py lines 27-84), at a constant lr with clipping;
* the scenario's ``template=authors`` and ``split=crl``.

``prompt_variant=soft-tokens`` is a later revision of that code (branch quangnm, 105af50 -
84dcf8f, Feb 2025, after the paper): the softmax over the K chosen cosines weights their
mean. Not reproduced: BERT dropout in the frozen blocks while the embeddings train, the
pre-drawn and cycled Gaussian samples, CE over all outputs while the heads refit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.consolidation import (
    GaussianConsolidation,
    RelationMLP,
    fit_head,
    reset_linear_layers,
)
from clbench.encoders.attention import Prompt
from clbench.encoders.bert import BertEncoder
from clbench.errors import UsageError
from clbench.progress import track
from clbench.prompted_cache import PromptedFeatureCache, Rows, flat_parameters
from clbench.prompts import PromptSelection, TaskPromptPools, require_layers
from clbench.prompts.base import TaskIndex
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

WavePromptVariant = Literal["prefix", "pool-average", "soft-tokens"]
CODE = "hide-prompt-cre e5de6bb"  # where the authors' behaviours below are read


@dataclass
class WaveCREConfig(PrefixParamOptions, StrategyConfig):
    num_tasks: int = option(
        0, "prompt pools, one per task (0: the scenario's number of tasks)", symbol="T"
    )
    prompt_variant: WavePromptVariant = option(
        "prefix",
        "prefix: the top-K prompts' prefixes (the paper); pool-average: one prompt of L "
        "input tokens, the mean over the whole pool of each prompt weighted by the softmax "
        "of all M cosines, top-K only in the pull term (the authors' code); soft-tokens: "
        "the mean of the top-K prompts weighted by the softmax of their K cosines (a "
        "revision of that code after the paper)",
        quirk=f"{CODE} methods/prompt.py lines 39-60 (pool-average); branch quangnm "
        "105af50 methods/prompt.py forward (soft-tokens)",
    )
    pool_size: int = option(20, "prompts per task pool", symbol="M")
    prompt_length: int = option(
        1,
        "prefix: keys (and values) per prompt, L = L_p / 2 (1 in the paper); pool-average, "
        "soft-tokens: tokens per prompt (8 in the authors' code)",
        symbol="L",
    )
    top_k: int = option(
        8,
        "prompts chosen per input (8 in the paper; 4 in the authors' code, where they feed "
        "only the pull term)",
        symbol="K",
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
    head_schedule: Literal["cosine", "constant"] = option(
        "cosine",
        "learning-rate schedule of the heads' sample training",
        quirk=f"{CODE} methods/manager.py lines 27-84: Adam at a constant lr",
    )
    head_grad_clip: float = option(
        0.0,
        "gradient-norm clip of the heads' sample training (0: none)",
        quirk=f"{CODE} methods/manager.py line 70: clip_grad_norm_ to max_grad_norm = 10",
    )
    head_weight_average: bool = option(
        False,
        "the heads keep the running mean of their weights after every epoch of their "
        "sample training (SWA)",
        quirk=f"{CODE} methods/manager.py lines 81-83: SWAG collect_model every epoch, "
        "sampled at scale 0 (the plain weight mean)",
    )
    embedding_epochs: int = option(
        0,
        "epochs training the encoder's marker rows, position and token-type embeddings "
        "and embedding LayerNorm with a fresh MLP (CE over all outputs) before task 1's "
        "pool; later queries and prompted features use the tuned layer (0: frozen)",
        quirk=f"{CODE} methods/manager.py lines 86-142 (train_encoder, task 1 only: "
        "encoder_epochs 30), methods/backbone.py lines 103-114 (only the marker rows of "
        "the word matrix move)",
    )
    embedding_lr: float = option(2e-5, "learning rate of that embedding training (Adam)")
    attend_padding: bool = option(
        False,
        "the encoder attends to [PAD] at the scenario's padded length (max_length): no "
        "attention mask",
        quirk=f"{CODE} methods/backbone.py lines 131-149: BertEncoder called without a mask",
    )
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
# the authors' code's prompt alone (README at 14db687: length 8, top-k 4, pool 20)
AUTHORS_CODE = {"prompt_variant": "pool-average", "prompt_length": 8, "top_k": 4}
CPU_HEADS = {"head_epochs": 50, "samples_per_class": 128, "head_batch_size": 64, "head_lr": 1e-3}
# Everything of the authors' code that clbench reproduces (module docstring)
AUTHORS: dict[str, Any] = {
    **AUTHORS_CODE,
    "mask_train_logits": False,  # manager.py lines 146, 204: CE over all outputs
    "embedding_epochs": 30,  # README: encoder_epochs 30, encoder_lr 2e-5
    "embedding_lr": 2e-5,
    "attend_padding": True,
    "head_schedule": "constant",
    "head_grad_clip": 10.0,
    "head_weight_average": True,
    "scenario.template": "authors",
    "scenario.split": "crl",
}

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
    "authors:fewrel": AUTHORS,
    "authors:tacred": AUTHORS,
    # the authors' behaviours at the fewrel-offline preset's CPU cost: one pool epoch,
    # one embedding epoch at a larger step
    "authors:fewrel-offline": {**AUTHORS, "epochs": 1, "batch_size": 32, "lr": 0.01,
                               **CPU_HEADS, "embedding_epochs": 1, "embedding_lr": 1e-4},
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
        if c.embedding_epochs < 0 or c.head_grad_clip < 0:
            raise UsageError("embedding_epochs and head_grad_clip must be >= 0")
        if c.attend_padding or c.embedding_epochs:
            if not isinstance(encoder, BertEncoder):
                raise UsageError(
                    "attend_padding and embedding_epochs need a BERT-family text backbone "
                    f"(got {type(encoder).__name__})"
                )
            encoder.attend_padding = c.attend_padding  # this run's encoder, every pass
            if c.embedding_epochs:
                # a module of the strategy, so checkpoints hold it and a resumed run has
                # the tuned layer; the encoder embeds with it from now on
                model.tuned_embeddings = encoder.marker_embeddings()
                encoder.use_embeddings(model.tuned_embeddings)
        model.pools = TaskPromptPools(
            self.num_task_slots(),
            # the whole-pool average reads the same pools of L-token prompts and keys
            variant="soft-tokens" if c.prompt_variant == "pool-average" else c.prompt_variant,
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

    def select_prompts(
        self, query: Tensor, task: TaskIndex, train: bool = False
    ) -> PromptSelection:
        """The prompt of each input from its task's pool, with the pull term."""
        if self.config.prompt_variant == "pool-average":
            return pool_average(self.model.pools, query, task)
        return self.model.pools(query, task=task, train=train)

    # -- training a task's pool (eq. 15) --------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        if task == 0 and self.config.embedding_epochs:
            self.tune_embeddings()
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

    def tune_embeddings(self) -> None:
        """The authors' task-1 representation learning (``embedding_epochs``): the tuned
        embedding layer and a fresh MLP, CE over all outputs, Adam, the pool's clip."""
        c, embeddings = self.config, self.model.tuned_embeddings
        head = self._make_head().to(self.device)  # used here only, as in their code
        parameters = [*embeddings.parameters(), *head.parameters()]
        embeddings.requires_grad_(True)
        embeddings.tuning = True  # BERT's embedding dropout, as their encoder.train()
        optimizer = torch.optim.Adam(parameters, lr=c.embedding_lr)
        loader = torch.utils.data.DataLoader(
            self.experience.dataset.train(),
            batch_size=c.batch_size,
            shuffle=True,
            num_workers=c.num_workers,
        )
        label = "training the marker and position embeddings (task 1)"
        for _ in track(range(c.embedding_epochs), label, unit="epochs"):
            for batch in loader:
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                with self.autocast():
                    logits = head(self.encoder(x, readout="pooled").pooled)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(parameters, c.grad_clip)
                optimizer.step()
        embeddings.tuning = False
        embeddings.requires_grad_(False)
        if len(self.query_cache):  # queries of the untuned layer are stale now
            self.query_cache.forget(self.query_cache.keys.clone())
        self.prompted_cache.clear()

    def train_logits(self, x: Tensor) -> TrainOutput:
        query = self.query(x)
        selection = self.select_prompts(query, self.current_task, train=True)
        logits = self.model.classifier(self.encoder(x, selection.prompt, readout="pooled").pooled)
        return TrainOutput(logits, self.config.pull_weight * selection.aux_loss)

    # -- end of task: Gaussians (eqs. 16-17), task predictor (18), classifier (19) ------
    def end_task(self, task: int, classes: list[int]) -> None:
        self.model.pools.end_task(task)  # P_t is final

        def prompted(x: Tensor, query: Tensor) -> Tensor:
            return self.encoder(x, self.select_prompts(query, task).prompt, readout="pooled").pooled

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
        if c.head_schedule != "cosine" or c.head_grad_clip > 0 or c.head_weight_average:
            self.fit_head_as_authors(head, features, classes)
            return
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

    def fit_head_as_authors(
        self, head: nn.Module, features: Literal["query", "prompted"], classes: list[int]
    ) -> None:
        """:meth:`fit_head` with the authors' schedule, clip and weight average options."""
        c, consolidation = self.config, self.consolidation
        statistics = (
            consolidation.query_statistics
            if features == "query"
            else consolidation.prompted_statistics
        )
        parameters = list(head.parameters())
        optimizer: torch.optim.Optimizer
        if c.head_optimizer == "adam":
            optimizer = torch.optim.Adam(parameters, lr=c.head_lr)
        else:
            optimizer = torch.optim.SGD(parameters, lr=c.head_lr, momentum=0.9)
        schedule = None
        if c.head_schedule == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(c.head_epochs, 1)
            )
        average = EpochWeightAverage(head, schedule) if c.head_weight_average else None
        fit_head(
            head,
            lambda: statistics.sample(classes, c.samples_per_class, device=self.device),
            optimizer,
            epochs=c.head_epochs,
            batch_size=c.head_batch_size,
            scheduler=average or schedule,
            allowed=self.seen_classes,
            grad_clip=c.head_grad_clip,
        )
        if average is not None:
            average.apply()

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
            selection = self.select_prompts(query[rows], tasks[rows])
            return self.encoder(x[rows], selection.prompt, readout="pooled").pooled

        if not self.config.prompted_cache:
            return compute(slice(None))
        slots = torch.stack([flat_parameters(pool.parameters()) for pool in pools.pools])
        tuned = getattr(self.model, "tuned_embeddings", None)
        shared = flat_parameters(tuned.parameters()) if tuned is not None else None
        self.prompted_cache.sync(slots, shared)
        return self.prompted_cache.features(x, tasks, compute)

    # -- checkpoints ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return self.consolidation.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.consolidation.load_state_dict(state)


def pool_average(pools: TaskPromptPools, query: Tensor, task: TaskIndex) -> PromptSelection:
    """The authors' code's prompt (``prompt_variant=pool-average``; hide-prompt-cre
    e5de6bb methods/prompt.py lines 39-60): w = softmax over all M cosines cos(q, k_m),
    prompt = (1/M) sum_m w_m P_m, L tokens; the top-K cosines only make the pull term.

    ``task`` an int: that task's pool for the batch; a tensor [B]: each input's own pool.
    """
    task_pools = pools.task_pools()
    if isinstance(task, int):
        keys = task_pools[task].keys.unsqueeze(0)  # [1, M, Dq]
        prompts = task_pools[task].prompts.unsqueeze(0)  # [1, M, L, D]
    elif isinstance(task, Tensor):
        keys = torch.stack([pool.keys for pool in task_pools])[task]  # [B, M, Dq]
        prompts = torch.stack([pool.prompts for pool in task_pools])[task]
    else:
        raise ValueError("a task's pool is chosen by its task: pass task=")
    similarity = (F.normalize(query, dim=-1).unsqueeze(1) * F.normalize(keys, dim=-1)).sum(-1)
    weights = similarity.softmax(dim=1)  # [B, M]
    tokens = (weights[:, :, None, None] * prompts).mean(dim=1)  # their 1/M included
    top = similarity.topk(task_pools[0].top_k, dim=1)
    pull = (1.0 - top.values).sum(dim=1).mean()
    return PromptSelection(Prompt(tokens=tokens), pull, top.indices)


class EpochWeightAverage:
    """The running mean of a module's weights after every epoch (SWA; the authors' SWAG
    sampled at scale 0). :func:`~clbench.consolidation.fit_head` steps its scheduler once
    per epoch: this object is that step (and steps ``schedule`` too, if any); ``apply``
    writes the mean into the module."""

    def __init__(self, module: nn.Module, schedule: Any = None) -> None:
        self.module = module
        self.schedule = schedule
        self.means = [parameter.detach().clone() for parameter in module.parameters()]
        self.count = 0

    @torch.no_grad()
    def step(self) -> None:
        if self.schedule is not None:
            self.schedule.step()
        self.count += 1
        for mean, parameter in zip(self.means, self.module.parameters()):
            mean += (parameter - mean) / self.count

    @torch.no_grad()
    def apply(self) -> None:
        if self.count:
            for mean, parameter in zip(self.means, self.module.parameters()):
                parameter.copy_(mean)
