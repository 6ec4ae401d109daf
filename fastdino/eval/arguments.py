"""Command-line options shared by ``fastdino.eval.knn``, ``fastdino.eval.linear`` and
``fastdino.visualize``."""

from __future__ import annotations

from fastdino.models import list_backbones
from fastdino.models.checkpoints import CHECKPOINT_PARTS


def add_backbone_arguments(parser) -> None:
    """--checkpoint, --arch, --part: the frozen backbone; --device: where it runs."""
    parser.add_argument("--checkpoint", required=True,
                        help="a fastdino training checkpoint, an exported backbone, or a DINO "
                             "release checkpoint (full or *_pretrain.pth)")
    parser.add_argument("--arch", choices=list_backbones(), default=None,
                        help="backbone architecture; inferred from the weights' shapes if omitted")
    parser.add_argument("--part", choices=CHECKPOINT_PARTS, default="teacher",
                        help="which network of a full checkpoint to evaluate (default: teacher)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default auto: this rank's GPU if there is one)")


def add_data_arguments(parser) -> None:
    """Data and extraction options shared by the k-NN and linear evaluations."""
    parser.add_argument("--train-data", required=True, help="training images, one folder per class")
    parser.add_argument("--val-data", required=True, help="validation images, one folder per class")
    parser.add_argument("--image-size", type=int, default=224,
                        help="center-crop size; images are first resized to 256/224 of it (default 224)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per batch and process (default 128)")
    parser.add_argument("--num-workers", type=int, default=4, help="data-loading workers per process")
    parser.add_argument("--features-cache", default=None, metavar="DIR",
                        help="save extracted features here, and reuse them when the checkpoint, "
                             "data and preprocessing are unchanged")
