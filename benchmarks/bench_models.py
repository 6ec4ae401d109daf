"""ViT multi-crop forward + backward: fastdino's attention backends and packing vs timm's ViT.

One training step of the student backbone over a DINO multi-crop batch (2 global + 10 local
crops per image), drop path 0.1, train mode: CLS features of all crops, then backward. Providers:

- "timm ViT, per-resolution": timm's ``vit_small_patch{8,16}_224`` (``dynamic_img_size=True``,
  its fused SDPA attention) run the release's way, one forward per crop resolution;
- "fastdino <backend>, per-resolution" / "fastdino <backend>, packed": ``forward_multicrop``
  with packed=False / True, for the backends that run here (xformers on CUDA only).

On a GPU: bfloat16 autocast, batch 64 (16 with --quick), full-size crops (224 / 96), and the
issue's target (packed xformers >= 1.5x per-resolution SDPA for ViT-S/8). On the CPU: float32,
batch 2 with full-size crops (minutes), or batch 1 with 64 / 32 px crops with --quick.

    python benchmarks/bench_models.py [--quick] [--out DIR]   # run.py --suite models

``cases()`` serves benchmarks/run.py like the other suites.
"""

from __future__ import annotations

import sys

import torch

from fastdino.models import create_backbone, xformers_status
from fastdino.models.vision_transformer import batch_same_size_crops
from measure import Case, Provider, Target

MODELS = {"ViT-S/16": ("vit_small_p16", "vit_small_patch16_224"),
          "ViT-S/8": ("vit_small_p8", "vit_small_patch8_224")}
N_LOCAL_CROPS = 10
DROP_PATH_RATE = 0.1
def settings(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(batch=16 if quick else 64, global_size=224, local_size=96, dtype=torch.bfloat16)
    # The CPU only shows relative costs: --quick shrinks the crops to keep the suite near a minute.
    if quick:
        return dict(batch=1, global_size=64, local_size=32, dtype=torch.float32)
    return dict(batch=2, global_size=224, local_size=96, dtype=torch.float32)


def multicrop_step_flops(model, batch: int, crop_sizes: list[tuple[int, int]]) -> int:
    """Model FLOPs of one forward + backward (3x the forward) over ``batch`` images' crops."""
    return 3 * batch * sum(model.forward_flops(h, w) for h, w in crop_sizes)


def _timm_model(timm_name: str, device: torch.device):
    """timm's ViT as a user would build it for multi-crop (or None with the reason)."""
    try:
        import timm
    except Exception as error:  # not installed, or its torchvision does not load with this torch
        return None, f"{type(error).__name__}: {error}"
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                              drop_path_rate=DROP_PATH_RATE)
    return model.to(device).train(), ""


def _case(label: str, device: torch.device, quick: bool) -> Case:
    name, timm_name = MODELS[label]
    config = settings(device, quick)
    batch, dtype = config["batch"], config["dtype"]
    crop_sizes = ([(config["global_size"],) * 2] * 2 + [(config["local_size"],) * 2] * N_LOCAL_CROPS)
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, h, w, generator=generator).to(device) for h, w in crop_sizes]
    model = create_backbone(name, drop_path_rate=DROP_PATH_RATE).to(device).train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fastdino_step(backend: str, packed: bool):
        def step(_):
            model.attn_backend = backend
            with autocast:
                features = model.forward_multicrop(crops, packed=packed)
            features.float().sum().backward()
        return step

    def zero_grad(module):
        return lambda: module.zero_grad(set_to_none=True)

    providers = []
    timm_model, timm_unavailable = _timm_model(timm_name, device)
    if timm_model is not None:
        def timm_step(_):
            with autocast:
                features = torch.cat([timm_model(group) for group in batch_same_size_crops(crops)])
            features.float().sum().backward()
        providers.append(Provider("timm ViT, per-resolution", timm_step, zero_grad(timm_model)))
    else:
        print(f"[models] no timm baseline: {timm_unavailable}", file=sys.stderr)
    backends = ["sdpa", "explicit"]
    if xformers_status(device) == "available":
        backends.insert(0, "xformers")
    for backend in backends:
        for packed in (False, True):
            if backend == "explicit" and packed:
                continue  # the explicit path is for attention maps; its speed matters once
            mode = "packed" if packed else "per-resolution"
            providers.append(Provider(f"fastdino {backend}, {mode}", fastdino_step(backend, packed),
                                      zero_grad(model)))

    targets = []
    if device.type == "cuda" and label == "ViT-S/8" and "xformers" in backends:
        targets.append(Target("fastdino xformers, packed", "fastdino sdpa, per-resolution", 1.5))
    baselines = [p.name for p in providers if p.name.startswith("timm")] or ["fastdino sdpa, per-resolution"]
    return Case(
        suite="models", name=f"{label} multi-crop fwd+bwd", dtype=str(dtype).replace("torch.", ""),
        sizes={"batch": batch, "crops": f"2x{config['global_size']}+{N_LOCAL_CROPS}x{config['local_size']}",
               "GFLOP/step": round(multicrop_step_flops(model, batch, crop_sizes) / 1e9, 1)},
        providers=providers, baselines=baselines, targets=targets, items_per_run=batch,
        flops_per_run=multicrop_step_flops(model, batch, crop_sizes),
        repeats=3 if device.type == "cpu" else (5 if quick else 20),
    )


def cases(device: torch.device, quick: bool):
    return [_case(label, device, quick) for label in MODELS]


if __name__ == "__main__":
    import run  # the one report writer (tables, img/s, MFU, JSON, PNG)

    sys.exit(run.main(["--suite", "models", *sys.argv[1:]]))
