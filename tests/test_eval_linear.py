"""Linear probe: it learns separable features, its feature layouts are the release's, and the
CLI writes its JSON result in both modes."""

import itertools
import json

import pytest
import torch

from fastdino.eval.linear import (
    LinearClassifier,
    probe_feature_dim,
    probe_features,
    release_feature_layout,
    shuffled_feature_batches,
    train_linear_probe,
)
from fastdino.eval.linear import main as linear_main
from fastdino.models import VisionTransformer, create_backbone, vit_small
from image_folder_fixtures import save_training_checkpoint, write_image_folder


def gaussian_clusters(generator, num_classes, per_class, dim):
    """Well separated class clusters: one random center per class, small noise."""
    centers = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centers[labels] + torch.randn(labels.shape[0], dim, generator=generator)
    return features, labels


def test_the_probe_learns_separable_features(generator):
    num_classes, dim = 7, 33
    train_features, train_labels = gaussian_clusters(generator, num_classes, 41, dim)
    centers_generator = torch.Generator().manual_seed(generator.initial_seed())
    # The same centers (same seed), fresh noise: a held-out set from the same distribution.
    val_features, val_labels = gaussian_clusters(centers_generator, num_classes, 13, dim)
    torch.manual_seed(generator.initial_seed())
    classifier = LinearClassifier(dim, num_classes)
    shuffle = torch.Generator().manual_seed(0)
    history = train_linear_probe(
        classifier, lambda epoch: shuffled_feature_batches(train_features, train_labels, 32, shuffle),
        lambda: shuffled_feature_batches(val_features, val_labels, 32), epochs=10, lr=0.1, val_freq=5)
    assert [record["epoch"] for record in history] == list(range(1, 11))
    assert [("top1" in record) for record in history] == [False] * 4 + [True] + [False] * 4 + [True]
    assert history[-1]["top1"] > 90.0, history[-1]  # chance: 100 / 7
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # The cosine schedule: full lr in epoch 1, decaying towards 0.
    lrs = [record["lr"] for record in history]
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(lrs))


def test_last_four_blocks_give_four_times_the_embedding_for_vit_small():
    backbone = vit_small(patch_size=16, img_size=32).eval()
    assert release_feature_layout(backbone) == (4, False)
    images = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        features = probe_features(backbone, 4, False)(images)
        final_cls = backbone(images)
    assert features.shape == (3, 4 * 384) == (3, probe_feature_dim(backbone, 4, False))
    # The last of the four is the backbone's own (final-normed) CLS feature.
    torch.testing.assert_close(features[:, -384:], final_cls, rtol=1e-5, atol=1e-5)


def test_vit_base_layout_interleaves_cls_and_pooled_patch_tokens_as_the_release():
    backbone = VisionTransformer(img_size=32, patch_size=16, embed_dim=768, depth=2, num_heads=12).eval()
    assert release_feature_layout(backbone) == (1, True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = probe_features(backbone, 1, True)(images)
        tokens = backbone.get_intermediate_layers(images, 1)[-1]
    assert features.shape == (2, 2 * 768) == (2, probe_feature_dim(backbone, 1, True))
    torch.testing.assert_close(features[:, 0::2], tokens[:, 0])
    torch.testing.assert_close(features[:, 1::2], tokens[:, 1:].mean(dim=1))


def test_release_layouts_by_architecture():
    with torch.device("meta"):
        layouts = {name: release_feature_layout(create_backbone(name))
                   for name in ("vit_tiny_p16", "vit_small_p8", "vit_base_p16")}
    assert layouts == {"vit_tiny_p16": (4, False), "vit_small_p8": (4, False), "vit_base_p16": (1, True)}


def test_impossible_layouts_are_refused():
    backbone = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(ValueError, match="--n-last-blocks 3"):
        probe_features(backbone, 3, False)
    with pytest.raises(ValueError, match="--avgpool-patchtokens"):
        probe_features(backbone, 2, True)


@pytest.fixture
def tiny_setup(tmp_path):
    train = write_image_folder(tmp_path / "train", num_classes=3, per_class=4, seed=1)
    val = write_image_folder(tmp_path / "val", num_classes=3, per_class=2, seed=2)
    save_training_checkpoint(tmp_path / "checkpoint.pth")
    return ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--train-data", str(train),
            "--val-data", str(val), "--image-size", "32", "--num-workers", "0", "--batch-size", "5"]


@pytest.mark.parametrize("mode", ["precomputed", "augmented"])
def test_cli_writes_the_json_result_and_the_weights(mode, tiny_setup, tmp_path):
    output = tmp_path / "probe" / "result.json"
    argv = tiny_setup + ["--epochs", "2", "--lr", "0.5", "--output", str(output)]
    if mode == "precomputed":
        argv += ["--precomputed-features", "--features-cache", str(tmp_path / "cache")]
    returned = linear_main(argv)
    result = json.loads(output.read_text())
    assert result == returned
    assert result["mode"] == mode and result["arch"] == "vit_tiny_p16"
    assert (result["n_last_blocks"], result["avgpool_patchtokens"], result["feature_dim"]) == (4, False, 4 * 192)
    assert result["num_train"] == 12 and result["num_val"] == 6 and result["num_classes"] == 3
    assert result["scaled_lr"] == pytest.approx(0.5 * 5 / 256)
    assert len(result["history"]) == 2 and 0.0 <= result["top1"] <= 100.0
    weights = torch.load(output.with_suffix(".pth"))
    assert weights["state_dict"]["linear.weight"].shape == (3, 4 * 192)
    if mode == "precomputed":
        assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
            "train-last4cls.pt", "val-last4cls.pt"]
