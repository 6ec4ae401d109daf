"""The image checks of a dataset, kept on disk so that a dataset is checked once, not at every
start of every rank.

Where: ``cache_dir`` when given, else ``$FASTDINO_CACHE_DIR/index``, else
``$XDG_CACHE_HOME/fastdino/index``, else ``~/.cache/fastdino/index``. One file per dataset,
named after its resolved path (``train-<hash of the path>.npz``).

When it is used: the file holds the listing it was made from, each image's path relative to the
dataset, size, mtime_ns and ctime_ns, and which checker made it. The dataset is listed again
at every start (a stat per file, no reads); a cache is used as it is only when that listing is
the same in every field. Otherwise the checks are redone for the files that are new or whose
stat changed (ctime catches a file rewritten with its old size and mtime restored, as
``rsync -a`` or ``cp -p`` do), the checks of the files that did not change are kept, and the
file is rewritten. A folder's own mtime is not used: rewriting a file in place leaves it as it
was.

Format: an ``.npz`` of plain arrays (read with ``allow_pickle=False``), written under a
temporary name, fsynced and renamed, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_DIR_ENV_VAR = "FASTDINO_CACHE_DIR"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$FASTDINO_CACHE_DIR/index``, else ``$XDG_CACHE_HOME/fastdino/index``, else
    ``~/.cache/fastdino/index``."""
    if os.environ.get(CACHE_DIR_ENV_VAR):
        return Path(os.environ[CACHE_DIR_ENV_VAR]).expanduser() / "index"
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "fastdino" / "index"


def cache_file(cache_dir: str | os.PathLike, source: str) -> Path:
    """The cache of the dataset at the resolved path ``source``."""
    digest = hashlib.sha256(os.fsencode(source)).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(source))[:40] or "root"
    return Path(cache_dir) / f"{stem}-{digest}.npz"


@dataclass
class Checks:
    """What the check found for each file of a listing."""

    sizes: np.ndarray  # (n, 2) int32 (height, width); (-1, -1) where the file cannot be used
    reasons: dict[int, str]  # row -> why that file cannot be used

    @classmethod
    def unknown(cls, count: int) -> Checks:
        return cls(np.full((count, 2), -1, dtype=np.int32), {})


@dataclass
class CacheLookup:
    checks: Checks  # the checks the cache holds for this listing
    unchecked: np.ndarray  # rows of the listing with no usable check: check these now
    reason: str  # why the cache was not used as it is; "" when it was (nothing to check or write)


def _stat_rows(listing) -> np.ndarray:
    return np.stack([listing.file_sizes, listing.mtimes, listing.ctimes], axis=1)


def lookup(path: Path, listing, checker: str) -> CacheLookup:
    """The checks of ``listing`` (an ``ImageListing``) that the cache file ``path`` holds."""
    count = len(listing)
    nothing = np.arange(count)
    if not path.exists():
        return CacheLookup(Checks.unknown(count), nothing, f"no cache yet at {path}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            cached = {name: stored[name] for name in stored.files}
        meta = json.loads(cached["meta"].tobytes())
    except Exception as error:  # a damaged or foreign file: say so, rebuild, overwrite it
        return CacheLookup(Checks.unknown(count), nothing,
                           f"the cache {path} could not be read ({type(error).__name__}: {error})")
    if meta.get("format") != CACHE_FORMAT or meta.get("checker") != checker or meta.get("source") != listing.source:
        return CacheLookup(Checks.unknown(count), nothing,
                           f"the cache {path} was made by another checker or version "
                           f"({meta.get('checker')!r}, format {meta.get('format')}; now {checker!r}, "
                           f"format {CACHE_FORMAT})")
    reasons = json.loads(cached["reasons"].tobytes())
    old = Checks(cached["sizes"], {int(row): reason for row, reason in zip(cached["bad_rows"], reasons)})
    old_stats = np.stack([cached["file_sizes"], cached["mtimes"], cached["ctimes"]], axis=1)
    if (np.array_equal(cached["path_bytes"], listing.path_bytes)
            and np.array_equal(cached["path_offsets"], listing.path_offsets)
            and np.array_equal(old_stats, _stat_rows(listing))):
        return CacheLookup(old, np.arange(0), "")
    return _reuse_unchanged(old, cached["path_bytes"], cached["path_offsets"], old_stats, listing, path)


def _relative_paths(path_bytes: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    data = path_bytes.tobytes()
    return [data[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _reuse_unchanged(old: Checks, old_bytes, old_offsets, old_stats, listing, path: Path) -> CacheLookup:
    """Keep the checks of the files whose path and stat are the same as when they were checked."""
    old_rows = {name: row for row, name in enumerate(_relative_paths(old_bytes, old_offsets))}
    matched = np.array([old_rows.get(name, -1) for name in _relative_paths(listing.path_bytes, listing.path_offsets)],
                       dtype=np.int64).reshape(-1)
    present = matched >= 0
    unchanged = present.copy()
    unchanged[present] = (old_stats[matched[present]] == _stat_rows(listing)[present]).all(axis=1)
    checks = Checks.unknown(len(listing))
    checks.sizes[unchanged] = old.sizes[matched[unchanged]]
    new_row_of_old = np.full(len(old.sizes), -1, dtype=np.int64)
    new_row_of_old[matched[unchanged]] = np.flatnonzero(unchanged)
    checks.reasons = {int(new_row_of_old[row]): reason for row, reason in old.reasons.items()
                      if new_row_of_old[row] >= 0}
    added, changed = int((~present).sum()), int((present & ~unchanged).sum())
    removed = len(old_rows) - int(present.sum())
    why = ", ".join(f"{count} {what}" for count, what in
                    ((added, "added"), (removed, "removed"), (changed, "changed")) if count)
    return CacheLookup(checks, np.flatnonzero(~unchanged), f"files {why} since the cache {path}")


def store(path: Path, listing, checks: Checks, checker: str) -> None:
    """Write the checks of ``listing`` to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bad_rows = np.array(sorted(checks.reasons), dtype=np.int64)
    meta = {"format": CACHE_FORMAT, "checker": checker, "source": listing.source}
    arrays = dict(meta=_utf8(json.dumps(meta)), path_bytes=listing.path_bytes, path_offsets=listing.path_offsets,
                  file_sizes=listing.file_sizes, mtimes=listing.mtimes, ctimes=listing.ctimes, sizes=checks.sizes,
                  bad_rows=bad_rows, reasons=_utf8(json.dumps([checks.reasons[int(row)] for row in bad_rows])))
    # a unique temporary name: two jobs (or hosts sharing the folder) may write the same cache
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.partial-")
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared folder
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8)
