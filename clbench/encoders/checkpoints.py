"""Weights files in their publishers' formats, mapped onto timm's ViT and loaded strictly.

The self-supervised ViT-B/16 checkpoints of NoRGa's and HiDe-Prompt's tables are not timm
files: each publisher stores its encoder under its own prefixes, beside parts that are not
the encoder (projection heads, a momentum encoder, a mask token). A format here names
those parts explicitly and leaves them out; every other key must be an encoder weight of
the model, and every encoder weight of the model must be in the file. Anything else is an
error that names the keys, never a partially random encoder (the authors' loaders delete
whatever does not match and load the rest: MoE_PromptCL ``vits/*_vision_transformer.py``).

Formats (``backbone.checkpoint_format``):

* ``timm``: a timm / plain state dict, possibly under ``model`` or ``state_dict`` and with
  DataParallel's ``module.`` prefix, or timm's JAX ``.npz`` (the original ``ViT-B_16.npz``
  of L2P, DualPrompt, HiDe-Prompt and NoRGa; the augreg files). A classifier head
  (``head.*``) and timm's unused representation layer (``pre_logits``) are left out.
* ``dino``: DINO's released backbone file ``dino_vitbase16_pretrain.pth`` (timm's key
  names, no head), or a full DINO training checkpoint, whose ``teacher`` holds
  ``backbone.*`` and the DINO projection head ``head.*``.
* ``ibot``: iBOT's ``checkpoint_teacher.pth`` (``{"state_dict": ...}``, ImageNet-1K) or
  ``checkpoint.pth`` (a training checkpoint, ``{"teacher": ...}``, ImageNet-22K), with
  ``module.`` / ``backbone.`` prefixes, the iBOT head ``head.*`` and the masked-image
  token ``masked_embed``.
* ``mocov3``: MoCo v3's released ``vit-b-300ep.pth.tar`` (``{"state_dict": ...}`` with
  ``module.base_encoder.*``, ``module.momentum_encoder.*`` and ``module.predictor.*``; the
  base encoder is used and its projection MLP ``head.*`` left out), or the file MoCo v3's
  ``convert_to_deit.py`` writes (``{"model": ...}``, timm's key names).
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clbench.errors import UsageError

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Extracted:
    """The encoder's entries of a checkpoint, and the non-encoder keys a format left out."""

    state: StateDict
    left_out: list[str]


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    description: str
    extract: Callable[[Any], Extracted]


def _unwrap(raw: Any, *wrappers: str) -> Any:
    for wrapper in wrappers:
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            return raw[wrapper]
    return raw


def _strip(state: dict[str, Any], *prefixes: str) -> dict[str, Any]:
    """Remove each prefix (in order) from the keys that carry it."""
    for prefix in prefixes:
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _split(state: dict[str, Any], is_left_out: Callable[[str], bool]) -> Extracted:
    kept = {key: value for key, value in state.items() if not is_left_out(key)}
    return Extracted(kept, sorted(key for key in state if is_left_out(key)))


def _is_head(key: str) -> bool:
    return key.startswith("head.")


def _timm(raw: Any) -> Extracted:
    state = _strip(_unwrap(raw, "model", "state_dict"), "module.")
    return _split(state, _is_head)  # a frozen encoder has no classifier


def _dino(raw: Any) -> Extracted:
    # The teacher is the network DINO evaluates (its load_pretrained_weights default).
    state = _strip(_unwrap(raw, "teacher"), "module.", "backbone.")
    return _split(state, _is_head)


def _ibot(raw: Any) -> Extracted:
    state = _strip(_unwrap(raw, "state_dict", "teacher"), "module.", "backbone.")
    return _split(state, lambda key: _is_head(key) or key == "masked_embed")


MOCO_ENCODER = "base_encoder."
MOCO_OTHER_PARTS = ("momentum_encoder.", "predictor.")


def _mocov3(raw: Any) -> Extracted:
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):  # convert_to_deit.py
        return _split(_strip(raw["model"], "module."), _is_head)
    state = _strip(_unwrap(raw, "state_dict"), "module.")
    if not any(key.startswith(MOCO_ENCODER) for key in state):
        return Extracted(state, [])  # not MoCo v3's layout: the strict check names the keys
    left_out = [key for key in state if key.startswith(MOCO_OTHER_PARTS)]
    encoder = {k: v for k, v in state.items() if not k.startswith(MOCO_OTHER_PARTS)}
    extracted = _split(_strip(encoder, MOCO_ENCODER), _is_head)
    heads = [MOCO_ENCODER + key for key in extracted.left_out]
    return Extracted(extracted.state, sorted(left_out + heads))


FORMATS: dict[str, CheckpointFormat] = {
    f.name: f
    for f in (
        CheckpointFormat("timm", "timm / plain state dict or JAX .npz", _timm),
        CheckpointFormat("dino", "DINO backbone file or training checkpoint (teacher)", _dino),
        CheckpointFormat("ibot", "iBOT checkpoint_teacher.pth or checkpoint.pth", _ibot),
        CheckpointFormat("mocov3", "MoCo v3 vit-b-300ep.pth.tar or its DeiT conversion", _mocov3),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)

# What a refused file's unexpected keys suggest it is: (test, the formats that read it).
_SIGNATURES: tuple[tuple[Callable[[list[str]], bool], tuple[str, ...]], ...] = (
    (lambda keys: any(MOCO_ENCODER in key for key in keys), ("mocov3",)),
    (lambda keys: any(key.endswith("masked_embed") for key in keys), ("ibot",)),
    (lambda keys: any(key == "teacher" or "backbone." in key for key in keys), ("dino", "ibot")),
)


def checkpoint_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise UsageError(
            f"unknown checkpoint format {name!r}; valid choices: {', '.join(FORMAT_NAMES)}"
        )
    return FORMATS[name]


def read_weights_file(path: Path) -> Any:
    """The object stored in a .pth / .pth.tar / .bin / .safetensors file.

    torch files load with ``weights_only=True``: tensors and plain data only, so a file
    that would run code is refused. The training checkpoints of DINO and iBOT also store
    their ``argparse.Namespace`` of arguments, which is allowed for that reason alone.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "refused"
        raise UsageError(
            f"checkpoint {path} holds Python objects beyond tensors and plain data "
            f"({first_line}); load it in a trusted session and save its state dict with "
            "torch.save(state_dict, FILE)"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise UsageError(f"checkpoint {path} is not a readable torch file ({error})") from None


def load_vit_weights(model: nn.Module, path: Path, format_name: str = "timm") -> None:
    """Load the encoder weights of ``path`` (in ``format_name``) into a timm ViT, strictly.

    timm's ViT conversions apply (position embeddings resized to the model's grid, a
    linear patch embedding reshaped), as timm's own pretrained loader applies them.
    """
    fmt = checkpoint_format(format_name)
    if not path.is_file():
        raise UsageError(f"ViT checkpoint {path} does not exist (backbone.checkpoint)")
    if path.suffix == ".npz":
        _load_npz(model, path, fmt)
        return
    raw = read_weights_file(path)
    if not isinstance(raw, dict):
        raise UsageError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    extracted = fmt.extract(raw)
    state = _timm_conversions(extracted.state, model)
    _check_keys(model, state, path, fmt)
    _check_shapes(model, state, path)
    model.load_state_dict(state, strict=True)
    if extracted.left_out:
        log.info(
            "%s (%s format): loaded %d encoder tensors; left out %d that are not the "
            "encoder: %s",
            path.name, fmt.name, len(state), len(extracted.left_out),
            _groups(extracted.left_out),
        )  # fmt: skip


def _load_npz(model: nn.Module, path: Path, fmt: CheckpointFormat) -> None:
    if fmt.name != "timm":
        raise UsageError(f"{path}: .npz files are timm's JAX format, not {fmt.name}")
    load_pretrained: Any = getattr(model, "load_pretrained", None)
    if load_pretrained is None:
        raise UsageError(f"{path}: this model cannot read .npz weights")
    try:
        # timm's JAX loader reads every encoder array by name (a missing one is a KeyError)
        # and ignores the rest (the 21k head, the pre-logits representation layer).
        load_pretrained(str(path))
    except (KeyError, ValueError, RuntimeError) as error:
        raise UsageError(f"checkpoint {path} does not match the model: {error}") from None


def _timm_conversions(state: StateDict, model: nn.Module) -> StateDict:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return state
    return checkpoint_filter_fn(state, model)


def _check_keys(model: nn.Module, state: StateDict, path: Path, fmt: CheckpointFormat) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not (missing or unexpected):
        return
    hint = ""
    readers = next((names for test, names in _SIGNATURES if test(unexpected)), ())
    if readers and fmt.name not in readers:
        choices = " or ".join(f"backbone.checkpoint_format={name}" for name in readers)
        hint = f"; its keys look like another publisher's layout: try {choices}"
    raise UsageError(
        f"checkpoint {path} ({fmt.name} format) does not match the model: missing keys "
        f"{_preview(missing)}, unexpected keys {_preview(unexpected)}{hint}"
    )


def _check_shapes(model: nn.Module, state: StateDict, path: Path) -> None:
    expected = model.state_dict()
    wrong = [
        f"{key} {tuple(getattr(value, 'shape', ()))} vs {tuple(expected[key].shape)}"
        for key, value in state.items()
        if tuple(getattr(value, "shape", ())) != tuple(expected[key].shape)
    ]
    if wrong:
        raise UsageError(
            f"checkpoint {path} does not match the model (file vs model shapes): {_preview(wrong)}"
        )


def _groups(keys: list[str]) -> str:
    """``momentum_encoder.* (150), base_encoder.head.* (2), masked_embed (1)``."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        cut = parts.index("head") + 1 if "head" in parts else 1
        counts[".".join(parts[:cut]) + (".*" if len(parts) > cut else "")] += 1
    return ", ".join(f"{label} ({n})" for label, n in sorted(counts.items()))


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
