"""Backbone + head over the multi-crop views of a batch: the DINO student and teacher networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .vision_transformer import batch_same_size_crops


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
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, n_global_crops: int = 2,
                 global_crops_only: bool = False, packed: bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_global_crops = n_global_crops
        self.global_crops_only = global_crops_only
        self.packed = packed

    def features(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Backbone features of the crops this network sees, crop-major: (n_crops * B, D)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if self.global_crops_only:
            if len(crops) < self.n_global_crops:
                raise ValueError(f"got {len(crops)} crops, but the teacher needs the "
                                 f"n_global_crops={self.n_global_crops} global crops first")
            crops = crops[: self.n_global_crops]
        if hasattr(self.backbone, "forward_multicrop"):
            return self.backbone.forward_multicrop(crops, packed=self.packed)
        return torch.cat([self.backbone(batch) for batch in batch_same_size_crops(crops)])

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.head(self.features(crops))
