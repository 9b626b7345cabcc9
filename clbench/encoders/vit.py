"""Promptable adapter for timm Vision Transformers (any timm 1.x ViT, any width)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from clbench.encoders.attention import PrefixGate, prompted_attention
from clbench.encoders.base import PromptableEncoder
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

    def run_block(
        self,
        index: int,
        hidden: Tensor,
        context: Any,
        prefix: Tensor | None,
        gate: PrefixGate | None,
    ) -> Tensor:
        block: Any = self.model.blocks[index]  # a timm Block (nn.Module attributes are untyped)
        attn = block.attn
        normed = block.norm1(hidden)
        batch, length, _ = normed.shape
        qkv = attn.qkv(normed).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = prompted_attention(q, k, v, prefix=prefix, gate=gate)
        out = attn.norm(out.transpose(1, 2).reshape(batch, length, -1))
        if getattr(attn, "gate", None) is not None:  # timm's own output gate, if the model has one
            out = out * attn.gate(normed).sigmoid()
        hidden = hidden + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
        return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))

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
    """Load a local weights file into ``model``; every key must match.

    timm's own pretrained loader only warns about unexpected keys, which turns a wrong
    checkpoint into a silently half-random model; here it is an error. Accepted: a plain
    state dict or one under "model" / "state_dict" (torch, safetensors), timm's .npz
    format, with timm's ViT conversions (e.g. position-embedding resizing) applied. The
    classifier head is dropped on purpose: a frozen encoder has no head.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not path.is_file():
        raise UsageError(f"ViT checkpoint {path} does not exist (backbone.checkpoint)")
    if path.suffix == ".npz":
        model.load_pretrained(str(path))  # timm's strict JAX-format loader
        return
    state: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise UsageError(f"checkpoint {path} does not match the model: {error}") from error
    if missing or unexpected:
        raise UsageError(
            f"checkpoint {path} does not match the model: missing keys {_preview(missing)}, "
            f"unexpected keys {_preview(unexpected)}"
        )


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
