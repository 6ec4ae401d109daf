"""fastdino.models: DINO's and DINOv2's ViT backbones, head and multi-crop wrapper, and checkpoint
interop (the release's, DINOv2's and timm's state dicts).

    from fastdino.models import DINOHead, MultiCropWrapper, create_backbone

    student = MultiCropWrapper(create_backbone("vit_small_p8", drop_path_rate=0.1), DINOHead(384))
    teacher = MultiCropWrapper(create_backbone("vit_small_p8"), DINOHead(384),
                               global_crops_only=True)
    student_logits = student(crops)  # (n_crops * B, 65536), crop-major
    teacher_logits = teacher(crops)  # (2 * B, 65536): the 2 global crops only

Attention runs on xformers (CUDA, half precision), PyTorch SDPA or an explicit path: argument
``attn_backend`` of the ViTs, or ``FASTDINO_ATTENTION`` for the whole process. xformers is imported
when attention first runs on CUDA, timm only when the "resnet50" backbone is created.
"""

from .attention import (
    ATTENTION_BACKENDS,
    ATTENTION_ENV_VAR,
    PackedSequences,
    attention_kernels_report,
    resolve_attention_backend,
    xformers_status,
)
from .checkpoints import (
    StateDictMismatchError,
    check_state_dict,
    convert_backbone_state_dict,
    export_backbone_state_dict,
    export_dino_checkpoint,
    load_dino_checkpoint,
    read_checkpoint,
    select_state_dict,
)
from .head import DINOHead, WeightNormalizedLinear, convert_weight_norm_keys
from .registry import create_backbone, list_backbones
from .vision_transformer import (MultiCropFeatures, VisionTransformer, vit_base, vit_giant, vit_large, vit_small,
                                 vit_tiny)
from .wrapper import DINOv2Outputs, MultiCropWrapper

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_ENV_VAR",
    "DINOHead",
    "DINOv2Outputs",
    "MultiCropFeatures",
    "MultiCropWrapper",
    "PackedSequences",
    "StateDictMismatchError",
    "VisionTransformer",
    "WeightNormalizedLinear",
    "XFORMERS_AVAILABLE",
    "attention_kernels_report",
    "check_state_dict",
    "convert_backbone_state_dict",
    "convert_weight_norm_keys",
    "create_backbone",
    "export_backbone_state_dict",
    "export_dino_checkpoint",
    "list_backbones",
    "load_dino_checkpoint",
    "read_checkpoint",
    "resolve_attention_backend",
    "select_state_dict",
    "vit_base",
    "vit_giant",
    "vit_large",
    "vit_small",
    "vit_tiny",
    "xformers_status",
]


def __getattr__(name):
    # XFORMERS_AVAILABLE imports xformers: only when asked for, not with fastdino.models.
    if name == "XFORMERS_AVAILABLE":
        from . import attention

        return attention.XFORMERS_AVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
