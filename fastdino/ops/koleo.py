"""The Kozachenko-Leonenko (KoLeo) regularizer of DINOv2 (Sablayrolles et al., "Spreading vectors
for similarity search"): -mean_i log(d_i + eps), d_i the distance from the L2-normalized feature
x_i to its nearest other feature in the batch.

One implementation for every device: the search is a (B x B) Gram matrix (one matrix product,
which cuBLAS / the CPU BLAS already do at their best) and the distances a (B x D) difference, so
at DINOv2's B = 64 the whole term is a few microsecond kernels and there is nothing to fuse.

Where DINOv2's module is not finite, this one is, and says so:
- computed in float32 whatever the input dtype (DINOv2 runs it in the features' dtype with
  autocast off: in float16 its eps of 1e-8 rounds to 0 and a zero distance gives log(0) = -inf);
- two features that coincide (distance exactly 0) contribute -log(eps) with a zero gradient:
  the direction that would separate them is undefined;
- a feature with no other in its group (a batch of one) has no neighbour and contributes
  nothing; if no feature has one the loss is 0.
``koleo_loss_with_counts`` also returns how many features were in each case (as device
tensors: no host synchronization); on the CPU ``koleo_loss`` warns once when either happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdino.runtime import warn_once


def _nearest_neighbours(x: torch.Tensor, group_size: int, topk: int) -> torch.Tensor:
    """Indices (B * topk,) of each feature's topk most similar others within its group of
    ``group_size`` consecutive features (cosine similarity = nearest for unit vectors)."""
    grouped = x.view(-1, group_size, x.shape[1])
    similarity = torch.bmm(grouped, grouped.transpose(1, 2))
    similarity.diagonal(dim1=-2, dim2=-1).fill_(-3.0)  # below any cosine: never its own neighbour
    nearest = similarity.topk(k=topk, dim=-1).indices
    offsets = torch.arange(grouped.shape[0], device=x.device).view(-1, 1, 1) * group_size
    return (nearest + offsets).flatten()


def koleo_loss_with_counts(features: torch.Tensor, eps: float = 1e-8, *, topk: int = 1,
                           group_size: int | None = None, p: float = 2.0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, coincident, without_neighbour): the KoLeo loss and the number of (feature,
    neighbour) pairs at distance 0 and of features without a neighbour (0-d int64 tensors)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        described = (f"{features.dtype} of shape {tuple(features.shape)}" if isinstance(features, torch.Tensor)
                     else type(features).__name__)
        raise ValueError(f"koleo_loss: features must be a 2-D (batch x dim) floating tensor, got {described}")
    batch = features.shape[0]
    if batch == 0:
        raise ValueError("koleo_loss: the batch is empty")
    group_size = batch if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or batch % group_size:
        raise ValueError(f"koleo_loss: group_size={group_size!r} must be a positive int dividing the batch "
                         f"of {batch}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"koleo_loss: topk must be a positive int, got {topk!r}")
    if group_size > 1 and topk >= group_size:
        raise ValueError(f"koleo_loss: topk={topk} needs groups of more than {topk} features, got "
                         f"group_size={group_size}")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        if group_size == 1:  # no feature has a neighbour
            zero = torch.zeros((), dtype=torch.int64, device=x.device)
            return x.sum() * 0.0, zero, zero + batch
        neighbours = _nearest_neighbours(x, group_size, topk)
        # The distance from the difference itself, not sqrt(2 - 2 cos): no cancellation, and
        # an exact 0 for coincident features, whose norm has a zero (sub)gradient in torch.
        distances = torch.linalg.vector_norm(x.repeat_interleave(topk, dim=0) - x[neighbours], ord=p, dim=-1)
        loss = -torch.log(distances + eps).mean()
        coincident = (distances == 0).sum()
    return loss, coincident, torch.zeros_like(coincident)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8, *, topk: int = 1,
               group_size: int | None = None, p: float = 2.0) -> torch.Tensor:
    """KoLeo loss of ``features`` (B, D) (float32 0-d tensor), neighbours searched within groups
    of ``group_size`` consecutive features (default: the whole batch; DINOv3 uses 16), the
    ``topk`` nearest each (DINOv2: 1). See the module doc for coincident features and batches
    of one."""
    loss, coincident, without_neighbour = koleo_loss_with_counts(
        features, eps, topk=topk, group_size=group_size, p=p)
    if features.device.type == "cpu":  # free to read here; on a GPU it would synchronize
        if int(coincident):
            warn_once(f"fastdino.ops.koleo_loss: {int(coincident)} feature pairs coincide (distance 0): "
                      "each contributes -log(eps) with a zero gradient")
        if int(without_neighbour):
            warn_once(f"fastdino.ops.koleo_loss: {int(without_neighbour)} features have no other feature "
                      "in their group (a batch or group of one): they contribute nothing")
    return loss
