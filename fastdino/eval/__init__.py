"""fastdino.eval: the release's evaluations of frozen DINO features.

    python -m fastdino.eval.knn --checkpoint ckpt.pth --train-data train/ --val-data val/
    python -m fastdino.eval.linear --checkpoint ckpt.pth --train-data train/ --val-data val/

Modules: ``backbones`` (``load_backbone``: any supported checkpoint, architecture inferred from
its shapes), ``datasets`` (image folders and the release's transforms, with torchvision),
``extraction`` (features over every rank), ``feature_cache``, ``arguments`` (the shared
command-line options), ``knn`` (``knn_classifier``) and ``linear`` (the linear probe). The
process (ranks, device, log) is ``fastdino.runtime``. The CLIs run as ``python -m`` modules, so
this package does not import them; torchvision is imported only when data is read.
"""

from .backbones import ArchitectureInferenceError, LoadedBackbone, infer_architecture, load_backbone
from .extraction import extract_features
from .feature_cache import cached_features, features_fingerprint

__all__ = [
    "ArchitectureInferenceError",
    "LoadedBackbone",
    "cached_features",
    "extract_features",
    "features_fingerprint",
    "infer_architecture",
    "load_backbone",
]
