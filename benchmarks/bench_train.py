"""The DINO training step: fastdino.train's step beside the release's, same model and batch.

Providers (each on its own copy of the same freshly initialized student and teacher):

- "release-style step": ``baselines.release_train_step``, main_dino.py's iteration: one forward
  per crop resolution, the Python-loop loss, the center update, ``loss.item()``, per-parameter
  clipping with ``.item()``, torch's default AdamW, the per-parameter EMA loop;
- "fastdino step": ``fastdino.train.step.DINOStep`` as ``python -m fastdino.train`` runs it
  (fused loss, clipping and EMA from ``fastdino.ops``, fused AdamW, no host sync, packed
  multi-crop forward where xformers runs);
- "fastdino step + loader": the same step fed by ``fastdino.data`` from generated JPEGs, so the
  difference to "fastdino step" is the time the step waits for data.

Sizes: the ``tiny`` preset on the CPU (its batch, crops and head; float32); on a GPU the
``vit_small_p8`` preset (ViT-S/8, 2 x 224 + 10 x 96 crops, K = 65536) in bfloat16, batch 64
(16 with --quick). Target: >= 1.5x the release-style step on the CPU with the tiny preset.

    python benchmarks/bench_train.py [--quick] [--out DIR]   # run.py --suite train

``cases()`` serves benchmarks/run.py (suite "train") like the other suites.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import torch
from baselines import release_step_on_copies
from measure import Case, Provider, Target

from fastdino.data import build_multicrop_loader, write_synthetic_image_folder
from fastdino.train import build_schedules, resolve_config
from fastdino.train.networks import build_optimizer, build_student_and_teacher
from fastdino.train.step import DINOStep

CPU_TARGET = 1.5


def benchmark_config(device: torch.device, quick: bool):
    if device.type == "cuda":
        return resolve_config("vit_small_p8", dict(batch_size_per_gpu=16 if quick else 64))
    return resolve_config("tiny")


def _crops(config, device, dtype, generator):
    sizes = [config.global_crop_size] * 2 + [config.local_crop_size] * config.n_local_crops
    return [torch.randn(config.batch_size_per_gpu, 3, size, size, generator=generator).to(device, dtype)
            for size in sizes]


def _loader_batches(config, device, folder: Path):
    """Endless multi-crop batches of generated JPEGs, as the trainer reads them."""
    images = write_synthetic_image_folder(folder, n_images=max(64, 4 * config.batch_size_per_gpu),
                                          image_size=(320, 240) if device.type == "cuda" else (160, 120))
    loader = build_multicrop_loader(images, config.batch_size_per_gpu, n_local_crops=config.n_local_crops,
                                    device=device, recipe=config.multicrop_recipe(), verbose=False)
    for _ in itertools.count():
        yield from loader


def cases(device: torch.device, quick: bool):
    config = benchmark_config(device, quick)
    autocast_dtype = config.autocast_dtype  # bf16 on GPUs (precision=auto), fp32 for the tiny preset
    generator = torch.Generator().manual_seed(0)
    crops = _crops(config, device, torch.float32, generator)
    values = build_schedules(config, iterations_per_epoch=100, world_size=1).at(150)  # past warm-up

    torch.manual_seed(config.seed)
    student, teacher = build_student_and_teacher(config, device)
    release_step = release_step_on_copies(student, teacher, crops, values, clip_grad=config.clip_grad,
                                          autocast_dtype=autocast_dtype, out_dim=config.out_dim)

    step = DINOStep(student, teacher, build_optimizer(config, student, device),
                    torch.zeros(1, config.out_dim, device=device), student_temp=config.student_temp,
                    center_momentum=config.center_momentum, clip_grad=config.clip_grad,
                    autocast_dtype=autocast_dtype)

    def fastdino_step(_):
        step([crops], values, freeze_last_layer=False)

    image_folder = Path(tempfile.mkdtemp(prefix="fastdino-bench-train-")) / "images"
    batches = _loader_batches(config, device, image_folder)

    def fastdino_step_with_loader(_):
        step([next(batches)], values, freeze_last_layer=False)

    targets = [Target("fastdino step", "release-style step", CPU_TARGET)] if device.type == "cpu" else []
    return [Case(
        suite="train", name=f"DINO training step ({config.preset} preset)",
        dtype="bfloat16" if autocast_dtype else "float32",
        sizes={"arch": config.arch, "batch": config.batch_size_per_gpu,
               "crops": f"2x{config.global_crop_size}+{config.n_local_crops}x{config.local_crop_size}",
               "K": config.out_dim},
        providers=[Provider("release-style step", release_step), Provider("fastdino step", fastdino_step),
                   Provider("fastdino step + loader", fastdino_step_with_loader)],
        baselines=["release-style step"], targets=targets, items_per_run=config.batch_size_per_gpu,
        repeats=(5 if quick else 15) if device.type == "cpu" else (10 if quick else 30),
    )]


if __name__ == "__main__":
    import run  # the one report writer (tables, img/s, MFU, JSON, PNG)

    sys.exit(run.main(["--suite", "train", *sys.argv[1:]]))
