"""The multi-crop loader on both backends: contract, augmentations as drawn, order, resume.

Runs on real photographs (scikit-image's samples) and on generated colourful images. DALI runs
on its CPU operators here; the GPU pipeline is the same graph with the "mixed" decoder
(tests marked gpu).
"""

import math

import numpy as np
import pytest
import torch

from fastdino.data import (
    DATA_BACKEND_ENV_VAR,
    MultiCropRecipe,
    build_multicrop_loader,
    dali_available,
    resolve_data_backend,
    write_sample_photo_folder,
    write_synthetic_image_folder,
)

pytest.importorskip("PIL")
SMALL = dict(global_crop_size=40, local_crop_size=24)
PLAIN = dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probabilities=(0, 0, 0),
             solarize_probabilities=(0, 0, 0))
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI is not installed")),
            "torchvision"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    pytest.importorskip("skimage")
    return write_sample_photo_folder(tmp_path_factory.mktemp("photos"), n_images=24, image_size=(200, 150))


@pytest.fixture(scope="module")
def dim_photos(photos, tmp_path_factory):
    """The photos with their levels mapped into [90, 140] (as PNG): no colour jitter of the
    recipe's ranges (brightness and contrast 0.6..1.4, saturation 0.8..1.2, in any order) takes a
    value out of [0, 255] (34..242 at the extremes), so PIL's clamp after each adjustment never
    acts."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dim_photos")
    for path in sorted(photos.rglob("*.jpg")):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        target = root / path.relative_to(photos).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(90 + pixels * (50 / 255)).astype(np.uint8)).save(target)
    return root


@pytest.fixture(scope="module")
def colorful(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("colorful"), n_images=12, image_size=(96, 72))


def make_loader(folder, backend, seed, batch_size=6, n_local_crops=2, num_threads=1, **recipe_fields):
    """``seed``: the loader's, the test's own seed (conftest), so that FASTDINO_TEST_SEED varies the
    draws."""
    recipe = MultiCropRecipe(**{**SMALL, **recipe_fields})
    return build_multicrop_loader(folder, batch_size, n_local_crops=n_local_crops, backend=backend,
                                  recipe=recipe, num_threads=num_threads, verbose=False, seed=seed)


def to_uint8_levels(crop, recipe=MultiCropRecipe()):
    """Normalized crops back to 0..255 levels."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (crop.float() * std + mean) * 255


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_follow_the_contract(photos, backend, dtype):
    loader = build_multicrop_loader(photos, 4, n_local_crops=3, backend=backend, dtype=dtype, num_threads=2,
                                    recipe=MultiCropRecipe(**SMALL), verbose=False)
    assert loader.backend == {"dali": "dali-cpu", "torchvision": "torchvision"}[backend]
    assert len(loader) == 6 and len(loader.plan.index) == 24
    batches = list(loader)
    assert len(batches) == 6
    for crops in batches:
        assert [tuple(c.shape) for c in crops] == [(4, 3, 40, 40)] * 2 + [(4, 3, 24, 24)] * 3
        assert all(c.dtype == dtype and c.device.type == "cpu" for c in crops)
        for crop in crops:
            levels = to_uint8_levels(crop)
            slack = 1.5 if dtype == torch.bfloat16 else 0.01  # bf16 keeps 8 bits of mantissa
            assert levels.min() >= -slack and levels.max() <= 255 + slack
    assert loader.state_dict() == {"epoch": 1, "step": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_size_photos_with_the_release_recipe(tmp_path, backend):
    pytest.importorskip("skimage")
    folder = write_sample_photo_folder(tmp_path, n_images=4, image_size=(500, 375))
    crops = next(iter(build_multicrop_loader(folder, 4, n_local_crops=2, backend=backend, num_threads=2,
                                             verbose=False)))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 2
    for crop in crops:
        # normalized photos: per-channel means within a couple of standard deviations of 0
        assert crop.mean(dim=(0, 2, 3)).abs().max() < 2 and 0.1 < crop.std() < 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_crops_apply_their_draws(colorful, backend, random_seed):
    """Grayscale and solarization land on exactly the crops whose draws say so, in crop order."""
    fields = {**PLAIN, "grayscale_probability": 0.5, "solarize_probabilities": (0.0, 0.5, 0.0)}
    loader = make_loader(colorful, backend, random_seed, **fields)
    plain = make_loader(colorful, backend, random_seed, **PLAIN)
    _, draws = loader.plan.request(0, 0)
    crops, plain_crops = next(iter(loader)), next(iter(plain))
    for index, (crop, draw) in enumerate(zip(crops, draws)):
        levels = to_uint8_levels(crop)
        is_gray = (levels.amax(dim=1) - levels.amin(dim=1)).flatten(1).amax(dim=1) < 1.0
        assert is_gray.tolist() == draw.grayscale.tolist(), f"crop {index}"
        changed = (crop - plain_crops[index]).abs().flatten(1).amax(dim=1) > 0.05
        # solarization only on the second global crop; grayscale changes the others
        assert changed.tolist() == (draw.grayscale | draw.solarize).tolist(), f"crop {index}"
        assert index == 1 or not draw.solarize.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_mirrors_the_crop(colorful, backend, random_seed):
    flipped = next(iter(make_loader(colorful, backend, random_seed, **{**PLAIN, "flip_probability": 1.0})))
    unflipped = next(iter(make_loader(colorful, backend, random_seed, **{**PLAIN, "flip_probability": 0.0})))
    for a, b in zip(flipped, unflipped):
        torch.testing.assert_close(a, b.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
@pytest.mark.parametrize("folder, fields, bound", [
    ("photos", {}, 0.01),  # both bicubic from the same boxes: interpolation rounding only
    # PIL rounds to 8 bits after each of the 4 adjustments too (hue=0 still round-trips through
    # 8-bit HSV): 0.25 level on average per rounding, scaled by at most 1.4 x 1.8 x 1.4 by the
    # adjustments after it (contrast c scales x by c and its mean by 1 - c): ~2.5 levels in all,
    # 0.044. On dim photos, so that this rounding is the one difference left: PIL also clamps
    # after every adjustment, DALI once at the end (test_dali_colour_map_is_the_documented_one),
    # which on bright photos costs up to 10 levels on average, as much as the draws make it.
    ("dim_photos", {"color_jitter_probability": 1.0, "hue": 0.0}, 0.05),
], ids=["crop", "jitter"])
def test_dali_agrees_with_the_release_pil_operations(request, folder, fields, bound, random_seed):
    """Mean differences in normalized units (1/255 level is about 0.017) on the same draws."""
    folder = request.getfixturevalue(folder)
    dali_crops = next(iter(make_loader(folder, "dali", random_seed, **{**PLAIN, **fields})))
    torchvision_crops = next(iter(make_loader(folder, "torchvision", random_seed, **{**PLAIN, **fields})))
    for a, b in zip(dali_crops, torchvision_crops):
        assert (a - b).abs().mean() < bound


def hue_shift_gap(angles) -> np.ndarray:
    """Per unit of chroma (max - min of R, G, B), the largest difference in any channel between
    HSV's hue shift by ``angles`` (radians) and the documented DALI hue, a rotation about the gray
    axis, red towards green for positive angles (written out here, not taken from fastdino). Both
    keep a colour's chroma and move it along the hue circle, so the gap scales with the chroma."""
    import colorsys

    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    hues = np.linspace(0, 1, 1441)[:-1]
    pure = np.array([colorsys.hsv_to_rgb(h, 1, 1) for h in hues])  # chroma 1
    gray = pure.mean(axis=1, keepdims=True)
    gaps = []
    for angle in np.asarray(angles, dtype=np.float64):
        rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(axis, axis)
        shifted = np.array([colorsys.hsv_to_rgb((h + angle / (2 * np.pi)) % 1, 1, 1) for h in hues])
        gaps.append(np.abs(shifted - (gray + (pure - gray) @ rotation.T)).max())
    return np.array(gaps)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_hue_is_the_release_hue_up_to_the_rotation_gap(photos, random_seed):
    """Per image, the mean difference stays within the hue model: the gap between the two hue
    maps (hue_shift_gap, 0.28 per unit of chroma at the largest shift, 36 degrees) times the
    crop's mean chroma, plus 8-bit rounding: PIL quantizes hue and its shift to 1/256 of a turn
    (a colour moves by up to 6 / 256 of its chroma per step, 0.035 in all) and rounds the resize,
    S and the result (<= 0.5 level each, <= 3x through the hue map: 4 levels). DALI clamps the
    rotated colour to [0, 255], which only moves it towards PIL's (in range)."""
    fields = {**PLAIN, "color_jitter_probability": 1.0, "brightness": 0, "contrast": 0, "saturation": 0}
    loader = make_loader(photos, "dali", random_seed, **fields)
    _, draws = loader.plan.request(0, 0)
    dali_crops = next(iter(loader))
    torchvision_crops = next(iter(make_loader(photos, "torchvision", random_seed, **fields)))
    plain = next(iter(make_loader(photos, "torchvision", random_seed, **PLAIN)))
    for dali_crop, torchvision_crop, unshifted, draw in zip(dali_crops, torchvision_crops, plain, draws):
        difference = (to_uint8_levels(dali_crop) - to_uint8_levels(torchvision_crop)).abs().mean(dim=(1, 2, 3))
        levels = to_uint8_levels(unshifted)
        chroma = (levels.amax(dim=1) - levels.amin(dim=1)).mean(dim=(1, 2))
        gap = torch.from_numpy(hue_shift_gap(2 * np.pi * draw.hue) + 0.035).float()
        bound = gap * chroma + 4.0
        assert (difference <= bound).all(), (difference, bound)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_colour_map_is_the_documented_one(photos, random_seed):
    """DALI's jitter and grayscale are exactly A x + P mu + q of its own unjittered crop (mu its
    mean colour, ``color_transform``), clamped to [0, 255] once, on full-range photos. In float32
    the mean colour sums 1600 levels (a random-walk error of ~u sqrt(n) 255 = 6e-4 level) and the
    map rounds a few values <= 255 (half an ulp is 1.5e-5): 1e-2 level allowed."""
    from fastdino.data.dali_pipeline import color_transform

    fields = {**PLAIN, "color_jitter_probability": 1.0, "grayscale_probability": 0.5}
    loader = make_loader(photos, "dali", random_seed, **fields)
    _, draws = loader.plan.request(0, 0)
    jittered = next(iter(loader))
    plain = next(iter(make_loader(photos, "dali", random_seed, **PLAIN)))
    for crop, draw, unjittered in zip(jittered, draws, plain):
        linear, from_mean, offset = (torch.tensor(x) for x in color_transform(draw))
        x = to_uint8_levels(unjittered).double()
        expected = (torch.einsum("bij,bjhw->bihw", linear, x)
                    + (torch.einsum("bij,bj->bi", from_mean, x.mean(dim=(2, 3))) + offset)[:, :, None, None])
        assert (to_uint8_levels(crop).double() - expected.clamp(0, 255)).abs().max() < 1e-2


def gaussian_blur_reflect_101(levels, sigma, window):
    """A ``window``-tap Gaussian of ``sigma`` over (3, H, W) levels, in float64, the borders
    mirrored without repeating the edge pixel (DALI's default border)."""
    half = window // 2
    taps = torch.exp(-torch.arange(-half, half + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    image = torch.nn.functional.pad(levels.double()[None], (half, half, half, half), mode="reflect")
    image = torch.nn.functional.conv2d(image, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(image, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_is_the_drawn_gaussian(photos, backend, random_seed):
    """Each backend blurs its own unblurred crop with the drawn sigma: DALI with the documented
    Gaussian (up to 23 taps, cut at 3 sigma, mirrored borders), the release's path with PIL's
    GaussianBlur. DALI's float32 blur rounds at most 2 x 23 times at levels <= 255 (half an ulp
    is 1.5e-5) and the normalization and back a few more: 1e-3 level allowed for both. Between
    the two backends lie PIL's box-filter approximation and its edge replication, which no error
    model here bounds (about a gray level on these small crops, most of it at the borders)."""
    from PIL import Image, ImageFilter

    recipe = MultiCropRecipe(**SMALL)
    loader = make_loader(photos, backend, random_seed, **{**PLAIN, "blur_probabilities": (1.0, 1.0, 1.0)})
    _, draws = loader.plan.request(0, 0)
    blurred = next(iter(loader))
    plain = next(iter(make_loader(photos, backend, random_seed, **PLAIN)))
    for crop, draw, unblurred in zip(blurred, draws, plain):
        for index, sigma in enumerate(draw.blur_sigma.tolist()):
            levels = to_uint8_levels(unblurred[index : index + 1])[0]
            actual = to_uint8_levels(crop[index : index + 1])[0]
            if backend == "dali":
                window = int(min(recipe.blur_kernel_size, 2 * math.ceil(3 * sigma) + 1))
                assert (actual.double() - gaussian_blur_reflect_101(levels, sigma, window)).abs().max() < 1e-3
            else:
                image = Image.fromarray(levels.round().to(torch.uint8).permute(1, 2, 0).numpy())
                expected = np.array(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
                assert (actual - torch.from_numpy(expected).permute(2, 0, 1)).abs().max() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seed_fixes_every_batch_and_threads_change_nothing(photos, backend, random_seed):
    first = list(make_loader(photos, backend, random_seed, num_threads=1))
    again = list(make_loader(photos, backend, random_seed, num_threads=2))
    for crops_a, crops_b in zip(first, again):
        for a, b in zip(crops_a, crops_b):
            assert torch.equal(a, b)
    other_seed = build_multicrop_loader(photos, 6, n_local_crops=2, backend=backend, seed=random_seed + 1,
                                        num_threads=1, recipe=MultiCropRecipe(**SMALL), verbose=False)
    assert not torch.equal(next(iter(other_seed))[0], first[0][0])


def test_shards_are_disjoint_and_cover_every_epoch(photos, random_seed):
    plans = [build_multicrop_loader(photos, 2, backend="torchvision", shard_id=k, num_shards=3, seed=random_seed,
                                    verbose=False).plan for k in range(3)]
    for epoch in (0, 1):
        orders = [plan.shard_order(epoch) for plan in plans]
        assert all(len(order) == 8 for order in orders)
        assert sorted(np.concatenate(orders).tolist()) == list(range(24))
        batches = [np.concatenate([plan.batch_indices(epoch, step) for step in range(4)]) for plan in plans]
        assert all((b == o).all() for b, o in zip(batches, orders))
    assert not (plans[0].shard_order(0) == plans[0].shard_order(1)).all(), "each epoch is reshuffled"


def test_uneven_shards_drop_the_remainder_and_partial_batches(photos):
    loader = build_multicrop_loader(photos, 5, backend="torchvision", num_shards=5, shard_id=4, verbose=False,
                                    drop_last=False)
    assert loader.plan.images_per_shard == 4 and len(loader) == 1
    with pytest.raises(ValueError, match="fewer than batch_size=5"):
        build_multicrop_loader(photos, 5, backend="torchvision", num_shards=5, verbose=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_with_the_next_unseen_batch(photos, backend, random_seed):
    uninterrupted = make_loader(photos, backend, random_seed, batch_size=5)  # 4 batches per epoch
    epoch_0 = list(uninterrupted)
    epoch_1 = list(uninterrupted)
    assert uninterrupted.state_dict() == {"epoch": 2, "step": 0}

    interrupted = make_loader(photos, backend, random_seed, batch_size=5)
    for step, crops in enumerate(interrupted):
        if step == 1:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "step": 2}
    continued = list(interrupted)  # the same loader goes on where it stopped
    assert all(torch.equal(a[0], b[0]) for a, b in zip(continued, epoch_0[2:]))

    resumed = make_loader(photos, backend, random_seed, batch_size=5)
    resumed.load_state_dict({"epoch": 1, "step": 3})
    rest = list(resumed)
    assert len(rest) == 1 and all(torch.equal(a, b) for a, b in zip(rest[0], epoch_1[3]))
    resumed.set_epoch(0)
    assert torch.equal(next(iter(resumed))[2], epoch_0[0][2])
    with pytest.raises(ValueError, match="step=9"):
        resumed.load_state_dict({"epoch": 0, "step": 9})


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_group_micro_batches_across_epochs_with_one_pipeline(photos, backend, monkeypatch, random_seed):
    reference = make_loader(photos, backend, random_seed, batch_size=5)  # 4 batches per epoch
    epochs = [list(reference), list(reference)]
    loader = build_multicrop_loader(photos, 5, n_local_crops=2, backend=backend, recipe=MultiCropRecipe(**SMALL),
                                    num_threads=1, verbose=False, seed=random_seed, batches_per_step=3)
    assert len(loader) == 3 and loader.steps_per_epoch == 1  # the 4th batch fills no step
    restarts = []
    restart = loader._restart_stream
    monkeypatch.setattr(loader, "_restart_stream", lambda: restarts.append(loader.state_dict()) or restart())
    steps = loader.steps()
    for expected_step in range(2):
        step, batches = next(steps)
        assert step == expected_step and len(batches) == 3
        for batch, expected in zip(batches, epochs[expected_step][:3]):
            assert all(torch.equal(a, b) for a, b in zip(batch, expected))
        assert loader.state_dict() == {"epoch": expected_step + 1, "step": 0} and loader.steps_done == step + 1
    assert restarts == [{"epoch": 0, "step": 0}]  # one pipeline across the epoch end
    with pytest.raises(ValueError, match="step=1 is not the first batch of a group of batches_per_step=3"):
        loader.load_state_dict({"epoch": 0, "step": 1})
    with pytest.raises(ValueError, match="batches_per_step=5: an epoch of this shard has 4 batches"):
        build_multicrop_loader(photos, 5, backend=backend, verbose=False, batches_per_step=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_colour_jitter_of_strength_zero_changes_nothing(photos, backend, random_seed):
    # torchvision's ColorJitter leaves out adjustments of strength 0 (hue=0 included)
    no_strength = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_probability=0.0)
    jittered = next(iter(make_loader(photos, backend, random_seed, color_jitter_probability=1.0, **no_strength)))
    plain = next(iter(make_loader(photos, backend, random_seed, color_jitter_probability=0.0, **no_strength)))
    for a, b in zip(jittered, plain):
        assert torch.equal(a, b) if backend == "torchvision" else (a - b).abs().max() < 1e-5


def test_backend_choice_and_the_environment_override(monkeypatch):
    assert resolve_data_backend("torchvision") == "torchvision"
    assert resolve_data_backend("auto") == ("dali" if dali_available() else "torchvision")
    monkeypatch.setenv(DATA_BACKEND_ENV_VAR, "torchvision")
    assert resolve_data_backend("dali") == "torchvision"
    monkeypatch.setenv(DATA_BACKEND_ENV_VAR, "pillow")
    with pytest.raises(ValueError, match=f"{DATA_BACKEND_ENV_VAR}='pillow'"):
        resolve_data_backend("auto")


@pytest.mark.parametrize("argument, value, message", [
    ("batch_size", 0, "batch_size=0"), ("n_local_crops", -1, "n_local_crops=-1"),
    ("shard_id", 3, "shard_id=3"), ("dtype", torch.int8, "dtype=torch.int8"),
])
def test_bad_arguments_are_named(colorful, argument, value, message):
    arguments = dict(batch_size=2, shard_id=0, num_shards=2, n_local_crops=2, dtype=torch.float32)
    arguments[argument] = value
    batch_size = arguments.pop("batch_size")
    with pytest.raises(ValueError, match=message):
        build_multicrop_loader(colorful, batch_size, backend="torchvision", verbose=False, **arguments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not dali_available(), reason="needs a GPU and DALI")
def test_dali_gpu_matches_dali_cpu(photos, random_seed):
    gpu = build_multicrop_loader(photos, 6, n_local_crops=2, backend="dali", device="cuda", seed=random_seed,
                                 recipe=MultiCropRecipe(**SMALL), verbose=False)
    cpu = make_loader(photos, "dali", random_seed)
    assert gpu.backend == "dali-gpu"
    for a, b in zip(next(iter(gpu)), next(iter(cpu))):
        assert a.device.type == "cuda"
        # nvJPEG and libjpeg-turbo may differ by a level here and there
        assert (a.cpu() - b).abs().mean() < 0.02
