"""The DeiT-layout Vision Transformer of DINO and DINOv2, with packed multi-crop forwards.

One class for both. Built as DINO's ViTs (the defaults), its parameter names and shapes are those of
the public DINO release and of timm's ``vit_small_patch8_224`` (``num_classes=0``), so their state
dicts load with ``strict=True``: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``.

DINOv2's options add LayerScale (``blocks.N.ls1.gamma``, ``blocks.N.ls2.gamma``), register tokens
(``register_tokens``, placed after CLS and given no position embedding), a ``mask_token`` for iBOT,
a SwiGLU FFN (``blocks.N.mlp.w12``, ``blocks.N.mlp.w3``, ViT-g) and the release's antialiased
position-table resizing: the layout of DINOv2's public backbone files (``block_chunks=0``).
Other layouts (timm's, ``block_chunks``) are converted on load by ``fastdino.models.checkpoints``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

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
FFN_LAYERS = ("mlp", "swiglu")


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


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12(x): DINOv2's ``SwiGLUFFNFused`` (ViT-g).

    Its hidden width is 2/3 of the MLP's it replaces, rounded up to a multiple of 8 (4096 for
    ViT-g's 1536 x 4), and w12 packs both input projections, x1 first: the release's layout and
    names (xformers' fused SwiGLU reads the same two halves), so its ViT-g state dicts load.
    """

    def __init__(self, dim: int, mlp_hidden_dim: int):
        super().__init__()
        hidden_dim = (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (CaiT; DINOv2 starts it at 1e-5)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + ffn(norm2(x)), with drop path.

    layerscale_init: None (DINO: no LayerScale, no ``ls1``/``ls2`` parameters) or gamma's initial
    value; each residual branch is then scaled by its gamma before drop path, as DINOv2's.
    ffn_layer: "mlp" (fc1 -> GELU -> fc2) or "swiglu" (``SwiGLUFFN``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                 layerscale_init: float | None = None, ffn_layer: str = "mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        if layerscale_init:
            self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if ffn_layer == "mlp" else SwiGLUFFN(dim, int(dim * mlp_ratio))
        if layerscale_init:
            self.ls2 = LayerScale(dim, layerscale_init)
        self.layerscale = bool(layerscale_init)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, backend: str,
                packing: PackedSequences | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D), or a packed (1, T, D) with its ``packing``."""
        attended = self.attn(self.norm1(x), backend, packing)
        if self.layerscale:
            attended = self.ls1(attended)
        x = x + drop_path(attended, self.drop_path_rate, self.training, packing)
        transformed = self.mlp(self.norm2(x))
        if self.layerscale:
            transformed = self.ls2(transformed)
        return x + drop_path(transformed, self.drop_path_rate, self.training, packing)

    def ffn_flops_per_token(self) -> int:
        """FLOPs of the FFN's two (MLP) or three (SwiGLU, w12 packs two) projections, per token."""
        if isinstance(self.mlp, SwiGLUFFN):
            return 2 * (self.mlp.w12.in_features * self.mlp.w12.out_features
                        + self.mlp.w3.in_features * self.mlp.w3.out_features)
        return 2 * 2 * self.mlp.fc1.in_features * self.mlp.fc1.out_features


class MultiCropFeatures(NamedTuple):
    """``VisionTransformer.forward_multicrop(..., return_patch_tokens=True)``'s result.

    cls_tokens: (sum_i B_i, D), the final-normed CLS token of every crop, crop-major.
    patch_tokens: (n_global * B, N, D), the final-normed patch tokens (registers left out) of the
        global crops (the crops ``masks`` covers, or every crop without masks), crop-major: row
        v * B + b is sample b of global crop v, its N patches in the row-major order of the
        (B, N) masks. Masked patches are the outputs at the mask token's positions.
    """

    cls_tokens: torch.Tensor
    patch_tokens: torch.Tensor


class VisionTransformer(nn.Module):
    """ViT backbone whose feature is the final-normed CLS token; DINO's and DINOv2's.

    Args:
        img_size: side of the square image the learned position embeddings are laid out for
            (224: a 28 x 28 grid at patch 8; DINOv2's public weights: 518, a 37 x 37 grid at
            patch 14). Other sizes, non-square too, interpolate them.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the architecture.
        drop_path_rate: stochastic depth, rising linearly from 0 in the first block to this rate
            in the last (the release's schedule), or the same in every block with
            ``drop_path_uniform``. A dropped branch is dropped per sample (per packed sequence);
            DINOv2's release instead runs rates above 0.1 on a random subset of the batch, which
            has the same expectation.
        attn_backend: "auto", "xformers", "sdpa" or "explicit" (see ``fastdino.models.attention``).
        activation_checkpointing: recompute each block's activations in the backward instead of
            keeping them (less memory, about one more forward of compute).
        interpolate_offset: the release adds 0.1 to the target grid when it derives the bicubic
            scale factor (dino issue #8); 0 interpolates to the exact output size instead (what
            DINOv2's register models use).

    DINOv2's options (keyword only; the defaults build DINO's ViT, whose state dict they leave
    unchanged):
        layerscale_init: None (or 0) for no LayerScale; else the initial value of the
            ``blocks.N.ls1.gamma`` / ``ls2.gamma`` that scale each residual branch (DINOv2: 1e-5).
        num_register_tokens: learned ``register_tokens`` (1, R, D) inserted after CLS, after the
            position embedding is added (they get none); the sequence is CLS, registers, patches.
        ffn_layer: "mlp" or "swiglu" (``SwiGLUFFN``, DINOv2's ViT-g).
        drop_path_uniform: every block at ``drop_path_rate`` (DINOv2's default).
        interpolate_antialias: antialiased bicubic resizing of the position table (DINOv2's
            register models); only matters when shrinking it.
        mask_token: a learned ``mask_token`` (1, D) that replaces the masked patch embeddings
            before the position embedding is added (iBOT); see ``prepare_tokens``.
        token_init_std: standard deviation of the CLS and register tokens' initial values (DINO:
            0.02, DINOv2: 1e-6).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, attn_backend: str = "auto",
                 activation_checkpointing: bool = False, interpolate_offset: float = 0.1, *,
                 layerscale_init: float | None = None, num_register_tokens: int = 0,
                 ffn_layer: str = "mlp", drop_path_uniform: bool = False,
                 interpolate_antialias: bool = False, mask_token: bool = False,
                 token_init_std: float = 0.02):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer={ffn_layer!r}: choose one of {FFN_LAYERS}")
        if isinstance(num_register_tokens, bool) or not isinstance(num_register_tokens, int) \
                or num_register_tokens < 0:
            raise ValueError(f"num_register_tokens={num_register_tokens!r}: expected an int >= 0")
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.attn_backend = attn_backend
        self.activation_checkpointing = activation_checkpointing
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.num_register_tokens = num_register_tokens
        self.token_init_std = token_init_std
        self.pos_embed_grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_embed_grid ** 2, embed_dim))
        # Absent parameters are registered as None: no state-dict entry, so DINO's layout stays.
        self.register_parameter("register_tokens", nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.register_parameter("mask_token", nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None)
        if drop_path_uniform:
            rates = [float(drop_path_rate)] * depth
        else:
            # torch.linspace, as the release: its float32 rates are the release's to the last bit.
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate, layerscale_init, ffn_layer)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # (grid_h, grid_w, offset, antialias) -> (stamp of pos_embed when computed, interpolated
        # table); see interpolated_pos_embed. Not a buffer: it is derived, never saved.
        self._pos_embed_cache: OrderedDict = OrderedDict()
        self.cache_pos_embed = True
        self._init_weights()

    def _init_weights(self):
        # The releases' init: truncated normal 0.02 for the position table and linear weights,
        # zero biases, unit LayerNorms, the tokens at token_init_std (DINOv2 draws them from a
        # plain normal: at std 1e-6 the truncation at +-2 never acts), a zero mask token and
        # LayerScale at its constant. The patch conv keeps PyTorch's default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=self.token_init_std)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=self.token_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- tokens --------------------------------------------------------------------------------

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in every sequence: CLS and the registers."""
        return 1 + self.num_register_tokens

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
        key = (grid_h, grid_w, self.interpolate_offset, self.interpolate_antialias)
        cached = self._pos_embed_cache.get(key)
        if cached is not None and cached[0][0] is stamp[0] and cached[0][1:] == stamp[1:]:
            self._pos_embed_cache.move_to_end(key)
            return cached[1]
        table = self._interpolate_pos_embed(grid_h, grid_w)
        self._pos_embed_cache[key] = (stamp, table)
        if len(self._pos_embed_cache) > POS_EMBED_CACHE_SIZE:
            self._pos_embed_cache.popitem(last=False)
        return table

    def _interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        native, dim, table = self.pos_embed_grid, self.embed_dim, self.pos_embed
        # Half-precision tables (FSDP's bf16 parameters) are resized in float32, as DINOv2 and timm
        # do; float32 and float64 ones in their own precision.
        compute_dtype = torch.float32 if table.dtype in (torch.float16, torch.bfloat16) else table.dtype
        patch_pos = table[:, 1:].to(compute_dtype).reshape(1, native, native, dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The release passes a scale factor, which also sets the sampling positions; the
            # offset keeps floor(native * scale) from landing one short of the grid.
            scale = ((grid_h + self.interpolate_offset) / native,
                     (grid_w + self.interpolate_offset) / native)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embeddings resized to {tuple(patch_pos.shape[-2:])}, "
                               f"expected ({grid_h}, {grid_w}); use interpolate_offset=0")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(table.dtype)
        return torch.cat((table[:, :1], patch_pos), dim=1)

    def _check_masks(self, masks: torch.Tensor, batch: int, num_patches: int, what: str) -> None:
        if self.mask_token is None:
            raise ValueError(f"{what}: this model has no mask token; build it with mask_token=True "
                             f"(the DINOv2 backbones of the registry have one)")
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool \
                or tuple(masks.shape) != (batch, num_patches):
            described = (f"a {masks.dtype} tensor of shape {tuple(masks.shape)}"
                         if isinstance(masks, torch.Tensor) else type(masks).__name__)
            raise ValueError(f"{what}: expected a bool tensor of shape ({batch}, {num_patches}) "
                             f"(images x patches, True = masked), got {described}")

    def prepare_tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + (H // p) * (W // p), D): CLS, R registers,
        patches.

        masks: None, or a bool (B, N) tensor over the row-major patch grid; True replaces that
        patch's embedding by ``mask_token`` before the position embedding is added (DINOv2's
        order), so a masked patch still knows where it is.
        """
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if grid_h == 0 or grid_w == 0:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than one "
                             f"{self.patch_size} x {self.patch_size} patch")
        patches = self.patch_embed(images)
        if masks is not None:
            self._check_masks(masks, patches.shape[0], patches.shape[1], "masks")
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype).unsqueeze(0), patches)
        tokens = torch.cat((self.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        tokens = tokens + self.interpolated_pos_embed(grid_h, grid_w)
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(tokens.shape[0], -1, -1),
                                tokens[:, 1:]), dim=1)
        return tokens

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

    def forward_features(self, images: torch.Tensor,
                         masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """DINOv2's ``forward_features``: images (B, C, H, W), optional (B, N) bool masks ->
        ``{"x_norm_clstoken": (B, D), "x_norm_regtokens": (B, R, D), "x_norm_patchtokens":
        (B, N, D), "x_prenorm": (B, 1 + R + N, D), "masks": masks}``, all final-normed but
        ``x_prenorm``."""
        tokens = self.prepare_tokens(images, masks)
        tokens = self._run_blocks(tokens, self.resolved_attn_backend(tokens))
        normed = self.norm(tokens)
        first_patch = self.num_prefix_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:first_patch],
                "x_norm_patchtokens": normed[:, first_patch:], "x_prenorm": tokens, "masks": masks}

    def _masks_per_crop(self, crops: Sequence[torch.Tensor],
                        masks: Sequence[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        if masks is None:
            return [None] * len(crops)
        if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
            described = (f"a tensor of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor)
                         else type(masks).__name__)
            raise ValueError(f"masks: expected a list with one (B, N) bool tensor (or None) per "
                             f"global crop, got {described}")
        if not 1 <= len(masks) <= len(crops):
            raise ValueError(f"masks: got {len(masks)} masks for {len(crops)} crops; give one per "
                             f"global crop (the first crops), at least one")
        for index, (crop, crop_masks) in enumerate(zip(crops, masks)):
            if crop_masks is not None:
                grid = (crop.shape[-2] // self.patch_size) * (crop.shape[-1] // self.patch_size)
                self._check_masks(crop_masks, crop.shape[0], grid, f"masks[{index}]")
        return list(masks) + [None] * (len(crops) - len(masks))

    def forward_multicrop(self, crops: Sequence[torch.Tensor], packed: bool | None = None,
                          masks: Sequence[torch.Tensor | None] | None = None,
                          return_patch_tokens: bool = False) -> torch.Tensor | MultiCropFeatures:
        """CLS features of every crop, crop-major: (sum_i B_i, D) for crops [(B_i, C, H_i, W_i)].

        Rows 0..B_0-1 are crop 0 of each sample, the next B_1 rows crop 1, and so on: the order
        of ``torch.cat`` over the crops, which ``fastdino.ops.DINOLoss`` expects.

        packed=True runs all crops in ONE forward: their token sequences (CLS, registers,
        patches) are concatenated and attention is confined to each sequence (xformers'
        block-diagonal mask; other backends attend each resolution group in turn). packed=False
        runs one forward per run of consecutive crops of the same size, concatenated along the
        batch (the release's way). None packs when the attention backend resolves to "xformers".
        Both give the same features.

        masks (iBOT's student): None, or a list with one entry per global crop, the global crops
        being the first ``len(masks)`` crops: a (B, N) bool tensor over that crop's row-major
        patch grid (True: the patch embedding is replaced by ``mask_token``), or None for a crop
        left unmasked. Needs a model built with ``mask_token=True``.
        return_patch_tokens: False returns the CLS features tensor above. True returns
        ``MultiCropFeatures(cls_tokens, patch_tokens)`` with the final-normed patch tokens
        (n_global * B, N, D) of the global crops, crop-major: the crops ``masks`` covers, or
        every crop when masks is None (the teacher, which gets only the global crops). The global
        crops must share one size.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("forward_multicrop needs at least one crop")
        crop_masks = self._masks_per_crop(crops, masks)
        tokens = []
        for run in same_size_runs(crops):
            images = torch.cat([crops[i] for i in run]) if len(run) > 1 else crops[run[0]]
            run_masks = None
            if any(crop_masks[i] is not None for i in run):  # unmasked crops of the run: all False
                grid = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
                run_masks = torch.cat([crop_masks[i] if crop_masks[i] is not None else
                                       torch.zeros(crops[i].shape[0], grid, dtype=torch.bool, device=images.device)
                                       for i in run])
            tokens.append(self.prepare_tokens(images, run_masks))
        backend = self.resolved_attn_backend(tokens[0])
        if packed is None:
            packed = backend == "xformers"
        if not packed or len(tokens) == 1:
            outputs = [self._run_blocks(group, backend) for group in tokens]
            cls_tokens = torch.cat([self.norm(group[:, 0]) for group in outputs])
        else:
            packed_tokens, packing = PackedSequences.pack(tokens)
            packed_tokens = self._run_blocks(packed_tokens, backend, packing)
            cls_tokens = self.norm(packing.first_tokens(packed_tokens))
            outputs = packing.unpack(packed_tokens)
        if not return_patch_tokens:
            return cls_tokens
        n_global = len(crops) if masks is None else len(masks)
        if any(crop.shape[1:] != crops[0].shape[1:] for crop in crops[1:n_global]):
            raise ValueError(f"return_patch_tokens: the {n_global} global crops must share one size, got "
                             f"{[tuple(crop.shape[-2:]) for crop in crops[:n_global]]}")
        # The global crops are the first rows of the crop-major outputs, in one or more groups.
        remaining, pieces = sum(crop.shape[0] for crop in crops[:n_global]), []
        for group in outputs:
            if remaining == 0:
                break
            pieces.append(group[:remaining, self.num_prefix_tokens:])
            remaining -= pieces[-1].shape[0]
        return MultiCropFeatures(cls_tokens, self.norm(torch.cat(pieces) if len(pieces) > 1 else pieces[0]))

    def get_last_selfattention(self, images: torch.Tensor) -> torch.Tensor:
        """Attention of the last block, for visualization: (B, num_heads, T, T), T = 1 + R + N.

        Row 0 is the CLS token's attention over [CLS, registers, patches]. The blocks before run
        on the configured backend; the last block's attention is computed explicitly.
        """
        tokens = self.prepare_tokens(images)
        tokens = self._run_blocks(tokens, self.resolved_attn_backend(tokens), blocks=self.blocks[:-1])
        last = self.blocks[-1]
        return last.attn.attention_probabilities(last.norm1(tokens))

    def get_intermediate_layers(self, images: torch.Tensor, n: int | Sequence[int] = 1,
                                reshape: bool = False, return_class_token: bool = False,
                                norm: bool = True) -> list[torch.Tensor] | tuple:
        """Tokens after each of the last ``n`` blocks, or after the blocks whose (0-based) indices
        ``n`` lists, in block order; final-normed unless norm=False.

        Plain (reshape and return_class_token False): DINO's layout, a list of whole sequences
        (B, 1 + R + N, D), CLS first, then the R registers, then the patches (the release's
        linear evaluation concatenates their CLS tokens). DINOv2's release returns only the
        patches here: take ``[:, model.num_prefix_tokens:]``.
        reshape or return_class_token: DINOv2's (and timm's) layout, a tuple of the patch tokens
        alone, (B, N, D), or (B, D, H // p, W // p) with reshape; with return_class_token, a tuple
        of (patch tokens, CLS token (B, D)) pairs.
        """
        depth = len(self.blocks)
        if isinstance(n, int) and not isinstance(n, bool):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n}: the model has {depth} blocks; ask for 1 to {depth} last "
                                 f"blocks or a list of block indices")
            wanted = list(range(depth - n, depth))
        else:
            wanted = sorted(n)
            if not wanted or len(set(wanted)) != len(wanted) or not all(
                    isinstance(i, int) and 0 <= i < depth for i in wanted):
                raise ValueError(f"n={n!r}: expected distinct block indices in [0, {depth - 1}]")
        tokens = self.prepare_tokens(images)
        backend = self.resolved_attn_backend(tokens)
        outputs = []
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):
            tokens = self._run_blocks(tokens, backend, blocks=[block])
            if index in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        if not (reshape or return_class_token):
            return outputs
        patch_tokens = [out[:, self.num_prefix_tokens:] for out in outputs]
        if reshape:
            batch, _, height, width = images.shape
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            patch_tokens = [out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                            for out in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, [out[:, 0] for out in outputs]))
        return tuple(patch_tokens)

    # -- cost ----------------------------------------------------------------------------------

    def forward_flops(self, height: int, width: int) -> int:
        """FLOPs (2 per multiply-add) of the forward pass over one (height x width) image.

        Counts the matrix products (patch convolution, qkv, Q K^T, attention x V, output
        projection, MLP or SwiGLU); normalizations, softmax, GELU, LayerScale and additions are a
        few percent and are left out, as in the usual MFU accounting. Training (forward +
        backward) is 3x this.
        """
        grid = (height // self.patch_size) * (width // self.patch_size)
        tokens, dim = self.num_prefix_tokens + grid, self.embed_dim
        patch_embed = 2 * grid * dim * self.patch_embed.proj.in_channels * self.patch_size ** 2
        per_block = 0
        for block in self.blocks:
            per_block += 2 * tokens * dim * (3 * dim + dim)  # qkv, proj
            per_block += tokens * block.ffn_flops_per_token()
            per_block += 2 * 2 * tokens * tokens * dim  # Q K^T and attention x V, all heads
        return patch_embed + per_block


def same_size_runs(crops: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of each run of consecutive crops of the same (C, H, W): [[0, 1], [2, 3, 4], ...]."""
    runs: list[list[int]] = []
    for index, crop in enumerate(crops):
        if runs and crops[runs[-1][-1]].shape[1:] == crop.shape[1:]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def batch_same_size_crops(crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate each run of consecutive same-size crops along the batch, keeping the order.

    [(B, C, 224, 224)] * 2 + [(B, C, 96, 96)] * 10 -> [(2B, C, 224, 224), (10B, C, 96, 96)]:
    the release's one-forward-per-resolution batching.
    """
    return [torch.cat([crops[i] for i in run]) if len(run) > 1 else crops[run[0]]
            for run in same_size_runs(crops)]


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


def vit_giant(patch_size: int = 14, **kwargs) -> VisionTransformer:
    """ViT-giant of DINOv2 (its ``vit_giant2``): dim 1536, depth 40, 24 heads of 64, SwiGLU FFN
    of hidden width 4096 (1.14G parameters with a 37 x 37 position table)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=1536, depth=40, num_heads=24,
                             **{"ffn_layer": "swiglu", **kwargs})
