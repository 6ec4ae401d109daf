"""Per-parameter gradient clipping as in the public DINO release, without host syncs."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .backends import cpp_extension, resolve_backend, triton_kernels

CLIP_EPS = 1e-6  # the release's clip_coef = clip / (norm + 1e-6)


@torch.no_grad()
def clip_grad_per_param_reference(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The "torch" backend: torch's fused foreach norms and scaling (no .item(), no Python loop
    over values). With float64 grads it is the test reference."""
    # Norms accumulate and come back in float32 (float64 for float64 grads), not in bf16/fp16.
    norm_dtype = torch.promote_types(grads[0].dtype, torch.float32)
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype))
    # clamp(max=1) multiplies by exactly 1 where the release skips the multiplication.
    coefficients = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefficients.unbind()))
    return norms


def _why_not_fused(indexed_grads: list[tuple[int, torch.Tensor]]) -> str:
    """Why the fused kernels cannot clip these gradients, "" when they can."""
    for index, grad in indexed_grads:
        if not grad.is_contiguous():
            return (
                f"the gradient of parameter {index} (shape {tuple(grad.shape)}, strides "
                f"{grad.stride()}) is not contiguous, and the fused kernels clip contiguous "
                "gradients only"
            )
    return ""


@torch.no_grad()
def clip_grad_per_param_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, backend: str = "auto"
) -> torch.Tensor:
    """Clip each parameter's gradient to norm ``max_norm`` separately, as the release does:
    ``grad *= max_norm / (norm + 1e-6)`` where that factor is < 1.

    Parameters without a gradient are skipped. Returns the gradient norms before clipping as a
    float32 tensor on the gradients' device (one entry per parameter with a gradient), without
    synchronizing the host. A non-contiguous gradient runs the "torch" reference under
    ``backend="auto"`` (with a one-time warning); "cpp" or "triton" raise
    BackendUnavailableError naming the parameter.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    indexed_grads = [(index, p.grad) for index, p in enumerate(parameters) if p.grad is not None]
    if not indexed_grads:
        return torch.zeros(0)
    if not max_norm > 0:
        raise ValueError(f"clip_grad_per_param_: max_norm must be > 0, got {max_norm!r}")
    grads = [grad for _, grad in indexed_grads]
    name = resolve_backend("clip_grad_per_param_", backend, grads,
                           fused_unsupported=_why_not_fused(indexed_grads))
    if name == "torch":
        return clip_grad_per_param_reference(grads, max_norm)
    kernels = cpp_extension() if name == "cpp" else triton_kernels()
    return kernels.clip_grad_per_param_(grads, float(max_norm), CLIP_EPS)
