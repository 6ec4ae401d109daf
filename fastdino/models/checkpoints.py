"""Weights in and out: the public DINO and DINOv2 releases' checkpoints and timm's ViT state dicts.

Formats understood (the tests build each of them from the key lists in DINO.md and DINOV2.md):

- a full release checkpoint: ``{"student": ..., "teacher": ..., "optimizer": ..., "epoch": ...,
  "args": argparse.Namespace, ...}``, where the networks' keys start with ``backbone.`` and
  ``head.``, and with ``module.`` before them for the DDP-wrapped student;
- a network state dict with ``backbone.`` / ``head.`` keys (``MultiCropWrapper.state_dict()``);
- a backbone-only state dict (``cls_token``, ``pos_embed``, ``blocks.0.norm1.weight``, ...): the
  release's ``*_pretrain.pth`` files, and timm's ViT with ``num_classes=0``;
- DINOv2's backbone layouts, converted by ``convert_backbone_state_dict``: its public
  ``dinov2_vit*14[_reg4]_pretrain.pth`` files (the plain layout fastdino's DINOv2 models have), its
  ``block_chunks`` layout (``blocks.C.N.*``: read, never written), and timm's
  ``vit_*_patch14[_reg4]_dinov2`` (``reg_token``, no mask token, a position table without a CLS
  entry for the register models, ``mlp.fc1``/``mlp.fc2`` for ViT-g's SwiGLU);
- the head's weight-norm tensors under either key style (see ``convert_weight_norm_keys``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
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


_CHUNKED_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
_SWIGLU_TIMM_NAMES = {"mlp.fc1.": "mlp.w12.", "mlp.fc2.": "mlp.w3."}


def convert_backbone_state_dict(state_dict: Mapping[str, torch.Tensor],
                                backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A backbone state dict in any layout above, renamed and reshaped into ``backbone``'s own
    (the plain layout of the releases, which ``backbone.state_dict()`` and the exports write).

    - ``blocks.C.N.*`` (DINOv2's ``block_chunks``: chunk C holds block N under its global index)
      -> ``blocks.N.*``;
    - timm's ``reg_token`` -> ``register_tokens``; timm's register models add no position
      embedding to CLS (``no_embed_class``: their table has N, not 1 + N, rows and their
      ``cls_token`` already holds DINOv2's CLS + pos_embed[0]): a zero CLS row is put back, which
      gives the same CLS token;
    - timm's ``mlp.fc1`` / ``mlp.fc2`` -> ``mlp.w12`` / ``mlp.w3`` where ``backbone``'s FFN is
      SwiGLU (timm's SwiGLUPacked: the same packed halves, gate first);
    - a DINOv2 state dict without ``mask_token`` (timm drops it) gets DINOv2's initial one, zeros,
      when ``backbone`` has one: the mask token never changes features of unmasked images.

    Anything else is passed through unchanged, for ``check_state_dict`` to judge.
    """
    expected = backbone.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        chunked = _CHUNKED_BLOCK_KEY.fullmatch(key)
        if chunked:
            key = f"blocks.{chunked[2]}.{chunked[3]}"
            if key in converted:
                raise ValueError(f"block_chunks layout: two chunks hold {key!r}")
        for timm_name, release_name in _SWIGLU_TIMM_NAMES.items():
            renamed = key.replace(timm_name, release_name)
            if renamed != key and renamed in expected and key not in expected:
                key = renamed
        if key == "reg_token" and "register_tokens" in expected:
            key = "register_tokens"
        converted[key] = value
    pos_embed, wanted = converted.get("pos_embed"), expected.get("pos_embed")
    if pos_embed is not None and wanted is not None and pos_embed.dim() == 3 \
            and pos_embed.shape[1] == wanted.shape[1] - 1 and math.isqrt(pos_embed.shape[1]) ** 2 == pos_embed.shape[1]:
        # 1 + g^2 rows are never a square for g >= 1: only a table without CLS entry gets here.
        converted["pos_embed"] = torch.cat((pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed), dim=1)
    if "mask_token" in expected and "mask_token" not in converted \
            and any(key.endswith(".ls1.gamma") for key in converted):
        converted["mask_token"] = torch.zeros_like(expected["mask_token"], device="cpu")
    return converted


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
    if component == "backbone":
        state = convert_backbone_state_dict(state, target)
    elif component == "network":
        backbone = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
        state = {**{key: value for key, value in state.items() if not key.startswith("backbone.")},
                 **{"backbone." + key: value
                    for key, value in convert_backbone_state_dict(backbone, target.backbone).items()}}
    check_state_dict(target, state)
    target.load_state_dict(state, strict=True)


def export_backbone_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights in the plain layout of the releases' backbone files: a DINO ViT's load
    with ``strict=True`` into ``timm.create_model("vit_small_patch8_224", num_classes=0)`` (same
    shape) and into the release's ``vit_small``; a DINOv2 ViT's are laid out as
    ``dinov2_vits14[_reg4]_pretrain.pth`` (never ``block_chunks``'s ``blocks.C.N``), which the
    release's models (``block_chunks=0``) load and timm's ``checkpoint_filter_fn`` converts.

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
