"""Promptable adapter for timm Vision Transformers (any timm 1.x ViT, any width)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from clbench.encoders.attention import LayerPrompt, join, prompted_attention
from clbench.encoders.base import OutputRows, PromptableEncoder, Readout
from clbench.encoders.checkpoints import load_vit_weights
from clbench.encoders.deltas import MLP_TARGETS, QKV, LayerDelta, check_target, project
from clbench.errors import UsageError


class ViTEncoder(PromptableEncoder):
    """Wraps a timm ``VisionTransformer``; pooled feature = timm's own pre-logits feature."""

    modality = "vision"

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise UsageError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        self.model = model
        self.embed_dim = model.embed_dim
        self.num_layers = len(model.blocks)
        first_attention: Any = model.blocks[0].attn  # nn.Module attributes are untyped
        self.num_heads = first_attention.num_heads
        self.feature_dim = model.num_features
        self.num_leading_tokens = model.num_prefix_tokens
        config: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
        self.input_size = (3, *model.patch_embed.img_size)
        self.mean = tuple(config.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(config.get("std", (0.5, 0.5, 0.5)))
        self.freeze()

    @property
    def blocks(self) -> Any:
        return self.model.blocks

    def embed(self, x: Tensor) -> tuple[Tensor, Any]:
        m = self.model
        hidden = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return hidden, None

    def output_rows(
        self, context: Any, num_prompt_tokens: int, readout: Readout
    ) -> OutputRows | None:
        model = self.model
        if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
            return None  # an average or attention pool reads every token
        # timm's token pool reads [CLS]: the leading tokens, then the prompt tokens if asked
        kept_prompt = num_prompt_tokens if readout == "prompt" else 0
        return OutputRows(
            leading=self.num_leading_tokens + kept_prompt,
            context=context,
            num_prompt_tokens=kept_prompt,
        )

    def run_block(
        self,
        index: int,
        hidden: Tensor,
        context: Any,
        layer: LayerPrompt,
        rows: OutputRows | None = None,
    ) -> Tensor:
        block: Any = self.model.blocks[index]  # a timm Block (nn.Module attributes are untyped)
        attn, delta = block.attn, layer.delta
        normed = block.norm1(hidden)
        q, k, v = self._query_key_value(block, normed, delta)
        if rows is not None:  # keys and values from every token, the rest for the kept rows
            q, hidden, normed = rows.take(q, 2), rows.take(hidden, 1), rows.take(normed, 1)
        batch, length, _ = normed.shape
        prefix = layer.prefix
        if layer.kv_tokens is not None:
            tokens = layer.kv_tokens.to(hidden.dtype)
            prefix = join(prefix, self._key_value_prefix(block, tokens, delta), dim=2)
        out = prompted_attention(q, k, v, prefix=prefix, gate=layer.gate)
        out = attn.norm(out.transpose(1, 2).reshape(batch, length, -1))
        if getattr(attn, "gate", None) is not None:  # timm's own output gate, if the model has one
            out = out * attn.gate(normed).sigmoid()
        out = project(attn.proj, out, delta, "o")
        hidden = hidden + block.drop_path1(block.ls1(attn.proj_drop(out)))
        if delta is not None and delta.touches(MLP_TARGETS):
            mlp_out = self._adapted_mlp(block.mlp, block.norm2(hidden), delta)
        else:
            mlp_out = block.mlp(block.norm2(hidden))
        return hidden + block.drop_path2(block.ls2(mlp_out))

    @staticmethod
    def _query_key_value(
        block: Any, normed: Tensor, delta: LayerDelta | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, N, dh] from timm's fused qkv (each third with its own delta)."""
        attn = block.attn
        length = normed.shape[1]
        if delta is None or not delta.touches(QKV):
            qkv = attn.qkv(normed)
        else:
            qkv = delta.project_fused(attn.qkv, normed, QKV)
        qkv = qkv.reshape(qkv.shape[0], length, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _key_value_prefix(self, block: Any, tokens: Tensor, delta: LayerDelta | None) -> Tensor:
        """Key/value-only tokens [b, Lk, D] -> prefix [b, 2, Lk, D] through the block's
        own norm1, qkv (k / v thirds, their deltas) and k_norm: exactly what the block
        computes for a VPT-deep prompt token inserted into its input."""
        _, keys, values = self._query_key_value(block, block.norm1(tokens), delta)
        b, _, lk, _ = keys.shape
        # [b, H, Lk, dh] -> [b, Lk, D]: split_prefix re-splits D into heads the same way
        keys = keys.transpose(1, 2).reshape(b, lk, -1)
        values = values.transpose(1, 2).reshape(b, lk, -1)
        return torch.stack([keys, values], dim=1)

    @staticmethod
    def _adapted_mlp(mlp: Any, x: Tensor, delta: LayerDelta) -> Tensor:
        """timm's ``Mlp.forward`` written out, so fc1 / fc2 take their deltas."""
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if (
            not isinstance(mlp, Mlp)
            or not isinstance(fc1, nn.Linear)
            or not isinstance(fc2, nn.Linear)
        ):
            raise UsageError(
                f"fc1 / fc2 deltas need timm's Mlp with Linear layers in every block; this "
                f"model has {type(mlp).__name__} (adapt q, k, v or o instead)"
            )
        x = mlp.drop1(mlp.act(project(fc1, x, delta, "fc1")))
        return mlp.drop2(project(fc2, mlp.norm(x), delta, "fc2"))

    def projection_weight(self, index: int, target: str) -> Tensor:
        check_target(target)
        block: Any = self.model.blocks[index]
        if target in QKV:
            width = block.attn.qkv.out_features // 3
            start = QKV.index(target) * width
            return block.attn.qkv.weight.detach()[start : start + width]
        if target == "o":
            return block.attn.proj.weight.detach()
        if not isinstance(block.mlp, Mlp):
            raise UsageError(f"{type(block.mlp).__name__} has no fc1 / fc2 to adapt")
        return getattr(block.mlp, target).weight.detach()

    def finish(self, hidden: Tensor) -> Tensor:
        return self.model.norm(hidden)

    def pool(self, hidden: Tensor, context: Any, num_prompt_tokens: int) -> Tensor:
        if num_prompt_tokens:  # timm's pooling must not see the prompt tokens
            lead = self.num_leading_tokens
            hidden = hidden[:, [*range(lead), *range(lead + num_prompt_tokens, hidden.shape[1])]]
        return self.model.forward_head(hidden, pre_logits=True)


def create_vit(
    model_name: str,
    *,
    pretrained: bool,
    checkpoint: str | None = None,
    img_size: int | None = None,
    **model_kwargs: Any,
) -> ViTEncoder:
    """A timm ViT by name: random, from the hub (``pretrained``) or from a local file.

    A local checkpoint is loaded through timm's own pretrained-weights path (so timm's
    format conversions apply) with strict key matching: a checkpoint whose keys do not
    match is an error, never a partially random model.
    """
    kwargs: dict[str, Any] = dict(model_kwargs, num_classes=0)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model: Any  # a VisionTransformer for every ViT name (ViTEncoder checks)
    if checkpoint is not None:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        load_checkpoint_strictly(model, Path(checkpoint).expanduser())
        return ViTEncoder(model)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        if pretrained:
            raise UsageError(
                f"could not fetch pretrained weights for {model_name} from the hub ({error}); "
                "offline, download them elsewhere and pass backbone.checkpoint=PATH"
            ) from error
        raise
    return ViTEncoder(model)


def load_checkpoint_strictly(model: VisionTransformer, path: Path) -> None:
    """Load a local timm-format weights file into ``model``; every key must match.

    timm's own pretrained loader only warns about unexpected keys, which turns a wrong
    checkpoint into a silently half-random model; here it is an error. The formats and
    the checks are :mod:`clbench.encoders.checkpoints` (other publishers' layouts too).
    """
    load_vit_weights(model, path, "timm")
