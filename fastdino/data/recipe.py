"""DINO's multi-crop augmentation recipe, and the random draws of each crop.

All randomness of the augmentation is drawn here, in NumPy, from a key (seed, epoch, shard,
step). The backends (DALI on the GPU or CPU, torchvision/PIL) only *apply* the drawn
parameters, so:

- a batch is a pure function of (seed, epoch, shard, step): a resumed run gets the very crops
  the uninterrupted run would have got, and worker or thread counts change nothing;
- every backend follows one definition of the recipe, which the tests check statistically.

The draws follow torchvision's transforms as the public DINO release uses them
(``RandomResizedCrop`` with its 10 tries and center-crop fallback, ``ColorJitter`` with its
random order of the four adjustments, ``RandomGrayscale``, the release's ``GaussianBlur`` and
``Solarization``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Colour-jitter adjustments, in torchvision's ColorJitter order; NO_ADJUSTMENT pads the order
# of crops that are not jittered.
BRIGHTNESS, CONTRAST, SATURATION, HUE, NO_ADJUSTMENT = range(5)
RESIZED_CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before its central fallback


@dataclass(frozen=True)
class MultiCropRecipe:
    """Crop sizes, scales and augmentation probabilities; the defaults are the release's.

    Probabilities given as a triple apply to (first global crop, second global crop, each local
    crop).
    """

    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    color_jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_probability: float = 0.2
    blur_probabilities: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 23
    solarize_probabilities: tuple[float, float, float] = (0.0, 0.2, 0.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("global_crop_size", "local_crop_size", "blur_kernel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MultiCropRecipe.{name}={getattr(self, name)!r}: must be >= 1")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"MultiCropRecipe.blur_kernel_size={self.blur_kernel_size}: must be odd")
        for name in ("global_crop_scale", "local_crop_scale", "aspect_ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"MultiCropRecipe.{name}={getattr(self, name)!r}: need 0 < low <= high")
        for name in ("global_crop_scale", "local_crop_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"MultiCropRecipe.{name}={getattr(self, name)!r}: an area "
                                 f"fraction cannot exceed 1")
        probabilities = [("flip_probability", self.flip_probability),
                         ("color_jitter_probability", self.color_jitter_probability),
                         ("grayscale_probability", self.grayscale_probability)]
        probabilities += [(f"blur_probabilities[{i}]", p) for i, p in enumerate(self.blur_probabilities)]
        probabilities += [(f"solarize_probabilities[{i}]", p) for i, p in enumerate(self.solarize_probabilities)]
        for name, probability in probabilities:
            if not 0 <= probability <= 1:
                raise ValueError(f"MultiCropRecipe.{name}={probability!r}: a probability is in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"MultiCropRecipe.{name}={getattr(self, name)!r}: must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"MultiCropRecipe.hue={self.hue!r}: must be in [0, 0.5]")
        if len(self.blur_probabilities) != 3 or len(self.solarize_probabilities) != 3:
            raise ValueError("MultiCropRecipe.blur_probabilities and solarize_probabilities are "
                             "triples: (first global crop, second global crop, local crops)")

    def crop_sizes(self, n_local_crops: int) -> list[int]:
        """Output side of each crop, global crops first."""
        return [self.global_crop_size] * 2 + [self.local_crop_size] * n_local_crops

    def crop_kind(self, crop_index: int) -> int:
        """Index into the probability triples: 0, 1 for the global crops, 2 for local ones."""
        return min(crop_index, 2)


@dataclass
class CropParameters:
    """The draws of one crop position for a batch of B images (arrays of length B)."""

    box: np.ndarray  # (B, 4) int64: top, left, height, width in pixels of the source image
    flip: np.ndarray  # (B,) bool
    jitter_order: np.ndarray  # (B, 4) int64: adjustments in the order applied, NO_ADJUSTMENT pads
    brightness: np.ndarray  # (B,) float32 factors
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray  # (B,) float32, fraction of a full turn in [-hue, hue]
    grayscale: np.ndarray  # (B,) bool
    blur: np.ndarray  # (B,) bool
    blur_sigma: np.ndarray  # (B,) float32
    solarize: np.ndarray  # (B,) bool


def batch_generator(seed: int, epoch: int, shard_id: int, step: int) -> np.random.Generator:
    """The generator of one batch's draws: independent streams per (seed, epoch, shard, step)."""
    return np.random.default_rng([seed, epoch, shard_id, step])


def sample_crop_parameters(recipe: MultiCropRecipe, n_local_crops: int, image_sizes: np.ndarray,
                           generator: np.random.Generator) -> list[CropParameters]:
    """Draws for every crop (global first) of a batch; image_sizes: (B, 2) int (height, width).

    The generator is called crop after crop in one fixed order; what follows from the draws
    (boxes, jitter orders, the comparisons with the probabilities) is then computed for all
    crops at once: on B-long arrays NumPy's cost is per call rather than per element."""
    image_sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    batch, n_crops = len(image_sizes), 2 + n_local_crops
    kinds = [recipe.crop_kind(i) for i in range(n_crops)]
    fields = ("jitter", "order", "blur", "area", "log_ratio", "top", "left", "flip", "brightness", "contrast",
              "saturation", "hue", "grayscale", "sigma", "solarize")
    draws = {name: [] for name in fields}
    for crop_index, kind in enumerate(kinds):
        scale = recipe.global_crop_scale if crop_index < 2 else recipe.local_crop_scale
        # one crop's draws; their order fixes every batch of every seed, resumed runs' included
        crop_draws = (generator.random(batch), generator.random((batch, 4)), generator.random(batch),
                      *_box_draws(batch, scale, recipe.aspect_ratio, generator, RESIZED_CROP_ATTEMPTS),
                      generator.random(batch), _factors(generator, batch, recipe.brightness),
                      _factors(generator, batch, recipe.contrast), _factors(generator, batch, recipe.saturation),
                      generator.uniform(-recipe.hue, recipe.hue, batch), generator.random(batch),
                      generator.uniform(*recipe.blur_sigma, batch), generator.random(batch))
        for name, values in zip(fields, crop_draws):
            draws[name].append(values)
    draws = {name: np.stack(values) for name, values in draws.items()}  # (n_crops, B, ...)

    blur_probability = np.array([recipe.blur_probabilities[kind] for kind in kinds])[:, None]
    solarize_probability = np.array([recipe.solarize_probabilities[kind] for kind in kinds])[:, None]
    order = np.argsort(draws["order"], axis=2)  # a uniform random permutation
    order[~(draws["jitter"] < recipe.color_jitter_probability)] = NO_ADJUSTMENT
    rows = n_crops * batch
    boxes = _boxes_from_draws(np.tile(image_sizes, (n_crops, 1)), recipe.aspect_ratio,  # crop-major rows
                              draws["area"].reshape(rows, -1), draws["log_ratio"].reshape(rows, -1),
                              draws["top"].reshape(rows), draws["left"].reshape(rows))
    derived = dict(
        box=boxes.reshape(n_crops, batch, 4),
        flip=draws["flip"] < recipe.flip_probability,
        jitter_order=order,
        brightness=draws["brightness"].astype(np.float32),
        contrast=draws["contrast"].astype(np.float32),
        saturation=draws["saturation"].astype(np.float32),
        hue=draws["hue"].astype(np.float32),
        grayscale=draws["grayscale"] < recipe.grayscale_probability,
        blur=draws["blur"] < blur_probability,
        blur_sigma=draws["sigma"].astype(np.float32),
        solarize=draws["solarize"] < solarize_probability,
    )
    return [CropParameters(**{name: values[i] for name, values in derived.items()}) for i in range(n_crops)]


def _factors(generator, batch, strength):
    # ColorJitter's factor range for brightness/contrast/saturation: [max(0, 1 - s), 1 + s]
    return generator.uniform(max(0.0, 1 - strength), 1 + strength, batch)


def random_resized_crop_boxes(image_sizes: np.ndarray, scale: tuple[float, float],
                              aspect_ratio: tuple[float, float],
                              generator: np.random.Generator, attempts: int = RESIZED_CROP_ATTEMPTS) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params``, vectorized over images.

    Up to ``attempts`` (area fraction, log-uniform aspect ratio) tries; the first that fits the
    image wins; otherwise a central crop with the aspect ratio clamped to the range.
    Returns (B, 4) int64 boxes: top, left, height, width.
    """
    return _boxes_from_draws(image_sizes, aspect_ratio,
                             *_box_draws(len(image_sizes), scale, aspect_ratio, generator, attempts))


def _box_draws(batch, scale, aspect_ratio, generator, attempts):
    """``random_resized_crop_boxes``' draws in its order: the tries' area fractions and log
    aspect ratios (B, attempts), then the uniforms (B,) placing the box vertically and
    horizontally."""
    return (generator.uniform(scale[0], scale[1], (batch, attempts)),
            generator.uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1]), (batch, attempts)),
            generator.random(batch), generator.random(batch))


def _boxes_from_draws(image_sizes, aspect_ratio, area_fraction, log_ratio, top_uniform, left_uniform):
    heights, widths = image_sizes[:, 0:1], image_sizes[:, 1:2]
    batch = len(image_sizes)
    area = (heights * widths).astype(np.float64)
    target_area = area * area_fraction
    ratio = np.exp(log_ratio)
    crop_w = np.round(np.sqrt(target_area * ratio)).astype(np.int64)
    crop_h = np.round(np.sqrt(target_area / ratio)).astype(np.int64)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths) & (crop_h <= heights)
    first = np.argmax(fits, axis=1)
    rows = np.arange(batch)
    found = fits[rows, first]
    height = np.where(found, crop_h[rows, first], 0)
    width = np.where(found, crop_w[rows, first], 0)

    # the fallback: the whole image's central part at the nearest allowed aspect ratio
    in_ratio = widths[:, 0] / heights[:, 0]
    fallback_w = np.where(in_ratio < aspect_ratio[0], widths[:, 0],
                          np.where(in_ratio > aspect_ratio[1],
                                   np.round(heights[:, 0] * aspect_ratio[1]).astype(np.int64), widths[:, 0]))
    fallback_h = np.where(in_ratio < aspect_ratio[0],
                          np.round(widths[:, 0] / aspect_ratio[0]).astype(np.int64), heights[:, 0])
    height = np.where(found, height, fallback_h)
    width = np.where(found, width, fallback_w)

    # the position: uniform over the placements that fit (torch.randint(0, H - h + 1))
    top_random = np.floor(top_uniform * (heights[:, 0] - height + 1)).astype(np.int64)
    left_random = np.floor(left_uniform * (widths[:, 0] - width + 1)).astype(np.int64)
    top = np.where(found, top_random, (heights[:, 0] - height) // 2)
    left = np.where(found, left_random, (widths[:, 0] - width) // 2)
    return np.stack([top, left, height, width], axis=1)
