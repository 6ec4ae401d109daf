"""The DeiT-layout Vision Transformer of DINO, with packed multi-crop forwards.

Parameter names and shapes are those of the public DINO release and of timm's
``vit_small_patch8_224`` (``num_classes=0``), so their state dicts load with ``strict=True``:
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    PackedSequences,
    attention_compute_dtype,
    attention_probabilities,
    multi_head_attention,
    resolve_attention_backend,
)

LAYER_NORM_EPS = 1e-6
# Interpolated position tables kept per model, least recently used dropped first: training sees
# two or three crop sizes; evaluation at many sizes stays bounded.
POS_EMBED_CACHE_SIZE = 16


def drop_path(x: torch.Tensor, rate: float, training: bool,
              packing: PackedSequences | None = None) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for whole samples, scale the rest by 1/(1-rate).

    x: (B, N, C), one sample per row, or a packed (1, T, C) with its ``packing``, where each
    packed sequence (sample) is dropped or kept as a whole. Identity when not training.
    """
    if rate == 0.0 or not training:
        return x
    keep_prob = 1.0 - rate
    num_samples = x.shape[0] if packing is None else packing.num_sequences
    # floor(keep_prob + U[0, 1)) is 1 with probability keep_prob, as in the release and timm.
    keep = (keep_prob + torch.rand(num_samples, device=x.device, dtype=x.dtype)).floor_()
    if packing is None:
        keep = keep.view(-1, *(1,) * (x.dim() - 1))
    else:
        keep = packing.spread_over_tokens(keep)
    return x.div(keep_prob) * keep


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, (H // p) * (W // p), D), row-major over the grid."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: qkv projection (with bias), attention, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, tokens, dim = x.shape
        # (B, N, 3, H, d): the release's and timm's qkv layout, so their weights mean the same.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        return qkv.unbind(2)  # each (B, N, H, d), the layout xformers takes without a copy

    def forward(self, x: torch.Tensor, backend: str,
                packing: PackedSequences | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); a packed (1, T, D) with ``packing``. ``backend`` is resolved."""
        out = multi_head_attention(*self._query_key_value(x), backend, packing)
        return self.proj(out.reshape(x.shape))

    def attention_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) for (B, N, D) tokens: (B, H, N, N)."""
        query, key, _ = self._query_key_value(x)
        return attention_probabilities(query.transpose(1, 2), key.transpose(1, 2))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, hidden width ``mlp_ratio`` x dim."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, backend: str,
                packing: PackedSequences | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D), or a packed (1, T, D) with its ``packing``."""
        x = x + drop_path(self.attn(self.norm1(x), backend, packing), self.drop_path_rate,
                          self.training, packing)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training, packing)


class VisionTransformer(nn.Module):
    """ViT backbone whose feature is the final-normed CLS token.

    Args:
        img_size: side of the square image the learned position embeddings are laid out for
            (224: a 28 x 28 grid at patch 8). Other sizes, non-square too, interpolate them.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the architecture.
        drop_path_rate: stochastic depth, rising linearly from 0 in the first block to this rate
            in the last (the release's schedule).
        attn_backend: "auto", "xformers", "sdpa" or "explicit" (see ``fastdino.models.attention``).
        activation_checkpointing: recompute each block's activations in the backward instead of
            keeping them (less memory, about one more forward of compute).
        interpolate_offset: the release adds 0.1 to the target grid when it derives the bicubic
            scale factor (dino issue #8); 0 interpolates to the exact output size instead.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, attn_backend: str = "auto",
                 activation_checkpointing: bool = False, interpolate_offset: float = 0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.attn_backend = attn_backend
        self.activation_checkpointing = activation_checkpointing
        self.interpolate_offset = interpolate_offset
        self.pos_embed_grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_embed_grid ** 2, embed_dim))
        # torch.linspace, as the release: its float32 rates are the release's to the last bit.
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # (grid_h, grid_w) -> (stamp of pos_embed when computed, interpolated table); see
        # interpolated_pos_embed. Not a buffer: it is derived, never saved.
        self._pos_embed_cache: OrderedDict = OrderedDict()
        self.cache_pos_embed = True
        self._init_weights()

    def _init_weights(self):
        # The release's init: truncated normal 0.02 for the embeddings and linear weights, zero
        # biases, unit LayerNorms. The patch conv keeps PyTorch's default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- tokens --------------------------------------------------------------------------------

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a (grid_h x grid_w) patch grid: (1, 1 + grid_h * grid_w, D).

        The patch part of ``pos_embed`` is resized bicubically, as the release does; the CLS
        entry is kept. Without autograd recording through ``pos_embed`` (teacher, evaluation,
        inference) the result is cached per grid size and recomputed only after ``pos_embed``
        changes (``load_state_dict``, a move to another device or dtype, any in-place torch op:
        an unfused optimizer, ``fastdino.ops.ema_update_``). torch's fused optimizers write
        without bumping the version counter this relies on; ``fastdino.train.build_optimizer``'s
        bump it after every step, and others need ``torch.autograd.graph.increment_version``.
        When gradients must reach ``pos_embed`` it is recomputed on every call, so each forward
        has its own graph (a cached one would already be freed by the previous backward).
        ``cache_pos_embed = False`` recomputes it always: FSDP2 refills its gathered parameters in
        place and keeps their version counters, which the cache's stamp cannot see
        (``fastdino.train.sharding`` turns the cache off).
        """
        native = self.pos_embed_grid
        if (grid_h, grid_w) == (native, native):
            return self.pos_embed
        recording = torch.is_grad_enabled() and self.pos_embed.requires_grad
        if recording or not self.cache_pos_embed:
            return self._interpolate_pos_embed(grid_h, grid_w)
        # The parameter object, its storage and its in-place version counter identify its values.
        stamp = (self.pos_embed, self.pos_embed.data_ptr(), self.pos_embed._version)
        cached = self._pos_embed_cache.get((grid_h, grid_w))
        if cached is not None and cached[0][0] is stamp[0] and cached[0][1:] == stamp[1:]:
            self._pos_embed_cache.move_to_end((grid_h, grid_w))
            return cached[1]
        table = self._interpolate_pos_embed(grid_h, grid_w)
        self._pos_embed_cache[(grid_h, grid_w)] = (stamp, table)
        if len(self._pos_embed_cache) > POS_EMBED_CACHE_SIZE:
            self._pos_embed_cache.popitem(last=False)
        return table

    def _interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        native, dim = self.pos_embed_grid, self.embed_dim
        patch_pos = self.pos_embed[:, 1:].reshape(1, native, native, dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The release passes a scale factor, which also sets the sampling positions; the
            # offset keeps floor(native * scale) from landing one short of the grid.
            scale = ((grid_h + self.interpolate_offset) / native,
                     (grid_w + self.interpolate_offset) / native)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic")
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embeddings resized to {tuple(patch_pos.shape[-2:])}, "
                               f"expected ({grid_h}, {grid_w}); use interpolate_offset=0")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + (H // p) * (W // p), D): CLS, then patches."""
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if grid_h == 0 or grid_w == 0:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than one "
                             f"{self.patch_size} x {self.patch_size} patch")
        patches = self.patch_embed(images)
        tokens = torch.cat((self.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        return tokens + self.interpolated_pos_embed(grid_h, grid_w)

    # -- blocks --------------------------------------------------------------------------------

    def resolved_attn_backend(self, reference: torch.Tensor) -> str:
        """The attention backend a forward on ``reference``'s device (and autocast) would use."""
        dtype = attention_compute_dtype(reference.device, reference.dtype)
        return resolve_attention_backend(self.attn_backend, reference.device, dtype)

    def _run_blocks(self, x: torch.Tensor, backend: str, packing: PackedSequences | None = None,
                    blocks: Sequence[Block] | None = None) -> torch.Tensor:
        for block in self.blocks if blocks is None else blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, backend, packing, use_reentrant=False)
            else:
                x = block(x, backend, packing)
        return x

    # -- features ------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> CLS features (B, D)."""
        tokens = self.prepare_tokens(images)
        tokens = self._run_blocks(tokens, self.resolved_attn_backend(tokens))
        # LayerNorm acts per token: normalizing only the CLS token gives the same feature.
        return self.norm(tokens[:, 0])

    def forward_multicrop(self, crops: Sequence[torch.Tensor],
                          packed: bool | None = None) -> torch.Tensor:
        """CLS features of every crop, crop-major: (sum_i B_i, D) for crops [(B_i, C, H_i, W_i)].

        Rows 0..B_0-1 are crop 0 of each sample, the next B_1 rows crop 1, and so on: the order
        of ``torch.cat`` over the crops, which ``fastdino.ops.DINOLoss`` expects.

        packed=True runs all crops in ONE forward: their token sequences are concatenated and
        attention is confined to each sequence (xformers' block-diagonal mask; other backends
        attend each resolution group in turn). packed=False runs one forward per run of
        consecutive crops of the same size, concatenated along the batch (the release's way).
        None packs when the attention backend resolves to "xformers". Both give the same features.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("forward_multicrop needs at least one crop")
        tokens = [self.prepare_tokens(group) for group in batch_same_size_crops(crops)]
        backend = self.resolved_attn_backend(tokens[0])
        if packed is None:
            packed = backend == "xformers"
        if not packed or len(tokens) == 1:
            return torch.cat([self.norm(self._run_blocks(group, backend)[:, 0]) for group in tokens])
        packed_tokens, packing = PackedSequences.pack(tokens)
        packed_tokens = self._run_blocks(packed_tokens, backend, packing)
        return self.norm(packing.first_tokens(packed_tokens))

    def get_last_selfattention(self, images: torch.Tensor) -> torch.Tensor:
        """Attention of the last block, for visualization: (B, num_heads, 1 + N, 1 + N).

        Row 0 is the CLS token's attention over [CLS, patches]. The blocks before run on the
        configured backend; the last block's attention is computed explicitly.
        """
        tokens = self.prepare_tokens(images)
        tokens = self._run_blocks(tokens, self.resolved_attn_backend(tokens), blocks=self.blocks[:-1])
        last = self.blocks[-1]
        return last.attn.attention_probabilities(last.norm1(tokens))

    def get_intermediate_layers(self, images: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed tokens (B, 1 + N, D) of each of the last ``n`` blocks (the release's linear
        evaluation concatenates their CLS tokens)."""
        tokens = self.prepare_tokens(images)
        backend = self.resolved_attn_backend(tokens)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = self._run_blocks(tokens, backend, blocks=[block])
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        return outputs

    # -- cost ----------------------------------------------------------------------------------

    def forward_flops(self, height: int, width: int) -> int:
        """FLOPs (2 per multiply-add) of the forward pass over one (height x width) image.

        Counts the matrix products (patch convolution, qkv, Q K^T, attention x V, output
        projection, MLP); normalizations, softmax, GELU and additions are a few percent and are
        left out, as in the usual MFU accounting. Training (forward + backward) is 3x this.
        """
        grid = (height // self.patch_size) * (width // self.patch_size)
        tokens, dim = 1 + grid, self.embed_dim
        patch_embed = 2 * grid * dim * self.patch_embed.proj.in_channels * self.patch_size ** 2
        per_block = 0
        for block in self.blocks:
            hidden = block.mlp.fc1.out_features
            per_block += 2 * tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
            per_block += 2 * 2 * tokens * tokens * dim  # Q K^T and attention x V, all heads
        return patch_embed + per_block


def batch_same_size_crops(crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate each run of consecutive same-size crops along the batch, keeping the order.

    [(B, C, 224, 224)] * 2 + [(B, C, 96, 96)] * 10 -> [(2B, C, 224, 224), (10B, C, 96, 96)]:
    the release's one-forward-per-resolution batching.
    """
    runs: list[list[torch.Tensor]] = []
    for crop in crops:
        if runs and runs[-1][-1].shape[1:] == crop.shape[1:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return [torch.cat(run) if len(run) > 1 else run[0] for run in runs]


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Tiny: dim 192, depth 12, 3 heads (5.5M parameters)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Small: dim 384, depth 12, 6 heads (21.7M parameters)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Base: dim 768, depth 12, 12 heads (85.8M parameters)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Large: dim 1024, depth 24, 16 heads (303.3M parameters)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16, **kwargs)
