"""Backbones by name: ``create_backbone("vit_small_p8", drop_path_rate=0.1)``.

DINO's ViTs: ``vit_{tiny,small,base,large}_p{8,16}``. DINOv2's: ``vit_{small,base,large,giant}_p14``
and the ``..._p14_reg4`` models with 4 registers, built with the release's training settings
(LayerScale 1e-5, a mask token, drop path uniform over depth, SwiGLU for giant); the reg4 ones
resize their position table as the public register models do (antialiased, no offset). The public
weights need ``img_size=518``: ``create_backbone("vit_small_p14_reg4", img_size=518)`` then
``load_dino_checkpoint(model, "dinov2_vits14_reg4_pretrain.pth")`` gives their features.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .vision_transformer import vit_base, vit_giant, vit_large, vit_small, vit_tiny


# dinov2/configs/ssl_default_config.yaml (student) and its models' initialization.
DINOV2_OPTIONS = dict(layerscale_init=1e-5, mask_token=True, drop_path_uniform=True, token_init_std=1e-6,
                      interpolate_offset=0.1, interpolate_antialias=False)
# dinov2/hub/backbones.py's *_reg models (and configs/eval/*_reg4_pretrain.yaml).
DINOV2_REG4_OPTIONS = dict(DINOV2_OPTIONS, num_register_tokens=4, interpolate_offset=0.0,
                           interpolate_antialias=True)


def _vit(constructor: Callable[..., nn.Module], patch_size: int, options: dict | None = None,
         description: str = "") -> Callable[..., nn.Module]:
    def create(**kwargs) -> nn.Module:
        return constructor(patch_size=patch_size, **{**(options or {}), **kwargs})

    create.__doc__ = f"{constructor.__doc__} Patch {patch_size}.{description}"
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
for name, constructor in (("vit_small", vit_small), ("vit_base", vit_base), ("vit_large", vit_large),
                          ("vit_giant", vit_giant)):
    _BACKBONES[f"{name}_p14"] = _vit(constructor, 14, DINOV2_OPTIONS, f" DINOv2: {DINOV2_OPTIONS}.")
    _BACKBONES[f"{name}_p14_reg4"] = _vit(constructor, 14, DINOV2_REG4_OPTIONS,
                                          f" DINOv2 with registers: {DINOV2_REG4_OPTIONS}.")
_BACKBONES["resnet50"] = _timm_resnet50


def list_backbones() -> list[str]:
    """Names ``create_backbone`` accepts, sorted."""
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A freshly initialized backbone (no pretrained weights) by name; see ``list_backbones()``.

    Keyword arguments go to the constructor: for the ViTs ``img_size``, ``drop_path_rate``,
    ``attn_backend``, ``activation_checkpointing``, ... (``VisionTransformer``), and they override
    the DINOv2 models' settings (``layerscale_init``, ``interpolate_offset``, ...); for
    "resnet50", timm's ``create_model`` arguments.
    """
    try:
        constructor = _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}") from None
    return constructor(**kwargs)
