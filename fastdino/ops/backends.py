"""Which implementation of an op runs: detection (once per process) and per-call resolution.

Backends:
- "triton": the fused Triton kernels in ``fastdino.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests).
- "cpp": the C++/OpenMP extension ``fastdino._C``; CPU tensors.
- "torch": the plain PyTorch reference; any device and dtype. It is also the fallback.
- "auto": the fastest backend available for the tensors' device.

``FASTDINO_BACKEND=<name>`` forces one backend for the whole process; it overrides the
``backend=`` argument of every op. Nothing heavy is imported here: Triton and the extension
are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from fastdino.runtime import warn_once

BACKENDS = ("auto", "triton", "cpp", "torch")
BACKEND_ENV_VAR = "FASTDINO_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the given tensors (or is not installed)."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_status(module_name: str) -> tuple[object | None, str]:
    """(module, "") when importable, else (None, why not)."""
    try:
        return importlib.import_module(module_name), ""
    except Exception as error:  # ImportError, or a broken install raising anything else
        return None, f"{type(error).__name__}: {error}"


def cpp_extension():
    """The compiled ``fastdino._C`` module, or raise BackendUnavailableError saying why not."""
    module, why = _import_status("fastdino._C")
    if module is None:
        raise BackendUnavailableError(
            "the 'cpp' backend is unavailable: the C++ extension fastdino._C could not be "
            f"imported ({why}). It is built at install time; reinstall with "
            "`pip install --no-build-isolation -e .` with torch and a C++ compiler present, "
            "and read the build log for its error."
        )
    return module


def triton_kernels():
    """``fastdino.kernels``, or raise BackendUnavailableError saying why not."""
    module, why = _import_status("fastdino.kernels")
    if module is None:
        raise BackendUnavailableError(
            f"the 'triton' backend is unavailable: fastdino.kernels could not be imported ({why})."
        )
    return module


def backend_status() -> dict[str, str]:
    """For each backend, "available" or the reason it is not (for diagnostics and the README)."""
    status = {"torch": "available"}
    for name, probe in (("cpp", cpp_extension), ("triton", triton_kernels)):
        try:
            probe()
            status[name] = "available"
        except BackendUnavailableError as error:
            status[name] = str(error)
    if status["triton"] == "available" and not (
        torch.cuda.is_available() or triton_interpreter_enabled()
    ):
        status["triton"] = "installed, but needs a CUDA device (or TRITON_INTERPRET=1)"
    return status


def _requested(backend: str) -> tuple[str, str]:
    """The backend to use and where the choice came from (for error messages)."""
    forced = os.environ.get(BACKEND_ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV_VAR}={forced!r} is not a backend; choose one of {BACKENDS}"
            )
        return forced, f"{BACKEND_ENV_VAR}={forced}"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; choose one of {BACKENDS}")
    return backend, f"backend={backend!r}"


def resolve_backend(op_name: str, backend: str, tensors: list[torch.Tensor],
                    scalars: list[torch.Tensor] = (), fused_unsupported: str = "") -> str:
    """Pick the concrete backend for ``tensors``, or raise a clear error naming it and why.

    Floating dtypes other than float32/bfloat16/float16 (float64 in tests) run on "torch"
    under "auto", and are rejected by the fused backends. ``scalars`` (0-d arguments such as a
    momentum, which every backend reads in any float dtype) only have to be on the same device.
    ``fused_unsupported`` says why the fused backends cannot take these tensors ("" when they
    can): "auto" then falls back to "torch" with the one-time warning, and an explicit "cpp" or
    "triton" raises BackendUnavailableError.
    """
    name, source = _requested(backend)
    devices = {tensor.device for tensor in [*tensors, *scalars]}
    if len(devices) > 1:
        raise ValueError(
            f"{op_name}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop() if devices else torch.device("cpu")
    fused_dtypes = {torch.float32, torch.bfloat16, torch.float16}
    unfused = sorted({str(t.dtype) for t in tensors if t.dtype not in fused_dtypes})

    if name == "auto":
        if unfused:
            return "torch"
        if device.type == "cuda":
            name = "triton"
        elif device.type == "cpu":
            name = "cpp"
        else:
            return "torch"
        try:
            _check_runs(name, device)
        except BackendUnavailableError as error:
            _warn_fallback_once(op_name, str(error))
            return "torch"
        if fused_unsupported:
            _warn_fallback_once(op_name, fused_unsupported)
            return "torch"
        return name

    if name == "torch":
        return name
    if unfused:
        raise BackendUnavailableError(
            f"{op_name}: backend '{name}' ({source}) supports float32, bfloat16 and float16, "
            f"got {', '.join(unfused)}; use backend='torch' for other dtypes"
        )
    try:
        _check_runs(name, device)
    except BackendUnavailableError as error:
        raise BackendUnavailableError(f"{op_name}: {source}: {error}") from None
    if fused_unsupported:
        raise BackendUnavailableError(f"{op_name}: backend '{name}' ({source}): {fused_unsupported}")
    return name


def _warn_fallback_once(op_name: str, reason: str) -> None:
    warn_once(f"fastdino.ops.{op_name}: falling back to the plain PyTorch reference (backend 'torch'), "
              f"which is slower: {reason}", stacklevel=5)


def _check_runs(name: str, device: torch.device) -> None:
    if name == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"the 'cpp' backend runs on CPU tensors only, got tensors on {device}"
            )
        cpp_extension()
    elif name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreter_enabled()):
            raise BackendUnavailableError(
                f"the 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"testing), got tensors on {device}"
            )
        triton_kernels()
