"""The papers' ViT-B/16 weights: each publisher's file format mapped onto timm's ViT, strictly.

No weights can be downloaded here, so every format is written for a tiny ViT of the same
family (timm's VisionTransformer: the same key names as DINO's, iBOT's and MoCo v3's ViTs),
in the layout the real file has: DINO's backbone file and training checkpoint, iBOT's
checkpoint_teacher.pth and 22K checkpoint.pth, MoCo v3's vit-b-300ep.pth.tar and its DeiT
conversion, and the original ViT-B_16.npz of Google's JAX release.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models import get_pretrained_cfg

from clbench.encoders import checkpoints, zoo
from clbench.encoders.checkpoints import FORMAT_NAMES, load_vit_weights
from clbench.encoders.vit import ViTEncoder, create_vit
from clbench.encoders.zoo import (
    IMAGENET_MEAN,
    PAPER_VITS,
    PaperViTOptions,
    PaperWeights,
    checkpoint_folder,
    paper_vit,
)
from clbench.errors import UsageError
from clbench.registry import BACKBONES

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 4}
IMAGE = 32


def tiny_vit(seed: int) -> ViTEncoder:
    torch.manual_seed(seed)
    return create_vit("vit_base_patch16_224", pretrained=False, img_size=IMAGE, **TINY)


@pytest.fixture(scope="module")
def source() -> ViTEncoder:
    """The "pretrained" encoder whose weights every file below holds."""
    return tiny_vit(seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def projection_head(prefix: str) -> dict[str, torch.Tensor]:
    """A few entries of a self-supervised projection head (DINO / iBOT / MoCo)."""
    return {
        f"{prefix}mlp.0.weight": torch.randn(16, 32),
        f"{prefix}mlp.0.bias": torch.randn(16),
        f"{prefix}last_layer.weight_g": torch.ones(64, 1),
    }


def training_checkpoint(teacher: dict, student: dict) -> dict:
    """DINO's / iBOT's main script saves this: both networks, optimizer, epoch and args."""
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_base", patch_size=16, out_dim=8192),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


def real_format_files(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, object]]:
    """file name -> (format, what the publisher's file holds) for the encoder ``state``."""
    encoder = dict(state)
    student = {**prefixed(encoder, "module.backbone."), **projection_head("module.head.")}
    with_mask = {**encoder, "masked_embed": torch.zeros(1, 32)}
    moco = {
        **prefixed(encoder, "module.base_encoder."),
        "module.base_encoder.head.0.weight": torch.randn(16, 32),  # the projector MLP
        "module.base_encoder.head.1.running_mean": torch.zeros(16),
        **prefixed(encoder, "module.momentum_encoder."),
        "module.predictor.0.weight": torch.randn(16, 16),
    }
    return {
        # the released DINO backbone: timm's key names, no head
        "dino_vitbase16_pretrain.pth": ("dino", encoder),
        "dino_vitbase16_pretrain_full_checkpoint.pth": (
            "dino",
            training_checkpoint(
                {**prefixed(encoder, "backbone."), **projection_head("head.")}, student
            ),
        ),
        # iBOT-1K: the teacher alone, with DataParallel / wrapper prefixes and its head
        "checkpoint_teacher.pth": (
            "ibot",
            {
                "state_dict": {
                    **prefixed(with_mask, "module.backbone."),
                    **projection_head("module.head."),
                }
            },
        ),
        # iBOT-22K: the training checkpoint
        "checkpoint.pth": (
            "ibot",
            training_checkpoint(
                {**prefixed(with_mask, "backbone."), **projection_head("head.")}, student
            ),
        ),
        "vit-b-300ep.pth.tar": (
            "mocov3",
            {"epoch": 300, "arch": "vit_base", "state_dict": moco, "optimizer": {"state": {}}},
        ),
        # moco-v3's convert_to_deit.py output (the copy NoRGa's README links)
        "mocov3-vit-base-300ep.pth": ("mocov3", {"model": encoder}),
        "timm.pth": ("timm", {"model": {**encoder, "head.weight": torch.zeros(5, 32)}}),
    }


@pytest.mark.parametrize("name", sorted(real_format_files({})))
def test_each_publishers_format_loads_the_encoder_exactly(name, source, images, tmp_path):
    fmt, content = real_format_files(source.model.state_dict())[name]
    path = tmp_path / name
    torch.save(content, path)
    target = tiny_vit(seed=2)
    assert not torch.allclose(target(images).pooled, source(images).pooled)
    load_vit_weights(target.model, path, fmt)
    torch.testing.assert_close(target(images).pooled, source(images).pooled)
    assert not any(p.requires_grad for p in target.parameters())  # still frozen


def test_the_parts_left_out_are_said_by_name(source, tmp_path, monkeypatch):
    _, moco = real_format_files(source.model.state_dict())["vit-b-300ep.pth.tar"]
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(moco, path)
    lines = []
    monkeypatch.setattr(checkpoints.log, "info", lambda text, *args: lines.append(text % args))
    load_vit_weights(tiny_vit(0).model, path, "mocov3")
    (line,) = lines
    encoder = len(source.model.state_dict())
    assert f"loaded {encoder} encoder tensors; left out {encoder + 3} that are not" in line
    assert f"base_encoder.head.* (2), momentum_encoder.* ({encoder}), predictor.* (1)" in line


def test_a_missing_encoder_weight_is_named(source, tmp_path):
    state = {k: v for k, v in source.model.state_dict().items() if k != "blocks.1.mlp.fc2.bias"}
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\] \(1\)"):
        load_vit_weights(tiny_vit(0).model, path, "dino")


def test_an_unexpected_key_is_named_not_dropped(source, tmp_path):
    # a key no format knows (here a DINO file with an extra block) is an error
    state = {**source.model.state_dict(), "blocks.2.norm1.weight": torch.ones(32)}
    path = tmp_path / "dino.pth"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"unexpected keys \[blocks\.2\.norm1\.weight\]"):
        load_vit_weights(tiny_vit(0).model, path, "dino")


def test_a_file_in_another_layout_is_refused_with_the_format_to_use(source, tmp_path):
    _, moco = real_format_files(source.model.state_dict())["vit-b-300ep.pth.tar"]
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(moco, path)
    with pytest.raises(UsageError, match="checkpoint_format=mocov3") as error:
        load_vit_weights(tiny_vit(0).model, path, "timm")
    assert "missing keys [blocks.0.attn.proj.bias" in str(error.value)
    _, ibot = real_format_files(source.model.state_dict())["checkpoint.pth"]
    torch.save(ibot, path)
    with pytest.raises(UsageError, match="checkpoint_format=dino or backbone.checkpoint_format"):
        load_vit_weights(tiny_vit(0).model, path, "mocov3")


def test_shape_mismatch_and_bad_files_are_one_line_errors(source, tmp_path):
    wide = create_vit("vit_base_patch16_224", pretrained=False, img_size=IMAGE, **TINY | {
        "embed_dim": 64})  # fmt: skip
    path = tmp_path / "wide.pth"
    torch.save(wide.model.state_dict(), path)
    with pytest.raises(UsageError, match="file vs model shapes"):
        load_vit_weights(tiny_vit(0).model, path, "timm")
    torch.save([1, 2, 3], path)
    with pytest.raises(UsageError, match="holds a list, not a state dict"):
        load_vit_weights(tiny_vit(0).model, path, "timm")
    with pytest.raises(UsageError, match="does not exist"):
        load_vit_weights(tiny_vit(0).model, tmp_path / "absent.pth", "dino")
    with pytest.raises(UsageError, match="valid choices: timm, dino, ibot, mocov3"):
        load_vit_weights(tiny_vit(0).model, path, "deit")


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1)}, "hook": RunsCode(marker)}, path)
    with pytest.raises(UsageError, match="beyond tensors and plain data"):
        load_vit_weights(tiny_vit(0).model, path, "ibot")
    assert not marker.exists()


# -- the original ViT-B_16.npz (Google's JAX release): timm's converter, strictly -----


def jax_npz(encoder: ViTEncoder, *, drop: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of the original ImageNet-21k ViT-B_16.npz, for ``encoder``'s weights:
    the inverse of timm's JAX loader, with the 21k head and the pre-logits layer it has."""
    m: torch.nn.Module = encoder.model
    heads, width = encoder.num_heads, encoder.embed_dim

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().copy()

    w = {
        "embedding/kernel": a(m.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": a(m.patch_embed.proj.bias),
        "cls": a(m.cls_token),
        "Transformer/posembed_input/pos_embedding": a(m.pos_embed),
        "Transformer/encoder_norm/scale": a(m.norm.weight),
        "Transformer/encoder_norm/bias": a(m.norm.bias),
        "pre_logits/kernel": np.zeros((width, width), np.float32),
        "pre_logits/bias": np.zeros(width, np.float32),
        "head/kernel": np.zeros((width, 7), np.float32),
        "head/bias": np.zeros(7, np.float32),
    }
    for i, block in enumerate(m.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = (
            a(block.norm1.weight),
            a(block.norm1.bias),
        )
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = (
            a(block.norm2.weight),
            a(block.norm2.bias),
        )
        qkv_w = block.attn.qkv.weight.reshape(3, width, width)
        qkv_b = block.attn.qkv.bias.reshape(3, heads, width // heads)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{mha}{name}/kernel"] = a(qkv_w[j].T.reshape(width, heads, width // heads))
            w[f"{mha}{name}/bias"] = a(qkv_b[j])
        w[mha + "out/kernel"] = a(
            block.attn.proj.weight.reshape(width, heads, width // heads).permute(1, 2, 0)
        )
        w[mha + "out/bias"] = a(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = a(fc.weight.T)
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = a(fc.bias)
    if drop is not None:
        del w[drop]
    return w


def test_the_original_in21k_npz_loads_and_a_missing_array_is_an_error(source, images, tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    np.savez(path, **jax_npz(source))
    target = tiny_vit(seed=3)
    load_vit_weights(target.model, path, "timm")
    torch.testing.assert_close(target(images).pooled, source(images).pooled)
    np.savez(path, **jax_npz(source, drop="Transformer/encoderblock_1/LayerNorm_2/bias"))
    with pytest.raises(UsageError, match="does not match the model"):
        load_vit_weights(tiny_vit(0).model, path, "timm")
    with pytest.raises(UsageError, match="npz files are timm's JAX format, not dino"):
        load_vit_weights(tiny_vit(0).model, path, "dino")


# -- where a registered backbone's weights come from --------------------------------


def tiny_weights(**changes) -> PaperWeights:
    fields = {
        "timm_name": "vit_base_patch16_224.orig_in21k",
        "checkpoint_format": "timm",
        "files": ("ViT-B_16.npz", "model.safetensors"),
        "source": "https://example.org/ViT-B_16.npz",
        "model_kwargs": TINY,
    }
    return PaperWeights(**(fields | changes))


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_publishers_file_in_the_data_root_is_used(data_root, source, images):
    folder = checkpoint_folder("vit-b16-orig-in21k")
    assert folder == data_root / "checkpoints" / "vit-b16-orig-in21k"
    folder.mkdir(parents=True)
    np.savez(folder / "ViT-B_16.npz", **jax_npz(source))
    encoder = paper_vit("vit-b16-orig-in21k", tiny_weights(), PaperViTOptions(img_size=IMAGE))
    torch.testing.assert_close(encoder(images).pooled, source(images).pooled)
    assert encoder.mean == (0.5, 0.5, 0.5)  # the timm tag's own statistics


def test_an_explicit_file_and_format_win(data_root, source, images, tmp_path):
    fmt, moco = real_format_files(source.model.state_dict())["vit-b-300ep.pth.tar"]
    path = tmp_path / "elsewhere.pth.tar"
    torch.save(moco, path)
    weights = tiny_weights(
        timm_name="vit_base_patch16_224", checkpoint_format="mocov3", hub=False,
        mean=IMAGENET_MEAN, std=zoo.IMAGENET_STD,
    )  # fmt: skip
    options = PaperViTOptions(checkpoint=str(path), img_size=IMAGE)
    encoder = paper_vit("vit-b16-mocov3-in1k", weights, options)
    torch.testing.assert_close(encoder(images).pooled, source(images).pooled)
    assert encoder.mean == IMAGENET_MEAN and encoder.std == zoo.IMAGENET_STD
    with pytest.raises(UsageError, match="unexpected keys"):
        paper_vit("x", weights, PaperViTOptions(str(path), "dino", IMAGE))


def test_without_a_file_a_local_only_backbone_says_where_to_put_it(data_root):
    weights = tiny_weights(hub=False, files=("checkpoint_teacher.pth",))
    with pytest.raises(UsageError) as error:
        paper_vit("vit-b16-ibot-in1k", weights, PaperViTOptions(img_size=IMAGE))
    message = str(error.value)
    assert "checkpoint_teacher.pth (https://example.org/ViT-B_16.npz)" in message
    assert str(data_root / "checkpoints" / "vit-b16-ibot-in1k") in message
    assert "backbone.checkpoint=PATH" in message and "\n" not in message


def test_without_a_file_the_hub_is_asked_for_the_timm_tag(data_root, monkeypatch):
    calls = []

    def offline(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        raise OSError("no network")

    monkeypatch.setattr("clbench.encoders.vit.timm.create_model", offline)
    with pytest.raises(UsageError, match="could not fetch") as error:
        paper_vit("vit-b16-orig-in21k", tiny_weights(), PaperViTOptions(img_size=IMAGE))
    assert calls == [("vit_base_patch16_224.orig_in21k", True)]
    assert "or put ViT-B_16.npz or model.safetensors" in str(error.value)


def test_every_paper_backbone_is_registered_with_real_timm_weights():
    expected = {
        "vit-b16-orig-in21k", "vit-b16-augreg-in21k-ft-in1k", "vit-b16-augreg2-in21k-ft-in1k",
        "vit-b16-dino-in1k", "vit-b16-ibot-in1k", "vit-b16-ibot-in21k", "vit-b16-mocov3-in1k",
    }  # fmt: skip
    assert set(PAPER_VITS) == expected and expected <= set(BACKBONES.names())
    for name, (_, weights) in PAPER_VITS.items():
        assert BACKBONES.spec(name) is weights
        assert weights.checkpoint_format in FORMAT_NAMES and weights.files
        config = get_pretrained_cfg(weights.timm_name)
        assert config is not None, weights.timm_name
        if weights.hub:  # timm knows these weights on the hub under the tag
            assert config.hf_hub_id == f"timm/{weights.timm_name}"
        else:  # the self-supervised files: trained on ImageNet statistics
            assert weights.mean == IMAGENET_MEAN
    # no registered name extends another (the reference tables match a family by prefix)
    for name in BACKBONES.names():
        assert not any(other != name and other.startswith(name + "-") for other in expected)
    assert PAPER_VITS["vit-b16-orig-in21k"][1].timm_name.endswith(".orig_in21k")
    assert PAPER_VITS["vit-b16-augreg-in21k-ft-in1k"][1].timm_name.endswith("augreg_in21k_ft_in1k")
