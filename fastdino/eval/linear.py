"""Linear probe on frozen features, as the release's ``eval_linear.py``.

    python -m fastdino.eval.linear --checkpoint ckpt.pth --train-data imagenet/train \\
        --val-data imagenet/val [--epochs 100] [--lr 0.001] [--batch-size 128] [--output probe.json]
    torchrun --nproc_per_node=8 -m fastdino.eval.linear ...

Features: the CLS tokens of the last ``--n-last-blocks`` blocks, concatenated, plus (with
``--avgpool-patchtokens``) the average of the last block's patch tokens. The release's choices,
the defaults here: the last 4 CLS tokens for ViT-S and smaller, the last CLS token with pooled
patch tokens for ViT-B. A ResNet's feature is its pooled output.

Recipe: a linear layer (weights N(0, 0.01), zero bias), SGD with momentum 0.9 and no weight
decay, learning rate ``--lr`` x global batch / 256 annealed by a cosine to 0 over the epochs.

Modes (the JSON result names the one that ran):
- "augmented" (default, the release's): every step crops and flips training images
  (RandomResizedCrop + horizontal flip) and runs them through the frozen backbone.
- "precomputed" (``--precomputed-features``): the training images are preprocessed like the
  validation ones (resize 256, center crop 224, no augmentation) and their features extracted
  once (and cached with ``--features-cache``); the layer then trains on those, so an epoch costs
  almost nothing. Faster, but without augmentation the probe may fit the training set more.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from fastdino.runtime import Runtime, get_logger, runtime_scope, track

from .arguments import add_backbone_arguments, add_data_arguments
from .backbones import load_backbone
from .datasets import augmentation_transform, check_same_classes, evaluation_transform, image_folder
from .extraction import FeatureFunction, extract_features
from .feature_cache import cached_features, features_fingerprint

logger = get_logger("eval")
# Batches of (features on the device, labels), and how many there are.
FeatureBatches = tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]


def release_feature_layout(backbone: nn.Module) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) the release used: (4, False) for ViT-S and smaller,
    (1, True) for ViT-B and larger. A ResNet ignores them (its feature is its pooled output)."""
    if getattr(backbone, "embed_dim", 0) >= 768:
        return 1, True
    return 4, False


def probe_features(backbone: nn.Module, n_last_blocks: int,
                   avgpool_patchtokens: bool) -> FeatureFunction:
    """images -> the linear probe's input features, in the release's layout."""
    if not hasattr(backbone, "get_intermediate_layers"):  # a ResNet: its pooled output
        return backbone
    if not 1 <= n_last_blocks <= len(backbone.blocks):
        raise ValueError(f"--n-last-blocks {n_last_blocks}: the backbone has "
                         f"{len(backbone.blocks)} blocks")
    if avgpool_patchtokens and n_last_blocks != 1:
        raise ValueError(f"--avgpool-patchtokens goes with --n-last-blocks 1 (the release's "
                         f"layout), got --n-last-blocks {n_last_blocks}")

    def features(images: torch.Tensor) -> torch.Tensor:
        blocks = backbone.get_intermediate_layers(images, n_last_blocks)
        cls_tokens = torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)
        if not avgpool_patchtokens:
            return cls_tokens
        pooled = blocks[-1][:, getattr(backbone, "num_prefix_tokens", 1):].mean(dim=1)  # patches, not registers
        # The release interleaves them (cls_0, pooled_0, cls_1, pooled_1, ...), so its trained
        # linear weights apply unchanged.
        return torch.stack((cls_tokens, pooled), dim=-1).flatten(1)

    return features


def probe_feature_name(backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> str:
    """A short name of the feature layout, for cache files: "last4cls", "last1cls-avgpool", "pooled"."""
    if not hasattr(backbone, "get_intermediate_layers"):
        return "pooled"
    return f"last{n_last_blocks}cls" + ("-avgpool" if avgpool_patchtokens else "")


def probe_feature_dim(backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> int:
    if not hasattr(backbone, "get_intermediate_layers"):
        return backbone.num_features
    return backbone.embed_dim * (n_last_blocks + int(avgpool_patchtokens))


class LinearClassifier(nn.Module):
    """The release's ``LinearClassifier``: one linear layer, weights N(0, 0.01), zero bias."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


# -- batches -------------------------------------------------------------------------------------

def shuffled_feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                             generator: torch.Generator | None = None) -> FeatureBatches:
    """Precomputed features in mini-batches; a fresh random order when a generator is given."""
    count = features.shape[0]
    order = torch.arange(count) if generator is None else torch.randperm(count, generator=generator)
    order = order.to(features.device)
    batches = ((features[order[start:start + batch_size]], labels[order[start:start + batch_size]])
               for start in range(0, count, batch_size))
    return batches, -(-count // batch_size)


def image_feature_batches(loader: DataLoader, feature_function: FeatureFunction,
                          device: torch.device) -> FeatureBatches:
    """Images from ``loader`` through the frozen backbone, one batch at a time."""
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in loader:
            with torch.no_grad():
                features = feature_function(images.to(device, non_blocking=True))
            yield features, labels.to(device, non_blocking=True)
    return batches(), len(loader)


# -- training ------------------------------------------------------------------------------------

def _sum_over_ranks(values: list[float], across_ranks: bool, device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if across_ranks:
        dist.all_reduce(totals)
    return totals.tolist()


@torch.no_grad()
def evaluate_linear(classifier: nn.Module, val_batches: FeatureBatches,
                    across_ranks: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean loss over the validation batches (summed over
    all ranks' shards when ``across_ranks``)."""
    classifier.eval()
    correct_top1 = correct_top5 = loss_sum = count = 0
    device = next(classifier.parameters()).device
    batches, total = val_batches
    for features, labels in track(batches, total, "validation", logger):
        logits = classifier(features)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = predictions == labels.view(-1, 1)
        correct_top1 += hits[:, 0].sum().item()
        correct_top5 += hits.any(dim=1).sum().item()
        count += labels.shape[0]
    correct_top1, correct_top5, loss_sum, count = _sum_over_ranks(
        [correct_top1, correct_top5, loss_sum, count], across_ranks, device)
    return {"top1": 100.0 * correct_top1 / count, "top5": 100.0 * correct_top5 / count,
            "val_loss": loss_sum / count}


def train_linear_probe(classifier: nn.Module, train_batches: Callable[[int], FeatureBatches],
                       val_batches: Callable[[], FeatureBatches], epochs: int, lr: float,
                       val_freq: int = 1, across_ranks: bool = False) -> list[dict]:
    """The release's recipe: SGD (momentum 0.9, no weight decay) at ``lr`` (already scaled by the
    batch), cosine-annealed to 0 over ``epochs``; validation every ``val_freq`` epochs and after
    the last. ``train_batches(epoch)`` gives that epoch's batches. Returns one record per epoch.
    """
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    device = next(classifier.parameters()).device
    history = []
    for epoch in range(1, epochs + 1):
        classifier.train()
        batches, total = train_batches(epoch)
        loss_sum = count = 0.0
        for features, labels in track(batches, total, f"epoch {epoch}/{epochs}", logger):
            loss = F.cross_entropy(classifier(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.shape[0]
            count += labels.shape[0]
        loss_sum, count = _sum_over_ranks([loss_sum, count], across_ranks, device)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / count}
        scheduler.step()
        if epoch % val_freq == 0 or epoch == epochs:
            record.update(evaluate_linear(classifier, val_batches(), across_ranks))
        history.append(record)
        logger.info(f"epoch {epoch}/{epochs}: " + ", ".join(
            f"{key} {value:.4g}" for key, value in record.items() if key != "epoch"))
    return history


# -- the command ---------------------------------------------------------------------------------

def run_linear(args: argparse.Namespace, runtime: Runtime) -> dict:
    """Train and evaluate the probe; rank 0 writes the JSON result and the classifier's weights
    and returns the result (other ranks return {})."""
    device, rank, world_size = runtime.device, runtime.rank, runtime.world_size
    backbone, arch = load_backbone(args.checkpoint, args.arch, args.part)
    backbone.to(device)
    n_last_blocks, avgpool = release_feature_layout(backbone)
    n_last_blocks = args.n_last_blocks if args.n_last_blocks is not None else n_last_blocks
    avgpool = args.avgpool_patchtokens if args.avgpool_patchtokens is not None else avgpool
    feature_function = probe_features(backbone, n_last_blocks, avgpool)
    feature_dim = probe_feature_dim(backbone, n_last_blocks, avgpool)
    feature_name = probe_feature_name(backbone, n_last_blocks, avgpool)
    mode = "precomputed" if args.precomputed_features else "augmented"
    global_batch = args.batch_size * world_size
    scaled_lr = args.lr * global_batch / 256
    logger.info(f"linear probe ({mode} mode) of the {args.part} of {args.checkpoint} ({arch}) on {device}: "
                f"{feature_dim}-dim features ({feature_name}), global batch {global_batch}, "
                f"lr {args.lr} x {global_batch}/256 = {scaled_lr:.4g}, {args.epochs} epochs")

    val_dataset = image_folder(args.val_data, evaluation_transform(args.image_size), "--val-data")
    train_transform = (evaluation_transform(args.image_size) if args.precomputed_features
                       else augmentation_transform(args.image_size))
    train_dataset = image_folder(args.train_data, train_transform, "--train-data")
    check_same_classes(train_dataset, val_dataset)
    num_classes = len(train_dataset.classes)
    torch.manual_seed(args.seed)
    classifier = LinearClassifier(feature_dim, num_classes).to(device)

    if args.precomputed_features:
        splits = {}
        for split, dataset in (("train", train_dataset), ("val", val_dataset)):
            fingerprint = features_fingerprint(args.checkpoint, arch, args.part, dataset, feature_name)
            extract = functools.partial(extract_features, feature_function, dataset, args.batch_size,
                                        device, args.num_workers, f"{split} features")
            features, labels = cached_features(args.features_cache, f"{split}-{feature_name}",
                                               fingerprint, extract)
            splits[split] = (features.to(device), labels.to(device))
        if rank != 0:  # the layer is cheap to train on features: rank 0 does it alone
            return {}
        shuffle = torch.Generator().manual_seed(args.seed)
        history = train_linear_probe(
            classifier, lambda epoch: shuffled_feature_batches(*splits["train"], global_batch, shuffle),
            lambda: shuffled_feature_batches(*splits["val"], global_batch), args.epochs, scaled_lr,
            args.val_freq)
    else:
        distributed = world_size > 1
        sampler = (DistributedSampler(train_dataset, shuffle=True, seed=args.seed) if distributed
                   else torch.utils.data.RandomSampler(
                       train_dataset, generator=torch.Generator().manual_seed(args.seed)))
        train_loader = DataLoader(train_dataset, batch_size=args.batch_size, sampler=sampler,
                                  num_workers=args.num_workers, pin_memory=device.type == "cuda")
        # Each rank validates its own images (no padding), and the counts are summed.
        val_loader = DataLoader(Subset(val_dataset, range(rank, len(val_dataset), world_size)),
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
        trained = (nn.parallel.DistributedDataParallel(classifier, device_ids=[device.index]
                                                       if device.type == "cuda" else None)
                   if distributed else classifier)

        def train_batches(epoch: int) -> FeatureBatches:
            if distributed:
                sampler.set_epoch(epoch)
            return image_feature_batches(train_loader, feature_function, device)

        history = train_linear_probe(
            trained, train_batches, lambda: image_feature_batches(val_loader, feature_function, device),
            args.epochs, scaled_lr, args.val_freq, across_ranks=distributed)
        if rank != 0:
            return {}

    evaluated = [record for record in history if "top1" in record]
    result = {
        "mode": mode, "checkpoint": str(args.checkpoint), "arch": arch, "part": args.part,
        "train_data": str(args.train_data), "val_data": str(args.val_data),
        "num_train": len(train_dataset), "num_val": len(val_dataset), "num_classes": num_classes,
        "n_last_blocks": n_last_blocks, "avgpool_patchtokens": avgpool, "feature_dim": feature_dim,
        "epochs": args.epochs, "batch_size": global_batch, "lr": args.lr, "scaled_lr": scaled_lr,
        "image_size": args.image_size, "seed": args.seed, "world_size": world_size,
        "top1": evaluated[-1]["top1"], "top5": evaluated[-1]["top5"],
        "best_top1": max(record["top1"] for record in evaluated), "history": history,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    weights = output.with_suffix(".pth")
    torch.save({"state_dict": classifier.state_dict(), "arch": arch, "n_last_blocks": n_last_blocks,
                "avgpool_patchtokens": avgpool, "num_classes": num_classes}, weights)
    logger.info(f"linear probe ({mode}): top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f} "
                f"(best top-1 {result['best_top1']:.2f}); wrote {output} and {weights}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdino.eval.linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    parser.add_argument("--lr", type=float, default=0.001,
                        help="learning rate at a global batch of 256, scaled linearly (default 0.001)")
    parser.add_argument("--n-last-blocks", type=int, default=None,
                        help="concatenate the CLS tokens of this many last blocks "
                             "(default: 4 for ViT-S and smaller, 1 for ViT-B)")
    parser.add_argument("--avgpool-patchtokens", action=argparse.BooleanOptionalAction, default=None,
                        help="append the last block's average patch token "
                             "(default: on for ViT-B, off for ViT-S and smaller)")
    parser.add_argument("--precomputed-features", action="store_true",
                        help="train on features extracted once, without augmentation (fast)")
    parser.add_argument("--val-freq", type=int, default=1, help="validate every N epochs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layer's init and the shuffling")
    parser.add_argument("--output", default="linear_eval.json", metavar="JSON",
                        help="result file (default linear_eval.json); the weights go beside it (.pth)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--val-freq", args.val_freq), ("--n-last-blocks", args.n_last_blocks)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} {value}: must be at least 1")
    if args.lr <= 0:
        raise SystemExit(f"--lr {args.lr}: must be positive")
    with runtime_scope(args.device) as runtime:
        return run_linear(args, runtime)


if __name__ == "__main__":
    main()
