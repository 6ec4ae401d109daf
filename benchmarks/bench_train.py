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

    python benchmarks/bench_train.py [--quick]     # this suite alone, with img/s and data-wait %

``cases()`` serves benchmarks/run.py (suite "train") like the other suites.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from baselines import release_train_step
from measure import Case, Provider, Target, device_name, time_function

from fastdino.data import (
    MultiCropRecipe,
    build_multicrop_loader,
    write_synthetic_image_folder,
)
from fastdino.train import build_schedules, resolve_config
from fastdino.train.networks import (
    build_optimizer,
    build_student_and_teacher,
    parameter_groups,
)
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
    recipe = MultiCropRecipe(global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
                             global_crop_scale=config.global_crop_scale, local_crop_scale=config.local_crop_scale)
    loader = build_multicrop_loader(images, config.batch_size_per_gpu, n_local_crops=config.n_local_crops,
                                    device=device, recipe=recipe, verbose=False)
    for _ in itertools.count():
        yield from loader


def cases(device: torch.device, quick: bool):
    config = benchmark_config(device, quick)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    crops = _crops(config, device, torch.float32, generator)
    values = build_schedules(config, iterations_per_epoch=100, world_size=1).at(150)  # past warm-up

    torch.manual_seed(config.seed)
    student, teacher = build_student_and_teacher(config, device)
    release_student, release_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    release_optimizer = torch.optim.AdamW(parameter_groups(release_student))  # the release's choice
    release_center = torch.zeros(1, config.out_dim, device=device)
    # The release's MultiCropWrapper: one backbone forward per crop resolution, SDPA attention.
    release_student.packed = release_teacher.packed = False
    release_student.backbone.attn_backend = release_teacher.backbone.attn_backend = "sdpa"

    def release_step(_):
        release_train_step(release_student, release_teacher, release_optimizer, release_center, crops,
                           lr=values.learning_rate, weight_decay=values.weight_decay,
                           momentum=values.teacher_momentum, teacher_temp=values.teacher_temperature,
                           clip_grad=config.clip_grad, autocast_dtype=autocast_dtype)

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CPU) or a smaller batch (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [f"# fastdino training-step benchmark: {device_name(device)}, {datetime.date.today().isoformat()}"
             f"{' (--quick)' if args.quick else ''}", "", f"torch {torch.__version__}", ""]
    missed = 0
    for case in cases(device, args.quick):
        batch = case.sizes["batch"]
        lines += [f"## {case.name} ({case.dtype}, " + ", ".join(f"{k}={v}" for k, v in case.sizes.items()) + ")",
                  "", "| provider | median ms | img/s | peak GiB | x vs release-style step |", "|---|---|---|---|---|"]
        medians = {}
        for provider in case.providers:
            print(f"[train] {provider.name} ...", end=" ", flush=True, file=sys.stderr)
            times, peak = time_function(provider.fn, device, setup=provider.setup, repeats=case.repeats)
            medians[provider.name] = median = sorted(times)[len(times) // 2]
            print(f"{median:.1f} ms", flush=True, file=sys.stderr)
            memory = f"{peak / 2**30:.2f}" if peak is not None else "-"
            lines.append(f"| {provider.name} | {median:.1f} | {batch / (median / 1e3):.1f} | {memory} | "
                         f"{medians['release-style step'] / median:.2f} |")
        with_loader, alone = medians["fastdino step + loader"], medians["fastdino step"]
        lines.append(f"\ndata-wait: {max(0.0, with_loader - alone) / with_loader:.0%} of the step with the loader")
        for target in case.targets:
            measured = medians[target.baseline] / medians[target.provider]
            met = measured >= target.min_speedup
            missed += not met
            lines.append(f"target: {target.provider} >= {target.min_speedup}x {target.baseline}: "
                         f"{measured:.2f}x ({'met' if met else 'MISSED'})")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
