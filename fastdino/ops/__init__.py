"""fastdino.ops: the DINO loss, teacher EMA and per-parameter clipping, fused.

Light to import (no DALI, xformers or timm; Triton and the C++ extension load on first use):

    from fastdino.ops import DINOLoss, dino_loss, ema_update_, clip_grad_per_param_
"""

from .backends import BACKEND_ENV_VAR, BACKENDS, BackendUnavailableError, backend_status
from .center import CenterUpdate, update_center_
from .clip_grad import clip_grad_per_param_, clip_grad_per_param_reference
from .dino_loss import dino_loss, dino_loss_reference
from .ema import ema_update_, ema_update_reference
from .losses import DINOLoss, LightlyDINOLoss, teacher_temperature_schedule

__all__ = [
    "BACKENDS",
    "CenterUpdate",
    "BACKEND_ENV_VAR",
    "BackendUnavailableError",
    "DINOLoss",
    "LightlyDINOLoss",
    "backend_status",
    "clip_grad_per_param_",
    "clip_grad_per_param_reference",
    "dino_loss",
    "dino_loss_reference",
    "ema_update_",
    "ema_update_reference",
    "teacher_temperature_schedule",
    "update_center_",
]
