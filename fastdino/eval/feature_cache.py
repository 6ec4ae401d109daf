"""Extracted features on disk, reused only while what they depend on is unchanged."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from fastdino.runtime import atomic_save, get_logger, rank_and_world_size

# Bump when the meaning of cached features changes, so old caches are recomputed.
CACHE_FORMAT_VERSION = 1
logger = get_logger("eval")


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
            logger.info(f"cached features {path} could not be read ({type(error).__name__}: {error}); "
                        f"extracting again")
        else:
            if stored_fingerprint == fingerprint:
                logger.info(f"reusing cached features {path}")
                return stored["features"], stored["labels"]
            changed = sorted(key for key in fingerprint.keys() | stored_fingerprint.keys()
                             if fingerprint.get(key) != stored_fingerprint.get(key))
            logger.info(f"cached features {path} are stale ({', '.join(changed)} changed); extracting again")
    features, labels = extract()
    if rank_and_world_size()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"fingerprint": fingerprint, "features": features, "labels": labels}, path)
        logger.info(f"saved features to {path}")
    return features, labels
