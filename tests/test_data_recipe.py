"""The augmentation draws: probabilities, ranges and the crop boxes, on many samples.

Frequencies are checked against the configured probabilities within 6 binomial standard
deviations (plus one sample), so a correct sampler fails with probability below 1e-8 per check.
"""

import math

import numpy as np
import pytest

from fastdino.data import MultiCropRecipe, random_resized_crop_boxes, sample_crop_parameters
from fastdino.data.recipe import BRIGHTNESS, CONTRAST, HUE, NO_ADJUSTMENT, SATURATION, batch_generator

N_IMAGES = 20_000


def assert_frequency(flags, probability, what):
    flags = np.asarray(flags)
    tolerance = 6 * math.sqrt(probability * (1 - probability) / flags.size) + 1 / flags.size
    assert abs(flags.mean() - probability) <= tolerance, (
        f"{what}: frequency {flags.mean():.4f}, configured {probability} (tolerance {tolerance:.4f})")


@pytest.fixture
def image_sizes(numpy_generator):
    # ImageNet-like sizes, including portrait and very elongated images
    heights = numpy_generator.integers(60, 800, N_IMAGES)
    widths = numpy_generator.integers(60, 800, N_IMAGES)
    widths[:100] = heights[:100] * 100  # no crop of the allowed ratios fits: the fallback
    return np.stack([heights, widths], axis=1)


def test_probabilities_match_the_recipe(image_sizes, numpy_generator):
    recipe = MultiCropRecipe()
    crops = sample_crop_parameters(recipe, 3, image_sizes, numpy_generator)
    assert len(crops) == 5
    for index, crop in enumerate(crops):
        kind = ("global 1", "global 2", "local")[min(index, 2)]
        assert_frequency(crop.flip, 0.5, f"flip, {kind}")
        assert_frequency(crop.jitter_order[:, 0] != NO_ADJUSTMENT, 0.8, f"color jitter, {kind}")
        assert_frequency(crop.grayscale, 0.2, f"grayscale, {kind}")
        assert_frequency(crop.blur, (1.0, 0.1, 0.5)[min(index, 2)], f"blur, {kind}")
        assert_frequency(crop.solarize, (0.0, 0.2, 0.0)[min(index, 2)], f"solarize, {kind}")


def test_configured_probabilities_are_used(image_sizes, numpy_generator):
    recipe = MultiCropRecipe(flip_probability=0.3, color_jitter_probability=0.35, grayscale_probability=0.65,
                             blur_probabilities=(0.25, 0.75, 0.05), solarize_probabilities=(0.4, 0.6, 0.9))
    crops = sample_crop_parameters(recipe, 1, image_sizes, numpy_generator)
    for index, crop in enumerate(crops):
        assert_frequency(crop.flip, 0.3, "flip")
        assert_frequency(crop.jitter_order[:, 0] != NO_ADJUSTMENT, 0.35, "color jitter")
        assert_frequency(crop.grayscale, 0.65, "grayscale")
        assert_frequency(crop.blur, recipe.blur_probabilities[index], "blur")
        assert_frequency(crop.solarize, recipe.solarize_probabilities[index], "solarize")


def test_jitter_factors_and_order(image_sizes, numpy_generator):
    crop = sample_crop_parameters(MultiCropRecipe(), 0, image_sizes, numpy_generator)[0]
    for name, low, high in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                            ("hue", -0.1, 0.1)]:
        values = getattr(crop, name)
        assert values.min() >= low and values.max() <= high, name
        # uniform: each quarter of the range holds about a quarter of the draws
        quarters = np.histogram(values, bins=4, range=(low, high))[0] / values.size
        assert (abs(quarters - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / values.size)).all(), (name, quarters)
    jittered = crop.jitter_order[crop.jitter_order[:, 0] != NO_ADJUSTMENT]
    assert (np.sort(jittered, axis=1) == [BRIGHTNESS, CONTRAST, SATURATION, HUE]).all()  # permutations
    # each adjustment comes first in about a quarter of the jittered crops (ColorJitter's random order)
    for adjustment in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
        assert_frequency(jittered[:, 0] == adjustment, 0.25, f"adjustment {adjustment} first")
    assert (crop.jitter_order[crop.jitter_order[:, 0] == NO_ADJUSTMENT] == NO_ADJUSTMENT).all()
    assert crop.blur_sigma.min() >= 0.1 and crop.blur_sigma.max() <= 2.0


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_boxes_follow_random_resized_crop(scale, image_sizes, numpy_generator):
    boxes = random_resized_crop_boxes(image_sizes, scale, (3 / 4, 4 / 3), numpy_generator)
    top, left, height, width = boxes.T
    image_h, image_w = image_sizes.T
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= image_h).all() and (left + width <= image_w).all()
    # the fallback, written out: the central crop at the nearest allowed ratio
    image_ratio = image_w / image_h
    fallback_w = np.where(image_ratio > 4 / 3, np.round(image_h * 4 / 3), image_w)
    fallback_h = np.where(image_ratio < 3 / 4, np.round(image_w / (3 / 4)), image_h)
    is_fallback = ((height == fallback_h) & (width == fallback_w) & (top == (image_h - fallback_h) // 2)
                   & (left == (image_w - fallback_w) // 2))
    assert is_fallback[:100].all(), "images too elongated for any crop must take the fallback"
    # the others: area fraction and ratio in range, up to rounding the sides to whole pixels
    slack = 2.5 / np.sqrt(height * width)
    area_fraction = height * width / (image_h * image_w)
    ratio = width / height
    in_range = ((area_fraction >= scale[0] * (1 - slack)) & (area_fraction <= scale[1] * (1 + slack))
                & (ratio >= 3 / 4 * (1 - slack)) & (ratio <= 4 / 3 * (1 + slack)))
    assert (in_range | is_fallback).all()
    assert in_range[100:].mean() > 0.7  # about 0.8 with these sizes for the global scale


def test_draws_depend_only_on_their_key():
    sizes = np.array([[375, 500], [500, 375], [224, 224]])
    recipe = MultiCropRecipe()
    first = sample_crop_parameters(recipe, 2, sizes, batch_generator(7, 3, 1, 11))
    again = sample_crop_parameters(recipe, 2, sizes, batch_generator(7, 3, 1, 11))
    other_step = sample_crop_parameters(recipe, 2, sizes, batch_generator(7, 3, 1, 12))
    assert all((a.box == b.box).all() and (a.hue == b.hue).all() for a, b in zip(first, again))
    assert any((a.box != b.box).any() for a, b in zip(first, other_step))


@pytest.mark.parametrize("field, value", [
    ("global_crop_scale", (0.5, 0.2)), ("local_crop_scale", (0.05, 1.5)), ("flip_probability", 1.5),
    ("blur_probabilities", (1.0, -0.1, 0.5)), ("blur_kernel_size", 22), ("hue", 0.7), ("global_crop_size", 0),
])
def test_bad_recipe_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MultiCropRecipe(**{field: value})


def test_dali_color_map_composes_the_adjustments_in_the_drawn_order(numpy_generator):
    """A x + P mu + q equals the adjustments applied one after another (before clamping)."""
    from fastdino.data.dali_pipeline import color_transform

    sizes = np.full((64, 2), 100)
    crop = sample_crop_parameters(MultiCropRecipe(color_jitter_probability=0.9), 0, sizes, numpy_generator)[0]
    luma = np.array([0.299, 0.587, 0.114])
    linear, from_mean, offset = color_transform(crop)
    for index in range(64):
        pixels = numpy_generator.uniform(0, 255, (50, 3))
        expected = pixels.copy()
        for adjustment in crop.jitter_order[index]:
            if adjustment == BRIGHTNESS:
                expected = expected * crop.brightness[index]
            elif adjustment == CONTRAST:
                mean_luma = (expected @ luma).mean()
                expected = crop.contrast[index] * expected + (1 - crop.contrast[index]) * mean_luma
            elif adjustment == SATURATION:
                gray = (expected @ luma)[:, None]
                expected = crop.saturation[index] * expected + (1 - crop.saturation[index]) * gray
            elif adjustment == HUE:
                # rotation about the gray axis keeps the gray component and turns the rest
                angle = 2 * np.pi * crop.hue[index]
                axis = np.ones(3) / np.sqrt(3)
                along = (expected @ axis)[:, None] * axis
                across = expected - along
                expected = along + np.cos(angle) * across + np.sin(angle) * np.cross(axis, across)
        if crop.grayscale[index]:
            expected = np.repeat((expected @ luma)[:, None], 3, axis=1)
        got = pixels @ linear[index].T + from_mean[index] @ pixels.mean(axis=0) + offset[index]
        np.testing.assert_allclose(got, expected, atol=1e-6 * 255)
