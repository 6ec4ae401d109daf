"""Backbones by name: ``create_backbone("vit_small_p8", drop_path_rate=0.1)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .vision_transformer import vit_base, vit_large, vit_small, vit_tiny


def _vit(constructor: Callable[..., nn.Module], patch_size: int) -> Callable[..., nn.Module]:
    def create(**kwargs) -> nn.Module:
        return constructor(patch_size=patch_size, **kwargs)

    create.__doc__ = f"{constructor.__doc__} Patch {patch_size}."
    return create


def _timm_resnet50(**kwargs) -> nn.Module:
    """timm's ResNet-50 without its classifier: images (B, 3, H, W) -> pooled features (B, 2048).

    Its parameter names are torchvision's, so the release's ResNet-50 weights load into it.
    """
    try:
        import timm  # imported here: only this backbone needs timm
    except Exception as error:  # not installed, or its torchvision does not load with this torch
        raise ImportError(
            f"the 'resnet50' backbone is built by timm, which could not be imported "
            f"({type(error).__name__}: {error}); install it with `pip install timm`"
        ) from error
    return timm.create_model("resnet50", pretrained=False, num_classes=0, **kwargs)


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    f"{name}_p{patch_size}": _vit(constructor, patch_size)
    for name, constructor in (("vit_tiny", vit_tiny), ("vit_small", vit_small), ("vit_base", vit_base),
                              ("vit_large", vit_large))
    for patch_size in (8, 16)
}
_BACKBONES["resnet50"] = _timm_resnet50


def list_backbones() -> list[str]:
    """Names ``create_backbone`` accepts, sorted."""
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A freshly initialized backbone (no pretrained weights) by name; see ``list_backbones()``.

    Keyword arguments go to the constructor: for the ViTs ``img_size``, ``drop_path_rate``,
    ``attn_backend``, ``activation_checkpointing``, ... (``VisionTransformer``); for "resnet50",
    timm's ``create_model`` arguments.
    """
    try:
        constructor = _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}") from None
    return constructor(**kwargs)
