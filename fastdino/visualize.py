"""Self-attention maps of a ViT's CLS token, as the release's ``visualize_attention.py``.

    python -m fastdino.visualize --checkpoint ckpt.pth --image img.jpg --out attention/ \\
        [--image-size 480 | --image-size H W] [--threshold 0.6]

Writes into ``--out``, every image at the size of the resized input:

- ``image.png``: the input, resized so that both sides are multiples of the patch size;
- ``attn-head{i}.png``, ``attn-mean.png``: the last block's attention of the CLS token over the
  patches, per head and averaged over heads, one block of pixels per patch, colormapped and
  overlaid on the image;
- ``mask-head{i}.png``, ``mask-mean.png``: the release's foreground masks, white where a patch is
  among the fewest patches that hold ``--threshold`` (60%) of that map's attention mass.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from fastdino.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from fastdino.eval.arguments import add_backbone_arguments
from fastdino.eval.backbones import load_backbone
from fastdino.runtime import get_logger, select_device

DEFAULT_IMAGE_SIZE = 480  # the release's
DEFAULT_THRESHOLD = 0.6
OVERLAY_OPACITY = 0.6
# Anchor colors of the "inferno" colormap (dark = little attention, bright yellow = most),
# interpolated linearly; avoids needing matplotlib for one lookup table.
_INFERNO_ANCHORS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
                             (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
                            dtype=np.float64)


def _import_pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("fastdino.visualize reads and writes images with Pillow; "
                          "install it with `pip install pillow`") from error
    return Image


def patch_multiple_size(width: int, height: int, image_size: int | tuple[int, int],
                        patch_size: int) -> tuple[int, int]:
    """(width, height) to resize to: the shorter side to ``image_size`` (aspect kept), or exactly
    (H, W) for a pair; then each side rounded to the nearest multiple of ``patch_size`` (at least
    one patch)."""
    if isinstance(image_size, int):
        scale = image_size / min(width, height)
        target_w, target_h = width * scale, height * scale
    else:
        target_h, target_w = image_size
    # Halves round up (Python's round() would send 2.5 patches to 2 and 3.5 to 4).
    return tuple(max(1, int(side / patch_size + 0.5)) * patch_size for side in (target_w, target_h))


def cls_attention_maps(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the CLS token over the patches: (B, heads, grid_h, grid_w).

    images: (B, 3, H, W) normalized, H and W multiples of the patch size.
    """
    patch_size = backbone.patch_size
    grid_h, grid_w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    with torch.no_grad():
        attention = backbone.get_last_selfattention(images)  # (B, heads, 1 + N, 1 + N)
    return attention[:, :, 0, 1:].reshape(images.shape[0], -1, grid_h, grid_w)


def attention_mass_mask(attention: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """The release's mask over the last dimension: True on the fewest largest entries whose sum
    is at least ``threshold`` of the total (the release keeps a patch when the ascending cumulative
    share of the entries up to it exceeds 1 - threshold)."""
    values, order = attention.sort(dim=-1)
    shares = values / values.sum(dim=-1, keepdim=True)
    keep_sorted = shares.cumsum(dim=-1) > 1 - threshold
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 inferno colors, the map's minimum dark, maximum bright."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    position = scaled * (len(_INFERNO_ANCHORS) - 1)
    lower = np.clip(np.floor(position).astype(int), 0, len(_INFERNO_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colors = (1 - fraction) * _INFERNO_ANCHORS[lower] + fraction * _INFERNO_ANCHORS[lower + 1]
    return np.rint(colors).astype(np.uint8)


def _per_pixel(patch_map: np.ndarray, patch_size: int) -> np.ndarray:
    """(grid_h, grid_w) -> (grid_h * p, grid_w * p): each patch's value over its pixels (the
    release's nearest upsampling)."""
    return patch_map.repeat(patch_size, axis=0).repeat(patch_size, axis=1)


def write_attention_images(backbone: torch.nn.Module, image_path: str | os.PathLike,
                           out_dir: str | os.PathLike,
                           image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                           threshold: float = DEFAULT_THRESHOLD,
                           device: torch.device | str = "cpu") -> list[Path]:
    """Write the files listed in this module's docstring; returns their paths."""
    Image = _import_pil()
    if not hasattr(backbone, "get_last_selfattention"):
        raise ValueError(f"attention maps need a ViT backbone; {type(backbone).__name__} has no "
                         f"self-attention")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold {threshold}: must be between 0 and 1")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"--image {str(image_path)!r}: no such file")
    try:
        image = Image.open(image_path).convert("RGB")
    except Exception as error:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"--image {str(image_path)!r} could not be read as an image "
                         f"({type(error).__name__}: {error})") from error
    patch_size = backbone.patch_size
    image = image.resize(patch_multiple_size(*image.size, image_size, patch_size),
                         Image.Resampling.BICUBIC)

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    normalized = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    backbone = backbone.to(device)
    maps = cls_attention_maps(backbone, normalized[None].to(device))[0].float().cpu()
    maps = torch.cat((maps, maps.mean(dim=0, keepdim=True)))  # the heads, then their mean
    masks = attention_mass_mask(maps.flatten(1), threshold).view_as(maps)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "image.png"]
    image.save(written[0])
    names = [f"head{head}" for head in range(maps.shape[0] - 1)] + ["mean"]
    for name, attention, mask in zip(names, maps.numpy(), masks.numpy()):
        heat = Image.fromarray(colorize(_per_pixel(attention, patch_size)))
        written.append(out_dir / f"attn-{name}.png")
        Image.blend(image, heat, OVERLAY_OPACITY).save(written[-1])
        written.append(out_dir / f"mask-{name}.png")
        Image.fromarray(_per_pixel(mask, patch_size).astype(np.uint8) * 255).save(written[-1])
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdino.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    parser.add_argument("--image", required=True, help="the image to visualize")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--image-size", type=int, nargs="+", default=[DEFAULT_IMAGE_SIZE],
                        metavar="SIZE",
                        help=f"one number: the shorter side (default {DEFAULT_IMAGE_SIZE}); two: "
                             f"height and width; both then rounded to multiples of the patch size")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"share of the attention mass the masks keep (default {DEFAULT_THRESHOLD})")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if len(args.image_size) > 2 or min(args.image_size) < 1:
        raise SystemExit(f"--image-size {' '.join(map(str, args.image_size))}: give one positive "
                         f"size (the shorter side) or two (height width)")
    image_size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    backbone, arch = load_backbone(args.checkpoint, args.arch, args.part)
    written = write_attention_images(backbone, args.image, args.out, image_size, args.threshold,
                                     select_device(args.device))
    get_logger("visualize").info(f"{arch} (patch {backbone.patch_size}): wrote {len(written)} images to {args.out}")
    return written


if __name__ == "__main__":
    main()
