"""The iBOT block masks (fastdino.data.masking) against DINOv2's algorithm and collate.

Two references written here from the release's description (``dinov2/data/masking.py``
``MaskingGenerator`` and ``dinov2/data/collate.py`` ``collate_data_and_cast``), driven by the same
numpy generator as fastdino, must give the very same masks. The shapes of single blocks are
checked against their distribution computed from the description (area uniform, aspect ratio
log-uniform, rounding, the strict fit), within 6 binomial standard deviations plus one sample,
so a correct sampler fails a check with probability below 1e-8.
"""

import math

import numpy as np
import pytest
import torch

from fastdino.data.masking import (
    MASK_STREAM,
    BlockMaskGenerator,
    IBOTMaskRecipe,
    IBOTMasks,
    _Uniforms,
    mask_batch_generator,
    sample_ibot_masks,
)
from fastdino.data.recipe import MultiCropRecipe, batch_generator, sample_crop_parameters
from fastdino.ops import ibot_masks_weight

KEY = dict(seed=3, epoch=2, shard_id=1, step=7)


def release_mask(height, width, count, rng, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, complete_randomly=False):
    """MaskingGenerator(input_size=(height, width), ...)(count) of the release, on a numpy array with
    its loops. Its random.uniform(a, b) is a + (b - a) * random() (Python's definition), its
    random.randint(0, n) here floor((n + 1) * random()), every random() one rng.random() call.
    complete_randomly: DINOv3's completion, as a partial Fisher-Yates shuffle of the unmasked
    patches in row-major order."""
    max_num_patches = height * width if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)

    def uniform(low, high):
        return low + (high - low) * rng.random()

    def one_block(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = int(rng.random() * (height - h + 1))
                left = int(rng.random() * (width - w + 1))
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < count:
        delta = one_block(min(count - mask_count, max_num_patches))
        if delta == 0:
            break
        mask_count += delta
    if complete_randomly:
        free = np.flatnonzero(~mask.reshape(-1)).tolist()
        for chosen in range(count - mask_count):
            other = chosen + int(rng.random() * (len(free) - chosen))
            free[chosen], free[other] = free[other], free[chosen]
            mask.reshape(-1)[free[chosen]] = True
    return mask


def release_batch_masks(recipe: IBOTMaskRecipe, batch_size, seed, epoch, shard_id, step):
    """collate_data_and_cast's masks, from the masks' generator of (seed, epoch, shard, step):
    one ratio uniform in each of the n_masked intervals of linspace(min, max, n_masked + 1), the
    masked crops placed at a random subset of the rows (the release's shuffle)."""
    rng = np.random.default_rng([seed, epoch, shard_id, step, MASK_STREAM])
    n_rows = recipe.n_global_crops * batch_size
    n_tokens = recipe.num_patches
    n_samples_masked = int(n_rows * recipe.mask_sample_probability)
    probs = np.linspace(*recipe.mask_ratio_min_max, n_samples_masked + 1)
    ratios = [probs[i] + (probs[i + 1] - probs[i]) * rng.random() for i in range(n_samples_masked)]
    rows = rng.permutation(n_rows)[:n_samples_masked]
    masks = np.zeros((n_rows, n_tokens), dtype=bool)
    generator = recipe.block_generator()
    for row, ratio in zip(rows, ratios):
        masks[row] = release_mask(*recipe.grid_size, int(n_tokens * ratio), rng, generator.min_num_patches,
                                  generator.max_num_patches, recipe.min_aspect, recipe.max_aspect,
                                  recipe.complete_randomly).reshape(-1)
    return masks


@pytest.mark.parametrize("grid, settings", [
    ((16, 16), dict(max_num_patches=128.0)),  # DINOv2 at 224 px, patch 14
    ((7, 13), dict(min_num_patches=2, min_aspect=0.5, max_aspect=3.0)),
    ((37, 37), dict(max_num_patches=684.5, complete_randomly=True)),  # 518 px
    ((16, 16), dict(max_num_patches=128.0, complete_randomly=True)),
])
def test_block_masks_are_the_release_algorithm(grid, settings, random_seed):
    generator = BlockMaskGenerator(grid, **settings)
    n_patches = grid[0] * grid[1]
    # every count from empty to the full grid (where the block phase stops short most)
    for count in sorted({0, 1, 2, 3, 4, 5, n_patches // 10, n_patches // 2, n_patches - 1, n_patches,
                         *np.random.default_rng(random_seed).integers(0, n_patches + 1, 6).tolist()}):
        seed = [random_seed, count]
        ours = generator(count, np.random.default_rng(seed))
        reference = release_mask(*grid, count, np.random.default_rng(seed), **settings)
        assert ours.shape == grid and ours.dtype == bool
        np.testing.assert_array_equal(ours, reference, err_msg=f"count {count}")
        assert ours.sum() <= count  # never more than asked
        if generator.complete_randomly:
            assert ours.sum() == count


def test_uniforms_are_the_generators_sequence(random_seed):
    # the bulk fetches hand out the doubles of one rng.random() call after another
    uniform = _Uniforms(np.random.default_rng(random_seed))
    one_by_one = np.random.default_rng(random_seed)
    assert [uniform() for _ in range(1000)] == [one_by_one.random() for _ in range(1000)]


def single_block_shape_probabilities(height, width, max_mask_patches, min_num_patches, min_aspect, max_aspect):
    """The shape (h, w) of one block on an empty grid, from the description: area x uniform in
    [min_num_patches, max_mask_patches], log aspect uniform, h = round(sqrt(x a)),
    w = round(sqrt(x / a)), taken when h < height, w < width and h w <= max_mask_patches, else
    drawn again (up to 10 attempts). Returns the shapes' probabilities given that one is taken,
    and the probability that 10 attempts in a row fail. For each x the aspect ratios giving (h, w) are an interval of log a; the
    integral over x is a midpoint sum (1e5 points: error well below the test's 1e-3 tolerance)."""
    log_low, log_high = math.log(min_aspect), math.log(max_aspect)
    steps = 100_000
    areas = min_num_patches + (np.arange(steps) + 0.5) * (max_mask_patches - min_num_patches) / steps
    log_areas = np.log(areas)
    largest = int(round(math.sqrt(max_mask_patches * max_aspect))) + 1
    per_attempt = {}
    for h in range(1, largest + 1):
        for w in range(1, largest + 1):
            # sqrt(x a) in [h - 1/2, h + 1/2) and sqrt(x / a) in [w - 1/2, w + 1/2)
            low = np.maximum.reduce([np.full(steps, log_low), 2 * np.log(h - 0.5) - log_areas if h > 1 else
                                     np.full(steps, -np.inf), log_areas - 2 * np.log(w + 0.5)])
            high = np.minimum.reduce([np.full(steps, log_high), 2 * np.log(h + 0.5) - log_areas,
                                      log_areas - 2 * np.log(w - 0.5) if w > 1 else np.full(steps, np.inf)])
            probability = np.clip(high - low, 0, None).mean() / (log_high - log_low)
            if probability > 0:
                per_attempt[h, w] = probability
    assert abs(sum(per_attempt.values()) - 1) < 1e-6  # the shapes cover every draw
    taken = {shape: p for shape, p in per_attempt.items()
             if shape[0] < height and shape[1] < width and shape[0] * shape[1] <= max_mask_patches}
    accepted = sum(taken.values())
    return {shape: p / accepted for shape, p in taken.items()}, (1 - accepted) ** 10


@pytest.mark.parametrize("grid, max_mask_patches, min_aspect, max_aspect", [
    ((16, 16), 20, 0.3, 1 / 0.3),
    ((5, 16), 24, 0.3, 1 / 0.3),  # tall blocks (h >= 5) do not fit: the strict h < height
    ((12, 9), 30, 0.6, 2.0),
])
def test_single_blocks_follow_the_described_distribution(grid, max_mask_patches, min_aspect, max_aspect,
                                                         numpy_generator):
    generator = BlockMaskGenerator(grid, max_num_patches=max_mask_patches, min_aspect=min_aspect,
                                   max_aspect=max_aspect)
    expected, failure = single_block_shape_probabilities(*grid, max_mask_patches, 4, min_aspect, max_aspect)
    uniform = _Uniforms(numpy_generator)
    n_attempts = 20_000
    shapes, failures = {}, 0
    for _ in range(n_attempts):
        rows = [0] * grid[0]
        added = generator._add_block(rows, max_mask_patches, uniform)
        if added == 0:
            assert not any(rows)
            failures += 1
            continue
        used = [row for row in rows if row]
        h, w = len(used), used[0].bit_count() if used else 0
        # one full rectangle of the returned size, strictly inside the grid
        assert added == h * w > 0 and len(set(used)) == 1
        assert rows.index(used[0]) + h == len(rows) - rows[::-1].index(used[0])  # contiguous rows
        assert used[0] == ((1 << w) - 1) << (used[0].bit_length() - w)  # contiguous columns
        shapes[h, w] = shapes.get((h, w), 0) + 1
    # a rare event (0.2 expected on the 5-row grid): 6 more counts than 6 sigma, P(Poisson(0.2) >= 7) ~ 3e-9
    tolerance = 6 * math.sqrt(n_attempts * failure * (1 - failure)) + 6
    assert abs(failures - n_attempts * failure) <= tolerance, (failures, n_attempts * failure)
    assert set(shapes) <= set(expected), f"shapes outside the described ones: {set(shapes) - set(expected)}"
    n_blocks = n_attempts - failures
    for shape, probability in expected.items():
        frequency = shapes.get(shape, 0) / n_blocks
        tolerance = 6 * math.sqrt(probability * (1 - probability) / n_blocks) + 1 / n_blocks
        assert abs(frequency - probability) <= tolerance, (
            f"block {shape}: frequency {frequency:.4f}, described {probability:.4f} (tolerance {tolerance:.4f})")
    assert all(h < grid[0] and w < grid[1] for h, w in shapes)


@pytest.mark.parametrize("batch_size, settings", [
    (32, {}),  # DINOv2's defaults, 64 global crops
    (5, dict(grid_size=(7, 9), mask_sample_probability=0.3, mask_ratio_min_max=(0.0, 0.6),
             min_num_patches=3, complete_randomly=True)),
    (3, dict(mask_sample_probability=1.0, mask_ratio_min_max=(0.5, 0.5), n_global_crops=3)),
    (4, dict(mask_sample_probability=0.0)),
])
def test_batch_masks_are_the_release_collate(batch_size, settings):
    recipe = IBOTMaskRecipe(**settings)
    ours = sample_ibot_masks(recipe, batch_size, **KEY)
    reference = release_batch_masks(recipe, batch_size, **KEY)
    np.testing.assert_array_equal(ours.masks.numpy(), reference)
    n_rows = recipe.n_global_crops * batch_size
    assert ours.masks.shape == (n_rows, recipe.num_patches) and ours.masks.dtype == torch.bool
    assert ours.grid_size == recipe.grid_size


def test_indices_weights_and_counts_are_dinov2s():
    recipe = IBOTMaskRecipe()
    masks = sample_ibot_masks(recipe, 16, **KEY)
    collated = masks.masks
    # DINOv2's collate, in torch
    torch.testing.assert_close(masks.mask_indices, collated.flatten().nonzero().flatten(), rtol=0, atol=0)
    torch.testing.assert_close(masks.masks_weight, ibot_masks_weight(collated), rtol=0, atol=0)
    assert masks.mask_indices.dtype == torch.int64 and masks.masks_weight.dtype == torch.float32
    assert masks.n_masked_patches == len(masks.mask_indices) == int(collated.sum())
    # each weight is 1/c rounded to float32 (relative error <= 2^-24), so c of them sum, in
    # float64, to within 2^-24 of 1
    crop_of_patch = masks.mask_indices // recipe.num_patches
    sums = torch.zeros(len(collated), dtype=torch.float64).index_add_(0, crop_of_patch, masks.masks_weight.double())
    masked = collated.any(dim=1)
    torch.testing.assert_close(sums[masked], torch.ones(int(masked.sum()), dtype=torch.float64),
                               rtol=0, atol=2.0**-24)
    assert (sums[~masked] == 0).all()


@pytest.mark.parametrize("batch_size, probability", [(64, 0.5), (5, 0.3), (3, 1.0), (7, 0.0), (1, 0.5)])
def test_number_of_masked_crops_and_their_ratios(batch_size, probability):
    """The masked crops' ratios fall in their intervals of [0.1, 0.5]: crop k of the sorted ones
    has int(N * r_k) patches, r_k in [lo_k, hi_k), so (granularity 1/N) between floor(N lo_k) and
    floor(N hi_k), exactly with complete_randomly; the release's block phase may stop short of
    the lower end (see BlockMaskGenerator), never above the upper one."""
    for complete_randomly in (True, False):
        recipe = IBOTMaskRecipe(mask_sample_probability=probability, complete_randomly=complete_randomly)
        masks = sample_ibot_masks(recipe, batch_size, **KEY)
        n_rows, n_patches = 2 * batch_size, recipe.num_patches
        n_masked = int(n_rows * probability)
        counts = masks.masks.sum(dim=1).numpy()
        assert (counts > 0).sum() == n_masked  # the ratios start at 0.1: every masked crop has patches
        bounds = np.linspace(0.1, 0.5, n_masked + 1)
        lowest, highest = np.floor(n_patches * bounds[:-1]), np.floor(n_patches * bounds[1:])
        ordered = np.sort(counts[counts > 0])
        assert (ordered <= highest).all(), (ordered, highest)
        if complete_randomly:
            assert (ordered >= lowest).all(), (ordered, lowest)
        assert masks.upperbound == int(highest.sum()) >= masks.n_masked_patches


def test_masked_crops_are_a_uniform_subset_of_the_rows(random_seed):
    # each of the 8 rows (4 samples x 2 crops) masked with probability 4 / 8 = 0.5
    recipe = IBOTMaskRecipe()
    n_batches = 2000
    masked = np.stack([sample_ibot_masks(recipe, 4, seed=random_seed, epoch=0, shard_id=0, step=step).masks.any(dim=1)
                       for step in range(n_batches)]).astype(bool)
    tolerance = 6 * math.sqrt(0.25 / n_batches) + 1 / n_batches
    assert np.abs(masked.mean(axis=0) - 0.5).max() <= tolerance
    # both crops of one sample masked as often as any two rows of a uniform 4-of-8 subset,
    # (4/8)(3/7): the release shuffles over all rows, not sample by sample (the 4 samples of a
    # batch are negatively correlated, so treating them as independent is conservative)
    both = (masked[:, :4] & masked[:, 4:]).mean()
    assert abs(both - 3 / 14) <= 6 * math.sqrt(3 / 14 * 11 / 14 / (4 * n_batches)) + 1 / n_batches


def test_masks_are_a_function_of_the_batch_key():
    recipe = IBOTMaskRecipe()
    first = sample_ibot_masks(recipe, 8, **KEY).masks
    # no state between calls: other batches in between (a resumed run starts anywhere)
    for step in (0, 9, 3):
        sample_ibot_masks(recipe, 8, **{**KEY, "step": step})
    torch.testing.assert_close(sample_ibot_masks(recipe, 8, **KEY).masks, first, rtol=0, atol=0)
    for name in KEY:
        other = sample_ibot_masks(recipe, 8, **{**KEY, name: KEY[name] + 1}).masks
        assert not torch.equal(other, first), f"{name} + 1 gave the same masks"


def test_masks_leave_the_crop_draws_unchanged(numpy_generator):
    sizes = numpy_generator.integers(100, 600, (6, 2))
    key = tuple(KEY.values())
    before = sample_crop_parameters(MultiCropRecipe(), 2, sizes, batch_generator(*key))
    sample_ibot_masks(IBOTMaskRecipe(), 6, **KEY)
    after = sample_crop_parameters(MultiCropRecipe(), 2, sizes, batch_generator(*key))
    for crop_before, crop_after in zip(before, after):
        np.testing.assert_array_equal(crop_before.box, crop_after.box)
    # and the masks' stream is not the crops' stream
    assert mask_batch_generator(*key).random() != batch_generator(*key).random()


def test_tensors_share_one_buffer_and_move_together():
    masks = sample_ibot_masks(IBOTMaskRecipe(), 4, **KEY, pin_memory=False)
    storage = masks.storage
    assert storage.dtype == torch.uint8 and storage.numel() == 12 * masks.n_masked_patches + masks.masks.numel()
    for tensor in (masks.masks, masks.mask_indices, masks.masks_weight):
        assert tensor.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    assert masks.to("cpu") is masks
    empty = sample_ibot_masks(IBOTMaskRecipe(mask_sample_probability=0.0), 4, **KEY, pin_memory=False)
    assert empty.n_masked_patches == 0 and empty.mask_indices.shape == (0,) and empty.masks_weight.shape == (0,)
    assert not empty.masks.any()


def test_from_masks_on_given_masks():
    given = np.zeros((3, 6), dtype=bool)
    given[0, [1, 4]] = True
    given[2, [0, 2, 5]] = True
    masks = IBOTMasks.from_masks(given, (2, 3), upperbound=5)
    assert masks.mask_indices.tolist() == [1, 4, 12, 14, 17]
    assert masks.masks_weight.tolist() == [0.5, 0.5] + [float(np.float32(1) / np.float32(3))] * 3
    assert masks.n_masked_patches == 5 and masks.upperbound == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_is_one_copy_without_a_host_sync():
    masks = sample_ibot_masks(IBOTMaskRecipe(), 32, **KEY)
    assert masks.storage.is_pinned()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        on_device = masks.to("cuda")
        on_device.record_stream(torch.cuda.current_stream())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_device.n_masked_patches == masks.n_masked_patches
    unpinned = sample_ibot_masks(IBOTMaskRecipe(), 32, **KEY, pin_memory=False)
    assert not unpinned.storage.is_pinned() and unpinned.pin_memory().storage.is_pinned()
    torch.testing.assert_close(unpinned.pin_memory().masks, masks.masks, rtol=0, atol=0)
    for name in ("masks", "mask_indices", "masks_weight"):
        assert getattr(on_device, name).is_cuda
        torch.testing.assert_close(getattr(on_device, name).cpu(), getattr(masks, name), rtol=0, atol=0)


@pytest.mark.parametrize("settings, message", [
    (dict(mask_ratio_min_max=(0.1, 1.5)), r"mask_ratio_min_max=\(0.1, 1.5\).*in \[0, 1\]"),
    (dict(mask_ratio_min_max=(-0.1, 0.5)), r"mask_ratio_min_max=\(-0.1, 0.5\).*in \[0, 1\]"),
    (dict(mask_ratio_min_max=(0.5, 0.1)), r"mask_ratio_min_max=\(0.5, 0.1\): min > max"),
    (dict(mask_ratio_min_max=(0.5,)), r"mask_ratio_min_max=\(0.5,\)"),
    (dict(mask_sample_probability=1.2), r"mask_sample_probability=1.2"),
    (dict(mask_sample_probability=-0.5), r"mask_sample_probability=-0.5"),
    (dict(grid_size=(1, 16)), r"grid too small.*0 x 15"),
    (dict(grid_size=2), r"grid too small.*1 x 1.*min_num_patches=4"),
    (dict(grid_size=(3, 2.5)), r"grid_size=\(3, 2.5\)"),
    (dict(n_global_crops=0), r"n_global_crops=0"),
    (dict(min_num_patches=0), r"min_num_patches=0"),
    (dict(max_num_patches=3), r"max_num_patches=3: must be >= min_num_patches=4"),
    (dict(min_aspect=0.0), r"min_aspect=0.0"),
    (dict(min_aspect=2.0, max_aspect=1.0), r"min_aspect=2.0, max_aspect=1.0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        IBOTMaskRecipe(**settings)


def test_bad_calls_are_named():
    with pytest.raises(ValueError, match=r"batch_size=0"):
        sample_ibot_masks(IBOTMaskRecipe(), 0, **KEY)
    with pytest.raises(ValueError, match=r"num_masking_patches=257: must be in \[0, 256\]"):
        BlockMaskGenerator(16)(257, np.random.default_rng(0))
