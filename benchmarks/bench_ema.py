"""Teacher EMA over the ViT-S/8 + DINO head parameters: fastdino vs per-parameter and foreach."""

import torch

from baselines import foreach_lerp_ema, release_ema, vit_dino_parameter_shapes
from fastdino.ops import ema_update_
from measure import Case, Provider, Target, fastdino_backend


def cases(device: torch.device, quick: bool):
    shapes = vit_dino_parameter_shapes(patch_size=16 if quick else 8, out_dim=16384 if quick else 65536)
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    student = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    momentum = 0.996
    backend = fastdino_backend(device)
    fastdino_name = f"fastdino {backend}"
    n_params = sum(t.numel() for t in teacher)
    return [Case(
        suite="ops", name="teacher EMA", dtype="float32",
        sizes={"tensors": len(shapes), "params_M": round(n_params / 1e6, 1)},
        providers=[
            Provider("release per-parameter loop", lambda _: release_ema(teacher, student, momentum)),
            Provider("torch._foreach_lerp_", lambda _: foreach_lerp_ema(teacher, student, momentum)),
            Provider(fastdino_name, lambda _: ema_update_(teacher, student, momentum, backend=backend)),
        ],
        baselines=["release per-parameter loop", "torch._foreach_lerp_"],
        targets=[Target(fastdino_name, "torch._foreach_lerp_", 1.0),
                 Target(fastdino_name, "release per-parameter loop", 3.0)],
        bytes_moved=3 * n_params * 4,  # read teacher and student, write teacher
        repeats=10 if quick else 20,
    )]
