"""Multi-crop data loading: fastdino's DALI and torchvision backends vs the release's recipe.

Real photographs (scikit-image's samples, cropped and resized to ImageNet's typical 500x375
JPEG), 2 x 224 + 10 x 96 crops, the same number of CPU workers/threads for every provider
(all the cores this process may use). One timed run = BATCHES_PER_RUN batches from a loader that
keeps running between runs: worker start-up is not timed after warm-up, and loaders whose
workers hand over batches in bursts (prefetching) are measured over a whole burst.

Providers: "release torchvision recipe" (``DataAugmentationDINO`` + ``ImageFolder`` +
``DataLoader``, as main_dino.py), "fastdino torchvision" (the fallback backend) and
"fastdino dali-cpu" / "fastdino dali-gpu" (DALI on this machine's device).
Image index start-up (``index_cases``): ``scan_images`` on an ImageNet-like folder (class folders
of 100 files named like ImageNet's), every file a hard link to one of 8 sample photos of
ImageNet's typical size (real JPEGs to check, written in seconds, on a warm page cache): the first
start (no cache: list, check every file, write the cache) against a cached start (list and stat
every file, read the cache), and the listing alone. Peak memory (tracemalloc, Python and NumPy
allocations) is measured in one more untimed run of each.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import torch

from baselines import release_multicrop_loader
from fastdino.data import build_multicrop_loader, dali_available, write_sample_photo_folder
from fastdino.data import image_files
from measure import Case, Provider, Target

N_LOCAL_CROPS = 10
IMAGE_SIZE = (500, 375)
BATCHES_PER_RUN = 4


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
    )] + index_cases(quick)


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
