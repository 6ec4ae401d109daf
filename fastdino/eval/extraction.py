"""Frozen-backbone features of a dataset, extracted over every rank of a torchrun job.

Extraction follows the release's ``extract_features``: each rank runs the backbone over its
shard of the dataset (the ``DistributedSampler`` layout: samples r, r + world, r + 2 world, ...)
and the shards are all-gathered and put back in dataset order, so every rank ends with the
features of the whole dataset, row i being sample i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from fastdino.runtime import get_logger, rank_and_world_size, track

FeatureFunction = Callable[[torch.Tensor], torch.Tensor]
logger = get_logger("eval")


def shard_indices(num_samples: int, rank: int, world_size: int) -> tuple[list[int], list[int]]:
    """This rank's samples, and where each goes in the dataset-ordered result (-1: padding).

    Rank r takes samples r, r + world_size, ...; shards are padded to equal length with samples
    from the start of the dataset (as ``DistributedSampler`` does) so that all_gather sees equal
    shapes; the padding rows are dropped after the gather.
    """
    per_rank = -(-num_samples // world_size)
    positions = list(range(rank, num_samples, world_size))
    padding = per_rank - len(positions)
    return positions + [index % num_samples for index in range(padding)], positions + [-1] * padding


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(feature_function: FeatureFunction, dataset: Dataset, batch_size: int,
                     device: torch.device, num_workers: int = 0,
                     description: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,) int64) on the CPU, row i from ``dataset[i]``.

    feature_function maps a batch of images (on ``device``) to features; the dataset yields
    (image, label). Under torch.distributed every rank extracts its shard and receives all rows.
    """
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError(f"{description}: the dataset is empty")
    rank, world_size = rank_and_world_size()
    indices, positions = shard_indices(num_samples, rank, world_size)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in track(loader, len(loader), description, logger):
        features.append(feature_function(images.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(targets, device=device))
    features, labels = torch.cat(features), torch.cat(labels).long()
    positions = torch.tensor(positions, device=device)
    if world_size > 1:
        features, labels, positions = (_all_gather(tensor) for tensor in (features, labels, positions))
    real = positions >= 0
    ordered_features = torch.empty(num_samples, features.shape[1], dtype=features.dtype, device=device)
    ordered_labels = torch.empty(num_samples, dtype=labels.dtype, device=device)
    ordered_features[positions[real]] = features[real]
    ordered_labels[positions[real]] = labels[real]
    return ordered_features.cpu(), ordered_labels.cpu()
