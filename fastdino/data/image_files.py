"""Finding the training images and checking them before training starts.

Accepted inputs: an ImageNet-layout folder (one subfolder per class), a flat folder of images,
or a text file listing image paths (one per line, relative to the list's folder, optionally
followed by an integer label). JPEG and PNG files are used; other files are ignored.

``scan_images`` reads each file's header (PIL, no decoding) and its last bytes, so it finds
non-images, unsupported formats and truncated files in seconds rather than as a decoder error in
the middle of an epoch. It also records each image's size, which the crop draws need.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdino.runtime import get_logger

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
logger = get_logger("data")
_SCAN_PROGRESS_EVERY = 50_000
_LISTED_BAD_FILES = 20


class ImageFolderError(ValueError):
    """The data path is missing, empty, or holds files that cannot be used."""


class DataLoadingError(RuntimeError):
    """A batch could not be produced during training; the message names the file(s)."""


@dataclass
class ImageIndex:
    """The usable images: paths, integer labels (-1 when unlabeled) and sizes (height, width)."""

    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    skipped: list[tuple[str, str]]  # (path, reason) of the files left out with skip_bad_files

    def __len__(self) -> int:
        return len(self.paths)


def list_image_files(data_path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(paths, labels) of the JPEG/PNG files of a folder or a file list; labels are -1 for
    images outside class subfolders."""
    root = Path(data_path)
    if not root.exists():
        raise ImageFolderError(f"data path {str(root)!r} does not exist")
    if root.is_file():
        return _read_file_list(root)
    class_folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    paths, labels, ignored = [], [], 0
    folders = [(root, -1)] + [(folder, label) for label, folder in enumerate(class_folders)]
    for folder, label in folders:
        walk = sorted(folder.rglob("*")) if label >= 0 else sorted(folder.iterdir())
        for entry in walk:
            if not entry.is_file():
                continue
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(entry))
                labels.append(label)
            else:
                ignored += 1
    if not paths:
        raise ImageFolderError(f"no JPEG or PNG images in {str(root)!r} (searched the folder and "
                               f"its class subfolders; {ignored} other files ignored)")
    return paths, labels


def _read_file_list(list_file: Path):
    paths, labels = [], []
    for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise ImageFolderError(f"{list_file}:{line_number}: expected 'path [integer label]', "
                                   f"got {line!r}")
        path = Path(fields[0])
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
        labels.append(int(fields[1]) if len(fields) == 2 else -1)
    if not paths:
        raise ImageFolderError(f"the file list {str(list_file)!r} names no images")
    return paths, labels


def check_image_file(path: str) -> tuple[int, int] | str:
    """(height, width) of a usable JPEG/PNG, or the reason it cannot be used."""
    from PIL import Image, UnidentifiedImageError  # PIL is needed only when data is loaded

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
        with open(path, "rb") as file:
            file.seek(max(0, size - 64))
            tail = file.read()
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image"
    except OSError as error:
        return f"unreadable ({error})"
    if image_format not in ("JPEG", "PNG"):
        return f"{image_format} image (only JPEG and PNG are supported)"
    # a complete JPEG ends with the EOI marker (some writers pad after it), a complete PNG with
    # its IEND chunk: a missing end is the cheap sign of a truncated download or copy
    if image_format == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if image_format == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    return height, width


def scan_images(data_path: str | os.PathLike, skip_bad_files: bool = False,
                num_threads: int | None = None, verbose: bool = True) -> ImageIndex:
    """List and check every image under ``data_path``.

    Bad files raise ``ImageFolderError`` naming them, unless ``skip_bad_files``: then they are
    left out, and counted in ``ImageIndex.skipped`` and in a printed line.
    """
    paths, labels = list_image_files(data_path)
    threads = num_threads or min(32, (os.cpu_count() or 1) * 4)  # header reads wait on I/O
    results = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for count, result in enumerate(pool.map(check_image_file, paths, chunksize=64), start=1):
            results.append(result)
            if verbose and count % _SCAN_PROGRESS_EVERY == 0:
                logger.info(f"checked {count}/{len(paths)} images")
    bad = [(path, result) for path, result in zip(paths, results) if isinstance(result, str)]
    if bad and not skip_bad_files:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_LISTED_BAD_FILES])
        more = f"\n  ... and {len(bad) - _LISTED_BAD_FILES} more" if len(bad) > _LISTED_BAD_FILES else ""
        raise ImageFolderError(
            f"{len(bad)} of {len(paths)} files under {str(data_path)!r} cannot be used:\n{listed}{more}\n"
            f"Remove or fix them, or pass skip_bad_files=True to train without them.")
    keep = [i for i, result in enumerate(results) if not isinstance(result, str)]
    if not keep:
        raise ImageFolderError(f"none of the {len(paths)} files under {str(data_path)!r} is a usable image")
    if bad and verbose:
        logger.warning(f"skipped {len(bad)} bad files of {len(paths)} under {data_path} "
                       f"(first: {bad[0][0]}: {bad[0][1]})")
    return ImageIndex(
        paths=[paths[i] for i in keep],
        labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
        sizes=np.asarray([results[i] for i in keep], dtype=np.int64).reshape(-1, 2),
        skipped=bad,
    )
