"""fastdino.ops: the DINO loss, teacher EMA and per-parameter clipping, and DINOv2's iBOT patch
loss, Sinkhorn-Knopp centering and KoLeo regularizer, fused.

Light to import (no DALI, xformers or timm; Triton and the C++ extension load on first use):

    from fastdino.ops import DINOLoss, dino_loss, ema_update_, clip_grad_per_param_
    from fastdino.ops import ibot_patch_loss, sinkhorn_knopp_, koleo_loss
    from fastdino.ops.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss  # DINOv2's modules
"""

from .backends import BACKEND_ENV_VAR, BACKENDS, BackendUnavailableError, backend_status
from .center import CenterUpdate, update_center_
from .clip_grad import clip_grad_per_param_, clip_grad_per_param_reference
from .dino_loss import dino_loss, dino_loss_reference
from .ema import ema_update_, ema_update_reference
from .koleo import koleo_loss, koleo_loss_with_counts
from .losses import (DINOLoss, LightlyDINOLoss, LightlyIBOTPatchLoss, LightlyKoLeoLoss,
                     teacher_temperature_schedule)
from .sinkhorn import sinkhorn_knopp_, sinkhorn_knopp_reference
from .soft_cross_entropy import (ibot_masks_weight, ibot_patch_loss, soft_cross_entropy,
                                 soft_cross_entropy_reference)

__all__ = [
    "BACKENDS",
    "CenterUpdate",
    "BACKEND_ENV_VAR",
    "BackendUnavailableError",
    "DINOLoss",
    "LightlyDINOLoss",
    "LightlyIBOTPatchLoss",
    "LightlyKoLeoLoss",
    "backend_status",
    "clip_grad_per_param_",
    "clip_grad_per_param_reference",
    "dino_loss",
    "dino_loss_reference",
    "ema_update_",
    "ema_update_reference",
    "ibot_masks_weight",
    "ibot_patch_loss",
    "koleo_loss",
    "koleo_loss_with_counts",
    "sinkhorn_knopp_",
    "sinkhorn_knopp_reference",
    "soft_cross_entropy",
    "soft_cross_entropy_reference",
    "teacher_temperature_schedule",
    "update_center_",
]
