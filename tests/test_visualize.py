"""Attention visualization: image sizes for patch 8 and 16, the 60%-mass masks, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.models import VisionTransformer, export_backbone_state_dict, vit_tiny
from fastdino.visualize import (
    attention_mass_mask,
    cls_attention_maps,
    colorize,
    main,
    patch_multiple_size,
    write_attention_images,
)


def small_vit(patch_size):
    torch.manual_seed(0)
    return VisionTransformer(img_size=4 * patch_size, patch_size=patch_size, embed_dim=48, depth=2,
                             num_heads=3).eval()


def save_image(path, height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def assert_minimal_mass_cover(attention, mask, threshold):
    """Kept entries hold >= threshold of the mass; without the smallest kept one they do not."""
    shares = attention / attention.sum()
    kept = shares[mask]
    assert kept.sum() >= threshold - 1e-6
    assert kept.sum() - kept.min() < threshold + 1e-6
    # The kept entries are the largest ones.
    if (~mask).any():
        assert shares[~mask].max() <= kept.min()


@pytest.mark.parametrize("tokens", [1, 7, 49, 100, 257])
@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_mask_keeps_the_fewest_patches_holding_the_mass(tokens, threshold, generator):
    attention = torch.randn(4, tokens, generator=generator, dtype=torch.float64).mul(2).softmax(dim=-1)
    masks = attention_mass_mask(attention, threshold)
    assert masks.dtype == torch.bool and masks.shape == attention.shape
    for head in range(4):
        assert_minimal_mass_cover(attention[head], masks[head], threshold)


def test_mask_of_a_uniform_map_keeps_just_over_the_share():
    masks = attention_mass_mask(torch.full((1, 10), 0.1, dtype=torch.float64), 0.6)
    assert 6 <= masks.sum() <= 7  # 6 patches hold 0.6 exactly; rounding may need a 7th


@pytest.mark.parametrize("width,height,image_size,patch,expected", [
    (640, 480, 480, 16, (640, 480)),
    (640, 480, 100, 8, (136, 104)),   # 133.3 x 100 -> nearest multiples of 8, halves up
    (45, 37, 40, 16, (48, 48)),        # 48.6 x 40 -> 48 x 48
    (30, 30, (20, 70), 16, (64, 16)),  # explicit height, width
    (10, 1000, 5, 8, (8, 504)),        # never below one patch
])
def test_sizes_are_multiples_of_the_patch(width, height, image_size, patch, expected):
    assert patch_multiple_size(width, height, image_size, patch) == expected


@pytest.mark.parametrize("patch_size", [8, 16])
def test_images_have_the_resized_input_size(patch_size, tmp_path):
    backbone = small_vit(patch_size)
    image = save_image(tmp_path / "input.png", 37, 45)
    written = write_attention_images(backbone, image, tmp_path / "out", image_size=40, threshold=0.6)
    names = sorted(path.name for path in written)
    assert names == sorted(["image.png"] + [f"{kind}-{name}.png" for kind in ("attn", "mask")
                                            for name in ("head0", "head1", "head2", "mean")])
    expected_size = patch_multiple_size(45, 37, 40, patch_size)
    for path in written:
        assert Image.open(path).size == expected_size, path.name
    assert all(side % patch_size == 0 for side in expected_size)

    # The written masks are the 60% masks of the model's attention, one block per patch.
    resized = np.asarray(Image.open(tmp_path / "out" / "image.png"), dtype=np.float32) / 255
    pixels = torch.from_numpy(resized).permute(2, 0, 1)
    normalized = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    maps = cls_attention_maps(backbone, normalized[None])[0]
    for head in range(3):
        mask_pixels = np.asarray(Image.open(tmp_path / "out" / f"mask-head{head}.png")) > 0
        mask = torch.from_numpy(mask_pixels[::patch_size, ::patch_size].copy())
        assert_minimal_mass_cover(maps[head].double(), mask, 0.6)


def test_colormap_spans_dark_to_bright():
    colors = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert colors.dtype == np.uint8 and colors.shape == (1, 3, 3)
    brightness = colors.astype(int).sum(axis=-1)[0]
    assert brightness[0] < brightness[1] < brightness[2]
    assert (colorize(np.ones((2, 2))) == colorize(np.zeros((2, 2)))).all()  # constant: no division by 0


def test_cli_loads_a_checkpoint_and_infers_the_patch_size(tmp_path, capsys):
    torch.save(export_backbone_state_dict(vit_tiny(patch_size=8, img_size=32)), tmp_path / "backbone.pth")
    image = save_image(tmp_path / "photo.jpg", 50, 30)
    written = main(["--checkpoint", str(tmp_path / "backbone.pth"), "--image", str(image),
                    "--out", str(tmp_path / "out"), "--image-size", "48", "64", "--device", "cpu"])
    assert "vit_tiny_p8" in capsys.readouterr().err
    assert len(written) == 1 + 2 * (3 + 1)  # image, then attention and mask per head and the mean
    assert {Image.open(path).size for path in written} == {(64, 48)}


def test_errors_name_the_input(tmp_path):
    backbone = small_vit(16)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_attention_images(backbone, tmp_path / "missing.png", tmp_path / "out")
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="broken.png"):
        write_attention_images(backbone, tmp_path / "broken.png", tmp_path / "out")
    with pytest.raises(ValueError, match="--threshold 1.5"):
        write_attention_images(backbone, tmp_path / "broken.png", tmp_path / "out", threshold=1.5)
    with pytest.raises(ValueError, match="need a ViT"):
        write_attention_images(torch.nn.Linear(2, 2), tmp_path / "broken.png", tmp_path / "out")
