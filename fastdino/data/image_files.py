"""Finding the training images, checking every one once per dataset, and the compact index.

Accepted inputs: an ImageNet-layout folder (one subfolder per class, searched recursively, symlinks
followed), a flat folder of images, or a text file listing image paths (one per line, relative to
the list's folder, optionally followed by an integer label). JPEG and PNG files are used (by their
content: a PNG named .jpg is fine); other files are ignored.

The check (``check_image_file``) finds, before training rather than as a decoder error or a
silent wrong image in the middle of an epoch: non-images, unsupported formats, truncated files,
and data corrupt in the middle of a file. JPEGs are entropy-decoded in full by libjpeg-turbo
(``simplejpeg``) at 1/8 scale (the inverse DCT shrinks to its DC term, every Huffman code is still
read) in strict mode: what libjpeg only warns about ("Corrupt JPEG data: premature end of data
segment", "bad Huffman code") fails the check. DALI's decoder trains on such files, printing that
warning without the file's name; PIL decodes some of them silently and raises on others, so
without the check the two backends would disagree. Without ``simplejpeg`` the check falls back to
PIL's 1/8-scale decode, which misses the warnings (said once at start-up). PNGs: every chunk's CRC
(``Image.verify``).
Unreadable folders, dangling symlinks and files that cannot be stat-ed are reported with the bad
files, never dropped without a word. Each bad file is named: an ``ImageFolderError`` listing
them, or with ``skip_bad_files`` a warning listing them and their count.

EXIF orientation is not applied, in either backend: images are used as stored, as the public
DINO release does (PIL's ``Image.open`` ignores the tag; DALI's decoder applies it by default, so
the DALI pipeline turns that off). The sizes in the index are the stored sizes.

The checks run once per dataset: ``scan_images`` keeps them in a cache (``index_cache``), lists
the folder at every start (stat only) and re-checks only files that are new or changed. With a
``Runtime`` of several ranks, rank 0 lists and checks (with all its threads) and broadcasts the
index; the other ranks do not touch the files.

The index holds paths as one UTF-8 byte array with int64 offsets (relative to a common prefix),
int32 labels and int32 sizes: about 50 bytes per ImageNet image ("n01440764/n01440764_10026.JPEG",
30 bytes, + 20), 64 MB for 1.28M images, where Python strings, int64 labels and sizes take about
130 bytes each.
"""

from __future__ import annotations

import functools
import io
import itertools
import operator
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
import torch.distributed as dist

from fastdino.runtime import Runtime, get_logger, track

from . import index_cache

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_IMAGE_SUFFIXES_BYTES = tuple(suffix.encode() for suffix in IMAGE_SUFFIXES)
_JPEG_START, _PNG_START = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_LISTED_BAD_FILES = 20
_ROWS_PER_TASK = 256  # files per thread-pool task: few futures even for millions of files
logger = get_logger("data")


class ImageFolderError(ValueError):
    """The data path is missing, empty, or holds files that cannot be used."""


class DataLoadingError(RuntimeError):
    """A batch could not be produced during training; the message names the file(s)."""


def _default_threads() -> int:
    return min(64, 2 * len(os.sched_getaffinity(0)))  # decoding is CPU-bound, reads wait on I/O


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 offsets (len(lengths) + 1) of strings of these lengths laid end to end."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _take(path_bytes: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings ``rows`` (increasing) of the strings packed as ``path_bytes`` and ``offsets``,
    packed the same way."""
    lengths = np.diff(offsets)
    keep = np.zeros(len(lengths), dtype=bool)
    keep[rows] = True
    return path_bytes[np.repeat(keep, lengths)], _offsets(lengths[rows])


class ImagePaths(Sequence):
    """The paths of an ``ImageIndex`` as a read-only sequence of str, decoded on access."""

    def __init__(self, index: ImageIndex):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self._index.path(i) for i in range(*item.indices(len(self)))]
        return self._index.path(item)


@dataclass
class ImageIndex:
    """The usable images: path i is ``prefix`` + the UTF-8 bytes
    ``path_bytes[path_offsets[i]:path_offsets[i + 1]]``; integer labels (-1 when unlabeled) and
    sizes (height, width) as stored (EXIF orientation not applied)."""

    prefix: str
    path_bytes: np.ndarray  # uint8
    path_offsets: np.ndarray  # int64, len(index) + 1
    labels: np.ndarray  # int32
    sizes: np.ndarray  # (len(index), 2) int32
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of each bad file left out

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of an index of {len(self)}")
        i %= len(self)
        start, end = self.path_offsets[i], self.path_offsets[i + 1]
        return self.prefix + os.fsdecode(self.path_bytes[start:end].tobytes())

    @property
    def paths(self) -> ImagePaths:
        return ImagePaths(self)

    @property
    def nbytes(self) -> int:
        """Memory of the index's arrays (the skipped list aside)."""
        return sum(array.nbytes for array in (self.path_bytes, self.path_offsets, self.labels, self.sizes))


# -- listing --------------------------------------------------------------------------------------

@dataclass
class ImageListing:
    """Every JPEG/PNG file found, in order, with the stat fields the cache is keyed on; paths as
    in ``ImageIndex`` (relative to ``prefix``)."""

    source: str  # the resolved data path: the cache's key
    prefix: str
    path_bytes: np.ndarray
    path_offsets: np.ndarray
    labels: np.ndarray  # int32
    file_sizes: np.ndarray  # int64 bytes; -1 where stat failed (the check then says why)
    mtimes: np.ndarray  # int64 ns
    ctimes: np.ndarray  # int64 ns
    problems: list[tuple[str, str]]  # (path, reason): unreadable folders, dangling symlinks
    ignored: int  # files that are not JPEG/PNG by name

    def __len__(self) -> int:
        return len(self.labels)

    def path_of(self, row: int) -> bytes:
        return os.fsencode(self.prefix) + self.path_bytes[self.path_offsets[row]:self.path_offsets[row + 1]].tobytes()


@dataclass
class _Found:
    """The files of one folder tree, gathered by one thread."""

    names: list[bytes] = field(default_factory=list)
    stats: list[int] = field(default_factory=list)  # size, mtime_ns, ctime_ns of each file, flat
    problems: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0

    def add(self, name: bytes, stat: os.stat_result) -> None:
        self.names.append(name)
        self.stats.extend((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))

    def packed(self) -> _Listed:
        """The same as arrays: a folder's per-file Python objects live only while it is listed."""
        return _Listed(b"".join(self.names), np.array([len(name) for name in self.names], dtype=np.int64),
                       np.array(self.stats, dtype=np.int64).reshape(-1, 3), self.problems, self.ignored)


@dataclass
class _Listed:
    name_bytes: bytes
    name_lengths: np.ndarray
    stats: np.ndarray  # (n, 3) size, mtime_ns, ctime_ns
    problems: list[tuple[str, str]]
    ignored: int


def _describe(error: OSError) -> str:
    return f"{type(error).__name__}: {error.strerror or error}"


def _dangling(path) -> str:
    return f"dangling symlink (to {os.fsdecode(os.readlink(path))})"


def _sorted_entries(folder: bytes, found: _Found) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as scan:
            return sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        found.problems.append((os.fsdecode(folder), f"unreadable folder ({_describe(error)})"))
        return []


def _add_file(entry: os.DirEntry, relative: bytes, found: _Found) -> bool:
    """Record a non-folder entry; False (nothing recorded) for a folder. Raises OSError."""
    if entry.is_dir():
        return False
    if entry.is_file():
        if entry.name.lower().endswith(_IMAGE_SUFFIXES_BYTES):
            found.add(relative + entry.name, entry.stat())
        else:
            found.ignored += 1
    elif entry.is_symlink():
        found.problems.append((os.fsdecode(entry.path), _dangling(entry.path)))
    else:
        found.ignored += 1  # sockets, pipes, devices
    return True


def _walk(folder: bytes, relative: bytes, visited: set, found: _Found) -> None:
    """Depth first, entries in name order (so the order is that of sorting the paths by their
    parts), following each symlinked folder once."""
    for entry in _sorted_entries(folder, found):
        try:
            if _add_file(entry, relative, found):
                continue
            stat = entry.stat()
            if (stat.st_dev, stat.st_ino) in visited:
                found.problems.append((os.fsdecode(entry.path), "folder already listed (a symlink loop)"))
                continue
            visited.add((stat.st_dev, stat.st_ino))
            _walk(entry.path, relative + entry.name + b"/", visited, found)
        except OSError as error:
            found.problems.append((os.fsdecode(entry.path), f"cannot stat ({_describe(error)})"))


def _walk_class(folder: bytes, relative: bytes) -> _Listed:
    found = _Found()
    try:
        stat = os.stat(folder)
    except OSError as error:
        found.problems.append((os.fsdecode(folder), f"cannot stat ({_describe(error)})"))
        return found.packed()
    _walk(folder, relative, {(stat.st_dev, stat.st_ino)}, found)
    return found.packed()


def _list_folder(root: Path, threads: int) -> ImageListing:
    top = _Found()
    entries = _sorted_entries(os.fsencode(root), top)
    if top.problems:
        raise ImageFolderError(f"cannot read the data folder {str(root)!r}: {top.problems[0][1]}")
    class_folders = []
    for entry in entries:
        try:
            if not _add_file(entry, b"", top):
                class_folders.append(entry)
        except OSError as error:
            top.problems.append((os.fsdecode(entry.path), f"cannot stat ({_describe(error)})"))
    # one task per class folder: the stat calls of many folders overlap (network file systems)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        per_class = list(pool.map(lambda entry: _walk_class(entry.path, entry.name + b"/"), class_folders))
    groups = [(top.packed(), -1)] + [(listed, label) for label, listed in enumerate(per_class)]
    stats = np.concatenate([listed.stats for listed, _ in groups])
    return ImageListing(
        source=str(root.resolve()), prefix=str(root) + os.sep,
        path_bytes=np.frombuffer(b"".join(listed.name_bytes for listed, _ in groups), dtype=np.uint8).copy(),
        path_offsets=_offsets(np.concatenate([listed.name_lengths for listed, _ in groups])),
        labels=np.concatenate([np.full(len(listed.stats), label, dtype=np.int32) for listed, label in groups]),
        file_sizes=stats[:, 0].copy(), mtimes=stats[:, 1].copy(), ctimes=stats[:, 2].copy(),
        problems=[problem for listed, _ in groups for problem in listed.problems],
        ignored=sum(listed.ignored for listed, _ in groups))


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


def _stat_or_missing(path: str) -> tuple[int, int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1, -1  # the check names the reason
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _list_file_list(list_file: Path, threads: int) -> ImageListing:
    paths, labels = _read_file_list(list_file)
    try:
        prefix = os.path.commonpath([os.path.dirname(path) for path in paths])
        prefix = prefix + os.sep if prefix else ""
    except ValueError:  # absolute and relative paths mixed
        prefix = ""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        stats = np.array(list(pool.map(_stat_or_missing, paths)), dtype=np.int64).reshape(-1, 3)
    relative = [os.fsencode(path[len(prefix):]) for path in paths]
    return ImageListing(
        source=str(list_file.resolve()), prefix=prefix,
        path_bytes=np.frombuffer(b"".join(relative), dtype=np.uint8).copy(),
        path_offsets=_offsets(np.array([len(path) for path in relative], dtype=np.int64)),
        labels=np.asarray(labels, dtype=np.int32), file_sizes=stats[:, 0].copy(), mtimes=stats[:, 1].copy(),
        ctimes=stats[:, 2].copy(), problems=[], ignored=0)


def list_images(data_path: str | os.PathLike, num_threads: int | None = None) -> ImageListing:
    """The JPEG/PNG files of a folder or a file list, with their stat; no file is opened.

    Labels are the class folder's rank in name order (-1 for images outside class folders).
    """
    root = Path(data_path)
    if not root.exists():
        raise ImageFolderError(f"data path {str(root)!r} does not exist")
    threads = num_threads or _default_threads()
    listing = _list_file_list(root, threads) if root.is_file() else _list_folder(root, threads)
    if not len(listing):
        problems = "".join(f"\n  {path}: {reason}" for path, reason in listing.problems[:_LISTED_BAD_FILES])
        raise ImageFolderError(f"no JPEG or PNG images in {str(root)!r} (searched the folder and "
                               f"its class subfolders; {listing.ignored} other files ignored){problems}")
    return listing


def list_image_files(data_path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(paths, labels) of the JPEG/PNG files of a folder or a file list; labels are -1 for
    images outside class subfolders."""
    listing = list_images(data_path)
    return [os.fsdecode(listing.path_of(row)) for row in range(len(listing))], listing.labels.tolist()


# -- checking -------------------------------------------------------------------------------------

def _import_simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def jpeg_checker() -> str:
    """Which check JPEGs get: "libjpeg-turbo strict" (simplejpeg) or "PIL" (the fallback)."""
    return "libjpeg-turbo strict" if _import_simplejpeg() is not None else "PIL"


def _check_jpeg(data: bytes) -> tuple[int, int] | str:
    # a complete JPEG ends with the EOI marker (some writers pad after it): the clear message for
    # the common case of a cut download or copy
    if b"\xff\xd9" not in data[-64:]:
        return "truncated JPEG (no end-of-image marker)"
    simplejpeg = _import_simplejpeg()
    try:
        if simplejpeg is not None:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            # at the smallest scale (1/8) the inverse DCT is the DC term alone, but every Huffman
            # code is read; strict: libjpeg's warnings (corrupt data it would paper over) raise
            simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image.draft("L", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Exception as error:  # whatever the decoder raises on damaged bytes
        return f"corrupt JPEG data ({error})"
    return height, width


def _check_png(data: bytes) -> tuple[int, int] | str:
    from PIL import Image

    if b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()  # every chunk's CRC, the image data's included
    except Exception as error:  # whatever PIL raises on damaged bytes
        return f"corrupt PNG ({error})"
    return height, width


def check_image_file(path: str | bytes) -> tuple[int, int] | str:
    """(height, width) of a usable JPEG/PNG (as stored: EXIF orientation is not applied), or the
    reason it cannot be used."""
    from PIL import Image, UnidentifiedImageError  # PIL is needed only when data is loaded

    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        if os.path.islink(path):
            return _dangling(path)
        return "file not found"
    except OSError as error:
        return f"unreadable ({_describe(error)})"
    if not data:
        return "empty file"
    if data.startswith(_JPEG_START):
        size = _check_jpeg(data)
    elif data.startswith(_PNG_START):
        size = _check_png(data)
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return f"{image.format} image (only JPEG and PNG are supported)"
        except UnidentifiedImageError:
            return "not an image"
        except Exception as error:
            return f"unreadable ({type(error).__name__}: {error})"
    if isinstance(size, tuple) and (size[0] < 1 or size[1] < 1):
        return f"empty image ({size[1]}x{size[0]})"
    return size


def _check_rows(listing: ImageListing, rows: np.ndarray) -> list[tuple[int, int] | str]:
    return [check_image_file(listing.path_of(row)) for row in rows.tolist()]


def _check_files(listing: ImageListing, rows: np.ndarray, checks: index_cache.Checks, threads: int,
                 verbose: bool) -> None:
    """Check the files ``rows`` of ``listing`` into ``checks``, ``threads`` at a time (the
    decoders release the GIL)."""
    tasks = [rows[start:start + _ROWS_PER_TASK] for start in range(0, len(rows), _ROWS_PER_TASK)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = itertools.chain.from_iterable(pool.map(lambda task: _check_rows(listing, task), tasks))
        if verbose:
            results = track(results, len(rows), "index: checking images", logger)
        for row, result in zip(rows.tolist(), results):
            if isinstance(result, str):
                checks.reasons[row] = result
                checks.sizes[row] = -1
            else:
                checks.reasons.pop(row, None)
                checks.sizes[row] = result


# -- the index ------------------------------------------------------------------------------------

def _bad_files_text(bad: list[tuple[str, str]]) -> str:
    listed = "".join(f"\n  {path}: {reason}" for path, reason in bad[:_LISTED_BAD_FILES])
    more = f"\n  ... and {len(bad) - _LISTED_BAD_FILES} more" if len(bad) > _LISTED_BAD_FILES else ""
    return listed + more


@functools.lru_cache(maxsize=None)
def _say_the_check_is_lenient() -> None:
    logger.warning("simplejpeg is not installed: JPEGs are checked with PIL, which does not see data "
                   "corrupt in the middle of a file that libjpeg only warns about (DALI then trains on "
                   "it, printing the warning without the file's name); pip install simplejpeg")


def _scan(data_path, skip_bad_files: bool, num_threads: int | None, verbose: bool, cache_dir,
          use_cache: bool) -> ImageIndex:
    threads = num_threads or _default_threads()
    listing = list_images(data_path, threads)
    checker = jpeg_checker()
    if checker == "PIL" and verbose:
        _say_the_check_is_lenient()
    cache_path = None
    if use_cache:
        cache_path = index_cache.cache_file(cache_dir if cache_dir is not None else index_cache.default_cache_dir(),
                                            listing.source)
        found = index_cache.lookup(cache_path, listing, checker)
    else:
        found = index_cache.CacheLookup(index_cache.Checks.unknown(len(listing)), np.arange(len(listing)),
                                        "use_cache=False")
    checks = found.checks
    if not found.reason:
        if verbose:
            logger.info(f"index: cached ({cache_path})")
    else:
        started = time.perf_counter()
        _check_files(listing, found.unchecked, checks, threads, verbose)
        summary = (f"index: rebuilt ({found.reason}): checked {len(found.unchecked)} files in "
                   f"{time.perf_counter() - started:.1f} s with {threads} threads ({checker} JPEG check)")
        if len(found.unchecked) < len(listing):
            summary += f", kept the checks of {len(listing) - len(found.unchecked)} unchanged files"
        if cache_path is not None:
            try:
                index_cache.store(cache_path, listing, checks, checker)
                summary += f"; saved to {cache_path}"
            except OSError as error:
                logger.warning(f"index: could not write the cache {cache_path} ({_describe(error)}): the next "
                               f"start checks every file again; set cache_dir (or {index_cache.CACHE_DIR_ENV_VAR})")
        if verbose:
            logger.info(summary)
    bad = listing.problems + [(os.fsdecode(listing.path_of(row)), checks.reasons[row])
                              for row in sorted(checks.reasons)]
    total = len(listing) + len(listing.problems)
    if bad and not skip_bad_files:
        raise ImageFolderError(
            f"{len(bad)} of {total} files under {str(data_path)!r} cannot be used:{_bad_files_text(bad)}\n"
            f"Remove or fix them, or pass skip_bad_files=True to train without them.")
    keep = np.flatnonzero(checks.sizes[:, 0] >= 0)
    if not len(keep):
        raise ImageFolderError(f"none of the {total} files under {str(data_path)!r} is a usable image")
    if bad and verbose:
        logger.warning(f"skipped {len(bad)} bad files of {total} under {data_path}:{_bad_files_text(bad)}")
    path_bytes, path_offsets = _take(listing.path_bytes, listing.path_offsets, keep)
    return ImageIndex(prefix=listing.prefix, path_bytes=path_bytes, path_offsets=path_offsets,
                      labels=listing.labels[keep], sizes=checks.sizes[keep], skipped=bad)


def scan_images(data_path: str | os.PathLike, skip_bad_files: bool = False, num_threads: int | None = None,
                verbose: bool = True, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                runtime: Runtime | None = None) -> ImageIndex:
    """List and check every image under ``data_path``; the checks are cached per dataset.

    Bad files raise ``ImageFolderError`` naming them, unless ``skip_bad_files``: then they are
    left out, and listed in ``ImageIndex.skipped`` and in a warning.
    cache_dir: where the checks are kept (default ``index_cache.default_cache_dir()``);
    ``use_cache=False`` checks every file and keeps nothing.
    runtime: the job's ``fastdino.runtime.Runtime``; with several ranks this is a collective
    (every rank calls it): rank 0 lists and checks, the other ranks receive its index, or raise
    its error. Without one, this process scans alone.
    """
    scan = functools.partial(_scan, data_path, skip_bad_files, num_threads, verbose, cache_dir, use_cache)
    if runtime is None or not runtime.initialized or runtime.world_size == 1:
        return scan()
    return _scan_on_rank_zero(runtime, scan, data_path)


_BROADCAST_ARRAYS = {"path_bytes": torch.uint8, "path_offsets": torch.int64, "labels": torch.int32,
                     "sizes": torch.int32}


def _scan_on_rank_zero(runtime: Runtime, scan, data_path) -> ImageIndex:
    """Rank 0 scans and broadcasts the index (or its error), so the other ranks need no shared
    cache folder and never touch the files."""
    # NCCL moves only GPU tensors; the arrays cross once, at start-up
    device = runtime.device if runtime.backend == "nccl" else torch.device("cpu")
    index, header = None, [None]
    if runtime.is_main:
        try:
            index = scan()
        except Exception as error:  # the other ranks must not wait for arrays that never come
            dist.broadcast_object_list([{"error": str(error), "type": type(error).__name__}], src=0, device=device)
            raise
        header[0] = {"prefix": index.prefix, "skipped": index.skipped,
                     "shapes": {name: getattr(index, name).shape for name in _BROADCAST_ARRAYS}}
    dist.broadcast_object_list(header, src=0, device=device)
    if "error" in header[0]:
        if header[0]["type"] == "ImageFolderError":
            raise ImageFolderError(header[0]["error"])
        raise RuntimeError(f"rank 0 could not index {data_path}: {header[0]['type']}: {header[0]['error']}")
    arrays = {}
    for name, dtype in _BROADCAST_ARRAYS.items():
        tensor = (torch.from_numpy(getattr(index, name)) if index is not None
                  else torch.empty(header[0]["shapes"][name], dtype=dtype)).to(device)
        dist.broadcast(tensor, src=0)
        arrays[name] = tensor.cpu().numpy()
    if index is not None:
        return index
    return ImageIndex(prefix=header[0]["prefix"], skipped=header[0]["skipped"], **arrays)
