"""L2P: Learning to Prompt for Continual Learning (Wang et al., CVPR 2022).

A pool of M prompts with learnable keys sits before a frozen encoder. The encoder's own
un-prompted feature is the query; the N keys most cosine-similar to it pick N prompts of
length Lp, prepended as tokens at the input. The classifier reads the mean of the prompt
tokens' final states (the paper's choice; ``head_input=pooled`` reads the encoder's pooled
feature instead, e.g. the entity markers for relation extraction). Loss = CE over the
current task's classes + lambda * sum_k (1 - cos(q, k)) pulling the chosen keys to the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from clbench.config import option
from clbench.prompts import PromptPool
from clbench.registry import STRATEGIES
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel, TrainOutput


@dataclass
class L2PConfig(StrategyConfig):
    pool_size: int = option(10, "prompts in the pool", symbol="M")
    prompt_length: int = option(5, "tokens per prompt", symbol="L_p")
    top_k: int = option(5, "prompts chosen per input", symbol="N")
    pull_weight: float = option(0.1, "weight of the key-query pull term", symbol="lambda")
    batchwise_selection: bool = option(
        False, "every input of a batch uses the batch's most chosen prompts (L2P's option)"
    )
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")
    head_input: Literal["prompt_mean", "pooled"] = option(
        "prompt_mean", "classifier input: mean of the prompt tokens' states, or the pooled feature"
    )
    # the authors' settings: Adam, lr 0.03 at batch 128 (0.03 x batch / 256 scaling), 5 epochs
    lr: float = option(0.03, "learning rate of prompts, keys and head", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")


@STRATEGIES.register(
    "l2p", "Learning to Prompt: prompt pool with learnable keys, top-N prompt tokens at the input"
)
class L2P(CLStrategy):
    Config = L2PConfig
    presets = {
        # one epoch; on fewrel-offline a subset of the data (QUICK_DATA)
        "quick": {"epochs": 1, "batch_size": 32, **QUICK_DATA},
        "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01, "head_input": "pooled"},
        # a random tiny ViT: its prompt-token states carry little of the image, so the
        # classifier reads the [CLS] feature
        "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01, "head_input": "pooled"},
    }
    config: L2PConfig

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        model.prompt_pool = PromptPool(
            c.pool_size,
            c.prompt_length,
            c.top_k,
            encoder.embed_dim,
            encoder.feature_dim,
            mode="tokens",
            batchwise_selection=c.batchwise_selection,
        )
        head_dim = encoder.embed_dim if c.head_input == "prompt_mean" else encoder.feature_dim
        model.head = nn.Linear(head_dim, self.num_classes)

    def _forward(self, x: Tensor, train: bool) -> TrainOutput:
        query = self.query(x)  # the same frozen encoder, no prompt, no grad
        selection = self.model.prompt_pool(query, train=train)
        output = self.encoder(x, selection.prompt)
        if self.config.head_input == "prompt_mean":
            features = output.prompt_token_states().mean(dim=1)
        else:
            features = output.pooled
        aux_loss = self.config.pull_weight * selection.aux_loss
        return TrainOutput(self.model.head(features), aux_loss)

    def train_logits(self, x: Tensor) -> TrainOutput:
        return self._forward(x, train=True)

    def predict(self, x: Tensor) -> Tensor:
        return self._forward(x, train=False).logits
