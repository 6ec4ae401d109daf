"""Backbone + head over the multi-crop views of a batch: the DINO student and teacher networks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .vision_transformer import batch_same_size_crops


class DINOv2Outputs(NamedTuple):
    """``MultiCropWrapper(..., dinov2_outputs=True)``: what DINOv2's three terms need.

    cls_logits: (n_crops * B, K), crop-major, as the DINO forward returns.
    global_cls_features: (n_global * B, D), the backbone's CLS features of the global crops (KoLeo).
    patch_logits: (M, K_patch), the iBOT head's logits of the patches at ``mask_indices`` (flat
        positions into the (n_global * B * N) patch tokens of the global crops), or None.
    """

    cls_logits: torch.Tensor
    global_cls_features: torch.Tensor
    patch_logits: torch.Tensor | None


class MultiCropWrapper(nn.Module):
    """Runs the backbone over crops and the head ONCE over all their features.

    Drop-in for the release's ``MultiCropWrapper`` (same ``backbone.`` / ``head.`` state-dict
    keys, crop-major output), with two additions:

    - a backbone that has ``forward_multicrop`` (fastdino's ViT) runs all crops in one packed
      forward where the attention backend allows it (``packed``, see
      ``VisionTransformer.forward_multicrop``); other backbones (e.g. timm's ResNet-50) run one
      forward per resolution, as the release does;
    - ``global_crops_only=True`` makes it the teacher: it keeps the first ``n_global_crops``
      crops of the list it is given, so student and teacher take the same list.

    Input: a list of crops [(B, C, H_i, W_i)], global crops first (or one tensor).
    Output: logits (n_crops * B, out_dim), crop-major: rows v*B .. v*B + B - 1 are crop v, the
    layout ``fastdino.ops.DINOLoss`` expects (student: all crops; teacher: the global crops).
    With ``dinov2_outputs=True`` (a ViT backbone): ``DINOv2Outputs``, the student's crops masked
    by ``masks`` and the patch logits of the positions ``mask_indices`` (the teacher: unmasked),
    by the DINO head or, when given, an ``ibot_head`` of their own (DINOv2's
    ``ibot.separate_head``). Both go through ``forward``, so DDP's gradient hooks see them.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, n_global_crops: int = 2,
                 global_crops_only: bool = False, packed: bool | None = None,
                 ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:  # registered only when used: DINO state dicts keep their keys
            self.ibot_head = ibot_head
        self.n_global_crops = n_global_crops
        self.global_crops_only = global_crops_only
        self.packed = packed

    def _crops_seen(self, crops):
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if self.global_crops_only:
            if len(crops) < self.n_global_crops:
                raise ValueError(f"got {len(crops)} crops, but the teacher needs the "
                                 f"n_global_crops={self.n_global_crops} global crops first")
            crops = crops[: self.n_global_crops]
        return crops

    def features(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Backbone features of the crops this network sees, crop-major: (n_crops * B, D)."""
        crops = self._crops_seen(crops)
        if hasattr(self.backbone, "forward_multicrop"):
            return self.backbone.forward_multicrop(crops, packed=self.packed)
        return torch.cat([self.backbone(batch) for batch in batch_same_size_crops(crops)])

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor, *, dinov2_outputs: bool = False,
                masks: torch.Tensor | None = None, mask_indices: torch.Tensor | None = None):
        if not dinov2_outputs:
            return self.head(self.features(crops))
        return self._forward_dinov2(self._crops_seen(crops), masks, mask_indices)

    def _forward_dinov2(self, crops, masks, mask_indices) -> DINOv2Outputs:
        if not hasattr(self.backbone, "forward_multicrop"):
            raise ValueError("dinov2_outputs needs a ViT backbone (patch tokens and a mask token)")
        batch = crops[0].shape[0]
        n_global = self.n_global_crops
        per_crop_masks = None if masks is None else list(masks.view(n_global, batch, -1).unbind(0))
        tokens = self.backbone.forward_multicrop(crops, packed=self.packed, masks=per_crop_masks,
                                                 return_patch_tokens=True)
        cls_logits = self.head(tokens.cls_tokens)
        patch_logits = None
        if mask_indices is not None:
            # Two head calls rather than one on a concatenation: each loss then owns its logits
            # buffer whole, and the backward adds no (rows x K) zero-filled slices.
            masked = tokens.patch_tokens.flatten(0, 1).index_select(0, mask_indices)
            patch_logits = getattr(self, "ibot_head", self.head)(masked)
        return DINOv2Outputs(cls_logits, tokens.cls_tokens[: n_global * batch], patch_logits)
