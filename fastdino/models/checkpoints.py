"""Weights in and out: the public DINO release's checkpoints and timm's ViT state dicts.

Formats understood (the tests build each of them from the key list in DINO.md):

- a full release checkpoint: ``{"student": ..., "teacher": ..., "optimizer": ..., "epoch": ...,
  "args": argparse.Namespace, ...}``, where the networks' keys start with ``backbone.`` and
  ``head.``, and with ``module.`` before them for the DDP-wrapped student;
- a network state dict with ``backbone.`` / ``head.`` keys (``MultiCropWrapper.state_dict()``);
- a backbone-only state dict (``cls_token``, ``pos_embed``, ``blocks.0.norm1.weight``, ...): the
  release's ``*_pretrain.pth`` files, and timm's ViT with ``num_classes=0``;
- the head's weight-norm tensors under either key style (see ``convert_weight_norm_keys``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch
from torch import nn

from fastdino.runtime import unwrap_parallel

from .head import DINOHead, convert_weight_norm_keys
from .wrapper import MultiCropWrapper

CHECKPOINT_PARTS = ("teacher", "student")
_LISTED_KEYS = 25  # per category in an error message; the exception keeps them all


class StateDictMismatchError(ValueError):
    """A state dict does not fit a module. ``missing``, ``unexpected`` and ``mis_shaped`` (a list of
    (key, shape in the module, shape in the state dict)) hold every offending key."""

    def __init__(self, module_name: str, missing: list[str], unexpected: list[str],
                 mis_shaped: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        lines = [f"the state dict does not fit {module_name}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys"]
        for title, entries in (
            ("missing (in the model, not in the state dict)", missing),
            ("unexpected (in the state dict, not in the model)", unexpected),
            ("mis-shaped (model shape vs state-dict shape)",
             [f"{key}: {model_shape} vs {given_shape}" for key, model_shape, given_shape in mis_shaped]),
        ):
            if entries:
                lines.append(f"  {title}:")
                lines += [f"    {entry}" for entry in entries[:_LISTED_KEYS]]
                if len(entries) > _LISTED_KEYS:
                    lines.append(f"    ... and {len(entries) - _LISTED_KEYS} more")
        super().__init__("\n".join(lines))


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``StateDictMismatchError`` unless ``state_dict`` has exactly the module's keys and
    shapes (what ``load_state_dict(strict=True)`` needs), listing every offending key."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mis_shaped = [(key, tuple(expected[key].shape), tuple(state_dict[key].shape))
                  for key in expected
                  if key in state_dict and expected[key].shape != state_dict[key].shape]
    if missing or unexpected or mis_shaped:
        raise StateDictMismatchError(type(module).__name__, missing, unexpected, mis_shaped)


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict:
    """``torch.load`` a checkpoint file onto the CPU.

    weights_only=True (the default) unpickles tensors and plain containers only, plus the
    ``argparse.Namespace`` the release stores as ``args``; pass False only for files you trust.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def select_state_dict(checkpoint: Mapping, part: str = "teacher",
                      component: str = "backbone") -> dict[str, torch.Tensor]:
    """The state dict of one network component inside any of the formats above.

    part: "teacher" or "student", used when ``checkpoint`` is a full release checkpoint.
    component: "backbone" or "head" (keys returned without their prefix), or "network" (keys
    with their ``backbone.`` / ``head.`` prefixes, for a ``MultiCropWrapper``). ``module.``
    prefixes are removed in every case.
    """
    if part not in CHECKPOINT_PARTS:
        raise ValueError(f"part={part!r}: choose one of {CHECKPOINT_PARTS}")
    if component not in ("backbone", "head", "network"):
        raise ValueError(f"component={component!r}: choose 'backbone', 'head' or 'network'")
    if any(name in checkpoint for name in CHECKPOINT_PARTS):
        if part not in checkpoint:
            raise KeyError(f"the checkpoint has no {part!r} entry; its top-level keys are "
                           f"{sorted(checkpoint)}")
        checkpoint = checkpoint[part]
    state = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    if not any(key.startswith("backbone.") for key in state):  # a backbone-only state dict
        if component != "backbone":
            raise ValueError(f"component={component!r}, but the state dict holds only a "
                             f"backbone (no 'backbone.'-prefixed keys)")
        return state
    if component == "network":
        return state
    prefix = component + "."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def load_dino_checkpoint(target: nn.Module, checkpoint: Mapping | str | os.PathLike,
                         part: str = "teacher") -> None:
    """Load release-format weights into ``target``, strictly.

    target: a ``MultiCropWrapper`` (backbone and head), a ``DINOHead``, or a backbone, possibly
    DDP-wrapped.
    checkpoint: a path, or an already loaded object in any format of this module's docstring;
    ``part`` chooses "teacher" (the release's evaluation weights) or "student" in a full one.
    Raises ``StateDictMismatchError`` listing missing, unexpected and mis-shaped keys.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    target = unwrap_parallel(target)
    if isinstance(target, MultiCropWrapper):
        component = "network"
    elif isinstance(target, DINOHead):
        component = "head"
    else:
        component = "backbone"
    state = convert_weight_norm_keys(select_state_dict(checkpoint, part, component), "release")
    check_state_dict(target, state)
    target.load_state_dict(state, strict=True)


def export_backbone_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights with the keys of timm's ViT (``num_classes=0``) and of the release's
    backbone files: loads with ``strict=True`` into ``timm.create_model("vit_small_patch8_224",
    num_classes=0)`` (same shape) and into the release's ``vit_small``.

    network: a ``MultiCropWrapper`` (usually the teacher), possibly DDP-wrapped, or a backbone.
    The tensors are detached copies, safe to save while training goes on.
    """
    network = unwrap_parallel(network)
    backbone = network.backbone if isinstance(network, MultiCropWrapper) else network
    return {key: value.detach().clone() for key, value in backbone.state_dict().items()}


def export_dino_checkpoint(student: nn.Module, teacher: nn.Module, **extra) -> dict:
    """A checkpoint in the release's layout: ``{"student": {"module.backbone...", "module.head..."},
    "teacher": {"backbone...", "head..."}, **extra}`` (e.g. epoch=..., optimizer=...), which the
    release's evaluation scripts and ``load_dino_checkpoint`` read. Head keys use the release's
    weight-norm style. student, teacher: ``MultiCropWrapper``s, possibly DDP-wrapped.
    """
    student_state = {"module." + key: value for key, value in unwrap_parallel(student).state_dict().items()}
    return {"student": student_state, "teacher": dict(unwrap_parallel(teacher).state_dict()), **extra}
