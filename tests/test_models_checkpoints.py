"""Checkpoint interop: the public DINO release's files (built here from the key list in DINO.md,
no downloads) and timm's ViTs (random weights), in both directions, and the mismatch errors."""

import argparse

import pytest
import torch

from fastdino.models import (
    DINOHead,
    MultiCropWrapper,
    StateDictMismatchError,
    convert_weight_norm_keys,
    create_backbone,
    export_backbone_state_dict,
    export_dino_checkpoint,
    load_dino_checkpoint,
    read_checkpoint,
    select_state_dict,
    vit_tiny,
)
from model_comparison import max_relative_difference, needs_timm, randomize_parameters, release_vit_features, timm

HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def release_backbone_shapes(embed_dim=192, depth=12, patch_size=16, img_size=224):
    """Key -> shape of a public DINO ViT backbone, from DINO.md's key list (not from fastdino)."""
    dim, grid = embed_dim, img_size // patch_size
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch_size, patch_size), "patch_embed.proj.bias": (dim,)}
    for n in range(depth):
        for name, weight_shape in (("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                                   ("norm2", (dim,)), ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))):
            shapes[f"blocks.{n}.{name}.weight"] = weight_shape
            shapes[f"blocks.{n}.{name}.bias"] = (weight_shape[0],)
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def release_head_shapes(in_dim=192, out_dim=64, hidden_dim=32, bottleneck_dim=16):
    return {"mlp.0.weight": (hidden_dim, in_dim), "mlp.0.bias": (hidden_dim,),
            "mlp.2.weight": (hidden_dim, hidden_dim), "mlp.2.bias": (hidden_dim,),
            "mlp.4.weight": (bottleneck_dim, hidden_dim), "mlp.4.bias": (bottleneck_dim,),
            "last_layer.weight_g": (out_dim, 1), "last_layer.weight_v": (out_dim, bottleneck_dim)}


def random_state(shapes, generator, prefix="", scale=1.0):
    return {prefix + key: torch.randn(shape, generator=generator) * scale for key, shape in shapes.items()}


def release_full_checkpoint(generator):
    """What the release's main_dino.py saves: DDP student (module.), plain teacher, and the rest."""
    def network(prefix):
        return {**random_state(release_backbone_shapes(), generator, prefix + "backbone."),
                **random_state(release_head_shapes(), generator, prefix + "head.")}
    return {"student": network("module."), "teacher": network(""),
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.04, "params": [0, 1]}]},
            "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64),
            "dino_loss": {"center": torch.zeros(1, 64)}}


def tiny_network(global_crops_only=False):
    return MultiCropWrapper(vit_tiny(patch_size=16), DINOHead(192, **HEAD), global_crops_only=global_crops_only)


def assert_state_equals(module, expected):
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# -- the release's formats ---------------------------------------------------------------------

def test_fastdino_keys_and_shapes_are_the_release_ones():
    network = tiny_network()
    expected = {**{"backbone." + k: s for k, s in release_backbone_shapes().items()},
                **{"head." + k: s for k, s in release_head_shapes().items()}}
    assert {key: tuple(value.shape) for key, value in network.state_dict().items()} == expected


@pytest.mark.parametrize("part", ["teacher", "student"])
def test_full_release_checkpoint_file_loads(tmp_path, generator, part):
    checkpoint = release_full_checkpoint(generator)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert isinstance(read_checkpoint(path)["args"], argparse.Namespace)  # weights_only loading

    network = tiny_network()
    load_dino_checkpoint(network, path, part=part)
    source = {key.removeprefix("module."): value for key, value in checkpoint[part].items()}
    assert_state_equals(network, source)

    backbone, head = vit_tiny(patch_size=16), DINOHead(192, **HEAD)
    load_dino_checkpoint(backbone, checkpoint, part=part)
    load_dino_checkpoint(head, checkpoint, part=part)
    for module, prefix in ((backbone, "backbone."), (head, "head.")):
        assert_state_equals(module, {k.removeprefix(prefix): v for k, v in source.items() if k.startswith(prefix)})


def test_backbone_only_file_loads(tmp_path, generator):
    weights = random_state(release_backbone_shapes(), generator)  # like dino_deitsmall16_pretrain.pth
    torch.save(weights, tmp_path / "backbone.pth")
    backbone = create_backbone("vit_tiny_p16")
    load_dino_checkpoint(backbone, tmp_path / "backbone.pth")
    assert_state_equals(backbone, weights)


@pytest.mark.parametrize("image_size", [(64, 64), (32, 32), (48, 32)])
def test_release_weights_give_the_release_features(generator, image_size):
    """The release's forward, written out as tensor math over a state dict built from DINO.md's key
    list, against fastdino's ViT: at the native grid and at interpolated (non-square) ones."""
    weights = random_state(release_backbone_shapes(img_size=64), generator, scale=0.1)
    backbone = create_backbone("vit_tiny_p16", img_size=64).eval()
    load_dino_checkpoint(backbone, weights)
    images = torch.randn(2, 3, *image_size, generator=generator)
    expected = release_vit_features(weights, images, num_heads=3, patch_size=16)
    with torch.no_grad():
        for backend in ("sdpa", "explicit"):
            backbone.attn_backend = backend
            assert max_relative_difference(backbone(images), expected) <= 1e-5, backend


def test_head_weights_with_parametrization_keys_load(generator):
    checkpoint = release_full_checkpoint(generator)
    modern = {"teacher": convert_weight_norm_keys(checkpoint["teacher"], "parametrization")}
    assert "head.last_layer.parametrizations.weight.original0" in modern["teacher"]
    network = tiny_network()
    load_dino_checkpoint(network, modern)
    assert_state_equals(network, checkpoint["teacher"])


def test_export_round_trips_through_the_release_layout(generator):
    student, teacher = tiny_network(), tiny_network(global_crops_only=True)
    randomize_parameters(student, generator)
    randomize_parameters(teacher, generator)
    checkpoint = export_dino_checkpoint(student, teacher, epoch=3)
    assert checkpoint["epoch"] == 3
    assert all(key.startswith("module.") for key in checkpoint["student"])
    assert set(checkpoint["teacher"]) == {"backbone." + k for k in release_backbone_shapes()} | {
        "head." + k for k in release_head_shapes()}

    for part, source in (("student", student), ("teacher", teacher)):
        restored = tiny_network()
        load_dino_checkpoint(restored, checkpoint, part=part)
        assert_state_equals(restored, source.state_dict())

    backbone_weights = export_backbone_state_dict(teacher)
    assert {k: tuple(v.shape) for k, v in backbone_weights.items()} == release_backbone_shapes()
    with torch.no_grad():
        teacher.backbone.cls_token.add_(1.0)  # the export is a copy, not a view of live weights
    assert not torch.equal(backbone_weights["cls_token"], teacher.backbone.cls_token)


def test_mismatch_error_lists_missing_unexpected_and_misshaped_keys(generator):
    weights = random_state(release_backbone_shapes(), generator)
    del weights["blocks.3.mlp.fc1.weight"]
    weights["head.weight"] = torch.zeros(1000, 192)  # a timm classifier's head
    weights["pos_embed"] = torch.zeros(1, 785, 192)  # a 224 / patch-8 table into a patch-16 model
    with pytest.raises(StateDictMismatchError) as caught:
        load_dino_checkpoint(vit_tiny(patch_size=16), weights)
    message = str(caught.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    for expected in ("blocks.3.mlp.fc1.weight", "head.weight", "pos_embed: (1, 197, 192) vs (1, 785, 192)"):
        assert expected in message
    assert caught.value.mis_shaped == [("pos_embed", (1, 197, 192), (1, 785, 192))]

    wrong_depth = random_state(release_backbone_shapes(depth=2), generator)
    with pytest.raises(StateDictMismatchError, match=r"(?s)120 missing.*\.\.\. and 95 more"):
        load_dino_checkpoint(vit_tiny(patch_size=16), wrong_depth)


def test_select_state_dict_says_what_is_wrong(generator):
    checkpoint = release_full_checkpoint(generator)
    with pytest.raises(KeyError, match="no 'student' entry.*teacher"):
        select_state_dict({"teacher": checkpoint["teacher"]}, part="student")
    with pytest.raises(ValueError, match="part='ema'"):
        select_state_dict(checkpoint, part="ema")
    backbone_only = random_state(release_backbone_shapes(), generator)
    with pytest.raises(ValueError, match="holds only a backbone"):
        load_dino_checkpoint(tiny_network(), backbone_only)
    assert set(select_state_dict(checkpoint, component="head")) == set(release_head_shapes())


# -- timm --------------------------------------------------------------------------------------

TIMM_PAIRS = [  # (timm name, fastdino name, image size)
    ("vit_tiny_patch16_224", "vit_tiny_p16", 48),
    ("vit_small_patch16_224", "vit_small_p16", 64),
    ("vit_small_patch8_224", "vit_small_p8", 224),
    pytest.param("vit_base_patch8_224", "vit_base_p8", 224, marks=pytest.mark.slow),
]


@needs_timm
@pytest.mark.parametrize("timm_name,name,image_size", TIMM_PAIRS)
def test_timm_state_dicts_load_both_ways_with_equal_features(generator, timm_name, name, image_size):
    timm_model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size)
    randomize_parameters(timm_model, generator).eval()
    images = torch.randn(2, 3, image_size, image_size, generator=generator)

    ours = create_backbone(name, img_size=image_size).eval()
    load_dino_checkpoint(ours, timm_model.state_dict())  # timm -> fastdino, strict
    with torch.no_grad():
        expected = timm_model(images)
        assert max_relative_difference(ours(images), expected) <= 1e-5
        ours.attn_backend = "explicit"
        assert max_relative_difference(ours(images), expected) <= 1e-5

    teacher = MultiCropWrapper(ours, DINOHead(ours.embed_dim, **HEAD), global_crops_only=True)
    fresh_timm = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size).eval()
    fresh_timm.load_state_dict(export_backbone_state_dict(teacher), strict=True)  # fastdino -> timm
    with torch.no_grad():
        assert max_relative_difference(fresh_timm(images), expected) <= 1e-5
