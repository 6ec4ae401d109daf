"""The DALI backend: decode once, then every crop and augmentation in one DALI pipeline.

One pipeline definition serves both devices:
- GPU (``device_id`` set): JPEGs are decoded by the "mixed" (nvJPEG) decoder and every crop,
  adjustment, blur and normalization runs on the GPU; the output is copied device to device
  into PyTorch tensors.
- CPU (``device_id=None``): the same graph on DALI's CPU operators, for machines without a GPU.

Each image is decoded once and all of its crops are cut from the decoded image (rather than a
region-of-interest decode per crop, which would parse the JPEG 2 + n_local times).

Reduced resolution (CPU pipeline only): when every crop of an image is downscaled by at least
2^(L + 1) on both axes (L <= 3), the decoded image is first halved L times by exact 2x2 box
averages and the crops are cut from that, their boxes scaled by 2^-L, by the same antialiased
bicubic resize. DALI's CPU resize costs in proportion to the side of its input region, so each
halving about halves the crops' resizes. The box is what decoding a JPEG at a reduced DCT scale
approximates; DALI's decoders take no scale, and decoding on the host would take the decoder out
of the graph that the GPU pipeline shares. The boxes add a blur of variance under 1/48 of an
output pixel^2 (``halvings``; tests/test_data_reduced_resolution.py bounds the difference from
the release's pixels). With the release's crops it applies from about 2000x1500 pixels on; never
on ImageNet-sized images (500x375), whose 224-pixel global crops are downscaled 1.06-1.66x.
The GPU pipeline (``device_id`` set) has the same graph with L = 0 for every image, so its
output is unchanged.

The random draws come from ``recipe.sample_crop_parameters`` (fed in per sample through an
external source), so DALI's own random generators are not used and a batch is a pure function of
its position.

Colour jitter and grayscale are one affine colour map per crop, ``x -> A x + P mu + q``: each
of ColorJitter's adjustments is linear in RGB (brightness a scale, saturation a blend with the
luma, hue a rotation, grayscale the luma) except contrast, which blends with the mean luma of the
image as it is at that point: an affine function of the crop's mean colour ``mu``. Composing the
drawn adjustments in their drawn order gives ``A``, ``P``, ``q`` (``color_transform``), so the
pipeline needs one reduction and one pass per crop, in any order, without branches. Blur and
solarization are DALI conditionals: each image takes its own branch, skipped work costs nothing.

Known differences from the PIL path of the release (documented in the README):
- hue is a rotation about the gray axis of RGB space, which approximates HSV's hue shift (exact
  at multiples of 120 degrees; mean difference 17/255 levels at the largest shift, 36 degrees,
  on random colours);
- adjustments are clamped to [0, 255] once, after the last, and are not rounded to 8 bits in
  between as PIL does;
- blur is a 23-tap Gaussian (the BYOL/DINO paper's kernel), where PIL's ``GaussianBlur`` uses
  box-filter approximations of the same sigma.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .recipe import BRIGHTNESS, CONTRAST, HUE, SATURATION, CropParameters, MultiCropRecipe

# Layout of the per-sample parameter vector of one crop
_ROI_START, _ROI_END, _FLIP, _BLUR, _SIGMA, _WINDOW, _SOLARIZE = slice(0, 2), slice(2, 4), 4, 5, 6, 7, 8
N_CROP_PARAMETERS = 9

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
_LUMA = np.array([0.299, 0.587, 0.114])
_ONES = np.ones(3)

# Resolution reduction: at most 3 halvings (1/8, as libjpeg's smallest DCT scale). Layout of
# the per-image vector: the number of halvings L, then for each halving l = 1..3 the size (h, w)
# of the image after it and the region (2h, 2w) of the image before it that it averages (one
# row or column past an odd side, which the resize fills with the edge).
MAX_HALVINGS = 3
_HALVINGS = 0
N_IMAGE_PARAMETERS = 1 + 4 * MAX_HALVINGS


def _halving_slices(level: int) -> tuple[slice, slice]:
    """(size after halving ``level`` (0-based), extent it averages) in the per-image vector."""
    start = 1 + 4 * level
    return slice(start, start + 2), slice(start + 2, start + 4)


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


def pack_crop_parameters(crops: list[CropParameters], blur_kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample inputs of every crop of a batch: (B, n_crops, N_CROP_PARAMETERS) float32
    parameter rows and (B, n_crops, 7, 3) float32 colour maps (rows 0-2: A, 3-5: P, 6: q; see
    ``color_transform``), crop i of image b at [b, i]. All crops go through one
    ``color_transform``: on (B, 3, 3) arrays NumPy's cost is per call, not per element, so one
    call on n_crops x B rows costs about what one crop's did."""
    n_crops, batch = len(crops), len(crops[0].box)
    rows = CropParameters(**{field.name: np.concatenate([getattr(crop, field.name) for crop in crops])
                             for field in dataclasses.fields(CropParameters)})
    top, left, height, width = (rows.box[:, i].astype(np.float32) for i in range(4))
    packed = np.zeros((n_crops * batch, N_CROP_PARAMETERS), dtype=np.float32)
    packed[:, _ROI_START] = np.stack([top, left], axis=1)
    packed[:, _ROI_END] = np.stack([top + height, left + width], axis=1)
    packed[:, _FLIP] = rows.flip
    packed[:, _BLUR] = rows.blur
    packed[:, _SIGMA] = rows.blur_sigma
    # taps beyond 3 sigma hold 0.3% of the weight: a narrower window for small sigmas makes the
    # blur (the costliest augmentation on a CPU) 2.5x cheaper on average
    packed[:, _WINDOW] = np.minimum(blur_kernel_size, 2 * np.ceil(3 * rows.blur_sigma) + 1)
    packed[:, _SOLARIZE] = rows.solarize
    linear, from_mean, offset = color_transform(rows)
    colors = np.concatenate([linear, from_mean, offset[:, None]], axis=1).astype(np.float32)
    # one sample per image, as DALI takes them: two inputs to feed rather than two per crop
    return (np.ascontiguousarray(packed.reshape(n_crops, batch, N_CROP_PARAMETERS).swapaxes(0, 1)),
            np.ascontiguousarray(colors.reshape(n_crops, batch, 7, 3).swapaxes(0, 1)))


def encoded_image_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's or PNG's header, or None for anything else (left to the
    decoder, which names the problem). The sizes DALI decodes to: EXIF orientation is ignored."""
    import simplejpeg

    header = data[:24].tobytes()
    if header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR":
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
        return height, width
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def halvings(boxes: np.ndarray, crop_sizes) -> np.ndarray:
    """(B,) int: how many times L (at most MAX_HALVINGS) each image is halved by 2x2 box
    averages before its crops are cut: the largest L such that every crop of the image is
    downscaled by at least 2^(L + 1) on both axes, twice the reduction. A crop upsampled or
    downscaled less thus comes from the full image, and the boxes' blur, of variance
    (4^L - 1) / 12 source pixels^2, stays under 1/48 of an output pixel^2.

    boxes: (n_crops, B, 4) top, left, height, width; crop_sizes: each crop's output side."""
    boxes = np.asarray(boxes)
    factor = (np.minimum(boxes[..., 2], boxes[..., 3]) / np.asarray(crop_sizes, dtype=np.float64)[:, None]).min(axis=0)
    levels = np.floor(np.log2(np.maximum(factor, 1))).astype(np.int64) - 1
    return np.clip(levels, 0, MAX_HALVINGS)


def reduced_crop_parameters(params: np.ndarray, image_sizes: np.ndarray, crop_sizes) -> tuple[np.ndarray, np.ndarray]:
    """The crops' parameter rows with their boxes in the coordinates of the halved images, and
    the (B, N_IMAGE_PARAMETERS) float32 per-image vectors of the halvings (see ``halvings``).
    An odd side is halved to ceil(side / 2): the last pixel averages the edge with itself, as
    the resize repeats edge pixels anyway, and the boxes scale by exactly 1/2.

    params: ``pack_crop_parameters``' rows (B, n_crops, N_CROP_PARAMETERS); image_sizes: (B, 2)
    (height, width), (0, 0) for an image whose size is unknown, which is not halved."""
    top_left, bottom_right = params[:, :, _ROI_START], params[:, :, _ROI_END]
    boxes = np.concatenate([top_left, bottom_right - top_left], axis=2).swapaxes(0, 1)
    sizes = np.asarray(image_sizes, dtype=np.int64)
    levels = np.where((sizes > 0).all(axis=1), halvings(boxes, crop_sizes), 0)
    vectors = np.zeros((len(levels), N_IMAGE_PARAMETERS), dtype=np.float32)
    vectors[:, _HALVINGS] = levels
    for level in range(MAX_HALVINGS):
        size, extent = _halving_slices(level)
        halved = (sizes + 2 ** (level + 1) - 1) >> (level + 1)  # ceil(side / 2^(level + 1))
        vectors[:, size] = halved
        vectors[:, extent] = 2 * halved
    reduced = params.copy()
    scale = (0.5 ** levels).astype(np.float32)[:, None, None]
    reduced[:, :, _ROI_START] *= scale
    reduced[:, :, _ROI_END] *= scale
    return reduced, vectors


def halving_inputs(encoded: list[np.ndarray], params: np.ndarray, crop_sizes,
                   reduce_resolution: bool) -> tuple[np.ndarray, np.ndarray]:
    """(params, per-image vectors) as the pipeline takes them: ``reduced_crop_parameters`` of the
    images' header sizes, or the params unchanged and no halvings (the GPU pipeline)."""
    if not reduce_resolution:
        return params, np.zeros((len(encoded), N_IMAGE_PARAMETERS), dtype=np.float32)
    sizes = np.array([encoded_image_size(data) or (0, 0) for data in encoded], dtype=np.int64).reshape(-1, 2)
    return reduced_crop_parameters(params, sizes, crop_sizes)


def color_transform(crop: CropParameters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, P, q), each (B, 3, 3) / (B, 3, 3) / (B, 3): the jittered-and-grayscaled colour of
    pixel x is A x + P mu + q, with mu the crop's mean colour (RGB, 0..255). Vectorized over
    rows, which may be the images of one crop or all crops of a batch (``pack_crop_parameters``):
    each row's map depends on its own draws only."""
    batch = len(crop.box)
    identity = np.broadcast_to(np.eye(3), (batch, 3, 3))
    to_luma = np.outer(_ONES, _LUMA)  # x -> its luma in all three channels
    linear, from_mean, offset = identity.copy(), np.zeros((batch, 3, 3)), np.zeros((batch, 3))

    def scalars(values):
        return np.asarray(values, dtype=np.float64)[:, None, None]

    for stage in range(4):
        adjustment = crop.jitter_order[:, stage]
        matrix = identity.copy()
        brightness, saturation, hue = (adjustment == BRIGHTNESS, adjustment == SATURATION, adjustment == HUE)
        matrix[brightness] = scalars(crop.brightness[brightness]) * np.eye(3)
        factor = scalars(crop.saturation[saturation])
        matrix[saturation] = factor * np.eye(3) + (1 - factor) * to_luma
        matrix[hue] = _gray_axis_rotation(2 * np.pi * crop.hue[hue].astype(np.float64))
        linear, from_mean, offset = matrix @ linear, matrix @ from_mean, np.einsum("bij,bj->bi", matrix, offset)
        # contrast blends with the mean luma of the current image, g . ((A + P) mu + q)
        contrast = adjustment == CONTRAST
        factor = scalars(crop.contrast[contrast])
        linear[contrast], from_mean[contrast], offset[contrast] = (
            factor * linear[contrast],
            factor * from_mean[contrast] + (1 - factor) * to_luma @ (linear[contrast] + from_mean[contrast]),
            factor[:, :, 0] * offset[contrast] + (1 - factor[:, :, 0]) * offset[contrast] @ to_luma.T)
    gray = crop.grayscale
    linear[gray], from_mean[gray], offset[gray] = (to_luma @ linear[gray], to_luma @ from_mean[gray],
                                                   offset[gray] @ to_luma.T)
    return linear, from_mean, offset


def _gray_axis_rotation(angles: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations of RGB space by ``angles`` about the gray axis (1, 1, 1) (Rodrigues'
    formula): red towards green for positive angles, as a positive HSV hue shift."""
    axis = _ONES / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    return cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(axis, axis)


def build_dali_pipeline(source, recipe: MultiCropRecipe, n_local_crops: int, batch_size: int,
                        num_threads: int, device_id: int | None, half_precision: bool,
                        prefetch_queue_depth: int = 2, reduce_resolution: bool | None = None):
    """A built DALI pipeline whose outputs are the normalized crops (CHW), global crops first.

    source: a callable returning, per batch, ``(encoded_images, params, colors)``: a list of
    uint8 arrays (the files' bytes) and the arrays of ``pack_crop_parameters``.
    reduce_resolution: cut the crops of images that all their crops downscale >= 4x from the
    image halved by 2x2 box averages (``halvings``, the module's notes); default: on the CPU
    only. The images' sizes are read from their headers.
    """
    fn, dali_math, types, pipeline_def = import_dali()
    on_gpu = device_id is not None
    output_type = types.FLOAT16 if half_precision else types.FLOAT
    crop_sizes = recipe.crop_sizes(n_local_crops)
    if reduce_resolution is None:
        reduce_resolution = not on_gpu

    def source_with_halvings():
        encoded, params, colors = source()
        return encoded, *halving_inputs(encoded, params, crop_sizes, reduce_resolution), colors

    def halve(image, image_params, level):
        # one conditional per halving: images halved fewer times skip it at no cost
        if image_params[_HALVINGS] > level + 0.5:
            size, extent = _halving_slices(level)
            image = fn.resize(image, size=image_params[size], roi_start=(0.0, 0.0), roi_end=image_params[extent],
                              interp_type=types.INTERP_LINEAR, antialias=False)  # exact 2x2 averages
        return image

    def augment(decoded, params, colors, size, crop_kind):
        crop = fn.resize(decoded, size=(size, size), roi_start=params[_ROI_START], roi_end=params[_ROI_END],
                         interp_type=types.INTERP_CUBIC, antialias=True)
        mean_color = fn.reshape(fn.reductions.mean(crop, axes=(0, 1), dtype=types.FLOAT), shape=[1, 3])
        offset = fn.coord_transform(mean_color, M=colors[3:6], T=colors[6])
        # min(max()) rather than clamp(): the same values, and DALI's CPU clamp reads its bounds
        # through a per-element type dispatch (3% of the CPU pipeline's instructions)
        image = dali_math.min(dali_math.max(fn.coord_transform(crop, M=colors[0:3], dtype=types.FLOAT) + offset, 0.0),
                              255.0)
        if recipe.blur_probabilities[crop_kind] > 0 and params[_BLUR] > 0.5:
            image = fn.gaussian_blur(image, window_size=fn.cast(params[_WINDOW], dtype=types.INT32),
                                     sigma=params[_SIGMA])
        if recipe.solarize_probabilities[crop_kind] > 0 and params[_SOLARIZE] > 0.5:
            image = image + (image >= 128.0) * (255.0 - 2.0 * image)  # invert pixels >= 128
        return fn.crop_mirror_normalize(
            image, mirror=fn.cast(params[_FLIP], dtype=types.INT32), dtype=output_type, output_layout="CHW",
            mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])

    @pipeline_def(enable_conditionals=True)
    def multicrop_pipeline():
        encoded, params, image_params, colors = fn.external_source(
            source=source_with_halvings, num_outputs=4, batch=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT])
        image = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)  # PIL, hence the release, ignores EXIF
        for level in range(MAX_HALVINGS):
            image = halve(image, image_params, level)
        return tuple(augment(image, params[i], colors[i], size, recipe.crop_kind(i))
                     for i, size in enumerate(crop_sizes))

    pipeline = multicrop_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                  prefetch_queue_depth=prefetch_queue_depth,
                                  exec_dynamic=True)
    pipeline.build()
    return pipeline


def dali_outputs_to_torch(outputs, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copy the pipeline's outputs (TensorLists of equal-shaped samples) into new torch tensors
    on ``device`` (device to device for GPU pipelines; DALI reuses its buffers next run)."""
    import nvidia.dali.types as types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensors = []
    for output in outputs:
        dense = output.as_tensor()
        source_dtype = torch.float16 if dense.dtype == types.FLOAT16 else torch.float32
        target = torch.empty(dense.shape(), dtype=source_dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        tensors.append(target if source_dtype == dtype else target.to(dtype))
    return tensors
