"""Weighted k-NN classification on frozen features, as the release's ``eval_knn.py``.

    python -m fastdino.eval.knn --checkpoint ckpt.pth --train-data imagenet/train \\
        --val-data imagenet/val [--arch vit_small_p16] [--features-cache feats/]
    torchrun --nproc_per_node=8 -m fastdino.eval.knn ...   # extraction sharded over 8 GPUs

Features are the teacher backbone's CLS tokens, L2-normalized. Each validation image takes the
k training features most cosine-similar to its own; each neighbor votes for its class with
weight exp(similarity / T); the classes ranked by their summed votes give top-1 and top-5.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdino.runtime import Runtime, get_logger, runtime_scope

from .arguments import add_backbone_arguments, add_data_arguments
from .backbones import load_backbone
from .datasets import check_same_classes, evaluation_transform, image_folder
from .extraction import FeatureFunction, extract_features
from .feature_cache import cached_features, features_fingerprint

DEFAULT_K = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
logger = get_logger("eval")


@torch.no_grad()
def knn_votes(train_features: torch.Tensor, train_labels: torch.Tensor,
              test_features: torch.Tensor, k: int, temperature: float,
              num_classes: int) -> torch.Tensor:
    """Each class's summed vote for each test sample: (M, num_classes).

    The k training features most similar to a test feature (dot products: cosine similarities
    for L2-normalized features) each give their class exp(similarity / temperature), summed as
    the release does (over a (M * k, num_classes) one-hot matrix, in its rounding) for its sort
    to rank the classes, ties included, as it does there.
    """
    similarity, neighbors = (test_features @ train_features.T).topk(k, dim=1)
    one_hot = torch.zeros(neighbors.numel(), num_classes, dtype=similarity.dtype, device=similarity.device)
    one_hot.scatter_(1, train_labels[neighbors].view(-1, 1), 1)
    weights = similarity.div(temperature).exp()
    return (one_hot.view(*neighbors.shape, num_classes) * weights.unsqueeze(-1)).sum(1)


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor,
                   test_features: torch.Tensor, test_labels: torch.Tensor, k: int,
                   temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                   test_chunk_size: int = 256) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of the release's weighted k-NN classifier.

    Features are expected L2-normalized. train_features (N, D), train_labels (N,),
    test_features (M, D), test_labels (M,). num_classes defaults to the largest label + 1.
    Top-5 counts the min(5, k) best-voted classes, as the release does; classes with equal votes
    (those without any) are ranked by the release's sort. Test samples go ``test_chunk_size`` at
    a time, bounding the (chunk, N) similarity matrix and the (chunk * k, num_classes) one-hot.
    """
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of training samples "
                         f"({train_features.shape[0]})")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    top_classes = min(5, k, num_classes)
    correct_top1 = correct_top5 = 0
    for start in range(0, test_features.shape[0], test_chunk_size):
        votes = knn_votes(train_features, train_labels, test_features[start:start + test_chunk_size],
                          k, temperature, num_classes)
        # The release's (unstable) sort, for its order of tied classes, which topk does not keep.
        ranking = votes.sort(dim=1, descending=True).indices[:, :top_classes]
        hits = ranking == test_labels[start:start + test_chunk_size, None]
        correct_top1 += hits[:, 0].sum().item()
        correct_top5 += hits.any(dim=1).sum().item()
    total = test_features.shape[0]
    return 100.0 * correct_top1 / total, 100.0 * correct_top5 / total


def cls_features(backbone: torch.nn.Module) -> FeatureFunction:
    """The backbone's feature (a ViT's final-normed CLS token), L2-normalized."""
    return lambda images: F.normalize(backbone(images), dim=1)


def run_knn(args: argparse.Namespace, runtime: Runtime) -> dict:
    """Extract (or reuse) the features, classify the validation set for every k; rank 0 returns
    the results (and writes them to ``--output``), other ranks {}."""
    device = runtime.device
    backbone, arch = load_backbone(args.checkpoint, args.arch, args.part)
    backbone.to(device)
    logger.info(f"k-NN evaluation of the {args.part} of {args.checkpoint} ({arch}) on {device}, "
                f"{runtime.world_size} process(es)")
    transform = evaluation_transform(args.image_size)
    datasets = {"train": image_folder(args.train_data, transform, "--train-data"),
                "val": image_folder(args.val_data, transform, "--val-data")}
    check_same_classes(datasets["train"], datasets["val"])
    features = {}
    for split, dataset in datasets.items():
        logger.info(f"{split}: {len(dataset)} images, {len(dataset.classes)} classes")
        fingerprint = features_fingerprint(args.checkpoint, arch, args.part, dataset, "cls")
        extract = functools.partial(extract_features, cls_features(backbone), dataset,
                                    args.batch_size, device, args.num_workers, f"{split} features")
        features[split] = cached_features(args.features_cache, f"{split}-cls", fingerprint, extract)
    if not runtime.is_main:  # every rank has all features; rank 0 classifies
        return {}
    (train_features, train_labels), (val_features, val_labels) = features["train"], features["val"]
    num_classes = len(datasets["train"].classes)
    results = {"checkpoint": str(args.checkpoint), "arch": arch, "part": args.part,
               "temperature": args.temperature, "num_train": len(train_labels),
               "num_val": len(val_labels), "accuracy": {}}
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    val_features, val_labels = val_features.to(device), val_labels.to(device)
    for k in args.nb_knn:
        if k > len(train_labels):
            logger.info(f"skipping k={k}: more than the {len(train_labels)} training images")
            continue
        top1, top5 = knn_classifier(train_features, train_labels, val_features, val_labels, k,
                                    args.temperature, num_classes)
        results["accuracy"][str(k)] = {"top1": top1, "top5": top5}
        logger.info(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        logger.info(f"wrote {args.output}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdino.eval.knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_K), metavar="K",
                        help=f"numbers of neighbors (default {' '.join(map(str, DEFAULT_K))})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"vote weight exp(similarity / T) (default {DEFAULT_TEMPERATURE})")
    parser.add_argument("--output", default=None, metavar="JSON", help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if any(k < 1 for k in args.nb_knn):
        raise SystemExit(f"--nb-knn {args.nb_knn}: every k must be at least 1")
    with runtime_scope(args.device) as runtime:
        return run_knn(args, runtime)


if __name__ == "__main__":
    main()
