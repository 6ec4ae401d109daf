"""Frozen-backbone features of an image folder: data, distributed extraction, a disk cache.

Extraction follows the release's ``extract_features``: under ``torchrun`` each rank runs the
backbone over its shard of the dataset (the ``DistributedSampler`` layout: samples r, r + world,
r + 2 world, ...) and the shards are all-gathered and put back in dataset order, so every rank
ends with the features of the whole dataset, row i being sample i.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from fastdino.data.recipe import IMAGENET_MEAN, IMAGENET_STD
# Bump when the meaning of cached features changes, so old caches are recomputed.
CACHE_FORMAT_VERSION = 1

FeatureFunction = Callable[[torch.Tensor], torch.Tensor]


def import_torchvision():
    """torchvision's ``datasets`` and ``transforms``, or an ImportError that says what to do."""
    try:
        from torchvision import datasets, transforms
    except Exception as error:  # missing, or built for another torch
        raise ImportError(
            f"fastdino's evaluation reads image folders with torchvision, which could not be "
            f"imported ({type(error).__name__}: {error}); install the torchvision built for "
            f"your torch (`pip install torchvision`)") from error
    return datasets, transforms


def evaluation_transform(image_size: int = 224):
    """The release's evaluation preprocessing: bicubic resize to 256/224 of ``image_size`` (256
    for 224), center crop ``image_size``, ImageNet normalization."""
    _, transforms = import_torchvision()
    return transforms.Compose([
        transforms.Resize(image_size * 256 // 224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def image_folder(root: str | os.PathLike, transform, flag: str):
    """torchvision's ``ImageFolder`` over ``root`` (one subfolder per class); ``flag`` names the
    command-line option in errors."""
    datasets, _ = import_torchvision()
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{flag} {str(root)!r}: no such directory")
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as error:  # no class subfolders, or no images in them
        raise ValueError(f"{flag} {str(root)!r} is not an image folder with one subfolder of "
                         f"images per class: {error}") from error


def check_same_classes(train_dataset, val_dataset) -> None:
    """ImageFolder numbers the classes of each folder on its own (sorted subfolder names), so the
    labels of the two folders mean the same only when they hold the same classes."""
    if train_dataset.classes != val_dataset.classes:
        only_train = sorted(set(train_dataset.classes) - set(val_dataset.classes))
        only_val = sorted(set(val_dataset.classes) - set(train_dataset.classes))
        raise ValueError(
            f"--train-data {train_dataset.root!r} and --val-data {val_dataset.root!r} must have "
            f"the same class subfolders; only in train: {only_train[:10]}, only in val: "
            f"{only_val[:10]}")


def add_data_arguments(parser) -> None:
    """Data and extraction options shared by the k-NN and linear evaluations."""
    parser.add_argument("--train-data", required=True, help="training images, one folder per class")
    parser.add_argument("--val-data", required=True, help="validation images, one folder per class")
    parser.add_argument("--image-size", type=int, default=224,
                        help="center-crop size; images are first resized to 256/224 of it (default 224)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per batch and process (default 128)")
    parser.add_argument("--num-workers", type=int, default=4, help="data-loading workers per process")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--features-cache", default=None, metavar="DIR",
                        help="save extracted features here, and reuse them when the checkpoint, "
                             "data and preprocessing are unchanged")


# -- distributed ---------------------------------------------------------------------------------

def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed_from_environment() -> Iterator[None]:
    """Initialize torch.distributed for the block when launched by torchrun with WORLD_SIZE > 1
    (NCCL with one GPU per rank when CUDA is available, else gloo); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_device(name: str | None) -> torch.device:
    """``--device``, or this rank's GPU when CUDA is available, else the CPU."""
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def log(message: str) -> None:
    """Print once per job (rank 0)."""
    if rank_and_world_size()[0] == 0:
        print(message, flush=True)


def progress(iterable: Iterable, total: int, description: str) -> Iterable:
    """A tqdm bar on rank 0 when tqdm is installed, else a plain line every ~10%."""
    if rank_and_world_size()[0] != 0:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(iterable, total, description)
    return tqdm(iterable, total=total, desc=description, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def _plain_progress(iterable: Iterable, total: int, description: str) -> Iterator:
    step = max(1, total // 10)
    for count, item in enumerate(iterable, start=1):
        yield item
        if count % step == 0 or count == total:
            print(f"{description}: {count}/{total}", file=sys.stderr, flush=True)


# -- extraction ----------------------------------------------------------------------------------

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
    for images, targets in progress(loader, len(loader), description):
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


# -- cache ---------------------------------------------------------------------------------------

def features_fingerprint(checkpoint: str | os.PathLike, arch: str, part: str, dataset,
                         feature_name: str) -> dict:
    """What cached features depend on: the checkpoint file (path, size, modification time), the
    network, the image list with labels, the preprocessing and the kind of feature."""
    stat = os.stat(checkpoint)
    listing = "\n".join(f"{path}\t{label}" for path, label in dataset.samples)
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_size": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "arch": arch,
        "part": part,
        "data_root": str(Path(dataset.root).resolve()),
        "num_samples": len(dataset.samples),
        "samples_sha1": hashlib.sha1(listing.encode()).hexdigest(),
        "transform": repr(dataset.transform),
        "features": feature_name,
    }


def cached_features(cache_dir: str | os.PathLike | None, name: str, fingerprint: dict,
                    extract: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract()``'s (features, labels), read from ``cache_dir/name.pt`` when that file was
    written for the same ``fingerprint``; otherwise extracted and (by rank 0) saved there."""
    if cache_dir is None:
        return extract()
    path = Path(cache_dir) / f"{name}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            stored_fingerprint = stored["fingerprint"]
        except Exception as error:  # truncated or foreign file: extract again
            log(f"cached features {path} could not be read ({type(error).__name__}: {error}); "
                f"extracting again")
        else:
            if stored_fingerprint == fingerprint:
                log(f"reusing cached features {path}")
                return stored["features"], stored["labels"]
            changed = sorted(key for key in fingerprint.keys() | stored_fingerprint.keys()
                             if fingerprint.get(key) != stored_fingerprint.get(key))
            log(f"cached features {path} are stale ({', '.join(changed)} changed); extracting again")
    features, labels = extract()
    if rank_and_world_size()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".pt.partial")  # never leave a half-written cache behind
        torch.save({"fingerprint": fingerprint, "features": features, "labels": labels}, partial)
        os.replace(partial, path)
        log(f"saved features to {path}")
    return features, labels
