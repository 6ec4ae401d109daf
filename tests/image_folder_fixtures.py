"""Small on-disk inputs for the evaluation and visualization tests: ImageNet-layout folders of
generated images and tiny checkpoints in the formats fastdino reads."""

from pathlib import Path

import numpy as np
import torch

from fastdino.models import DINOHead, MultiCropWrapper, create_backbone, export_dino_checkpoint

TINY_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def write_image_folder(root: Path, num_classes: int, per_class: int, size=(37, 45), seed=0) -> Path:
    """root/class{c}/{i}.png: noisy images whose mean brightness depends on the class, so even a
    random network separates the classes a little. size is (height, width)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = 40 + label * 170 / max(1, num_classes - 1)
        for index in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def tiny_networks(arch="vit_tiny_p16", img_size=32, seed=0):
    """Student and teacher MultiCropWrappers with different random weights."""
    torch.manual_seed(seed)
    networks = []
    for _ in range(2):
        backbone = create_backbone(arch, img_size=img_size)
        networks.append(MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, **TINY_HEAD)))
    return tuple(networks)


def save_training_checkpoint(path: Path, arch="vit_tiny_p16", img_size=32, seed=0):
    """A checkpoint in the release's (and fastdino training's) layout; returns (student, teacher)."""
    student, teacher = tiny_networks(arch, img_size, seed)
    torch.save(export_dino_checkpoint(student, teacher, epoch=1, config={"arch": arch}), path)
    return student, teacher
