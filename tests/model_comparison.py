"""What the model tests share: random weights, the comparison metric, whether timm imports, and
the release's ViT math written out independently of fastdino."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _import_timm():
    try:
        import timm
    except Exception as error:  # not installed, or its torchvision does not load with this torch
        return None, f"{type(error).__name__}: {error}"
    return timm, ""


timm, TIMM_UNAVAILABLE = _import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason=f"timm is unavailable: {TIMM_UNAVAILABLE}")


def max_relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the issue's "max relative difference"."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max())


@torch.no_grad()
def randomize_parameters(module: nn.Module, generator: torch.Generator, scale: float = 0.1) -> nn.Module:
    """Overwrite every parameter with random values (norm weights around 1), so comparisons do
    not pass merely because an init left biases at zero and norms at identity."""
    for name, parameter in module.named_parameters():
        values = torch.randn(parameter.shape, generator=generator) * scale
        if "norm" in name and name.endswith("weight"):
            values += 1.0
        parameter.copy_(values)
    return module


def release_interpolation(pos_embed, grid_h, grid_w, offset=0.1):
    """The release's interpolate_pos_encoding: (1, 1 + n*n, D) -> (1, 1 + grid_h * grid_w, D)."""
    native = int((pos_embed.shape[1] - 1) ** 0.5)
    patch = pos_embed[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid_h + offset) / native, (grid_w + offset) / native),
                          mode="bicubic")
    return torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def release_vit_features(state, images, num_heads, patch_size):
    """The release's ViT forward as plain tensor math over a backbone state dict: CLS features.

    Explicit attention (the release's), LayerNorm eps 1e-6, exact GELU, interpolated positions.
    """
    dim = state["cls_token"].shape[-1]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch_size)
    x = torch.cat((state["cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    grid_h, grid_w = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    native = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    x = x + (state["pos_embed"] if (grid_h, grid_w) == (native, native)
             else release_interpolation(state["pos_embed"], grid_h, grid_w))
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for n in range(depth):
        def weights(name):
            return state[f"blocks.{n}.{name}.weight"], state[f"blocks.{n}.{name}.bias"]
        batch, tokens, _ = x.shape
        qkv = F.linear(F.layer_norm(x, (dim,), *weights("norm1"), eps=1e-6), *weights("attn.qkv"))
        q, k, v = qkv.reshape(batch, tokens, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attention @ v).transpose(1, 2).reshape(batch, tokens, dim), *weights("attn.proj"))
        hidden = F.gelu(F.linear(F.layer_norm(x, (dim,), *weights("norm2"), eps=1e-6), *weights("mlp.fc1")))
        x = x + F.linear(hidden, *weights("mlp.fc2"))
    return F.layer_norm(x[:, 0], (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
