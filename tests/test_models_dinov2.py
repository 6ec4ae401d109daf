"""DINOv2's backbones in fastdino.models: the registry's patch-14 models, LayerScale, registers,
the mask token, SwiGLU, the release's position-table resizing, DINOv2's and timm's state-dict
layouts (plain and ``block_chunks``), the outputs DINOv2 users expect, and the packed multi-crop
forward with masks and patch tokens.

The DINOv2 reference below is written from DINOV2.md's key list and the release's formulas (not
vendored from the release); timm's ``vit_*_patch14[_reg4]_dinov2`` (random weights) is the
independent implementation. Widths and depths are small where the architecture is not the point.

Tolerances. float32 (u = 6e-8): each feature comes out of a few blocks of dot products over at
most 4 * 384 terms, whose rounding errors are ~ sqrt(K) u of the activations' scale (< 1e-6
relative); a different summation order (SDPA vs an explicit softmax, timm's fused kernels) stays
within that, so FP32_TOLERANCE = 1e-5 is a tenth of the smallest structural mistake (a missing
gamma or register, a shifted position row moves features by 1e-2 or more). float64 (u = 1.1e-16):
the same analysis gives ~1e-14; FP64_TOLERANCE = 1e-10.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastdino.models import (
    ATTENTION_ENV_VAR,
    StateDictMismatchError,
    VisionTransformer,
    create_backbone,
    export_backbone_state_dict,
    list_backbones,
    load_dino_checkpoint,
)
from fastdino.models import attention as attention_module
from fastdino.models.checkpoints import convert_backbone_state_dict
from fastdino.models.registry import DINOV2_OPTIONS, DINOV2_REG4_OPTIONS
from fastdino.models.vision_transformer import MultiCropFeatures, SwiGLUFFN
from model_comparison import max_relative_difference, needs_timm, randomize_parameters, timm

FP32_TOLERANCE = 1e-5
FP64_TOLERANCE = 1e-10
SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}


@pytest.fixture(autouse=True)
def no_forced_attention_backend(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV_VAR, raising=False)


# -- DINOv2's layout and forward, from DINOV2.md ------------------------------------------------

def swiglu_hidden(dim, mlp_ratio=4):
    """The release's SwiGLUFFNFused width: 2/3 of the MLP's, rounded up to a multiple of 8."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


def dinov2_backbone_shapes(dim, depth, patch_size=14, img_size=518, registers=0, swiglu=False):
    """Key -> shape of a public DINOv2 backbone file (``block_chunks=0``), from DINOV2.md."""
    grid = img_size // patch_size
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch_size, patch_size), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    ffn = ((("mlp.w12", (2 * swiglu_hidden(dim), dim)), ("mlp.w3", (dim, swiglu_hidden(dim)))) if swiglu
           else (("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))))
    for n in range(depth):
        for name, weight_shape in (("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                                   ("norm2", (dim,)), *ffn):
            shapes[f"blocks.{n}.{name}.weight"] = weight_shape
            shapes[f"blocks.{n}.{name}.bias"] = (weight_shape[0],)
        shapes[f"blocks.{n}.ls1.gamma"] = shapes[f"blocks.{n}.ls2.gamma"] = (dim,)
    return shapes


def random_dinov2_state(shapes, generator, dtype=torch.float32):
    """Random values for every key, norm weights around 1 (well-conditioned features)."""
    state = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.1
        if ".norm" in "." + key and key.endswith("weight"):
            values += 1.0
        state[key] = values.to(dtype)
    return state


def to_block_chunks(state, block_chunks):
    """The release's ``block_chunks`` layout: block N of chunk N // (depth // block_chunks)."""
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    chunk_size = depth // block_chunks
    chunked = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            key = f"blocks.{int(n) // chunk_size}.{n}.{rest}"
        chunked[key] = value
    return chunked


def dinov2_reference(state, images, num_heads, patch_size=14, masks=None, offset=0.1, antialias=False):
    """DINOv2's forward_features as tensor math over its state dict: the normed tokens after every
    block (a list) and the prenorm tokens after the last."""
    dim = state["cls_token"].shape[-1]
    batch = images.shape[0]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    if masks is not None:  # the mask token replaces the patch embedding, before positions
        x = torch.where(masks[..., None], state["mask_token"][None], x)
    x = torch.cat((state["cls_token"].expand(batch, -1, -1), x), dim=1)
    grid_h, grid_w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    native = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    pos_embed = state["pos_embed"]
    if (grid_h, grid_w) != (native, native):
        patch = pos_embed[:, 1:].reshape(1, native, native, dim).permute(0, 3, 1, 2)
        resize = (dict(scale_factor=((grid_h + offset) / native, (grid_w + offset) / native)) if offset
                  else dict(size=(grid_h, grid_w)))
        patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **resize)
        pos_embed = torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
    x = x + pos_embed
    if "register_tokens" in state:  # after CLS, after the position embedding
        x = torch.cat((x[:, :1], state["register_tokens"].expand(batch, -1, -1), x[:, 1:]), dim=1)
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    layers = []
    for n in range(depth):
        def weights(name):
            return state[f"blocks.{n}.{name}.weight"], state[f"blocks.{n}.{name}.bias"]
        tokens = x.shape[1]
        qkv = F.linear(F.layer_norm(x, (dim,), *weights("norm1"), eps=1e-6), *weights("attn.qkv"))
        q, k, v = qkv.reshape(batch, tokens, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
        attended = F.linear((attention @ v).transpose(1, 2).reshape(batch, tokens, dim), *weights("attn.proj"))
        x = x + attended * state[f"blocks.{n}.ls1.gamma"]
        hidden = F.layer_norm(x, (dim,), *weights("norm2"), eps=1e-6)
        if f"blocks.{n}.mlp.w12.weight" in state:
            x1, x2 = F.linear(hidden, *weights("mlp.w12")).chunk(2, dim=-1)
            transformed = F.linear(F.silu(x1) * x2, *weights("mlp.w3"))
        else:
            transformed = F.linear(F.gelu(F.linear(hidden, *weights("mlp.fc1"))), *weights("mlp.fc2"))
        x = x + transformed * state[f"blocks.{n}.ls2.gamma"]
        layers.append(F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6))
    return layers, x


def tiny_dinov2(registers=0, swiglu=False, img_size=56, dim=48, depth=3, num_heads=3, **kwargs):
    """A small ViT with the registry's DINOv2 settings (4 x 4 native grid at patch 14)."""
    options = dict(DINOV2_REG4_OPTIONS if registers else DINOV2_OPTIONS, num_register_tokens=registers)
    options.update(kwargs)
    return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=dim, depth=depth, num_heads=num_heads,
                             ffn_layer="swiglu" if swiglu else "mlp", **options)


def random_masks(generator, batch, num_patches, ratio=0.4):
    masks = torch.rand(batch, num_patches, generator=generator) < ratio
    masks[0, 0], masks[-1, -1] = True, False  # at least one masked and one kept patch
    return masks


# -- registry and layout -----------------------------------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("registers", [0, 4])
def test_registry_builds_the_public_dinov2_layouts(size, registers):
    name = f"vit_{size}_p14" + ("_reg4" if registers else "")
    assert name in list_backbones()
    dim, depth, heads = SIZES[size]
    with torch.device("meta"):  # shapes and settings only
        model = create_backbone(name, img_size=518, drop_path_rate=0.3)
    swiglu = size == "giant"
    assert ({key: tuple(value.shape) for key, value in model.state_dict().items()}
            == dinov2_backbone_shapes(dim, depth, registers=registers, swiglu=swiglu))
    assert (model.embed_dim, model.num_heads, model.patch_size) == (dim, heads, 14)
    assert model.num_register_tokens == registers
    assert all(block.drop_path_rate == pytest.approx(0.3) for block in model.blocks)  # uniform over depth
    assert all(block.ls1.init_value == block.ls2.init_value == 1e-5 for block in model.blocks)
    assert isinstance(model.blocks[0].mlp, SwiGLUFFN) == swiglu
    if swiglu:
        assert model.blocks[0].mlp.w3.in_features == 4096  # the release's ViT-g width
    # The public register models resize their table antialiased, without offset; the others as DINO.
    expected_interpolation = (0.0, True) if registers else (0.1, False)
    assert (model.interpolate_offset, model.interpolate_antialias) == expected_interpolation


def test_dinov2_initialization_follows_the_release():
    torch.manual_seed(0)
    model = create_backbone("vit_small_p14_reg4", img_size=56)
    assert torch.equal(model.mask_token, torch.zeros(1, 384))
    assert all(torch.equal(block.ls1.gamma, torch.full((384,), 1e-5)) for block in model.blocks)
    assert 0 < model.cls_token.abs().max() < 1e-5 and 0 < model.register_tokens.abs().max() < 1e-5


def test_dino_models_keep_their_layout_and_refuse_masks(generator):
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    keys = list(model.state_dict())
    assert model.mask_token is None and model.register_tokens is None
    assert not any(part in key for key in keys for part in ("ls1", "ls2", "mask_token", "register_tokens", "w12"))
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with pytest.raises(ValueError, match="no mask token.*mask_token=True"):
        model.forward_features(images, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ffn_layer='swiglufused'"):
        VisionTransformer(ffn_layer="swiglufused")
    with pytest.raises(ValueError, match="num_register_tokens=-1"):
        VisionTransformer(num_register_tokens=-1)


# -- timm --------------------------------------------------------------------------------------

def timm_dinov2(timm_name, generator, **kwargs):
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    return randomize_parameters(model, generator).eval()


TIMM_CASES = [  # timm name, registers, SwiGLU, timm width overrides
    ("vit_small_patch14_dinov2", 0, False, {}),
    ("vit_small_patch14_reg4_dinov2", 4, False, {}),
    # giant-like: timm's SwiGLUPacked (fc1/fc2) at width 192, whose hidden width 512 is the
    # release's formula too; the full-size layouts are compared in test_timm_layouts_at_full_size.
    ("vit_giant_patch14_reg4_dinov2", 4, True, dict(embed_dim=192, num_heads=3)),
]


@needs_timm
@pytest.mark.parametrize("timm_name,registers,swiglu,widths", TIMM_CASES)
def test_timm_dinov2_state_dicts_load_strictly_with_equal_features(generator, timm_name, registers, swiglu, widths):
    reference = timm_dinov2(timm_name, generator, img_size=70, depth=3, **widths)  # 5 x 5 native grid
    dim, heads = widths.get("embed_dim", 384), widths.get("num_heads", 6)
    # timm's dynamic_img_size resizes its table to the exact size, antialiased: as the reg4 models.
    model = tiny_dinov2(registers, swiglu, img_size=70, dim=dim, depth=3, num_heads=heads,
                        interpolate_offset=0.0, interpolate_antialias=True).eval()
    load_dino_checkpoint(model, reference.state_dict())  # strict, after conversion
    assert torch.equal(model.mask_token, torch.zeros(1, dim))  # timm drops it: the release's init
    for image_size in [(70, 70), (98, 84), (42, 56)]:  # native, larger and smaller grids
        images = torch.randn(2, 3, *image_size, generator=generator)
        with torch.no_grad():
            expected = reference.forward_features(images)
            ours = model.forward_features(images)
            prefix = 1 + registers
            for actual, wanted in ((ours["x_norm_clstoken"], expected[:, 0]),
                                   (ours["x_norm_patchtokens"], expected[:, prefix:]),
                                   (model(images), reference(images))):
                assert max_relative_difference(actual, wanted) <= FP32_TOLERANCE, image_size
            if registers:
                assert ours["x_norm_regtokens"].shape == (2, registers, dim)
                assert max_relative_difference(ours["x_norm_regtokens"], expected[:, 1:prefix]) <= FP32_TOLERANCE
            layers = model.get_intermediate_layers(images, n=2, reshape=True, return_class_token=True)
            wanted_layers = reference.get_intermediate_layers(images, n=2, reshape=True, return_prefix_tokens=True,
                                                              norm=True)
            for (patches, cls), (wanted_patches, wanted_prefix) in zip(layers, wanted_layers, strict=True):
                assert patches.shape == (2, dim, image_size[0] // 14, image_size[1] // 14)
                assert max_relative_difference(patches, wanted_patches) <= FP32_TOLERANCE
                assert max_relative_difference(cls, wanted_prefix[:, 0]) <= FP32_TOLERANCE


@needs_timm
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("registers", [0, 4])
def test_timm_layouts_at_full_size_load_strictly(size, registers):
    timm_name = f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2"
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
        model = create_backbone(f"vit_{size}_p14{'_reg4' if registers else ''}", img_size=518)
    timm_keys = set(reference.state_dict())
    assert ("reg_token" in timm_keys) == bool(registers) and "mask_token" not in timm_keys
    converted = convert_backbone_state_dict(reference.state_dict(), model)
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in model.state_dict().items()}


@needs_timm
@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (4, True)])
def test_the_dinov2_layout_through_timms_own_converter_gives_our_features(generator, registers, swiglu):
    """A DINOv2-layout state dict, converted by timm's checkpoint_filter_fn into timm's model, and
    fastdino's export of it, converted likewise: the same features as fastdino's."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    timm_name = "vit_giant_patch14_reg4_dinov2" if swiglu else (
        "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2")
    widths = dict(embed_dim=192, num_heads=3) if swiglu else {}
    dim, heads = widths.get("embed_dim", 384), widths.get("num_heads", 6)
    state = random_dinov2_state(dinov2_backbone_shapes(dim, 2, img_size=70, registers=registers, swiglu=swiglu),
                                generator)
    model = tiny_dinov2(registers, swiglu, img_size=70, dim=dim, depth=2, num_heads=heads).eval()
    load_dino_checkpoint(model, state)
    images = torch.randn(2, 3, 70, 70, generator=generator)  # native grid: timm resizes its own way
    with torch.no_grad():
        expected = model.forward_features(images)
    for source in (state, export_backbone_state_dict(model)):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=70, depth=2,
                                      **widths).eval()
        reference.load_state_dict(checkpoint_filter_fn(dict(source), reference), strict=True)
        with torch.no_grad():
            tokens = reference.forward_features(images)
        assert max_relative_difference(tokens[:, 0], expected["x_norm_clstoken"]) <= FP32_TOLERANCE
        assert max_relative_difference(tokens[:, 1 + registers:], expected["x_norm_patchtokens"]) <= FP32_TOLERANCE


# -- DINOv2's own layout, against the reference ------------------------------------------------

DINOV2_CASES = [(0, False), (4, False), (0, True), (4, True)]  # registers, SwiGLU


@pytest.mark.parametrize("registers,swiglu", DINOV2_CASES)
@pytest.mark.parametrize("block_chunks", [0, 2, 4])
def test_dinov2_layout_plain_and_block_chunks_give_the_reference_features(generator, registers, swiglu, block_chunks):
    depth, dim, heads = 4, 48, 3
    state = random_dinov2_state(dinov2_backbone_shapes(dim, depth, img_size=56, registers=registers, swiglu=swiglu),
                                generator, torch.float64)
    source = to_block_chunks(state, block_chunks) if block_chunks else state
    if block_chunks:  # block 2 lies in chunk 1 of 2, or in chunk 2 of 4
        assert f"blocks.{2 // (depth // block_chunks)}.2.norm1.weight" in source
    model = tiny_dinov2(registers, swiglu, dim=dim, depth=depth, num_heads=heads).double().eval()
    load_dino_checkpoint(model, source)
    exported = export_backbone_state_dict(model)
    assert set(exported) == set(state) and all(torch.equal(exported[key], state[key]) for key in state)  # plain
    offset, antialias = (0.0, True) if registers else (0.1, False)
    for image_size in [(56, 56), (84, 70), (28, 42)]:
        images = torch.randn(2, 3, *image_size, generator=generator, dtype=torch.float64)
        layers, prenorm = dinov2_reference(state, images, heads, offset=offset, antialias=antialias)
        with torch.no_grad():
            ours = model.forward_features(images)
            intermediate = model.get_intermediate_layers(images, n=[0, 2])
            patch_only = model.get_intermediate_layers(images, n=2, return_class_token=True)
        prefix = 1 + registers
        for actual, expected in ((ours["x_norm_clstoken"], layers[-1][:, 0]),
                                 (ours["x_norm_regtokens"], layers[-1][:, 1:prefix]),
                                 (ours["x_norm_patchtokens"], layers[-1][:, prefix:]),
                                 (ours["x_prenorm"], prenorm),
                                 *zip(intermediate, (layers[0], layers[2]), strict=True),
                                 *((patches, layer[:, prefix:]) for (patches, _), layer in zip(patch_only, layers[2:])),
                                 *((cls, layer[:, 0]) for (_, cls), layer in zip(patch_only, layers[2:]))):
            assert actual.shape == expected.shape
            if actual.numel():
                assert max_relative_difference(actual, expected) <= FP64_TOLERANCE, image_size


def test_dinov2_layout_mismatches_list_the_keys(generator):
    state = random_dinov2_state(dinov2_backbone_shapes(48, 2, img_size=56, registers=4), generator)
    del state["blocks.1.ls2.gamma"]
    with pytest.raises(StateDictMismatchError) as caught:
        load_dino_checkpoint(tiny_dinov2(registers=4, depth=2), state)
    assert caught.value.missing == ["blocks.1.ls2.gamma"] and not caught.value.unexpected
    # A DINOv2 file into a DINO ViT: every DINOv2 addition is named.
    dino = VisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(StateDictMismatchError) as caught:
        load_dino_checkpoint(dino, random_dinov2_state(dinov2_backbone_shapes(48, 2, img_size=56, registers=4),
                                                       generator))
    assert set(caught.value.unexpected) == {"mask_token", "register_tokens"} | {
        f"blocks.{n}.ls{i}.gamma" for n in range(2) for i in (1, 2)}
    # A register-free file into a register model, and block chunks that collide.
    with pytest.raises(StateDictMismatchError, match="register_tokens"):
        load_dino_checkpoint(tiny_dinov2(registers=4, depth=2),
                             random_dinov2_state(dinov2_backbone_shapes(48, 2, img_size=56), generator))
    chunked = to_block_chunks(random_dinov2_state(dinov2_backbone_shapes(48, 2, img_size=56), generator), 2)
    chunked["blocks.0.1.norm1.weight"] = chunked["blocks.1.1.norm1.weight"]
    with pytest.raises(ValueError, match="two chunks hold 'blocks.1.norm1.weight'"):
        load_dino_checkpoint(tiny_dinov2(depth=2), chunked)


def test_half_precision_tables_are_resized_in_float32(generator):
    model = tiny_dinov2(registers=4)
    randomize_parameters(model, generator)
    with torch.no_grad():
        expected = model.interpolated_pos_embed(3, 5)
        model.bfloat16()
        table = model.interpolated_pos_embed(3, 5)
    assert table.dtype == torch.bfloat16
    patch = model.pos_embed[:, 1:].float().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patch, size=(3, 5), mode="bicubic", antialias=True).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.equal(table[:, 1:], resized.bfloat16())
    assert max_relative_difference(table, expected) <= 2 ** -8  # one bfloat16 rounding


# -- masks, multi-crop -------------------------------------------------------------------------

@pytest.mark.parametrize("registers", [0, 4])
def test_masked_patches_take_the_mask_token_path(generator, registers):
    depth, dim, heads = 2, 48, 3
    state = random_dinov2_state(dinov2_backbone_shapes(dim, depth, img_size=56, registers=registers),
                                generator, torch.float64)
    model = tiny_dinov2(registers, dim=dim, depth=depth, num_heads=heads).double().eval()
    load_dino_checkpoint(model, state)
    images = torch.randn(3, 3, 70, 56, generator=generator, dtype=torch.float64)  # 5 x 4 grid
    masks = random_masks(generator, 3, 20)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    layers, _ = dinov2_reference(state, images, heads, masks=masks, offset=offset, antialias=antialias)
    with torch.no_grad():
        ours = model.forward_features(images, masks)
        # The pixels of a masked patch cannot reach the output: change them all.
        pixel_masks = masks.view(3, 5, 4).repeat_interleave(14, 1).repeat_interleave(14, 2)[:, None]
        scribbled = model.forward_features(torch.where(pixel_masks, torch.randn_like(images), images), masks)
        unmasked = model.forward_features(images, torch.zeros_like(masks))
        plain = model.forward_features(images)
    assert ours["masks"] is masks
    assert max_relative_difference(ours["x_norm_clstoken"], layers[-1][:, 0]) <= FP64_TOLERANCE
    assert max_relative_difference(ours["x_norm_patchtokens"], layers[-1][:, 1 + registers:]) <= FP64_TOLERANCE
    assert max_relative_difference(scribbled["x_prenorm"], ours["x_prenorm"]) <= FP64_TOLERANCE
    assert torch.equal(unmasked["x_prenorm"], plain["x_prenorm"])
    assert not torch.allclose(ours["x_norm_clstoken"], plain["x_norm_clstoken"])

    model.float().train()
    model.forward_features(images.float(), masks)["x_norm_patchtokens"].square().sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"bool tensor of shape \(3, 20\).*torch.int64 tensor of shape \(3, 20\)"):
        model.forward_features(images.float(), masks.long())


def multicrop(generator, batch=2):
    """2 global crops (4 x 4 grid), then local crops of two sizes."""
    sizes = [(56, 56)] * 2 + [(28, 28), (28, 28), (42, 28)]
    return [torch.randn(batch, 3, h, w, generator=generator) for h, w in sizes]


@pytest.mark.parametrize("registers", [0, 4])
def test_packed_and_per_resolution_multicrop_agree_with_masks_and_registers(generator, registers):
    model = randomize_parameters(tiny_dinov2(registers, swiglu=True, depth=2), generator).eval()
    crops = multicrop(generator)
    masks = [random_masks(generator, 2, 16), None]  # the second global crop unmasked
    with torch.no_grad():
        packed = model.forward_multicrop(crops, packed=True, masks=masks, return_patch_tokens=True)
        per_resolution = model.forward_multicrop(crops, packed=False, masks=masks, return_patch_tokens=True)
        one_by_one = [model.forward_features(crop, crop_masks) for crop, crop_masks in zip(crops, masks + [None] * 3)]
        cls_only = model.forward_multicrop(crops, packed=True, masks=masks)
    assert isinstance(packed, MultiCropFeatures)
    assert packed.cls_tokens.shape == (10, 48) and packed.patch_tokens.shape == (4, 16, 48)
    expected_cls = torch.cat([output["x_norm_clstoken"] for output in one_by_one])
    expected_patches = torch.cat([output["x_norm_patchtokens"] for output in one_by_one[:2]])
    for features in (packed, per_resolution):
        assert max_relative_difference(features.cls_tokens, expected_cls) <= FP32_TOLERANCE
        assert max_relative_difference(features.patch_tokens, expected_patches) <= FP32_TOLERANCE
    assert torch.equal(cls_only, packed.cls_tokens)


def test_packed_multicrop_gradients_equal_the_per_resolution_ones(generator):
    model = randomize_parameters(tiny_dinov2(registers=4, depth=2), generator)
    crops = multicrop(generator)
    masks = [random_masks(generator, 2, 16), random_masks(generator, 2, 16)]
    grads = {}
    for packed in (False, True):
        model.zero_grad()
        features = model.forward_multicrop(crops, packed=packed, masks=masks, return_patch_tokens=True)
        (features.cls_tokens.square().sum() + features.patch_tokens.square().sum()).backward()
        grads[packed] = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    for name, expected in grads[False].items():
        assert expected.abs().sum() > 0, f"no gradient reached {name}"  # mask token, registers, gammas too
        assert max_relative_difference(grads[True][name], expected) <= FP32_TOLERANCE, name


def test_teacher_patch_tokens_and_multicrop_errors(generator):
    model = randomize_parameters(tiny_dinov2(registers=4, depth=2), generator).eval()
    crops = multicrop(generator)
    with torch.no_grad():
        teacher = model.forward_multicrop(crops[:2], return_patch_tokens=True)  # no masks: every crop
        expected = torch.cat([model.forward_features(crop)["x_norm_patchtokens"] for crop in crops[:2]])
    assert max_relative_difference(teacher.patch_tokens, expected) <= FP32_TOLERANCE
    with pytest.raises(ValueError, match="2 global crops must share one size"):
        model.forward_multicrop([crops[0], crops[2]], return_patch_tokens=True)
    with pytest.raises(ValueError, match="list with one.*got a tensor of shape"):
        model.forward_multicrop(crops, masks=torch.zeros(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="got 6 masks for 5 crops"):
        model.forward_multicrop(crops, masks=[None] * 6)
    with pytest.raises(ValueError, match=r"masks\[1\]: expected a bool tensor of shape \(2, 16\)"):
        model.forward_multicrop(crops, masks=[None, torch.zeros(2, 9, dtype=torch.bool)])


def real_fmha():
    return pytest.importorskip("xformers.ops.fmha", reason="xformers is not installed")


def test_the_xformers_packed_path_counts_the_registers_in_each_sequence(generator, monkeypatch):
    """xformers' real block-diagonal mask, materialized for an SDPA stand-in of its kernel (its
    kernels need a GPU): every sequence is CLS + 4 registers + patches."""
    fmha = real_fmha()
    seqlens = []

    def attend(query, key, value, attn_bias=None):
        starts = attn_bias.q_seqinfo.seqstart_py
        seqlens.append([end - start for start, end in zip(starts, starts[1:])])
        tokens = query.shape[1]
        mask = attn_bias.materialize((tokens, tokens), dtype=query.dtype)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask=mask)
        return out.transpose(1, 2)

    monkeypatch.setattr(attention_module, "_xformers_ops",
                        lambda: SimpleNamespace(memory_efficient_attention=attend, fmha=fmha))
    monkeypatch.setattr(attention_module, "xformers_status", lambda device, dtype: "available")
    attention_module._block_diagonal_mask.cache_clear()
    model = randomize_parameters(tiny_dinov2(registers=4, depth=2, attn_backend="xformers"), generator).eval()
    crops = multicrop(generator)
    masks = [random_masks(generator, 2, 16), random_masks(generator, 2, 16)]
    with torch.no_grad():
        packed = model.forward_multicrop(crops, masks=masks, return_patch_tokens=True)  # packs on xformers
        model.attn_backend = "sdpa"
        expected = model.forward_multicrop(crops, packed=False, masks=masks, return_patch_tokens=True)
    attention_module._block_diagonal_mask.cache_clear()
    assert seqlens[0] == [5 + 16] * 4 + [5 + 4] * 4 + [5 + 6] * 2 and len(seqlens) == 2
    assert max_relative_difference(packed.cls_tokens, expected.cls_tokens) <= FP32_TOLERANCE
    assert max_relative_difference(packed.patch_tokens, expected.patch_tokens) <= FP32_TOLERANCE


# -- other outputs -----------------------------------------------------------------------------

def test_intermediate_layers_layouts(generator):
    model = randomize_parameters(tiny_dinov2(registers=4, depth=3), generator).eval()
    images = torch.randn(2, 3, 42, 56, generator=generator)  # 3 x 4 grid
    with torch.no_grad():
        sequences = model.get_intermediate_layers(images, n=2)
        raw = model.get_intermediate_layers(images, n=[2], norm=False)
        patches = model.get_intermediate_layers(images, n=[1, 2], reshape=True)
        features = model.forward_features(images)
    assert isinstance(sequences, list) and [tuple(s.shape) for s in sequences] == [(2, 17, 48)] * 2  # CLS, 4, 12
    assert torch.equal(raw[0], features["x_prenorm"])
    assert torch.equal(sequences[-1][:, 0], features["x_norm_clstoken"])
    assert torch.equal(sequences[-1][:, 1:5], features["x_norm_regtokens"])
    assert isinstance(patches, tuple) and patches[1].shape == (2, 48, 3, 4)
    assert torch.equal(patches[1], features["x_norm_patchtokens"].reshape(2, 3, 4, 48).permute(0, 3, 1, 2))
    assert torch.equal(patches[0].flatten(2).transpose(1, 2), sequences[0][:, 5:])
    attention = model.get_last_selfattention(images)
    assert attention.shape == (2, 3, 17, 17)
    for bad in (0, 4, [3], [1, 1], []):
        with pytest.raises(ValueError, match="n="):
            model.get_intermediate_layers(images, n=bad)


@pytest.mark.parametrize("registers,swiglu", [(4, False), (0, True), (4, True)])
def test_forward_flops_count_registers_and_swiglu(generator, registers, swiglu):
    model = tiny_dinov2(registers, swiglu, depth=2, attn_backend="explicit")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(3, 3, 42, 70, generator=generator))
    assert counter.get_total_flops() == 3 * model.forward_flops(42, 70)
