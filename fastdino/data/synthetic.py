"""Generated photo-like JPEGs for the default tiny run, tests and demos (no download needed).

Each image is a smooth colour gradient with a few filled shapes, blurred a little so that it
compresses like a photograph rather than like noise; each class has its own palette and shape,
so a network can tell the classes apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_synthetic_image_folder(path: str | os.PathLike, n_images: int = 64,
                                 image_size: tuple[int, int] = (160, 120), n_classes: int = 4,
                                 seed: int = 0) -> Path:
    """Write ``n_images`` JPEGs of ``image_size`` (width, height) into ``path/class_<k>/``.

    Existing files with the same names are overwritten; returns ``path``.
    """
    from PIL import Image, ImageDraw, ImageFilter

    if n_images < 1 or n_classes < 1:
        raise ValueError(f"n_images={n_images} and n_classes={n_classes} must be >= 1")
    root = Path(path)
    generator = np.random.default_rng(seed)
    width, height = image_size
    palettes = generator.integers(0, 256, size=(n_classes, 3, 3))
    ramp_x = np.linspace(0, 1, width)[None, :, None]
    ramp_y = np.linspace(0, 1, height)[:, None, None]
    for index in range(n_images):
        label = index % n_classes
        start, end, shape_color = palettes[label]
        mix = (ramp_x * generator.uniform(0.3, 1) + ramp_y * generator.uniform(0, 0.7)) / 1.7
        pixels = start * (1 - mix) + end * mix + generator.normal(0, 6, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = generator.integers(0, width * 3 // 4), generator.integers(0, height * 3 // 4)
            x1 = x0 + generator.integers(width // 8, width // 2)
            y1 = y0 + generator.integers(height // 8, height // 2)
            color = tuple(int(c) for c in np.clip(shape_color + generator.integers(-30, 30, 3), 0, 255))
            (draw.ellipse if label % 2 else draw.rectangle)([x0, y0, x1, y1], fill=color)
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.filter(ImageFilter.GaussianBlur(1)).save(folder / f"image_{index:05d}.jpg", quality=90)
    return root


SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
                 "hubble_deep_field", "camera")


def write_sample_photo_folder(path: str | os.PathLike, n_images: int = 32,
                              image_size: tuple[int, int] = (500, 375), seed: int = 0,
                              quality: int = 90) -> Path:
    """Write ``n_images`` JPEGs of real photographs at ImageNet-like size (width, height) into
    ``path/<photo name>/``: random crops of scikit-image's bundled sample photos, resized.

    Real photos decode and compress unlike generated images, so benchmarks and tests of the
    decoders use these. Needs scikit-image (``pip install scikit-image``).
    """
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("write_sample_photo_folder needs scikit-image's sample photos: "
                          "pip install scikit-image") from error
    from PIL import Image

    root = Path(path)
    generator = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLE_PHOTOS]
    width, height = image_size
    for index in range(n_images):
        label = index % len(photos)
        photo = photos[label]
        # a random crop with the output's aspect ratio, 60-100% of the photo's shorter fit
        fit = min(photo.width / width, photo.height / height)
        scale = fit * generator.uniform(0.6, 1.0)
        crop_w, crop_h = int(width * scale), int(height * scale)
        left = int(generator.integers(0, photo.width - crop_w + 1))
        top = int(generator.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        folder = root / SAMPLE_PHOTOS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"photo_{index:05d}.jpg", quality=quality)
    return root
