"""A frozen backbone from any checkpoint file fastdino knows, for evaluation and visualization.

Files understood (see ``fastdino.models.checkpoints``): fastdino training checkpoints and the
release's full checkpoints (``student`` / ``teacher`` networks with ``backbone.`` / ``head.``
keys), network state dicts, and backbone-only state dicts (the release's ``*_pretrain.pth``,
timm's ViTs with ``num_classes=0``, ``export_backbone_state_dict``).

The architecture is a ``list_backbones()`` name given by the caller, or read off the state dict:
embed dim and patch size from ``patch_embed.proj.weight``, depth from the ``blocks.N.`` keys,
and the image size the position embeddings were laid out for from ``pos_embed``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastdino.models import (
    StateDictMismatchError,
    check_state_dict,
    create_backbone,
    list_backbones,
    read_checkpoint,
    select_state_dict,
)
from fastdino.models.checkpoints import CHECKPOINT_PARTS

# A key only torchvision/timm ResNets have: the last bottleneck of stage 4.
_RESNET50_KEY = "layer4.2.conv3.weight"
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


class LoadedBackbone(NamedTuple):
    model: nn.Module  # in eval mode, parameters frozen, on the CPU
    arch: str  # its list_backbones() name


class ArchitectureInferenceError(ValueError):
    """The architecture of a state dict could not be determined; pass ``arch`` explicitly."""


@functools.cache
def _vit_signatures() -> dict[tuple[int, int, int, int], str]:
    """(embed_dim, depth, patch_size, register tokens) -> backbone name, for every ViT in the registry."""
    signatures = {}
    for name in list_backbones():
        if not name.startswith("vit_"):
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            model = create_backbone(name)
        signatures[(model.embed_dim, len(model.blocks), model.patch_size, _register_tokens(model.state_dict()))] = name
    return signatures


def _register_tokens(state_dict: Mapping[str, torch.Tensor]) -> int:
    tokens = state_dict.get("register_tokens")
    return 0 if tokens is None else tokens.shape[1]


def vit_image_size(state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    """Side of the square image the ViT's ``pos_embed`` was laid out for (grid x patch size)."""
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    positions = state_dict["pos_embed"].shape[1] - 1  # minus the CLS entry
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ArchitectureInferenceError(
            f"{source}: pos_embed has {positions} patch positions, not a square grid")
    return grid * patch_size


def infer_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> str:
    """The ``list_backbones()`` name whose parameters have the shapes of ``state_dict`` (a
    backbone-only state dict). ``source`` names the file in error messages."""
    if _RESNET50_KEY in state_dict:
        return "resnet50"
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        shown = sorted(state_dict)[:8]
        raise ArchitectureInferenceError(
            f"{source}: cannot infer the architecture: no 'patch_embed.proj.weight'/'pos_embed' "
            f"(a ViT) nor {_RESNET50_KEY!r} (a ResNet-50) among its {len(state_dict)} backbone "
            f"keys (first ones: {shown}); pass the architecture with --arch")
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max((int(match.group(1)) for key in state_dict
                     if (match := _BLOCK_INDEX.match(key))), default=-1)
    registers = _register_tokens(state_dict)
    name = _vit_signatures().get((embed_dim, depth, patch_size, registers))
    if name is None:
        known = ", ".join(f"{arch} (dim {dim}, depth {blocks}, patch {patch}, {tokens} registers)"
                          for (dim, blocks, patch, tokens), arch in sorted(_vit_signatures().items(),
                                                                           key=lambda item: item[1]))
        raise ArchitectureInferenceError(
            f"{source}: a ViT with embed dim {embed_dim}, depth {depth}, patch size {patch_size} and "
            f"{registers} register tokens is none of the known backbones: {known}")
    return name


def backbone_state_dict(checkpoint: object, part: str, source: str) -> dict[str, torch.Tensor]:
    """The backbone weights inside a loaded checkpoint of any supported format."""
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"{source}: expected a checkpoint dict, got {type(checkpoint).__name__}"
                         f"{' (empty)' if isinstance(checkpoint, Mapping) else ''}")
    try:
        state = select_state_dict(checkpoint, part=part, component="backbone")
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: not a state dict: entries {not_tensors[:5]} are not tensors "
                         f"(top-level keys: {sorted(checkpoint)[:10]})")
    return state


def load_backbone(checkpoint_path: str | os.PathLike, arch: str | None = None,
                  part: str = "teacher") -> LoadedBackbone:
    """The backbone stored in ``checkpoint_path``, loaded strictly, in eval mode and frozen.

    arch: a ``list_backbones()`` name; None infers it from the state dict's shapes. A ViT is built
    for the image size its position embeddings were saved at (other sizes interpolate them).
    part: "teacher" (the release evaluates the teacher) or "student", for files that hold both.
    Raises FileNotFoundError, ``ArchitectureInferenceError`` or ``StateDictMismatchError``, each
    naming the file.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    if part not in CHECKPOINT_PARTS:
        raise ValueError(f"part={part!r}: choose one of {CHECKPOINT_PARTS}")
    try:
        checkpoint = read_checkpoint(path)
    except Exception as error:  # not a torch file, truncated, or pickled objects we do not trust
        raise ValueError(f"checkpoint {str(path)!r} could not be read by torch.load "
                         f"({type(error).__name__}: {error})") from error
    state = backbone_state_dict(checkpoint, part, repr(str(path)))
    if arch is None:
        arch = infer_architecture(state, repr(str(path)))
    elif arch not in list_backbones():
        raise ValueError(f"--arch {arch!r} is not a known backbone; choose one of {list_backbones()}")
    kwargs = {}
    if "pos_embed" in state:  # a ViT: its grid, and a mask token where it was trained with one (DINOv2)
        kwargs = {"img_size": vit_image_size(state, repr(str(path))), "mask_token": "mask_token" in state}
    model = create_backbone(arch, **kwargs)
    try:
        check_state_dict(model, state)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{arch} (checkpoint {str(path)!r})", error.missing,
                                     error.unexpected, error.mis_shaped) from None
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return LoadedBackbone(model, arch)

