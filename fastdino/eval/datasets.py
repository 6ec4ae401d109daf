"""Image folders for the evaluations, read with torchvision, and the release's transforms."""

from __future__ import annotations

import os
from pathlib import Path

from fastdino.data.recipe import IMAGENET_MEAN, IMAGENET_STD


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


def augmentation_transform(image_size: int = 224):
    """The release's training transform for the linear probe: random resized crop and flip."""
    _, transforms = import_torchvision()
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
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
