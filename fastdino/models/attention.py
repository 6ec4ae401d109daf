"""Multi-head attention softmax(Q K^T / sqrt(d)) V behind one switch, and packed token sequences.

Backends (``attn_backend`` argument of the models, or ``FASTDINO_ATTENTION=<name>`` for the whole
process, which overrides the argument, as ``FASTDINO_BACKEND`` does for ``fastdino.ops``):

- "xformers": ``xformers.ops.memory_efficient_attention`` on CUDA. Never materializes the
  (N x N) attention matrix, and attends within each sequence of a packed batch through
  ``BlockDiagonalMask``, so crops of different sizes share one forward.
- "sdpa": ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
  on CUDA, a fused kernel on the CPU). Packed batches are attended one group of equal-length
  sequences at a time.
- "explicit": softmax(Q K^T / sqrt(d)) V written out with matmuls; it materializes the attention
  matrix, which ``attention_probabilities`` returns for visualization.
- "auto": "xformers" for float16/bfloat16 on CUDA when xformers works, else "sdpa".

xformers is imported on first use, here (``XFORMERS_AVAILABLE``); whether its kernels run is probed
once per CUDA device and dtype. When it is missing or broken, the models fall back to
"sdpa" with one warning instead of failing; without CUDA no xformers code runs at all.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdino.runtime import warn_once

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "explicit")
ATTENTION_ENV_VAR = "FASTDINO_ATTENTION"


@functools.cache
def _xformers_import() -> tuple[object | None, str]:
    """(xformers.ops, "") or (None, why it does not import). Imported on first use, not with
    fastdino.models: xformers pulls in Triton and its C++ extension, which `--help-config`, the
    CPU paths and a plain `import fastdino.models` have no use for."""
    try:
        from xformers import ops
    except Exception as error:  # not installed, or built for another torch/CUDA
        return None, f"{type(error).__name__}: {error}"
    return ops, ""


def _xformers_ops():
    """xformers.ops (``fmha``, ``memory_efficient_attention``); only called once its probe passed."""
    return _xformers_import()[0]


def __getattr__(name: str):
    if name == "XFORMERS_AVAILABLE":  # whether xformers imports (its kernels are probed per device)
        return _xformers_import()[0] is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# xformers' kernels exist for half precision first; float32 on CUDA goes to SDPA under "auto".
_XFORMERS_AUTO_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _xformers_kernel_error(device: torch.device, dtype: torch.dtype) -> str:
    """"" when xformers runs forward and backward on ``device`` in ``dtype``, else why not.

    Probed once per (device, dtype): a GPU may lack kernels for one dtype only (bfloat16 on V100).
    The first call often comes from the teacher's forward, under ``no_grad`` (or inference_mode)
    and autocast: the probe sets its own modes, so the answer never depends on the caller's.
    """
    xformers_ops, import_error = _xformers_import()
    if xformers_ops is None:
        return f"xformers could not be imported ({import_error})"
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            # The smallest call shaped like ours: (B, M, H, K) inputs and a block-diagonal mask.
            query = torch.zeros(1, 16, 1, 64, device=device, dtype=dtype, requires_grad=True)
            mask = xformers_ops.fmha.BlockDiagonalMask.from_seqlens([8, 8], device=device)
            xformers_ops.memory_efficient_attention(query, query, query, attn_bias=mask).sum().backward()
    except Exception as error:  # e.g. "No operator found for memory_efficient_attention_forward"
        return (f"xformers is installed but its kernels do not run on {device} in {dtype} with "
                f"this torch ({type(error).__name__}: {error})")
    return ""


def xformers_status(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> str:
    """"available", or why the "xformers" backend cannot run on ``device`` in ``dtype``."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"xformers needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "xformers needs a CUDA device, and torch sees none"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _xformers_kernel_error(device, dtype) or "available"


def _sdpa_kernels(device: torch.device) -> str:
    if device.type != "cuda":
        return "usable (torch's fused CPU kernel)"
    enabled = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                     ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                     ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                     ("math", torch.backends.cuda.math_sdp_enabled())) if on]
    return f"usable (torch picks per call among: {', '.join(enabled) or 'none enabled'})"


def attention_kernels_report(device: torch.device | str, dtype: torch.dtype) -> str:
    """One line: which attention backends can run on ``device`` in ``dtype``, and why not."""
    device = torch.device(device)
    xformers = xformers_status(device, dtype)
    return (f"xformers {'usable' if xformers == 'available' else 'not usable: ' + xformers}; "
            f"sdpa {_sdpa_kernels(device)}; explicit usable")


def _warn_fallback_once(requested: str, reason: str) -> None:
    warn_once(f"fastdino.models: attention backend {requested!r} falls back to 'sdpa' "
              f"(torch.nn.functional.scaled_dot_product_attention): {reason}", stacklevel=5)


def requested_attention_backend(attn_backend: str) -> str:
    """``FASTDINO_ATTENTION`` if set, else ``attn_backend``; raise on a name that is no backend."""
    forced = os.environ.get(ATTENTION_ENV_VAR)
    if forced:
        if forced not in ATTENTION_BACKENDS:
            raise ValueError(
                f"{ATTENTION_ENV_VAR}={forced!r} is not an attention backend; choose one of "
                f"{ATTENTION_BACKENDS}")
        return forced
    if attn_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attn_backend={attn_backend!r} is not an attention backend; choose one of "
            f"{ATTENTION_BACKENDS}")
    return attn_backend


def attention_compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype Q, K, V will have: the autocast dtype when autocast is on for ``device``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def resolve_attention_backend(attn_backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: "xformers", "sdpa" or "explicit", for Q/K/V of this device and dtype.

    "xformers" (asked for, or chosen by "auto") that cannot run here falls back to "sdpa" with one
    warning per reason: no CUDA tensors, xformers not importable, or kernels that fail to load.
    """
    requested = requested_attention_backend(attn_backend)
    if requested in ("sdpa", "explicit"):
        return requested
    if requested == "auto" and not (device.type == "cuda" and dtype in _XFORMERS_AUTO_DTYPES):
        return "sdpa"
    reason = xformers_status(device, dtype)
    if reason == "available":
        return "xformers"
    _warn_fallback_once(requested, reason)
    return "sdpa"


@dataclass(frozen=True)
class PackedSequences:
    """How a packed token tensor (1, T, C) divides into sequences that must not attend each other.

    ``groups[i] = (count, length)``: the next ``count`` sequences hold ``length`` tokens each (one
    group per crop resolution: all samples of the crops of that size, crop-major). The sequences
    lie back to back, so T = sum(count * length).
    """

    groups: tuple[tuple[int, int], ...]

    @classmethod
    def pack(cls, token_batches: list[torch.Tensor]) -> tuple[torch.Tensor, PackedSequences]:
        """(count_i, length_i, C) batches -> one (1, T, C) tensor and its ``PackedSequences``."""
        packing = cls(tuple((tokens.shape[0], tokens.shape[1]) for tokens in token_batches))
        packed = torch.cat([tokens.reshape(1, -1, tokens.shape[-1]) for tokens in token_batches], 1)
        return packed, packing

    @property
    def num_sequences(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def num_tokens(self) -> int:
        return sum(count * length for count, length in self.groups)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``pack``: (1, T, *) -> [(count_i, length_i, *)] (views, no copy)."""
        if packed.shape[:2] != (1, self.num_tokens):
            raise ValueError(f"expected a packed tensor of shape (1, {self.num_tokens}, ...), "
                             f"got {tuple(packed.shape)}")
        segments = packed[0].split([count * length for count, length in self.groups])
        return [segment.view(count, length, *packed.shape[2:])
                for segment, (count, length) in zip(segments, self.groups)]

    def sequence_lengths(self) -> list[int]:
        return [length for count, length in self.groups for _ in range(count)]

    def first_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """The first token (the CLS token) of every sequence: (1, T, C) -> (num_sequences, C)."""
        return torch.cat([group[:, 0] for group in self.unpack(packed)])

    def spread_over_tokens(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """One value per sequence (num_sequences,) -> that value at each of its tokens (1, T, 1).

        Built from views of the device tensor: no host-to-device copy, so no stream sync.
        """
        values = per_sequence.split([count for count, _ in self.groups])
        return torch.cat([value[:, None].expand(count, length).reshape(-1)
                          for value, (count, length) in zip(values, self.groups)]).view(1, -1, 1)

    def xformers_mask(self, device: torch.device):
        """xformers' ``BlockDiagonalMask`` for these sequences on ``device`` (built once per layout
        and device)."""
        return _block_diagonal_mask(self.groups, torch.device(device))


@functools.lru_cache(maxsize=32)
def _block_diagonal_mask(groups: tuple[tuple[int, int], ...], device: torch.device):
    # Cached so that its sequence-start tensor moves to the GPU once, not in every block; on the
    # tensors' device, which need not be the current one (cuda:1 without set_device).
    return _xformers_ops().fmha.BlockDiagonalMask.from_seqlens(PackedSequences(groups).sequence_lengths(),
                                                               device=device)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of (B, H, N, d) queries and keys: the (B, H, N, N) matrix."""
    scale = query.shape[-1] ** -0.5
    return ((query @ key.transpose(-2, -1)) * scale).softmax(dim=-1)


@torch.compiler.disable
def _xformers_attention(query, key, value, packing: PackedSequences | None = None) -> torch.Tensor:
    # Run eagerly inside a compiled block: xformers chooses its kernel in Python at every call and
    # the packed mask comes from a per-device cache, which dynamo would trace (and break on)
    # several times per block. One deliberate graph break here keeps the rest of the block in
    # one graph on either side.
    attn_bias = packing.xformers_mask(query.device) if packing is not None else None
    return _xformers_ops().memory_efficient_attention(query, key, value, attn_bias=attn_bias)


def _attend_unpacked(query, key, value, backend: str) -> torch.Tensor:
    """(B, N, H, d) query, key, value -> (B, N, H, d), every sequence of length N on its own."""
    if backend == "xformers":
        return _xformers_attention(query, key, value)
    # SDPA and the explicit path take (B, H, N, d); transposing is a view, not a copy.
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(query, key, value)
    elif backend == "explicit":
        out = attention_probabilities(query, key) @ value
    else:
        raise ValueError(f"attention backend {backend!r} is not one of 'xformers', 'sdpa', "
                         f"'explicit' (resolve 'auto' with resolve_attention_backend first)")
    return out.transpose(1, 2)


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str,
                         packing: PackedSequences | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, with a resolved backend ("xformers", "sdpa", "explicit").

    query, key, value: (B, N, H, d). Without ``packing``, each of the B rows is one sequence.
    With ``packing``, B = 1 and the N = T tokens hold the sequences it describes; a token attends
    only to the tokens of its own sequence. Returns (B, N, H, d).
    """
    if packing is None:
        return _attend_unpacked(query, key, value, backend)
    if backend == "xformers":
        # One kernel launch over all sequences; the mask confines attention to each sequence.
        return _xformers_attention(query, key, value, packing)
    # Without a block-diagonal kernel, attend each group of equal-length sequences as a batch:
    # the same result, with no (T x T) mask.
    outputs = [_attend_unpacked(*group_tensors, backend) for group_tensors in
               zip(*(packing.unpack(tensor) for tensor in (query, key, value)))]
    return torch.cat([out.reshape(1, -1, *out.shape[2:]) for out in outputs], dim=1)
