"""The DALI backend: decode once, then every crop and augmentation in one DALI pipeline.

One pipeline definition serves both devices:
- GPU (``device_id`` set): JPEGs are decoded by the "mixed" (nvJPEG) decoder and every crop,
  adjustment, blur and normalization runs on the GPU; the output is copied device to device
  into PyTorch tensors.
- CPU (``device_id=None``): the same graph on DALI's CPU operators, for machines without a GPU.

Each image is decoded once and all of its crops are cut from the decoded image (rather than a
region-of-interest decode per crop, which would parse the JPEG 2 + n_local times).

The random draws come from ``recipe.sample_crop_parameters`` (fed in per sample through an
external source), so DALI's own random generators are not used and a batch is a pure function of
its position. Per-sample choices (jitter order, grayscale, blur, solarize) are DALI
conditionals: each image follows its own branch, and skipped operations cost nothing.

Known differences from the PIL path of the release (documented in the README):
- hue is rotated in YIQ space (DALI's ``hue``), not shifted in HSV space as PIL does;
- blur is a 23-tap Gaussian (the BYOL/DINO paper's kernel), where PIL's ``GaussianBlur`` uses
  box-filter approximations of the same sigma;
- adjustments are computed in float and clamped, without PIL's rounding to 8 bits between them.
"""

from __future__ import annotations

import numpy as np
import torch

from .recipe import BRIGHTNESS, CONTRAST, HUE, SATURATION, CropParameters, MultiCropRecipe

# Layout of the per-sample parameter vector of one crop
_ROI_START, _ROI_END, _FLIP, _ORDER = slice(0, 2), slice(2, 4), 4, slice(5, 9)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 9, 10, 11, 12
_GRAYSCALE, _BLUR, _SIGMA, _SOLARIZE = 13, 14, 15, 16
N_CROP_PARAMETERS = 17

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)


def import_dali():
    """DALI's modules, or ImportError saying how to install it."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dali_math
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except Exception as error:
        raise ImportError(f"NVIDIA DALI could not be imported ({type(error).__name__}: {error}); "
                          f"install it with `pip install nvidia-dali-cuda120` or use "
                          f"backend='torchvision'") from error
    return fn, dali_math, types, pipeline_def


def pack_crop_parameters(crop: CropParameters) -> np.ndarray:
    """(B, N_CROP_PARAMETERS) float32 rows in the layout the pipeline reads."""
    top, left, height, width = (crop.box[:, i].astype(np.float32) for i in range(4))
    packed = np.zeros((len(crop.box), N_CROP_PARAMETERS), dtype=np.float32)
    packed[:, _ROI_START] = np.stack([top, left], axis=1)
    packed[:, _ROI_END] = np.stack([top + height, left + width], axis=1)
    packed[:, _FLIP] = crop.flip
    packed[:, _ORDER] = crop.jitter_order
    packed[:, _BRIGHTNESS] = crop.brightness
    packed[:, _CONTRAST] = crop.contrast
    packed[:, _SATURATION] = crop.saturation
    packed[:, _HUE] = crop.hue * 360  # DALI's hue is in degrees
    packed[:, _GRAYSCALE] = crop.grayscale
    packed[:, _BLUR] = crop.blur
    packed[:, _SIGMA] = crop.blur_sigma
    packed[:, _SOLARIZE] = crop.solarize
    return packed


def build_dali_pipeline(source, recipe: MultiCropRecipe, n_local_crops: int, batch_size: int,
                        num_threads: int, device_id: int | None, half_precision: bool,
                        prefetch_queue_depth: int = 2):
    """A built DALI pipeline whose outputs are the normalized crops (CHW), global crops first.

    source: a callable returning, per batch, ``(encoded_images, params_crop_0, ...)``: a list of
    uint8 arrays (the files' bytes) and, for each crop, a list of per-sample parameter vectors
    (``pack_crop_parameters``).
    """
    fn, dali_math, types, pipeline_def = import_dali()
    on_gpu = device_id is not None
    n_crops = 2 + n_local_crops
    output_type = types.FLOAT16 if half_precision else types.FLOAT

    def on_device(node):
        return node.gpu() if on_gpu else node

    def adjust_colors(image, params):
        # ColorJitter: up to four adjustments, each sample in its own drawn order
        for stage in range(4):
            adjustment = params[_ORDER.start + stage]
            if adjustment == BRIGHTNESS:
                image = dali_math.clamp(image * on_device(params[_BRIGHTNESS]), 0.0, 255.0)
            elif adjustment == CONTRAST:
                # torchvision blends with the mean gray level of the image as it is now
                channel_mean = fn.reductions.mean(image, axes=(0, 1))
                gray_mean = sum(channel_mean[c] * _LUMA[c] for c in range(3))
                factor = on_device(params[_CONTRAST])
                image = dali_math.clamp(image * factor + gray_mean * (1.0 - factor), 0.0, 255.0)
            elif adjustment == SATURATION:
                # YIQ saturation scales I and Q: exactly a blend with the luma image
                image = dali_math.clamp(fn.saturation(image, saturation=params[_SATURATION]), 0.0, 255.0)
            elif adjustment == HUE:
                image = dali_math.clamp(fn.hue(image, hue=params[_HUE]), 0.0, 255.0)
        return image

    def augment(decoded, params, size, crop_kind):
        crop = fn.resize(decoded, size=(size, size), roi_start=params[_ROI_START], roi_end=params[_ROI_END],
                         interp_type=types.INTERP_CUBIC, antialias=True)
        image = fn.cast(crop, dtype=types.FLOAT)
        if recipe.color_jitter_probability > 0:
            image = adjust_colors(image, params)
        if recipe.grayscale_probability > 0 and params[_GRAYSCALE] > 0.5:
            # the luma in all three channels, bit-equal (a later solarization keeps it gray)
            gray = sum(image[:, :, c] * _LUMA[c] for c in range(3))
            image = fn.reshape(fn.stack(gray, gray, gray, axis=2), layout="HWC")
        if recipe.blur_probabilities[crop_kind] > 0 and params[_BLUR] > 0.5:
            image = fn.gaussian_blur(image, window_size=recipe.blur_kernel_size, sigma=params[_SIGMA])
        if recipe.solarize_probabilities[crop_kind] > 0 and params[_SOLARIZE] > 0.5:
            image = image + (image >= 128.0) * (255.0 - 2.0 * image)  # invert pixels >= 128
        return fn.crop_mirror_normalize(
            image, mirror=fn.cast(params[_FLIP], dtype=types.INT32), dtype=output_type, output_layout="CHW",
            mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])

    @pipeline_def(enable_conditionals=True)
    def multicrop_pipeline():
        encoded, *crop_params = fn.external_source(
            source=source, num_outputs=1 + n_crops, batch=True,
            dtype=[types.UINT8] + [types.FLOAT] * n_crops)
        decoded = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)  # PIL, hence the release, ignores EXIF
        return tuple(augment(decoded, crop_params[i], size, recipe.crop_kind(i))
                     for i, size in enumerate(recipe.crop_sizes(n_local_crops)))

    pipeline = multicrop_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                  prefetch_queue_depth=prefetch_queue_depth,
                                  exec_dynamic=True)
    pipeline.build()
    return pipeline


def dali_outputs_to_torch(outputs, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copy the pipeline's outputs (TensorLists of equal-shaped samples) into new torch tensors
    on ``device`` (device to device for GPU pipelines; DALI reuses its buffers next run)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensors = []
    for output in outputs:
        dense = output.as_tensor()
        source_dtype = torch.float16 if dense.dtype == _dali_float16() else torch.float32
        target = torch.empty(dense.shape(), dtype=source_dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        tensors.append(target if source_dtype == dtype else target.to(dtype))
    return tensors


def _dali_float16():
    import nvidia.dali.types as types

    return types.FLOAT16
