"""fastdino.eval: the release's evaluations of frozen DINO features.

    python -m fastdino.eval.knn --checkpoint ckpt.pth --train-data train/ --val-data val/
    python -m fastdino.eval.linear --checkpoint ckpt.pth --train-data train/ --val-data val/

Modules: ``backbones`` (``load_backbone``: any supported checkpoint, architecture inferred from
its shapes), ``features`` (image folders, distributed extraction, the feature cache), ``knn``
(``knn_classifier``), ``linear`` (the linear probe). The CLIs run as ``python -m`` modules, so
this package does not import them; torchvision is imported only when data is read.
"""

from .backbones import ArchitectureInferenceError, LoadedBackbone, infer_architecture, load_backbone
from .features import cached_features, extract_features, features_fingerprint

__all__ = [
    "ArchitectureInferenceError",
    "LoadedBackbone",
    "cached_features",
    "extract_features",
    "features_fingerprint",
    "infer_architecture",
    "load_backbone",
]
