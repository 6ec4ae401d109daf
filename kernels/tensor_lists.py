"""Multi-tensor tables and chunk helpers (EMA, clipping), and the checks all Triton kernels share.

A *table* describes a list of tensors (or several pairwise-equal-numel lists, e.g. teacher and
student parameters) so that ONE kernel launch covers all of them:

- ``addrs[j]``: int64 device tensor (n,) with the base address (``data_ptr``) of every tensor of
  list ``j``. Inside a kernel, an address is turned into a typed pointer with
  ``tl.load(addrs + i).to(tl.pointer_type(DTYPE))`` (an ``inttoptr``; this works both compiled
  and in the interpreter, where addresses are host addresses of CPU tensors).
- ``numel`` (n,) and ``main`` (n,): element count and that count rounded down to a multiple of
  ``TAIL`` (16). Kernels mask their vectorized main loop with ``idx < main`` (a bound the
  compiler may treat as a multiple of 16, so the loads stay 16-byte vectors) and handle the
  ``numel % 16`` leftover elements with one small masked block.
- ``first_chunk`` (n + 1,): chunk range of each tensor (chunks of a tensor are consecutive).
- ``chunk_tensor`` / ``chunk_start`` (n_chunks,): one program per chunk of ``chunk`` elements;
  every tensor has at least one chunk (an empty tensor gets one that does nothing).
- ``extra`` (n,): optional per-tensor integers for the caller (e.g. the output slot of a norm).
- ``aligned``: every base address is 16-byte aligned, so kernels may add alignment hints.

A kernel over a table runs one program per chunk, a piece of tensor ``chunk_tensor[program_id]``:
``chunk_bounds`` and ``tensor_pointer`` give the chunk's bounds and typed base pointers, the main
loop walks ``[start, min(main, start + CHUNK))`` in BLOCK steps masked with ``idx < main``, and
``tail_block`` covers the leftover ``[main, numel)``.

All the int64 arrays live in ONE device tensor (one host-to-device copy when a table is built).
Tables are cached (LRU) by the tensors' (data_ptr, numel, dtype) and the device: the content of a
table only depends on those, so a cache hit is always correct even if memory was reused. On a
hit nothing is copied and nothing synchronizes.
"""

from __future__ import annotations

import collections
import contextlib
import numbers
import threading
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Kernels handle the last ``numel % TAIL`` elements of a tensor separately (see module doc).
TAIL = 16

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_CACHE_SIZE = 64
_cache: "collections.OrderedDict[Hashable, TensorListTable]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def interpreter_active() -> bool:
    """True when this module's kernels run in the Triton interpreter.

    Triton decides at decoration time (TRITON_INTERPRET=1 when the kernels were defined), so the
    answer comes from what ``triton.jit`` produced, not from the current environment.
    """
    return not isinstance(cast_rne, triton.runtime.jit.JITFunction)


def on_device_of(tensors: Sequence[torch.Tensor]):
    """Context for launches on the device of ``tensors`` (all on one device). Triton launches on
    the current CUDA device and its stream, which need not hold the tensors (cuda:1 without
    ``set_device``)."""
    if tensors and tensors[0].device.type == "cuda":
        return torch.cuda.device(tensors[0].device)
    return contextlib.nullcontext()


def check_device(tensor: torch.Tensor, name: str) -> None:
    """The compiled kernels need CUDA tensors; the interpreter runs on CPU tensors."""
    if tensor.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{name}: the 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            f"testing); got device {tensor.device}"
        )


def check_float_tensor(tensor, name: str, dtypes=_FLOAT_DTYPES, dim: Optional[int] = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    check_device(tensor, name)


def check_scalar(value, name: str, device: Optional[torch.device], tensors_name: str,
                 tensor_dtypes=(torch.float32,)):
    """A float or a 0-d float tensor for a kernel: (0-d tensor, 0.0) or (None, the float).

    The kernels take a pointer and a float argument and read the one that is set. A tensor must
    be on ``device``, the device of ``tensors_name`` (None: no tensors), where the kernel loads it
    without a host sync; a dtype outside ``tensor_dtypes`` becomes float32.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(
                f"{name} must be a float or a 0-d float tensor, got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise ValueError(f"{name} tensor must be floating point, got {value.dtype}")
        check_device(value, name)
        if device is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the {tensors_name} are on {device}")
        if value.dtype not in tensor_dtypes:
            value = value.to(torch.float32)
        return value.reshape(()), 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a float or a 0-d float tensor, got {type(value).__name__}"
        )
    return None, float(value)


def check_tensor_list(tensors, name: str, dtypes=_FLOAT_DTYPES) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    for i, tensor in enumerate(tensors):
        check_float_tensor(tensor, f"{name}[{i}]", dtypes)
    if tensors:
        device = tensors[0].device
        for i, tensor in enumerate(tensors):
            if tensor.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {tensor.device} but {name}[0] is on {device}: "
                    "all tensors must be on the same device"
                )
    return tensors


def group_by(keys: Sequence[Hashable]) -> Dict[Hashable, List[int]]:
    """Indices grouped by key, groups in first-appearance order, indices ascending."""
    groups: Dict[Hashable, List[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


@dataclass(frozen=True)
class TensorListTable:
    addrs: Tuple[torch.Tensor, ...]
    numel: torch.Tensor
    main: torch.Tensor
    first_chunk: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    extra: Optional[torch.Tensor]
    n_tensors: int
    n_chunks: int
    chunk: int
    aligned: bool
    storage: torch.Tensor  # the single device tensor all the fields above are views of


def _build(lists: Sequence[Sequence[torch.Tensor]], chunk: int, extra, device) -> TensorListTable:
    n = len(lists[0])
    numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
    counts = torch.clamp((numels + (chunk - 1)) // chunk, min=1)
    first_chunk = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=first_chunk[1:])
    n_chunks = int(first_chunk[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    chunk_start = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[:-1][chunk_tensor]) * chunk
    main = (numels // TAIL) * TAIL
    addr_rows = [torch.tensor([t.data_ptr() for t in lst], dtype=torch.int64) for lst in lists]
    parts = addr_rows + [numels, main, first_chunk, chunk_tensor, chunk_start]
    if extra is not None:
        parts.append(torch.tensor(list(extra), dtype=torch.int64))
    host = torch.cat(parts)
    if device.type == "cuda":
        host = host.pin_memory()
        storage = host.to(device, non_blocking=True)
    else:
        storage = host.to(device)

    views = []
    offset = 0
    for part in parts:
        views.append(storage[offset : offset + part.numel()])
        offset += part.numel()
    k = len(lists)
    aligned = all(t.data_ptr() % 16 == 0 for lst in lists for t in lst)
    return TensorListTable(
        addrs=tuple(views[:k]),
        numel=views[k],
        main=views[k + 1],
        first_chunk=views[k + 2],
        chunk_tensor=views[k + 3],
        chunk_start=views[k + 4],
        extra=views[k + 5] if extra is not None else None,
        n_tensors=n,
        n_chunks=n_chunks,
        chunk=chunk,
        aligned=aligned,
        storage=storage,
    )


def get_table(
    lists: Sequence[Sequence[torch.Tensor]], chunk: int, extra: Optional[Sequence[int]] = None
) -> TensorListTable:
    """Cached device table for ``lists`` (pairwise equal numel, all on one device, non-empty)."""
    if chunk % TAIL != 0:
        raise ValueError(f"chunk must be a multiple of {TAIL}, got {chunk}")
    lists = [list(lst) for lst in lists]
    n = len(lists[0])
    if n == 0 or any(len(lst) != n for lst in lists):
        raise ValueError("get_table needs non-empty lists of equal length")
    device = lists[0][0].device
    key = (
        str(device),
        chunk,
        tuple(tuple((t.data_ptr(), t.numel(), t.dtype) for t in lst) for lst in lists),
        None if extra is None else tuple(int(e) for e in extra),
    )
    with _cache_lock:
        table = _cache.get(key)
        if table is not None:
            _cache.move_to_end(key)
            return table
    table = _build(lists, chunk, extra, device)
    with _cache_lock:
        _cache[key] = table
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return table


def triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even.

    Compiled, ``.to`` already rounds to nearest even (cvt.rn). The interpreter (triton 3.9)
    truncates float32 -> bfloat16, so there the rounding is done on the bits (NaN kept NaN).
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(DTYPE)


@triton.jit
def chunk_bounds(tensor, numel_ptr, main_ptr, chunk_start_ptr, ALIGNED: tl.constexpr):
    """(start, numel, main) of this program's chunk, a piece of tensor ``tensor`` (the kernel
    loads ``chunk_tensor[program_id]`` itself: the clipping's scale kernel skips the rest when
    its tensor is not clipped).

    With ALIGNED, start and main are declared multiples of TAIL = 16 elements (they are), so
    that with 16-byte aligned bases (``tensor_pointer``) the main loop's masked accesses compile
    to 16-byte vectors.
    """
    start = tl.load(chunk_start_ptr + tl.program_id(0))
    numel = tl.load(numel_ptr + tensor)
    main = tl.load(main_ptr + tensor)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        main = tl.multiple_of(main, 16)
    return start, numel, main


@triton.jit
def tensor_pointer(addrs, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to the first element of tensor ``tensor`` of a table list."""
    base = tl.load(addrs + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def tail_block(start, numel, main, CHUNK: tl.constexpr, TAIL: tl.constexpr):
    """(indices, mask) of the numel % TAIL leftover elements [main, numel), masked to the one
    chunk that holds them."""
    idx = main + tl.arange(0, TAIL)
    mask = (idx < numel) & (idx >= start) & (idx < start + CHUNK)
    return idx, mask
