"""Per-parameter gradient clipping: fastdino (no host sync) vs the release's .item() loop."""

import torch

from baselines import release_clip_gradients, vit_dino_parameter_shapes
from fastdino.ops import clip_grad_per_param_
from measure import Case, Provider, fastdino_backend


def cases(device: torch.device, quick: bool):
    shapes = vit_dino_parameter_shapes(patch_size=16 if quick else 8, out_dim=16384 if quick else 65536)
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.empty(shape, device=device)) for shape in shapes]
    # Gradient norms around the clip value 3.0, so some are clipped and some are not.
    original_grads = [(torch.randn(shape, generator=generator) * 6 / max(1, torch.Size(shape).numel()) ** 0.5).to(device)
                      for shape in shapes]

    def restore_grads():  # clipping is in place: start every run from the same gradients
        for parameter, grad in zip(parameters, original_grads):
            parameter.grad = grad.clone()

    backend = fastdino_backend(device)
    n_params = sum(p.numel() for p in parameters)
    return [Case(
        suite="ops", name="per-parameter grad clipping", dtype="float32",
        sizes={"tensors": len(shapes), "params_M": round(n_params / 1e6, 1)},
        providers=[
            Provider("release .item() loop", lambda _: release_clip_gradients(parameters, 3.0), restore_grads),
            Provider("fastdino torch (foreach)", lambda _: clip_grad_per_param_(parameters, 3.0, backend="torch"),
                     restore_grads),
            Provider(f"fastdino {backend}", lambda _: clip_grad_per_param_(parameters, 3.0, backend=backend),
                     restore_grads),
        ],
        baselines=["release .item() loop"],
        bytes_moved=3 * n_params * 4,  # read for the norms, read and write to scale (upper bound)
        repeats=10,
    )]
