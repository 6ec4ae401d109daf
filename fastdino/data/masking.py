"""The iBOT block-wise masks of DINOv2's global crops, drawn from (seed, epoch, shard, step).

    from fastdino.data.masking import IBOTMaskRecipe, sample_ibot_masks

    recipe = IBOTMaskRecipe(grid_size=global_crop_size // patch_size)   # DINOv2's defaults
    masks = sample_ibot_masks(recipe, batch_size, seed, epoch, shard_id, step).to("cuda")
    # masks.masks (2B, N) bool, masks.mask_indices (M,), masks.masks_weight (M,),
    # masks.n_masked_patches == M (a Python int), masks.upperbound

Like the crop draws (``recipe.py``), a batch's masks are a pure function of (seed, epoch, shard,
step), so a resumed run gets the masks the uninterrupted run would have got. They come from
their own generator (``mask_batch_generator``), not from the crops' ``batch_generator``: turning
masking on or changing its settings leaves every crop as it was.

Everything derived from the masks (the flat indices of the masked patches, their weights, their
count) is computed here, on the host, once per batch. On the device, ``nonzero`` and boolean
indexing must learn the size of their output before they can allocate it: each one waits for
the GPU to catch up (a host synchronization, a stall of the training loop). Computed here, they
reach the device as plain tensors in one copy (``IBOTMasks.to``) and the device code needs no
data-dependent shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

BLOCK_ATTEMPTS = 10  # tries of the release's ``_mask`` for one block before it gives up
# Appended to (seed, epoch, shard, step): the masks' stream, independent of the crops'.
# Non-zero: numpy's SeedSequence pads short entropy with zeros, so a 0 could alias another key.
MASK_STREAM = 0x6D61736B  # "mask"
_UNIFORMS_PER_REFILL = 256


def mask_batch_generator(seed: int, epoch: int, shard_id: int, step: int) -> np.random.Generator:
    """The generator of one batch's masks; ``recipe.batch_generator`` (the crops') is another."""
    return np.random.default_rng([seed, epoch, shard_id, step, MASK_STREAM])


class _Uniforms:
    """Uniform [0, 1) doubles of a numpy generator, one per call, fetched a few hundred at a time.

    The values are the generator's own sequence (``Generator.random(n)`` yields the doubles of n
    calls of ``Generator.random()``); fetching them in bulk only advances the generator further.
    A numpy call per value would cost about a microsecond each, most of the masks' time."""

    def __init__(self, generator: np.random.Generator):
        self.generator = generator
        self.values: list[float] = []
        self.position = 0

    def __call__(self) -> float:
        if self.position == len(self.values):
            self.values, self.position = self.generator.random(_UNIFORMS_PER_REFILL).tolist(), 0
        self.position += 1
        return self.values[self.position - 1]


def _grid_pair(grid_size, name: str) -> tuple[int, int]:
    pair = (grid_size, grid_size) if isinstance(grid_size, (int, np.integer)) else tuple(grid_size)
    if len(pair) != 2 or any(not isinstance(side, (int, np.integer)) for side in pair):
        raise ValueError(f"{name}={grid_size!r}: expected an int or a pair of ints (patch rows, patch columns)")
    return int(pair[0]), int(pair[1])


class BlockMaskGenerator:
    """DINOv2's (and BEiT's) block-wise mask of a (height, width) patch grid, driven by a numpy
    generator (``dinov2/data/masking.py``, ``MaskingGenerator``; same parameters and defaults).

    Called as ``block_masks(count, generator)``, an instance masks ``count`` patches, block after block, where one block is
    found in up to 10 attempts, each of them:

    1. an area uniform in [min_num_patches, min(remaining, max_num_patches)] (remaining: patches
       still to mask; below min_num_patches the range is reversed, as ``random.uniform`` allows)
       and an aspect ratio h / w log-uniform in [min_aspect, max_aspect];
    2. h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) (Python's round, half to
       even); the block must be strictly smaller than the grid on both sides (h < height,
       w < width: no block is as tall or as wide as the grid);
    3. a position uniform over the placements inside the grid;
    4. the block is taken if it masks at least one new patch and at most ``remaining`` new ones
       (overlap with earlier blocks counts once); else the next attempt.

    The mask never exceeds ``count`` patches (a hard bound). When 10 attempts in a row fail the
    release stops there, short of ``count``: mostly near the end, when the few remaining patches
    are hard to hit with a block. On the 16 x 16 grid with DINOv2's settings and counts up to half
    the grid, about 7.5% of the masks come out 1 patch short, 0.2% 2 short, 2e-4 3 to 7 short
    (measured on 2e5 masks, the release's code and this one alike); above half the grid the
    shortfalls grow (tens of patches near a full grid). ``complete_randomly=True`` then masks the
    missing ones uniformly among the unmasked patches, as DINOv3's ``complete_mask_randomly``
    does, so the count is exact.

    Differences from the release, none in the distribution of the masks:
    - draws come from the given numpy generator, not Python's global ``random`` (deterministic
      given the generator's state; the generator advances by whole chunks of 256 doubles);
      ``random.randint(0, n)`` becomes floor(u * (n + 1)) of a uniform u;
    - ``num_masking_patches`` is not a constructor argument (the release only uses it as the
      default of ``max_num_patches`` and in its repr); ``max_num_patches=None`` is no cap;
    - the mask is kept as one integer bitset per patch row: 46 us a mask against the release's
      320 us (16 x 16 grid, counts 0 to 256; the training's data thread holds the GIL for it);
    - ``complete_randomly`` (off by default) is DINOv3's addition.
    """

    def __init__(self, input_size: int | tuple[int, int], min_num_patches: int = 4,
                 max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None, complete_randomly: bool = False):
        self.height, self.width = _grid_pair(input_size, "BlockMaskGenerator.input_size")
        if not isinstance(min_num_patches, (int, np.integer)) or min_num_patches < 1:
            raise ValueError(f"BlockMaskGenerator.min_num_patches={min_num_patches!r}: must be an int >= 1")
        if self.height < 2 or self.width < 2 or (self.height - 1) * (self.width - 1) < min_num_patches:
            raise ValueError(
                f"BlockMaskGenerator.input_size={(self.height, self.width)}: grid too small; a block must be "
                f"strictly smaller than the grid on both sides, so the largest is "
                f"{max(self.height - 1, 0)} x {max(self.width - 1, 0)}, which cannot hold "
                f"min_num_patches={min_num_patches}")
        self.num_patches = self.height * self.width
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        if not self.min_num_patches <= self.max_num_patches:
            raise ValueError(f"BlockMaskGenerator.max_num_patches={max_num_patches!r}: must be >= "
                             f"min_num_patches={min_num_patches}")
        max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"BlockMaskGenerator aspect range (min_aspect={min_aspect!r}, "
                             f"max_aspect={max_aspect!r}): need 0 < min_aspect <= max_aspect")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_ratio = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.complete_randomly = bool(complete_randomly)

    def __repr__(self):
        return (f"BlockMaskGenerator(input_size=({self.height}, {self.width}), min_num_patches="
                f"{self.min_num_patches}, max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect:.4g}, "
                f"max_aspect={self.max_aspect:.4g}, complete_randomly={self.complete_randomly})")

    def __call__(self, num_masking_patches: int, generator: np.random.Generator) -> np.ndarray:
        """A (height, width) bool mask of at most (with ``complete_randomly``: exactly)
        ``num_masking_patches`` patches."""
        self._check_count(num_masking_patches)
        rows = self._row_bitsets(int(num_masking_patches), _Uniforms(generator))
        return _bitsets_to_masks([rows], self.width).reshape(self.height, self.width)

    def _check_count(self, num_masking_patches):
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches!r}: must be in [0, "
                             f"{self.num_patches}], the patches of the {self.height} x {self.width} grid")

    def _row_bitsets(self, num_masking_patches: int, uniform) -> list[int]:
        """The mask as one int per patch row, bit j set when column j is masked."""
        rows = [0] * self.height
        count = 0
        while count < num_masking_patches:
            added = self._add_block(rows, min(num_masking_patches - count, self.max_num_patches), uniform)
            if added == 0:
                break
            count += added
        if self.complete_randomly and count < num_masking_patches:
            self._complete(rows, num_masking_patches - count, uniform)
        return rows

    def _add_block(self, rows: list[int], max_mask_patches, uniform) -> int:
        """The release's ``_mask``: one block in up to BLOCK_ATTEMPTS tries; the patches it added."""
        low_area = self.min_num_patches
        log_low, log_high = self.log_aspect_ratio
        for _ in range(BLOCK_ATTEMPTS):
            target_area = low_area + (max_mask_patches - low_area) * uniform()
            aspect_ratio = math.exp(log_low + (log_high - log_low) * uniform())
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(uniform() * (self.height - h + 1))
                left = int(uniform() * (self.width - w + 1))
                block = ((1 << w) - 1) << left
                new = h * w - sum((rows[row] & block).bit_count() for row in range(top, top + h))
                if 0 < new <= max_mask_patches:
                    for row in range(top, top + h):
                        rows[row] |= block
                    return new
        return 0

    def _complete(self, rows: list[int], missing: int, uniform):
        """Masks ``missing`` more patches, a uniform choice without replacement among the unmasked
        ones (a partial Fisher-Yates shuffle)."""
        free = [row * self.width + column for row in range(self.height) for column in range(self.width)
                if not rows[row] >> column & 1]
        for chosen in range(missing):
            other = chosen + int(uniform() * (len(free) - chosen))
            free[chosen], free[other] = free[other], free[chosen]
            row, column = divmod(free[chosen], self.width)
            rows[row] |= 1 << column


def _bitsets_to_masks(masks_rows: list[list[int]], width: int) -> np.ndarray:
    """(n_masks, height * width) bool from each mask's row bitsets (one unpack for them all)."""
    row_bytes = (width + 7) // 8
    packed = b"".join(row.to_bytes(row_bytes, "little") for rows in masks_rows for row in rows)
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8).reshape(-1, row_bytes), axis=1,
                         bitorder="little")[:, :width]
    return bits.astype(bool).reshape(len(masks_rows), -1)


@dataclass(frozen=True)
class IBOTMaskRecipe:
    """Which global crops are masked and how much; the defaults are DINOv2's
    (``ibot.mask_sample_probability`` 0.5, ``ibot.mask_ratio_min_max`` (0.1, 0.5),
    ``MaskingGenerator(max_num_patches=0.5 * grid patches)``).

    grid_size: the global crops' patch grid, global_crop_size // patch_size (16 for 224 px at
        patch 14).
    max_num_patches: the largest block; None is half the grid, as the release. (The release
        writes ``0.5 * img_size // patch_size * img_size // patch_size``, which Python groups as
        ((0.5 * S) // p * S) // p: half the grid at 224 / 14, a little less at other sizes, e.g.
        666 instead of 684.5 at 518 / 14.)
    """

    grid_size: int | tuple[int, int] = 16
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    n_global_crops: int = 2
    min_num_patches: int = 4
    max_num_patches: float | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    complete_randomly: bool = False

    def __post_init__(self):
        object.__setattr__(self, "grid_size", _grid_pair(self.grid_size, "IBOTMaskRecipe.grid_size"))
        if not 0 <= self.mask_sample_probability <= 1:
            raise ValueError(f"IBOTMaskRecipe.mask_sample_probability={self.mask_sample_probability!r}: "
                             f"a probability is in [0, 1]")
        ratios = tuple(self.mask_ratio_min_max)
        if len(ratios) != 2 or not all(0 <= ratio <= 1 for ratio in ratios):
            raise ValueError(f"IBOTMaskRecipe.mask_ratio_min_max={self.mask_ratio_min_max!r}: expected "
                             f"(min, max) fractions of the patch grid, each in [0, 1]")
        if ratios[0] > ratios[1]:
            raise ValueError(f"IBOTMaskRecipe.mask_ratio_min_max={self.mask_ratio_min_max!r}: min > max")
        object.__setattr__(self, "mask_ratio_min_max", ratios)
        if not isinstance(self.n_global_crops, (int, np.integer)) or self.n_global_crops < 1:
            raise ValueError(f"IBOTMaskRecipe.n_global_crops={self.n_global_crops!r}: must be an int >= 1")
        try:
            self.block_generator()  # its checks: grid size, block sizes, aspect ratios
        except ValueError as error:
            raise ValueError(f"IBOTMaskRecipe: {error}") from None

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def block_generator(self) -> BlockMaskGenerator:
        max_num_patches = 0.5 * self.num_patches if self.max_num_patches is None else self.max_num_patches
        return BlockMaskGenerator(self.grid_size, self.min_num_patches, max_num_patches, self.min_aspect,
                                  self.max_aspect, self.complete_randomly)


@dataclass(frozen=True, eq=False)
class IBOTMasks:
    """One batch's masks of its global crops and what the iBOT loss needs from them.

    Rows are crop-major like fastdino's crops (``torch.cat`` of the global crops): row i * B + b
    is global crop i of sample b. The three tensors are views of one byte buffer (``storage``),
    so ``to`` moves them in one copy.
    """

    masks: torch.Tensor  # (n_global_crops * B, grid_h * grid_w) bool
    mask_indices: torch.Tensor  # (M,) int64: the positions of ``masks.flatten()`` that are set, in order
    masks_weight: torch.Tensor  # (M,) float32: 1 / (masked patches of that patch's crop)
    n_masked_patches: int  # M, known on the host: no .item() on the device
    upperbound: int  # the release's bound on M for this batch shape: sum of int(N * ratio max) per masked crop
    grid_size: tuple[int, int]
    storage: torch.Tensor = field(repr=False)  # uint8: indices, then weights, then masks

    @classmethod
    def from_masks(cls, masks: np.ndarray, grid_size: tuple[int, int], upperbound: int,
                   pin_memory: bool = False) -> IBOTMasks:
        """From (crops, patches) bool masks: indices and weights as DINOv2's collate computes
        them, the weights as float32 1 / count (correctly rounded, as torch's division)."""
        masks = np.ascontiguousarray(masks, dtype=bool)
        counts = masks.sum(axis=1)
        indices = np.flatnonzero(masks)
        n_masked = len(indices)
        storage_tensor = torch.empty(12 * n_masked + masks.size, dtype=torch.uint8, pin_memory=pin_memory)
        storage = storage_tensor.numpy()  # written in place: no second copy into pinned memory
        storage[: 8 * n_masked].view(np.int64)[:] = indices
        # flatnonzero runs row by row: each crop's weight repeated for its masked patches
        per_crop = np.float32(1) / np.maximum(counts, 1).astype(np.float32)
        storage[8 * n_masked : 12 * n_masked].view(np.float32)[:] = np.repeat(per_crop, counts)
        storage[12 * n_masked :].view(bool)[:] = masks.reshape(-1)
        return cls._views(storage_tensor, masks.shape, n_masked, upperbound, grid_size)

    @classmethod
    def _views(cls, storage, shape, n_masked, upperbound, grid_size) -> IBOTMasks:
        return cls(masks=storage[12 * n_masked :].view(torch.bool).view(shape),
                   mask_indices=storage[: 8 * n_masked].view(torch.int64),
                   masks_weight=storage[8 * n_masked : 12 * n_masked].view(torch.float32),
                   n_masked_patches=n_masked, upperbound=upperbound, grid_size=grid_size, storage=storage)

    def to(self, device, non_blocking: bool = True) -> IBOTMasks:
        """All of it on ``device`` in one copy, on the current stream. From pinned memory (see
        ``sample_ibot_masks``' ``pin_memory``) a non-blocking copy returns at once and nothing
        later waits for it on the host; torch's pinned-memory allocator keeps the host buffer
        until the copy is done. A copy made on a side stream needs ``record_stream`` and a wait
        of the consuming stream, as for any tensor."""
        device = torch.device(device)
        if self.storage.device == device:
            return self
        storage = self.storage.to(device, non_blocking=non_blocking)
        return self._views(storage, tuple(self.masks.shape), self.n_masked_patches, self.upperbound, self.grid_size)

    def pin_memory(self) -> IBOTMasks:
        """A copy in pinned host memory (what a DataLoader with ``pin_memory=True`` calls)."""
        return self._views(self.storage.pin_memory(), tuple(self.masks.shape), self.n_masked_patches,
                           self.upperbound, self.grid_size)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA allocator that ``stream`` uses these tensors (they share one buffer)."""
        self.storage.record_stream(stream)


def sample_ibot_masks(recipe: IBOTMaskRecipe, batch_size: int, seed: int, epoch: int, shard_id: int,
                      step: int, pin_memory: bool | None = None) -> IBOTMasks:
    """The masks of batch (epoch, step) of shard ``shard_id``, as DINOv2's ``collate_data_and_cast``
    draws them, from ``mask_batch_generator(seed, epoch, shard_id, step)``:

    - of the R = n_global_crops * batch_size global crops, int(R * mask_sample_probability) are
      masked; the ratio range is split into that many equal intervals
      (linspace(min, max, masked + 1)) and one ratio drawn uniformly in each, so the masked crops'
      ratios spread evenly over the range; crop k's mask has int(N * ratio_k) patches (at most:
      see ``BlockMaskGenerator``), N = grid_h * grid_w;
    - the masked crops are a uniform random subset of the R rows (the release shuffles the list
      of masked and empty masks), so both crops of a sample may be masked, or neither.

    pin_memory: build the tensors in pinned host memory so ``IBOTMasks.to`` copies them without
    blocking; default: when CUDA is available.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = mask_batch_generator(seed, epoch, shard_id, step)
    n_rows = recipe.n_global_crops * batch_size
    n_masked = int(n_rows * recipe.mask_sample_probability)
    bounds = np.linspace(*recipe.mask_ratio_min_max, n_masked + 1)
    # the fixed-size draws first, then the blocks' variable number of draws
    ratios = generator.uniform(bounds[:-1], bounds[1:])
    masked_rows = generator.permutation(n_rows)[:n_masked]
    n_patches = recipe.num_patches
    targets = (n_patches * ratios).astype(np.int64)  # int(): the ratios are >= 0
    upperbound = int((n_patches * bounds[1:]).astype(np.int64).sum())

    block_generator = recipe.block_generator()
    uniform = _Uniforms(generator)
    masks = np.zeros((n_rows, n_patches), dtype=bool)
    if n_masked:
        masks_rows = [block_generator._row_bitsets(int(target), uniform) for target in targets]
        masks[masked_rows] = _bitsets_to_masks(masks_rows, recipe.grid_size[1])
    return IBOTMasks.from_masks(masks, recipe.grid_size, upperbound, pin_memory)
