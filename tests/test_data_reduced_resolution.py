"""The DALI CPU pipeline's reduced resolution: images whose every crop is downscaled by at least
2^(L + 1) are halved L times by 2x2 box averages before their crops are cut.

Checked: the rule (against a per-image reference), the boxes in reduced coordinates, that
images the rule leaves alone come out bit-identical, and that halved crops differ from the
release's PIL crops by no more than the boxes' blur explains (the error model below), on native
photographs and on a smooth pattern that exposes any misplaced box.
"""

import io
import math

import numpy as np
import pytest
import torch

from fastdino.data import BatchPlan, MultiCropRecipe, dali_available, sample_crop_parameters, scan_images
from fastdino.data.dali_pipeline import (
    MAX_HALVINGS,
    encoded_image_size,
    halving_inputs,
    halvings,
    pack_crop_parameters,
    reduced_crop_parameters,
)
from fastdino.data.recipe import batch_generator

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
PLAIN = dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probabilities=(0, 0, 0),
             solarize_probabilities=(0, 0, 0), flip_probability=0.0)
IMAGE_SIZE = (509, 381)  # width, height: odd, so the halved images end in edge averages
# crop sizes that give IMAGE_SIZE's images 1, 2 and 3 halvings: local boxes have sides >= 85 (5%
# of the area at the aspect ratio 3/4), global ones 241..381
HALVING_RECIPES = {1: dict(global_crop_size=48, local_crop_size=20), 2: dict(global_crop_size=24, local_crop_size=10),
                   3: dict(global_crop_size=12, local_crop_size=5)}


def reference_halvings(boxes, crop_sizes) -> int:
    """The rule for one image, written out: the most halvings L <= MAX_HALVINGS such that every
    crop is downscaled >= 2^(L + 1) on both axes."""
    for level in range(MAX_HALVINGS, 0, -1):
        if all(height >= size * 2 ** (level + 1) and width >= size * 2 ** (level + 1)
               for (_, _, height, width), size in zip(boxes, crop_sizes)):
            return level
    return 0


@pytest.mark.parametrize("crop_sizes", [(224, 96), (48, 24), (14, 6)])
def test_halvings_follow_the_rule(crop_sizes, numpy_generator, random_seed):
    recipe = MultiCropRecipe(global_crop_size=crop_sizes[0], local_crop_size=crop_sizes[1])
    sizes = numpy_generator.integers(1, 2500, (200, 2))
    sizes[:20] = numpy_generator.integers(1, 20, (20, 2))  # tiny: fallback boxes, upsampled crops
    crops = sample_crop_parameters(recipe, 4, sizes, batch_generator(random_seed, 0, 0, 0))
    boxes = np.stack([crop.box for crop in crops])  # (crops, B, 4)
    levels = halvings(boxes, recipe.crop_sizes(4))
    assert levels.dtype == np.int64
    assert levels.tolist() == [reference_halvings(boxes[:, b], recipe.crop_sizes(4)) for b in range(len(sizes))]
    if crop_sizes == (14, 6):
        assert set(levels.tolist()) == {0, 1, 2, 3}  # every case was exercised


def test_halvings_keep_upsampled_crops_at_full_resolution():
    crop_sizes = [16, 8]
    # one image, crops downscaled 25x and 12.5x: 2^(L + 1) <= 12.5, L = 2
    fine = np.array([[[0, 0, 400, 400]], [[100, 100, 100, 100]]])
    assert halvings(fine, crop_sizes).tolist() == [2]
    upsampled = fine.copy()
    upsampled[1, 0] = [100, 100, 7, 100]  # 7 rows to 8: upsampled vertically
    assert halvings(upsampled, crop_sizes).tolist() == [0]
    for side, level in ((40, 1), (31, 0), (32, 1), (64, 2), (128, 3), (1000, 3)):
        boxes = fine.copy()
        boxes[1, 0] = [0, 0, side, side]  # side / 8 downscaled
        assert halvings(boxes, crop_sizes).tolist() == [level], side


def test_reduced_boxes_and_halving_sizes(random_seed):
    recipe = MultiCropRecipe(global_crop_size=24, local_crop_size=10)
    sizes = np.array([[381, 509], [380, 508], [10, 12], [381, 509]])
    crops = sample_crop_parameters(recipe, 2, sizes, batch_generator(random_seed, 0, 0, 1))
    params, _ = pack_crop_parameters(crops, recipe.blur_kernel_size)
    unknown = sizes.copy()
    unknown[3] = 0  # a header that could not be read
    reduced, vectors = reduced_crop_parameters(params, unknown, recipe.crop_sizes(2))
    levels = halvings(np.stack([crop.box for crop in crops]), recipe.crop_sizes(2))
    assert levels.tolist() == [2, 2, 0, 2]  # 10x12 pixels: no 10-pixel crop downscaled 4x
    levels[3] = 0  # not halved without its size
    assert vectors.shape == (4, 1 + 4 * MAX_HALVINGS) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[:, 0], levels)
    for b, (height, width) in enumerate(unknown):
        for level in range(MAX_HALVINGS):
            h, w = math.ceil(height / 2 ** (level + 1)), math.ceil(width / 2 ** (level + 1))
            np.testing.assert_array_equal(vectors[b, 1 + 4 * level:5 + 4 * level], [h, w, 2 * h, 2 * w])
        np.testing.assert_array_equal(reduced[b, :, :4], params[b, :, :4] / 2 ** levels[b])
        np.testing.assert_array_equal(reduced[b, :, 4:], params[b, :, 4:])


def test_encoded_image_size_reads_jpeg_and_png_headers(numpy_generator):
    from PIL import Image

    pixels = numpy_generator.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for image_format in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=image_format)
        assert encoded_image_size(np.frombuffer(buffer.getvalue(), dtype=np.uint8)) == (37, 53)
    assert encoded_image_size(np.frombuffer(b"GIF89a" + bytes(40), dtype=np.uint8)) is None


def test_halving_inputs_read_the_headers_and_leave_the_gpu_inputs_alone(numpy_generator, random_seed):
    """What the external source feeds: halvings from each file's header (a PNG, a JPEG, bytes of
    neither: not halved), or none at all without ``reduce_resolution``, as on the GPU."""
    from PIL import Image

    recipe = MultiCropRecipe(global_crop_size=24, local_crop_size=10)
    encoded = []
    for image_format in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(numpy_generator.integers(0, 256, (381, 509, 3), dtype=np.uint8)).save(buffer, format=image_format)
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    encoded.append(np.zeros(100, dtype=np.uint8))
    crops = sample_crop_parameters(recipe, 2, [[381, 509]] * 3, batch_generator(random_seed, 0, 0, 2))
    params, _ = pack_crop_parameters(crops, recipe.blur_kernel_size)
    halved_params, vectors = halving_inputs(encoded, params, recipe.crop_sizes(2), reduce_resolution=True)
    assert vectors[:, 0].tolist() == [2, 2, 0]
    np.testing.assert_array_equal(halved_params[2], params[2])
    unchanged, none = halving_inputs(encoded, params, recipe.crop_sizes(2), reduce_resolution=False)
    assert unchanged is params and none.shape == vectors.shape and not none.any()


# -- the pipeline --------------------------------------------------------------------------------

def write_test_images(folder, kind: str, numpy_generator, period: float = 0, n_images: int = 4):
    """``n_images`` images of IMAGE_SIZE: native-resolution crops of the sample photos (JPEG), or
    a smooth 2-D sinusoid of ``period`` pixels and amplitude 100 levels (PNG), whose slopes turn
    a box misplaced by half a pixel of the halved image into several levels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    width, height = IMAGE_SIZE
    for index in range(n_images):
        if kind == "photos":
            import skimage.data

            name = ("astronaut", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")[index % 6]
            photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            left = int(numpy_generator.integers(0, photo.width - width + 1))
            top = int(numpy_generator.integers(0, photo.height - height + 1))
            photo.crop((left, top, left + width, top + height)).save(folder / f"image_{index}.jpg", quality=90)
        else:
            y, x = np.mgrid[0:height, 0:width]
            phase = numpy_generator.uniform(0, 2 * np.pi, 3)
            pixels = 128 + 100 * np.sin(2 * np.pi * (x + 0.6 * y)[:, :, None] / period + phase)
            Image.fromarray(np.round(pixels).astype(np.uint8)).save(folder / f"image_{index}.png")
    return folder


def dali_levels(plan, reduce_resolution: bool) -> list[np.ndarray]:
    """The DALI CPU pipeline's crops of batch (0, 0), as float64 levels (B, 3, S, S)."""
    from fastdino.data.dali_pipeline import build_dali_pipeline, dali_outputs_to_torch
    from fastdino.data.loader import dali_batch_inputs

    inputs = dali_batch_inputs(plan, 0, 0)[1]
    pipeline = build_dali_pipeline(lambda: inputs, plan.recipe, plan.n_local_crops, plan.batch_size, 1, None, False,
                                   reduce_resolution=reduce_resolution)
    crops = dali_outputs_to_torch(pipeline.run(), torch.device("cpu"), torch.float32)
    std = torch.tensor(plan.recipe.std).view(1, 3, 1, 1) * 255
    mean = torch.tensor(plan.recipe.mean).view(1, 3, 1, 1) * 255
    return [(crop * std + mean).double().numpy() for crop in crops]


def release_levels(plan) -> list[np.ndarray]:
    """The release's PIL crops (``resized_crop``, bicubic, at full resolution) of batch (0, 0)."""
    from fastdino.data.torchvision_pipeline import MultiCropBatches

    batches = MultiCropBatches(plan.recipe, plan.recipe.crop_sizes(plan.n_local_crops))
    return [crop.double().numpy() for crop in batches[plan.request(0, 0)]]


def make_plan(folder, recipe_fields, batch_size=4, n_local_crops=2) -> BatchPlan:
    return BatchPlan(scan_images(folder, verbose=False, use_cache=False), batch_size,
                     MultiCropRecipe(**{**PLAIN, **recipe_fields}), n_local_crops, seed=0, shard_id=0, num_shards=1,
                     drop_last=True)


def box_blur_model(full: np.ndarray, boxes: np.ndarray, size: int, levels: np.ndarray) -> np.ndarray:
    """The difference the boxes' blur predicts, to first order: the halvings average 2^L x 2^L
    source pixels (variance (4^L - 1) / 12 source pixels^2 per axis, that over factor^2 in output
    pixels), and a blur of small variance v changes an image y by about (v / 2) y'' per axis,
    with y'' the second difference of the crop at full resolution (edges repeated).

    full: (B, 3, S, S) levels; boxes: (B, 4) top, left, height, width."""
    padded = np.pad(full, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    second_y = padded[:, :, 2:, 1:-1] - 2 * full + padded[:, :, :-2, 1:-1]
    second_x = padded[:, :, 1:-1, 2:] - 2 * full + padded[:, :, 1:-1, :-2]
    source_variance = ((4.0 ** levels - 1) / 12)[:, None, None, None]
    factor_y = (boxes[:, 2] / size)[:, None, None, None]
    factor_x = (boxes[:, 3] / size)[:, None, None, None]
    return source_variance / 2 * (second_y / factor_y ** 2 + second_x / factor_x ** 2)


def rms(values: np.ndarray) -> np.ndarray:
    """Per image: the root mean square over channels and pixels."""
    return np.sqrt((values ** 2).reshape(len(values), -1).mean(axis=1))


def rounding_rms(n_halvings: int) -> float:
    """Rounding in the halved path against the full one, in levels rms: each halved image is
    rounded to 8 bits (uniform error, rms 1/sqrt(12); the resize's weights w carry it over with
    a factor sqrt(sum w^2) <= sqrt(sum |w|), under 1.04 for the bicubic kernel), and both crops
    are rounded to 8 bits after their resize (independently: rms sqrt(2 / 12))."""
    return n_halvings * 1.04 / math.sqrt(12) + math.sqrt(2 / 12)


# The first-order model against the box's exact effect: per axis and frequency w (radians per
# output pixel), a blur of variance v attenuates by at most v w^2 / 2 (cos x >= 1 - x^2 / 2
# under the box's distribution), the model's second difference gives v (1 - cos w), and
# w^2 / (2 (1 - cos w)) <= pi^2 / 4 on [0, pi]. By Parseval the difference's rms is then at
# most pi^2 / 4 times the model's (up to the crop's edges, where the model repeats pixels).
# Left out: what the halved image's coarser grid aliases differently from the full one, which
# is the signal above the crop's Nyquist frequency, little in photographs (white noise, all
# signal above it, differs by up to 1.5 levels rms after one halving).
MODEL_FACTOR = math.pi ** 2 / 4


@needs_dali
@pytest.mark.parametrize("kind", ["photos", "smooth"])
@pytest.mark.parametrize("n_halvings", sorted(HALVING_RECIPES))
def test_halved_crops_differ_from_the_release_by_the_box_blur_only(kind, n_halvings, tmp_path, numpy_generator):
    """Per crop: rms(halved - full) <= pi^2 / 4 rms(model) + rounding, against DALI's crop of
    the full image; and, through it (the triangle inequality), rms(halved - release) <=
    rms(full - release) + the same, against the release's PIL crop (DALI's own gap to PIL,
    interpolation rounding and edge handling, is what tests/test_data_loader.py bounds)."""
    if kind == "photos":
        pytest.importorskip("skimage")
    recipe = HALVING_RECIPES[n_halvings]
    # 12 output pixels per period or more: smooth in every crop, whatever its downscale
    period = 12 * IMAGE_SIZE[1] / recipe["global_crop_size"]
    plan = make_plan(write_test_images(tmp_path / kind, kind, numpy_generator, period), recipe)
    crops = plan.request(0, 0)[1]
    crop_sizes = plan.recipe.crop_sizes(plan.n_local_crops)
    levels = halvings(np.stack([crop.box for crop in crops]), crop_sizes)
    assert (levels == n_halvings).all(), levels  # the images are halved as intended
    halved, full, release = dali_levels(plan, True), dali_levels(plan, False), release_levels(plan)
    for index, (crop, size) in enumerate(zip(crops, crop_sizes)):
        bound = MODEL_FACTOR * rms(box_blur_model(full[index], crop.box, size, levels)) + rounding_rms(n_halvings)
        difference = rms(halved[index] - full[index])
        assert (difference <= bound).all(), f"crop {index}: rms {difference} > bound {bound}"
        to_release = rms(halved[index] - release[index])
        assert (to_release <= rms(full[index] - release[index]) + bound).all(), f"crop {index}"


@needs_dali
def test_images_without_halvings_come_out_unchanged(tmp_path, numpy_generator):
    """Crops downscaled < 4x (64/32-pixel crops of 200x150 photos): not one image is halved, and
    the pipeline's output is bit-identical to the full-resolution one."""
    pytest.importorskip("skimage")
    from fastdino.data import write_sample_photo_folder

    folder = write_sample_photo_folder(tmp_path, n_images=6, image_size=(200, 150))
    plan = make_plan(folder, dict(global_crop_size=64, local_crop_size=32, color_jitter_probability=0.8,
                                  blur_probabilities=(1.0, 0.1, 0.5), flip_probability=0.5), batch_size=6)
    for a, b in zip(dali_levels(plan, True), dali_levels(plan, False), strict=True):
        np.testing.assert_array_equal(a, b)
