"""k-NN evaluation: the classifier against a brute-force reference, feature extraction order
(one process and 2-process gloo), the feature cache, loading backbones from every checkpoint
format with the architecture inferred, and the errors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import Dataset

from conftest import free_port
from fastdino.eval import ArchitectureInferenceError, infer_architecture, load_backbone
from fastdino.eval.backbones import vit_image_size
from fastdino.eval.datasets import evaluation_transform, image_folder
from fastdino.eval.extraction import extract_features, shard_indices
from fastdino.eval.feature_cache import cached_features, features_fingerprint
from fastdino.eval.knn import knn_classifier, knn_votes
from fastdino.eval.knn import main as knn_main
from fastdino.models import (
    StateDictMismatchError,
    VisionTransformer,
    create_backbone,
    export_backbone_state_dict,
)
from image_folder_fixtures import save_training_checkpoint, write_image_folder

# -- the classifier against plain loops ----------------------------------------------------------


def reference_votes(train_features, train_labels, test_features, k, temperature):
    """Per test sample, {class: summed vote}, by loops: every similarity, the k largest, their
    exp(similarity / T) added to their class."""
    train_rows, labels = train_features.tolist(), train_labels.tolist()
    votes = []
    for test in test_features.tolist():
        similarities = [sum(a * b for a, b in zip(test, train)) for train in train_rows]
        nearest = sorted(range(len(similarities)), key=lambda index: -similarities[index])[:k]
        sample_votes = {}
        for index in nearest:
            sample_votes[labels[index]] = (sample_votes.get(labels[index], 0.0)
                                           + math.exp(similarities[index] / temperature))
        votes.append(sample_votes)
    return votes


def reference_accuracies(votes, test_labels, k, num_classes):
    """top-1 (percent), and the lowest and highest top-5 (percent) that tie-breaking among
    classes with no vote can give (the release counts the min(5, k) best-voted classes)."""
    slots = min(5, k, num_classes)
    top1 = top5_sure = top5_possible = 0
    for sample_votes, label in zip(votes, test_labels.tolist()):
        top1 += max(sample_votes, key=sample_votes.get) == label
        target = sample_votes.get(label, 0.0)
        stronger = sum(vote > target for vote in sample_votes.values())
        if target > 0:
            top5_sure += stronger < slots
            top5_possible += stronger < slots
        else:  # tied with every other class without a vote
            free_slots = slots - len(sample_votes)
            top5_possible += free_slots > 0
            top5_sure += free_slots >= num_classes - len(sample_votes)
    count = len(votes)
    return 100.0 * top1 / count, 100.0 * top5_sure / count, 100.0 * top5_possible / count


def random_features(generator, count, dim, num_classes):
    features = F.normalize(torch.randn(count, dim, generator=generator, dtype=torch.float64), dim=1)
    return features, torch.randint(num_classes, (count,), generator=generator)


@pytest.mark.parametrize("k", [1, 4, 7, 20, 157])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_votes_and_accuracies_match_a_brute_force_reference(k, temperature, generator):
    num_classes = 11
    train_features, train_labels = random_features(generator, 157, 37, num_classes)
    test_features, test_labels = random_features(generator, 61, 37, num_classes)

    votes = knn_votes(train_features, train_labels, test_features, k, temperature, num_classes)
    expected = reference_votes(train_features, train_labels, test_features, k, temperature)
    for sample, sample_votes in enumerate(expected):
        dense = torch.zeros(num_classes, dtype=torch.float64)
        for label, vote in sample_votes.items():
            dense[label] = vote
        torch.testing.assert_close(votes[sample], dense, rtol=1e-12, atol=0)

    top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, k,
                                temperature, num_classes, test_chunk_size=16)
    expected_top1, top5_low, top5_high = reference_accuracies(expected, test_labels, k, num_classes)
    assert top1 == pytest.approx(expected_top1)
    assert top5_low - 1e-9 <= top5 <= top5_high + 1e-9


def test_accuracies_on_a_hand_computed_example():
    # Unit vectors in 2-D; the similarities are the dot products written beside each test point.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.8, 0.6]])
    train_labels = torch.tensor([0, 1, 2, 3, 1])
    test = torch.tensor([[0.96, 0.28],   # .96 (c0), .936 (c1), .28 (c1): class 0 by weight
                         [0.6, 0.8],     # .96 (c1), .8 (c1), .6 (c0): class 1
                         [0.28, 0.96],   # .96 (c1), .8 (c1), .28 (c0): class 1, labelled 0
                         [0.6, -0.8]])   # .8 (c3), .6 (c0), 0 (c1): class 3
    test_labels = torch.tensor([0, 1, 0, 3])
    # k=1: the third is wrong in top-1 and in "top-5" (min(5, k) = 1 class).
    assert knn_classifier(train, train_labels, test, test_labels, k=1) == pytest.approx((75.0, 75.0))
    # k=3: still wrong in top-1, but class 0 is its second-best-voted of 3 counted classes.
    assert knn_classifier(train, train_labels, test, test_labels, k=3) == pytest.approx((75.0, 100.0))
    # The votes are weighted: with k=3 the first point's class-1 neighbors outnumber its
    # class-0 one, yet exp(.96/.07) > exp(.936/.07) + exp(.28/.07).
    votes = knn_votes(train, train_labels, test[:1], 3, 0.07, 4)[0]
    assert votes.argmax() == 0 and votes[1] > 0


def release_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """knn_classifier of the release's eval_knn.py, line for line, also returning its ranking of
    the classes for every test sample."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    rankings = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
        rankings.append(predictions)
    return top1 * 100.0 / total, top5 * 100.0 / total, torch.cat(rankings)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_classes_without_votes_tie_in_the_release_order(generator, num_classes):
    # Training samples of 3 classes: every other class ties at 0 votes, and which of them fill
    # the top 5 is the order of the release's sort (on the CPU, class index for 10 classes but
    # not for 1000). Labels: the release's 5th-ranked class (a hit) or its 6th (a miss).
    train_features = random_features(generator, 300, 16, 3)[0].float()
    train_labels = torch.randint(3, (300,), generator=generator)
    test_features = random_features(generator, 200, 16, 3)[0].float()
    *_, ranking = release_knn_classifier(train_features, train_labels, test_features,
                                         torch.zeros(200, dtype=torch.long), 20, 0.07, num_classes)
    test_labels = torch.where(torch.arange(200) % 2 == 0, ranking[:, 4], ranking[:, 5])
    expected = release_knn_classifier(train_features, train_labels, test_features, test_labels, 20, 0.07,
                                      num_classes)[:2]
    assert expected == (0.0, 50.0)
    assert knn_classifier(train_features, train_labels, test_features, test_labels, 20, 0.07,
                          num_classes) == expected


def test_k_larger_than_the_training_set_is_refused():
    features = F.normalize(torch.randn(5, 3), dim=1)
    with pytest.raises(ValueError, match="k=6"):
        knn_classifier(features, torch.arange(5), features, torch.arange(5), k=6)


# -- extraction order ----------------------------------------------------------------------------


class IndexImages(Dataset):
    """Sample i is an 'image' filled with i, labelled i % 3."""

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return torch.full((3, 2, 2), float(index)), index % 3


def first_pixel(images):
    return images.flatten(1)[:, :2]


@pytest.mark.parametrize("count,batch_size", [(1, 4), (11, 4), (12, 5)])
def test_features_come_back_in_dataset_order(count, batch_size):
    features, labels = extract_features(first_pixel, IndexImages(count), batch_size, torch.device("cpu"))
    assert torch.equal(features[:, 0], torch.arange(count, dtype=torch.float32))
    assert torch.equal(labels, torch.arange(count) % 3)
    assert features.dtype == torch.float32 and labels.dtype == torch.int64


@pytest.mark.parametrize("count,world_size", [(1, 2), (7, 2), (10, 3), (12, 4)])
def test_shards_cover_every_sample_once_with_equal_lengths(count, world_size):
    shards = [shard_indices(count, rank, world_size) for rank in range(world_size)]
    assert len({len(indices) for indices, _ in shards}) == 1
    real = sorted(position for _, positions in shards for position in positions if position >= 0)
    assert real == list(range(count))
    for indices, positions in shards:
        assert all(index == position for index, position in zip(indices, positions) if position >= 0)


DISTRIBUTED_COUNTS = (1, 7)  # fewer samples than ranks; shards of unequal length


def extract_in_rank(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        for count in DISTRIBUTED_COUNTS:
            features, labels = extract_features(first_pixel, IndexImages(count), 2, torch.device("cpu"))
            torch.save({"features": features, "labels": labels}, f"{out_dir}/{count}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_distributed_extraction_gathers_all_shards_in_dataset_order(tmp_path):
    world_size = 2
    mp.spawn(extract_in_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    for count in DISTRIBUTED_COUNTS:
        for rank in range(world_size):
            result = torch.load(tmp_path / f"{count}-rank{rank}.pt")
            assert torch.equal(result["features"][:, 0], torch.arange(count, dtype=torch.float32)), rank
            assert torch.equal(result["labels"], torch.arange(count) % 3), rank


# -- the feature cache ---------------------------------------------------------------------------


class CountingExtraction:
    def __init__(self, features):
        self.features, self.calls = features, 0

    def __call__(self):
        self.calls += 1
        return self.features, torch.arange(self.features.shape[0])


def test_cache_is_reused_when_the_fingerprint_matches_and_refreshed_when_not(tmp_path):
    fingerprint = {"checkpoint": "a.pth", "checkpoint_mtime_ns": 1, "features": "cls"}
    first = CountingExtraction(torch.randn(5, 3))
    features, labels = cached_features(tmp_path, "train-cls", fingerprint, first)
    assert first.calls == 1 and (tmp_path / "train-cls.pt").is_file()

    again = CountingExtraction(torch.randn(5, 3))
    reused, reused_labels = cached_features(tmp_path, "train-cls", dict(fingerprint), again)
    assert again.calls == 0
    assert torch.equal(reused, features) and torch.equal(reused_labels, labels)

    changed = CountingExtraction(torch.randn(5, 3))
    refreshed, _ = cached_features(tmp_path, "train-cls", {**fingerprint, "checkpoint_mtime_ns": 2},
                                   changed)
    assert changed.calls == 1 and torch.equal(refreshed, changed.features)
    # ... and the refreshed features replaced the stale ones on disk.
    later = CountingExtraction(torch.randn(5, 3))
    assert torch.equal(cached_features(tmp_path, "train-cls", {**fingerprint, "checkpoint_mtime_ns": 2},
                                       later)[0], changed.features)
    assert later.calls == 0


def test_an_unreadable_cache_file_is_extracted_again(tmp_path):
    (tmp_path / "val-cls.pt").write_bytes(b"not a torch file")
    extraction = CountingExtraction(torch.randn(4, 2))
    features, _ = cached_features(tmp_path, "val-cls", {"features": "cls"}, extraction)
    assert extraction.calls == 1 and torch.equal(features, extraction.features)


def test_fingerprint_changes_with_the_checkpoint_the_images_and_the_preprocessing(tmp_path):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"weights v1")
    root = write_image_folder(tmp_path / "images", num_classes=2, per_class=2)

    def fingerprint(image_size=32, part="teacher"):
        dataset = image_folder(root, evaluation_transform(image_size), "--train-data")
        return features_fingerprint(checkpoint, "vit_tiny_p16", part, dataset, "cls")

    original = fingerprint()
    assert fingerprint() == original
    assert fingerprint(image_size=64) != original
    assert fingerprint(part="student") != original
    write_image_folder(tmp_path / "images", num_classes=3, per_class=2)  # adds class2
    with_new_images = fingerprint()
    assert with_new_images != original
    checkpoint.write_bytes(b"weights version 2")
    assert fingerprint() != with_new_images


def test_knn_cli_reuses_its_cache_and_gives_the_same_numbers(tmp_path, capsys):
    train = write_image_folder(tmp_path / "train", num_classes=3, per_class=5, seed=1)
    val = write_image_folder(tmp_path / "val", num_classes=3, per_class=2, seed=2)
    save_training_checkpoint(tmp_path / "checkpoint.pth")
    argv = ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--train-data", str(train),
            "--val-data", str(val), "--image-size", "32", "--num-workers", "0", "--batch-size", "4",
            "--nb-knn", "1", "3", "200", "--features-cache", str(tmp_path / "cache"),
            "--output", str(tmp_path / "knn.json")]
    first = knn_main(argv)
    output = capsys.readouterr().err
    assert "reusing" not in output and "skipping k=200" in output
    assert first["arch"] == "vit_tiny_p16" and set(first["accuracy"]) == {"1", "3"}
    assert (tmp_path / "knn.json").is_file()

    second = knn_main(argv)
    assert capsys.readouterr().err.count("reusing cached features") == 2
    assert second["accuracy"] == first["accuracy"]


# -- loading backbones ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch,img_size", [("vit_tiny_p16", 224), ("vit_tiny_p8", 40),
                                           ("vit_small_p16", 96), ("vit_small_p8", 224),
                                           ("vit_base_p16", 224), ("vit_base_p8", 64)])
def test_architecture_and_image_size_are_inferred_from_the_shapes(arch, img_size):
    with torch.device("meta"):  # shapes only
        state = create_backbone(arch, img_size=img_size).state_dict()
    assert infer_architecture(state) == arch
    assert vit_image_size(state, "test") == img_size


@pytest.mark.parametrize("timm_name,arch", [("vit_small_patch8_224", "vit_small_p8"),
                                            ("vit_base_patch16_224", "vit_base_p16"),
                                            ("resnet50", "resnet50")])
def test_timm_state_dicts_are_recognized(timm_name, arch):
    # Imported here: timm is slow to import, and the distributed test's workers import this file.
    from model_comparison import TIMM_UNAVAILABLE, timm

    if timm is None:
        pytest.skip(f"timm is unavailable: {TIMM_UNAVAILABLE}")
    with torch.device("meta"):
        state = timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()
    assert infer_architecture(state) == arch


def test_every_checkpoint_format_loads_the_chosen_network(tmp_path):
    student, teacher = save_training_checkpoint(tmp_path / "training.pth")
    torch.save(teacher.state_dict(), tmp_path / "network.pth")  # backbone./head. keys
    torch.save(export_backbone_state_dict(teacher), tmp_path / "backbone.pth")
    expected = {"teacher": teacher.backbone.state_dict(), "student": student.backbone.state_dict()}
    for name, part in (("training.pth", "teacher"), ("training.pth", "student"),
                       ("network.pth", "teacher"), ("backbone.pth", "teacher")):
        model, arch = load_backbone(tmp_path / name, part=part)
        assert arch == "vit_tiny_p16" and not model.training
        assert not any(parameter.requires_grad for parameter in model.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[part][key]), (name, part, key)
    model, arch = load_backbone(tmp_path / "backbone.pth", arch="vit_tiny_p16")
    assert arch == "vit_tiny_p16"


def test_unloadable_files_give_errors_naming_them(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone(missing)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth.*could not be read"):
        load_backbone(text)

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="tensor.pth.*expected a checkpoint dict"):
        load_backbone(tmp_path / "tensor.pth")

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "classifier.pth")
    with pytest.raises(ArchitectureInferenceError, match="classifier.pth.*--arch"):
        load_backbone(tmp_path / "classifier.pth")

    odd = VisionTransformer(img_size=32, patch_size=16, embed_dim=96, depth=5, num_heads=3)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ArchitectureInferenceError, match="odd.pth.*embed dim 96, depth 5"):
        load_backbone(tmp_path / "odd.pth")

    save_training_checkpoint(tmp_path / "tiny.pth")
    with pytest.raises(StateDictMismatchError, match="tiny.pth") as error:
        load_backbone(tmp_path / "tiny.pth", arch="vit_small_p16")
    assert error.value.mis_shaped

    teacher_only = {"teacher": export_backbone_state_dict(create_backbone("vit_tiny_p16", img_size=32))}
    torch.save(teacher_only, tmp_path / "teacher-only.pth")
    with pytest.raises(ValueError, match="teacher-only.pth.*no 'student' entry"):
        load_backbone(tmp_path / "teacher-only.pth", part="student")


def test_bad_data_paths_are_named(tmp_path):
    save_training_checkpoint(tmp_path / "checkpoint.pth")
    (tmp_path / "empty").mkdir()
    common = ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--image-size", "32", "--num-workers", "0"]
    with pytest.raises(FileNotFoundError, match="--train-data.*nowhere"):
        knn_main(common + ["--train-data", str(tmp_path / "nowhere"), "--val-data", str(tmp_path)])
    with pytest.raises(ValueError, match="--train-data.*empty.*one subfolder of images per class"):
        knn_main(common + ["--train-data", str(tmp_path / "empty"), "--val-data", str(tmp_path)])
    train = write_image_folder(tmp_path / "train", num_classes=3, per_class=1)
    val = write_image_folder(tmp_path / "val", num_classes=2, per_class=1)
    with pytest.raises(ValueError, match=r"same class subfolders; only in train: \['class2'\]"):
        knn_main(common + ["--train-data", str(train), "--val-data", str(val)])


# -- end to end: DINO training helps -------------------------------------------------------------

DIGITS_SIZE = 32
# The tiny CPU preset shrunk to 32 px digits (ViT-Tiny/8: 4 x 4 patches per global crop, a small
# head), in a recipe that does not collapse within 252 steps: batch norm in the head (a random
# ViT's CLS token is nearly the same for every digit, so without it the centered teacher is
# uniform), a sharper teacher (0.02), a faster one (momentum 0.98), crops that keep part of a
# digit, no drop path and a flat weight decay. h(P_t) stays 3-5 nats below ln K.
DIGITS_TRAINING = ["arch=vit_tiny_p8", f"global_crop_size={DIGITS_SIZE}",
                   f"local_crop_size={DIGITS_SIZE // 2}", "n_local_crops=2", "out_dim=1024",
                   "head_hidden_dim=256", "head_bottleneck_dim=64", "use_bn_in_head=true",
                   "global_crop_scale=0.5,1.0", "local_crop_scale=0.2,0.5", "drop_path_rate=0",
                   "teacher_temp=0.02", "warmup_teacher_temp=0.02", "momentum_teacher=0.98",
                   "batch_size_per_gpu=32", "epochs=6", "warmup_epochs=1", "lr=0.005",
                   "weight_decay_end=0.04", "log_every_steps=21"]


def write_digits_folder(root):
    """scikit-learn's 8 x 8 digits, upsampled to 32 px RGB; every 4th image in val/."""
    from PIL import Image

    digits = pytest.importorskip("sklearn.datasets").load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if index % 4 == 0 else "train") / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * (255 / 16)).astype("uint8"))
        image.resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / f"{index}.png")
    return root / "train", root / "val"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_short_dino_training_beats_random_init_on_digits(tmp_path, method):
    train, val = write_digits_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    training = subprocess.run(
        [sys.executable, "-m", "fastdino.train", "--preset", "tiny", "--data", str(train),
         "--output-dir", str(run_dir), *DIGITS_TRAINING, f"method={method}"],
        env=environment, capture_output=True, text=True, timeout=3600, check=False)
    assert training.returncode == 0, training.stderr[-3000:]

    def top1(checkpoint):
        result = knn_main(["--checkpoint", str(checkpoint), "--train-data", str(train),
                           "--val-data", str(val), "--image-size", str(DIGITS_SIZE),
                           "--num-workers", "0", "--nb-knn", "20"])
        return result["accuracy"]["20"]["top1"]

    trained_model, arch = load_backbone(run_dir / "checkpoint.pth")
    torch.manual_seed(0)
    untrained = create_backbone(arch, img_size=trained_model.pos_embed_grid * trained_model.patch_size)
    torch.save(export_backbone_state_dict(untrained), tmp_path / "random_init.pth")
    trained_top1, random_top1 = top1(run_dir / "checkpoint.pth"), top1(tmp_path / "random_init.pth")
    print(f"digits 20-NN top-1: {method}-trained {arch} {trained_top1:.2f}%, random init {random_top1:.2f}%")
    assert trained_top1 > random_top1
