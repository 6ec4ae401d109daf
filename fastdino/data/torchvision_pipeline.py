"""The torchvision/PIL backend: the release's augmentation code path, on CPU worker processes.

This is the fallback for machines without DALI. Each crop goes through the same PIL operations
as the public DINO release's ``DataAugmentationDINO`` (bicubic ``resized_crop``, ``hflip``,
``ColorJitter``'s four adjustments in the drawn order, ``rgb_to_grayscale``, PIL's
``GaussianBlur(radius=sigma)``, ``ImageOps.solarize``), but with the parameters drawn by
``recipe.sample_crop_parameters``, so batches are reproducible and resumable. Each worker builds
whole batches.
"""

from __future__ import annotations

import numpy as np
import torch

from .image_files import DataLoadingError
from .recipe import BRIGHTNESS, CONTRAST, HUE, SATURATION, CropParameters, MultiCropRecipe


def _import_torchvision():
    try:
        import torchvision.transforms.functional as functional
        from PIL import Image, ImageFilter, ImageOps
    except Exception as error:  # missing, or a torchvision built for another torch
        raise ImportError(f"the torchvision data backend needs torchvision and Pillow, which "
                          f"could not be imported ({type(error).__name__}: {error}); install "
                          f"them, or DALI (pip install nvidia-dali-cuda120)") from error
    return functional, Image, ImageFilter, ImageOps


def load_rgb_image(path: str):
    """The image as 8-bit RGB (grayscale, palette, CMYK and RGBA converted), like ImageFolder."""
    _, Image, _, _ = _import_torchvision()
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except OSError as error:  # includes PIL's decoding errors on data corrupt past the header
        raise DataLoadingError(f"cannot decode {path}: {error}") from error


def augment_crop(image, crop: CropParameters, index: int, size: int, recipe: MultiCropRecipe):
    """One crop of a PIL image with the draws ``crop[index]``; returns a PIL image."""
    functional, Image, ImageFilter, ImageOps = _import_torchvision()
    top, left, height, width = (int(value) for value in crop.box[index])
    out = functional.resized_crop(image, top, left, height, width, [size, size],
                                  functional.InterpolationMode.BICUBIC)
    if crop.flip[index]:
        out = functional.hflip(out)
    for adjustment in crop.jitter_order[index]:
        if adjustment == HUE and recipe.hue == 0:
            continue  # as ColorJitter(hue=0), which leaves it out: adjust_hue(0) is not exact in 8 bits
        if adjustment == BRIGHTNESS:
            out = functional.adjust_brightness(out, float(crop.brightness[index]))
        elif adjustment == CONTRAST:
            out = functional.adjust_contrast(out, float(crop.contrast[index]))
        elif adjustment == SATURATION:
            out = functional.adjust_saturation(out, float(crop.saturation[index]))
        elif adjustment == HUE:
            out = functional.adjust_hue(out, float(crop.hue[index]))
    if crop.grayscale[index]:
        out = functional.rgb_to_grayscale(out, num_output_channels=3)
    if crop.blur[index]:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(crop.blur_sigma[index])))
    if crop.solarize[index]:
        out = ImageOps.solarize(out, threshold=128)
    return out


class MultiCropBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item i is a whole multi-crop batch, built in a worker.

    ``batch_request(i)`` is a picklable callable giving (paths, crop parameters) for batch i;
    items are lists of uint8 tensors (B, 3, S, S), one per crop, normalized later on the
    training device (4x less to move than float).
    """

    def __init__(self, recipe: MultiCropRecipe, crop_sizes: list[int]):
        self.recipe = recipe
        self.crop_sizes = crop_sizes

    def __getitem__(self, request):
        paths, crops = request
        images = [load_rgb_image(path) for path in paths]
        outputs = []
        for crop, size in zip(crops, self.crop_sizes):
            batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
            for index, image in enumerate(images):
                batch[index] = np.asarray(augment_crop(image, crop, index, size, self.recipe))
            outputs.append(torch.from_numpy(batch).permute(0, 3, 1, 2))
        return outputs


def normalize_uint8_crops(crops: list[torch.Tensor], recipe: MultiCropRecipe, device, dtype):
    """uint8 (B, 3, S, S) crops -> normalized ``dtype`` tensors on ``device``."""
    mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(recipe.std, device=device).view(1, 3, 1, 1) * 255)
    return [((crop.to(device, non_blocking=True).float() - mean) * inv_std).to(dtype) for crop in crops]
