"""The DALI backend's host side: the crop draws and colour maps computed for all crops of a batch
at once, and the worker thread that prepares and runs each batch off the training thread.

The vectorized draws and maps must be bit-identical to the per-crop computation (kept here as the
reference for the draws); the worker must change no batch whatever its prefetch depth, name the
right files when a batch fails while it works ahead, and leave no thread behind.
"""

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from fastdino.data import (
    DataLoadingError,
    MultiCropRecipe,
    build_multicrop_loader,
    dali_available,
    random_resized_crop_boxes,
    sample_crop_parameters,
    write_synthetic_image_folder,
)
from fastdino.data.dali_pipeline import color_transform, pack_crop_parameters
from fastdino.data.loader import default_num_threads, prefetch_in_thread
from fastdino.data.recipe import NO_ADJUSTMENT, CropParameters, batch_generator

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
SMALL = MultiCropRecipe(global_crop_size=16, local_crop_size=8)
RECIPES = [MultiCropRecipe(),
           MultiCropRecipe(color_jitter_probability=0.5, blur_probabilities=(0.3, 0.0, 1.0),
                           solarize_probabilities=(0.5, 0.5, 0.5), brightness=0.0, hue=0.5),
           # tries that rarely fit: the central fallback
           MultiCropRecipe(global_crop_scale=(0.9, 1.0), local_crop_scale=(0.01, 0.02), aspect_ratio=(0.2, 5.0))]


def per_crop_draws(recipe, n_local_crops, image_sizes, generator):
    """The draws one crop after another, each derived on its own: how sample_crop_parameters
    computed them before it derived all crops at once (the reference for bit-identity)."""
    image_sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    batch, crops = len(image_sizes), []
    for crop_index in range(2 + n_local_crops):
        kind = recipe.crop_kind(crop_index)
        scale = recipe.global_crop_scale if crop_index < 2 else recipe.local_crop_scale
        jitter = generator.random(batch) < recipe.color_jitter_probability
        order = np.argsort(generator.random((batch, 4)), axis=1)
        order[~jitter] = NO_ADJUSTMENT
        blur = generator.random(batch) < recipe.blur_probabilities[kind]

        def factors(strength):
            return generator.uniform(max(0.0, 1 - strength), 1 + strength, batch).astype(np.float32)

        crops.append(CropParameters(
            box=random_resized_crop_boxes(image_sizes, scale, recipe.aspect_ratio, generator),
            flip=generator.random(batch) < recipe.flip_probability, jitter_order=order,
            brightness=factors(recipe.brightness), contrast=factors(recipe.contrast),
            saturation=factors(recipe.saturation),
            hue=generator.uniform(-recipe.hue, recipe.hue, batch).astype(np.float32),
            grayscale=generator.random(batch) < recipe.grayscale_probability, blur=blur,
            blur_sigma=generator.uniform(*recipe.blur_sigma, batch).astype(np.float32),
            solarize=generator.random(batch) < recipe.solarize_probabilities[kind]))
    return crops


def assert_same_crops(actual, expected):
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        for field in dataclasses.fields(CropParameters):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert x.dtype == y.dtype and x.shape == y.shape, (index, field.name)
            np.testing.assert_array_equal(x, y, err_msg=f"crop {index}, {field.name}")


def image_sizes(numpy_generator, batch):
    sizes = numpy_generator.integers(1, 700, (batch, 2))
    sizes[: batch // 3, 0] = numpy_generator.integers(1, 12, batch // 3)  # thin images: the fallback
    return sizes


@pytest.mark.parametrize("recipe", RECIPES, ids=["release", "other-probabilities", "fallbacks"])
@pytest.mark.parametrize("batch, n_local_crops", [(1, 0), (7, 3), (64, 10)])
def test_draws_of_all_crops_at_once_are_the_per_crop_draws(recipe, batch, n_local_crops, numpy_generator,
                                                           random_seed):
    sizes = image_sizes(numpy_generator, batch)
    key = (random_seed, 3, 1, 11)
    assert_same_crops(sample_crop_parameters(recipe, n_local_crops, sizes, batch_generator(*key)),
                      per_crop_draws(recipe, n_local_crops, sizes, batch_generator(*key)))


@pytest.mark.parametrize("recipe", RECIPES[:2], ids=["release", "other-probabilities"])
def test_colour_maps_of_all_crops_in_one_call_are_the_per_crop_maps(recipe, numpy_generator, random_seed):
    """Bit-identical: every row's map is the same float64 operations on its own draws, whatever
    rows are computed with it, before the one rounding to float32."""
    batch = 32
    crops = sample_crop_parameters(recipe, 10, image_sizes(numpy_generator, batch),
                                   batch_generator(random_seed, 0, 0, 0))
    params, colors = pack_crop_parameters(crops, recipe.blur_kernel_size)
    assert params.shape == (batch, 12, 9) and colors.shape == (batch, 12, 7, 3)
    assert params.dtype == colors.dtype == np.float32
    assert params.flags.c_contiguous and colors.flags.c_contiguous  # DALI takes them as they are
    for index, crop in enumerate(crops):
        one_params, one_colors = pack_crop_parameters([crop], recipe.blur_kernel_size)
        np.testing.assert_array_equal(params[:, index], one_params[:, 0])
        np.testing.assert_array_equal(colors[:, index], one_colors[:, 0])
        linear, from_mean, offset = color_transform(crop)  # the per-crop reference
        np.testing.assert_array_equal(colors[:, index], np.concatenate(
            [linear, from_mean, offset[:, None]], axis=1).astype(np.float32))


def test_prefetch_in_thread_hands_over_items_then_the_error_and_stops(random_seed):
    def items():
        yield from range(5)
        raise KeyError("the sixth item")

    made_in = []

    def make_items():
        made_in.append(threading.current_thread())
        return items()

    prefetched = prefetch_in_thread(make_items, depth=2, name="test-prefetch")
    assert [next(prefetched) for _ in range(5)] == list(range(5))
    with pytest.raises(KeyError, match="the sixth item"):
        next(prefetched)
    assert made_in[0] is not threading.current_thread()
    assert [next(prefetch_in_thread(lambda: iter([random_seed]), depth=1))] == [random_seed]

    endless = prefetch_in_thread(lambda: iter(int, 1), depth=3, name="test-endless")
    assert next(endless) == 0
    endless.close()  # stops the worker, blocked on a full queue, and waits for it
    assert not any(thread.name in ("test-prefetch", "test-endless") for thread in threading.enumerate())
    with pytest.raises(ValueError, match="prefetch depth 0"):
        next(prefetch_in_thread(lambda: iter([]), depth=0))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("images"), n_images=12, image_size=(48, 36))


def small_loader(folder, seed, **arguments):
    return build_multicrop_loader(folder, 4, n_local_crops=2, backend="dali", device="cpu", recipe=SMALL,
                                  num_threads=1, verbose=False, seed=seed, **arguments)  # 3 batches per epoch


def dali_threads():
    return [thread for thread in threading.enumerate() if thread.name == "fastdino-dali"]


@needs_dali
def test_batches_do_not_depend_on_the_prefetch_depth_and_resume_exactly(images, random_seed):
    def batches(loader, count):
        stream = (batch for _, (batch,) in loader.steps())
        return [next(stream) for _ in range(count)]

    shallow = batches(small_loader(images, random_seed, prefetch_batches=1), 8)  # across two epoch ends
    deep = batches(small_loader(images, random_seed, prefetch_batches=4), 8)
    for a, b in zip(shallow, deep, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    resumed = small_loader(images, random_seed, prefetch_batches=3)
    resumed.load_state_dict({"epoch": 1, "step": 2})
    for a, b in zip(batches(resumed, 3), shallow[5:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@needs_dali
def test_the_host_work_runs_in_the_worker_thread_and_restarts_leave_no_thread(images, monkeypatch, random_seed):
    import fastdino.data.loader as loader_module
    from nvidia.dali import Pipeline

    threads = set()

    def recorded(function):
        def call(*arguments, **keywords):
            threads.add(threading.current_thread().name)
            return function(*arguments, **keywords)
        return call

    monkeypatch.setattr(loader_module, "dali_batch_inputs", recorded(loader_module.dali_batch_inputs))
    monkeypatch.setattr(Pipeline, "run", recorded(Pipeline.run))
    others = set(dali_threads())  # of loaders that other tests left to the garbage collector
    loader = small_loader(images, random_seed)
    next(iter(loader))
    assert threads == {"fastdino-dali"}  # reads, draws, colour maps and DALI's runs
    (first,) = set(dali_threads()) - others
    loader.set_epoch(3)  # another position: a new stream, the old worker stopped
    next(iter(loader))
    (second,) = set(dali_threads()) - others
    assert not first.is_alive() and second is not first
    del loader
    assert not second.is_alive()


def batch_files(loader, step):
    return loader.plan.request(0, step)[0]


@needs_dali
def test_an_unreadable_file_fails_in_the_place_of_its_batch(tmp_path, random_seed):
    """The worker reads files batches ahead; the batches before the failing one still arrive."""
    folder = write_synthetic_image_folder(tmp_path, n_images=12, image_size=(48, 36))
    loader = small_loader(folder, random_seed)
    missing = batch_files(loader, 2)[1]
    os.remove(missing)
    stream = iter(loader)
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(DataLoadingError, match=f"could not read '{missing}', an image of batch epoch=0, step=2"):
        next(stream)


@needs_dali
def test_a_file_dali_cannot_decode_names_the_files_of_its_batch(tmp_path, numpy_generator, random_seed):
    folder = write_synthetic_image_folder(tmp_path, n_images=12, image_size=(48, 36))
    loader = small_loader(folder, random_seed)  # scanned: every file is a JPEG
    files = batch_files(loader, 2)
    with open(files[1], "r+b") as garbled:
        garbled.write(numpy_generator.integers(0, 256, os.path.getsize(files[1]), dtype=np.uint8).tobytes())
    stream = iter(loader)
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(DataLoadingError, match="DALI failed on a batch of these 4 files") as failure:
        next(stream)
    assert all(path in str(failure.value) for path in files)


def test_default_threads_share_the_cores_among_the_ranks_of_the_node(images, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_threads()[0] == 16
    for ranks, threads in (("8", 2), ("3", 5), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert default_num_threads() == (threads, f"{threads} threads (16 cores / LOCAL_WORLD_SIZE={ranks})")
    loader = build_multicrop_loader(images, 4, backend="torchvision", recipe=SMALL, verbose=True)
    assert loader.num_threads == 1
    assert "1 threads (16 cores / LOCAL_WORLD_SIZE=32)" in capsys.readouterr().err
    for setting in ("0", "eight"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", setting)
        with pytest.raises(ValueError, match=f"LOCAL_WORLD_SIZE='{setting}'"):
            default_num_threads()


@pytest.mark.parametrize("argument, value", [("num_threads", 0), ("prefetch_batches", 0)])
def test_bad_thread_and_prefetch_counts_are_named(images, argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value}"):
        build_multicrop_loader(images, 4, backend="torchvision", verbose=False, **{argument: value})

