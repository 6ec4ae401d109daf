"""Multi-crop data loading: fastdino's DALI and torchvision backends vs the release's recipe.

Real photographs (scikit-image's samples, cropped and resized to ImageNet's typical 500x375
JPEG), 2 x 224 + 10 x 96 crops, the same number of CPU workers/threads for every provider
(all the cores this process may use). One timed run = BATCHES_PER_RUN batches from a loader that
keeps running between runs: worker start-up is not timed after warm-up, and loaders whose
workers hand over batches in bursts (prefetching) are measured over a whole burst.

Providers: "release torchvision recipe" (``DataAugmentationDINO`` + ``ImageFolder`` +
``DataLoader``, as main_dino.py), "fastdino torchvision" (the fallback backend) and
"fastdino dali-cpu" / "fastdino dali-gpu" (DALI on this machine's device).

Large photos (``large_photo_cases``, DALI only): 2000x1500 JPEGs, where every crop of the release's
recipe is downscaled >= 4x and the DALI CPU pipeline halves the images before cutting their crops
(``fastdino.data.dali_pipeline.halvings``): the loader as it runs, the release's loader, and the
DALI CPU pipeline alone with and without the halvings on the same batches.

Host side of the DALI backend, on the CPU: the milliseconds of each part of a batch's host work
(``host_work_cases``), and the training thread's data-wait against a stand-in training step of
fixed duration at the GPU target rate, 64 images per 21 ms (``data_wait_cases``). The GPU
pipeline's figures are measured by ``benchmarks/run.py --suite gpu``.

Image index start-up (``index_cases``): ``scan_images`` on an ImageNet-like folder (class folders
of 100 files named like ImageNet's), every file a hard link to one of 8 sample photos of
ImageNet's typical size (real JPEGs to check, written in seconds, on a warm page cache): the first
start (no cache: list, check every file, write the cache) against a cached start (list and stat
every file, read the cache), and the listing alone. Peak memory (tracemalloc, Python and NumPy
allocations) is measured in one more untimed run of each.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from baselines import release_multicrop_loader
from fastdino.data import (
    BatchPlan,
    MultiCropRecipe,
    build_multicrop_loader,
    dali_available,
    image_files,
    scan_images,
    write_sample_photo_folder,
)
from fastdino.data.dali_pipeline import build_dali_pipeline, pack_crop_parameters
from fastdino.data.loader import dali_batch_inputs, prefetch_in_thread
from measure import Case, Provider, Target

N_LOCAL_CROPS = 10
IMAGE_SIZE = (500, 375)
BATCHES_PER_RUN = 4
# the GPU target, 3000 img/s per GPU (benchmarks/gpu_data.py): a batch of 64 every 21 ms
TARGET_BATCH, STAND_IN_STEP_S = 64, 64 / 3000
DATA_WAIT_FRACTION = 0.02  # of the step, at most
# DALI's CPU operators cost per sample more than per pixel: the smallest images and crops keep
# the loader's wait nearest to its host side here
TINY_IMAGE_SIZE, TINY_RECIPE = (64, 48), MultiCropRecipe(global_crop_size=16, local_crop_size=8)


def _endless_batches(make_loader):
    """Batches from a loader built on first use, epoch after epoch."""
    loader = None
    while True:
        loader = loader or make_loader()
        yield from loader


def _provider(name, make_loader, labeled=False):
    batches = _endless_batches(make_loader)

    def next_batches(_):
        for _ in range(BATCHES_PER_RUN):
            crops = next(batches)[0] if labeled else next(batches)  # ImageFolder adds the labels
        if crops[0].is_cuda:
            torch.cuda.current_stream().synchronize()

    return Provider(name, next_batches)


def cases(device: torch.device, quick: bool):
    batch_size = 16 if quick else 32
    repeats = 3 if quick else 6
    threads = len(os.sched_getaffinity(0))
    folder = write_sample_photo_folder(tempfile.mkdtemp(prefix="fastdino-bench-photos-"),
                                       n_images=batch_size * BATCHES_PER_RUN * (repeats + 2), image_size=IMAGE_SIZE)

    def fastdino_loader(backend):
        return lambda: build_multicrop_loader(folder, batch_size, n_local_crops=N_LOCAL_CROPS, backend=backend,
                                              device=device, num_threads=threads, verbose=False)

    release = f"release torchvision recipe ({threads} workers)"
    providers = [_provider(release, lambda: release_multicrop_loader(folder, batch_size, N_LOCAL_CROPS, threads),
                           labeled=True),
                 _provider(f"fastdino torchvision ({threads} workers)", fastdino_loader("torchvision"))]
    targets = []
    if dali_available():
        dali_name = f"fastdino dali-{'gpu' if device.type == 'cuda' else 'cpu'} ({threads} threads)"
        providers.append(_provider(dali_name, fastdino_loader("dali")))
        if device.type == "cpu":
            targets.append(Target(dali_name, release, 2.0))
    return [Case(
        suite="data", name="multi-crop loading", dtype="float32",
        sizes={"batch": batch_size, "crops": f"2x224+{N_LOCAL_CROPS}x96",
               "images": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG photos", "cpu_threads": threads},
        providers=providers, baselines=[release], targets=targets, items_per_run=batch_size * BATCHES_PER_RUN,
        repeats=repeats,
    )] + large_photo_cases(device, quick) + host_work_cases(quick) + data_wait_cases(quick) + index_cases(quick)


LARGE_IMAGE_SIZE = (2000, 1500)


def large_photo_cases(device: torch.device, quick: bool):
    """The CPU pipeline on photos large enough to be halved (one halving for most at 2000x1500)."""
    if not dali_available() or device.type != "cpu":
        return []
    batch_size = 8 if quick else 16
    repeats = 3 if quick else 6
    threads = len(os.sched_getaffinity(0))
    n_batches = BATCHES_PER_RUN * (repeats + 2)
    folder = write_sample_photo_folder(tempfile.mkdtemp(prefix="fastdino-bench-large-"),
                                       n_images=batch_size * n_batches, image_size=LARGE_IMAGE_SIZE)
    index = scan_images(folder, verbose=False, use_cache=False)
    plan = BatchPlan(index, batch_size, MultiCropRecipe(), N_LOCAL_CROPS, seed=0, shard_id=0, num_shards=1,
                     drop_last=True)

    def pipeline_alone(reduce_resolution):
        positions = _positions(plan)
        pipeline = build_dali_pipeline(lambda: dali_batch_inputs(plan, *next(positions))[1], plan.recipe, N_LOCAL_CROPS,
                                       batch_size, threads, None, False, reduce_resolution=reduce_resolution)

        def run(_):
            for _ in range(BATCHES_PER_RUN):
                pipeline.run()
        return run

    release = f"release torchvision recipe ({threads} workers)"
    full, halved = (f"DALI CPU pipeline alone, {kind} ({threads} threads)" for kind in ("full resolution", "halved"))
    providers = [
        _provider(release, lambda: release_multicrop_loader(folder, batch_size, N_LOCAL_CROPS, threads), labeled=True),
        _provider(f"fastdino dali-cpu ({threads} threads)",
                  lambda: build_multicrop_loader(folder, batch_size, n_local_crops=N_LOCAL_CROPS, backend="dali",
                                                 device=device, num_threads=threads, verbose=False)),
        Provider(full, pipeline_alone(False)), Provider(halved, pipeline_alone(True))]
    return [Case(suite="data", name="multi-crop loading, large photos", dtype="float32",
                 sizes={"batch": batch_size, "crops": f"2x224+{N_LOCAL_CROPS}x96",
                        "images": f"{LARGE_IMAGE_SIZE[0]}x{LARGE_IMAGE_SIZE[1]} JPEG photos", "cpu_threads": threads},
                 providers=providers, baselines=[release, full], items_per_run=batch_size * BATCHES_PER_RUN,
                 repeats=repeats)]


def _photo_plan(batch_size: int, n_batches: int) -> BatchPlan:
    """The batches of 2 + N_LOCAL_CROPS release-recipe crops over ``n_batches`` x ``batch_size``
    sample photos."""
    folder = write_sample_photo_folder(tempfile.mkdtemp(prefix="fastdino-bench-host-"),
                                       n_images=batch_size * n_batches, image_size=IMAGE_SIZE)
    index = scan_images(folder, verbose=False, use_cache=False)
    return BatchPlan(index, batch_size, MultiCropRecipe(), N_LOCAL_CROPS, seed=0, shard_id=0, num_shards=1,
                     drop_last=True)


def _positions(plan: BatchPlan):
    return plan.positions(0, 0, plan.steps_per_epoch)


def host_work_cases(quick: bool):
    """A batch's host work for the DALI backend, part by part: the colour maps computed a call
    per crop (as before) or in one call for all crops, the crop draws, the file reads, and all
    of it (``dali_batch_inputs``, which the loader's worker thread runs)."""
    plan = _photo_plan(TARGET_BATCH, 2)
    kernel = plan.recipe.blur_kernel_size
    positions = _positions(plan)

    def crops():
        return plan.request(*next(positions))[1]

    def paths():
        return plan.request(*next(positions))[0]

    per_crop, all_crops = "colour maps, a call per crop (as before)", "colour maps, one call for all crops"
    providers = [
        Provider(per_crop, lambda batch_crops: [pack_crop_parameters([crop], kernel) for crop in batch_crops],
                 setup=crops),
        Provider(all_crops, lambda batch_crops: pack_crop_parameters(batch_crops, kernel), setup=crops),
        Provider("crop draws", lambda _: plan.request(*next(positions))),
        Provider("file reads", lambda batch_paths: [np.fromfile(path, dtype=np.uint8) for path in batch_paths],
                 setup=paths),
        Provider("all host inputs of a batch", lambda _: dali_batch_inputs(plan, *next(positions))),
    ]
    return [Case(suite="data", name="DALI host work per batch", dtype="float64",
                 sizes={"batch": TARGET_BATCH, "crops": f"2+{N_LOCAL_CROPS}",
                        "images": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG photos", "cpu_threads": 1},
                 providers=providers, baselines=[per_crop], targets=[Target(all_crops, per_crop, 2.0)],
                 repeats=10 if quick else 30)]


def data_wait_cases(quick: bool):
    """The training thread's wait for its next batch after a stand-in training step that sleeps
    21 ms (the GPU target rate at batch 64; a sleep leaves the GIL to the loader's threads, as a
    GPU step does while it waits for the device). The "x vs stand-in step" column is the step
    over the wait: at least 1 / DATA_WAIT_FRACTION = 50 meets the target.

    Providers: the batch's host inputs computed on the training thread (what the DALI source did
    before), the same from ``prefetch_in_thread`` (what the loader's worker thread does), and the
    whole DALI CPU loader on tiny images and crops, whose CPU operators take longer than the step
    on a small CPU: there the wait is theirs, not the host side's."""
    plan = _photo_plan(TARGET_BATCH, 2)
    positions = _positions(plan)
    prefetched = prefetch_in_thread(lambda: (dali_batch_inputs(plan, *position) for position in _positions(plan)),
                                    depth=2, name="bench-host-inputs")

    def stand_in_step():
        time.sleep(STAND_IN_STEP_S)

    stand_in = f"stand-in step (sleep {STAND_IN_STEP_S * 1e3:.0f} ms)"
    inline = "host inputs on the training thread (before)"
    threaded = "host inputs from the prefetch thread"
    providers = [Provider(stand_in, lambda _: stand_in_step()),
                 Provider(inline, lambda _: dali_batch_inputs(plan, *next(positions)), setup=stand_in_step),
                 Provider(threaded, lambda _: next(prefetched), setup=stand_in_step)]
    if dali_available():
        tiny = write_sample_photo_folder(tempfile.mkdtemp(prefix="fastdino-bench-tiny-"), n_images=TARGET_BATCH * 2,
                                         image_size=TINY_IMAGE_SIZE)
        loader = build_multicrop_loader(tiny, TARGET_BATCH, n_local_crops=N_LOCAL_CROPS, backend="dali", device="cpu",
                                        recipe=TINY_RECIPE, verbose=False)
        batches = itertools.chain.from_iterable(batch for _, batch in loader.steps())
        providers.append(Provider(f"DALI CPU loader, {TINY_IMAGE_SIZE[0]}x{TINY_IMAGE_SIZE[1]} images, "
                                  f"{TINY_RECIPE.global_crop_size}/{TINY_RECIPE.local_crop_size} px crops "
                                  f"({loader.num_threads} threads)", lambda _: next(batches), setup=stand_in_step))
    sizes = {"batch": TARGET_BATCH, "crops": f"2+{N_LOCAL_CROPS}", "step_ms": round(STAND_IN_STEP_S * 1e3, 1),
             "images": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG photos"}
    repeats = 10 if quick else 30
    wait = Case(suite="data", name="training thread's data-wait per stand-in step", dtype="float32", sizes=sizes,
                providers=providers, baselines=[stand_in], targets=[Target(threaded, stand_in, 1 / DATA_WAIT_FRACTION)],
                repeats=repeats)

    # The GIL: a step that runs Python for half its time (a GPU step launching its kernels) is
    # slowed by the worker's Python share, which a sleeping step does not show.
    python_work = _python_iterations(STAND_IN_STEP_S / 2)

    def python_step():
        _run_python(python_work)
        time.sleep(STAND_IN_STEP_S / 2)

    alone = "stand-in step: half Python, half sleep"
    beside = "the same step, then the next host inputs from the prefetch thread"
    gil = Case(suite="data", name="stand-in step with Python work beside the prefetch thread", dtype="float32",
               sizes={**sizes, "python_ms": round(STAND_IN_STEP_S / 2 * 1e3, 1)},
               providers=[Provider(alone, lambda _: python_step()),
                          Provider(beside, lambda _: (python_step(), next(prefetched)))],
               baselines=[alone], repeats=repeats)
    return [wait, gil]


def _run_python(iterations: int) -> None:
    total = 0
    for value in range(iterations):  # bytecode: the interpreter can hand the GIL over in between
        total += value


def _python_iterations(seconds: float) -> int:
    """Loop iterations of ``_run_python`` that take ``seconds`` on this machine, alone."""
    iterations = 100_000
    start = time.perf_counter()
    _run_python(iterations)
    return max(1, round(iterations * seconds / (time.perf_counter() - start)))


# -- the image index: a dataset's first start against a cached one --------------------------------

INDEX_FILES = {False: 100_000, True: 10_000}  # by --quick
INDEX_FILES_PER_CLASS = 100
INDEX_PHOTOS = 8
CACHED_START_TARGET = 20.0  # x faster than the first start


def _write_index_folder(root: Path, n_files: int) -> Path:
    """``root/train/n<label>/n<label>_<i>.JPEG``: ``n_files`` hard links to INDEX_PHOTOS photos."""
    photos = sorted(write_sample_photo_folder(root / "photos", n_images=INDEX_PHOTOS,
                                              image_size=IMAGE_SIZE).rglob("*.jpg"))
    train = root / "train"
    for label in range(n_files // INDEX_FILES_PER_CLASS):
        synset = f"n{label:08d}"
        (train / synset).mkdir(parents=True)
        for i in range(INDEX_FILES_PER_CLASS):
            os.link(photos[(label + i) % INDEX_PHOTOS], train / synset / f"{synset}_{i}.JPEG")
    return train


def _peak_traced_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def index_cases(quick: bool):
    """First start (its setup deletes the cache) vs cached start, which must be at least
    CACHED_START_TARGET x faster; the listing alone shows what a cached start is made of."""
    n_files = INDEX_FILES[quick]
    root = Path(tempfile.mkdtemp(prefix="fastdino-bench-index-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    train = _write_index_folder(root, n_files)
    cache_dir = root / "cache"

    def forget_the_cache():
        shutil.rmtree(cache_dir, ignore_errors=True)

    def start(_=None):
        return image_files.scan_images(train, verbose=False, cache_dir=cache_dir)

    forget_the_cache()
    first_peak = _peak_traced_bytes(start)
    cached_peak = _peak_traced_bytes(start)
    index = start()
    first, cached = "first start (checks every file)", "cached start"
    providers = [Provider(first, start, setup=forget_the_cache), Provider(cached, start),
                 Provider("listing alone (a stat per file)", lambda _: image_files.list_images(train))]
    cores = len(os.sched_getaffinity(0))
    return [Case(
        suite="data", name="image index start-up", dtype="-",
        sizes={"files": n_files, "classes": n_files // INDEX_FILES_PER_CLASS,
               "images": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG photos", "cpu_cores": cores,
               "check": image_files.jpeg_checker(),
               "peak_MiB_first_cached": f"{first_peak / 2**20:.0f}/{cached_peak / 2**20:.0f}",
               "index_bytes_per_image": round(index.nbytes / len(index), 1)},
        providers=providers, baselines=[first],
        # the target is the issue's, for 100k files: a smaller folder's cached start is mostly
        # fixed costs (threads, reading the cache)
        targets=[] if quick else [Target(cached, first, CACHED_START_TARGET)],
        items_per_run=n_files, repeats=1 if quick else 2,
    )]
