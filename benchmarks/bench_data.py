"""Multi-crop data loading: fastdino's DALI and torchvision backends vs the release's recipe.

Real photographs (scikit-image's samples, cropped and resized to ImageNet's typical 500x375
JPEG), 2 x 224 + 10 x 96 crops, the same number of CPU workers/threads for every provider
(all the cores this process may use). One timed run = BATCHES_PER_RUN batches from a loader that
keeps running between runs: worker start-up is not timed after warm-up, and loaders whose
workers hand over batches in bursts (prefetching) are measured over a whole burst.

Providers: "release torchvision recipe" (``DataAugmentationDINO`` + ``ImageFolder`` +
``DataLoader``, as main_dino.py), "fastdino torchvision" (the fallback backend) and
"fastdino dali-cpu" / "fastdino dali-gpu" (DALI on this machine's device).
"""

from __future__ import annotations

import os
import tempfile

import torch

from baselines import release_multicrop_loader
from fastdino.data import build_multicrop_loader, dali_available, write_sample_photo_folder
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
    )]
