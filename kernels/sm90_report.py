"""Ahead-of-time sm_90 (H100 / H200) compile report of every Triton kernel at production sizes.

No GPU is needed. Each launcher (``dino_loss_forward``, ``ema_update_``, ``clip_grad_per_param_``,
``soft_cross_entropy_forward``, the Sinkhorn passes) runs on meta tensors with its kernels
replaced by recorders, so the report sees exactly the arguments, constexprs and launch options
it passes on an H200 (132 SMs). Triton's own argument
binder turns them into the signature, constexprs and 16-byte divisibility hints of a real
launch, and ``triton.compile`` builds the cubin for sm_90 with the ptxas Triton bundles.

Registers, spills and shared memory are read from the cubin (``cuobjdump --dump-resource-usage``,
also bundled): Triton fills ``CompiledKernel.n_regs`` / ``n_spills`` only when the driver loads
the binary, which needs a GPU, and it discards its ``ptxas -v`` log. Spilled registers live in
the stack frame (STACK); LOCAL is other per-thread local memory. The driver's local size, which
Triton divides by 4 into ``n_spills``, counts both; a ``maxnreg`` cap shows them as STACK.

Occupancy follows cuda_occupancy.h for compute capability 9.0 (see ``Occupancy``).

The kernels must be compiled ones (``triton.jit`` without TRITON_INTERPRET, which the test suite
sets on CPU-only machines): run this in such a process, e.g.
``python -m fastdino.kernels.sm90_report`` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import clip_grad, dino_loss, ema, sinkhorn, soft_cross_entropy, tensor_lists

SM90 = GPUTarget("cuda", 90, 32)
H200_SMS = 132
PRESET = "vit_small_p8"


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident programs per SM on sm_90, by cuda_occupancy.h's rules for compute capability 9.0:
    registers are allocated per warp in units of 256 from each of the 4 sub-partitions' 16384,
    at most 64 warps and 32 programs per SM, 228 KiB of shared memory per SM in 128-byte units
    with 1 KiB reserved per program. The 1 KiB of static SHARED that sm_90 cubins of kernels using
    shared memory declare is counted on top, which errs toward fewer programs by at most that."""

    registers: int
    num_warps: int
    shared_bytes: int

    REGISTERS_PER_SUB_PARTITION = 65536 // 4
    SUB_PARTITIONS = 4
    REGISTER_UNIT = 256
    MAX_REGISTERS_PER_THREAD = 255
    MAX_WARPS = 64
    MAX_PROGRAMS = 32
    SHARED_PER_SM = 228 * 1024
    MAX_SHARED_PER_PROGRAM = 227 * 1024
    SHARED_RESERVED = 1024
    SHARED_UNIT = 128

    @property
    def by_registers(self) -> int:
        per_warp = _round_up(max(self.registers, 1) * 32, self.REGISTER_UNIT)
        # The hardware's per-program check assumes the warps are spread over all sub-partitions.
        if (self.registers > self.MAX_REGISTERS_PER_THREAD
                or per_warp * _round_up(self.num_warps, self.SUB_PARTITIONS) > 65536):
            return 0
        warps = (self.REGISTERS_PER_SUB_PARTITION // per_warp) * self.SUB_PARTITIONS
        return warps // self.num_warps

    @property
    def without_registers(self) -> int:
        """The warp, program-count and shared-memory limits alone."""
        shared = _round_up(self.shared_bytes + self.SHARED_RESERVED, self.SHARED_UNIT)
        by_shared = 0 if self.shared_bytes > self.MAX_SHARED_PER_PROGRAM else self.SHARED_PER_SM // shared
        return min(self.MAX_WARPS // self.num_warps, self.MAX_PROGRAMS, by_shared)

    @property
    def programs_per_sm(self) -> int:
        return min(self.by_registers, self.without_registers)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher made it: ``kernel[grid](*args, **kwargs)``."""

    kernel: JITFunction
    grid: Tuple[int, ...]
    args: Tuple
    kwargs: Dict

    def with_argument(self, name: str, value) -> "Launch":
        args = list(self.args)
        args[self.kernel.arg_names.index(name)] = value
        return dataclasses.replace(self, args=tuple(args))


@dataclasses.dataclass(frozen=True)
class KernelReport:
    scenario: str
    sizes: Dict[str, int]
    kernel: str
    config: str
    grid: Tuple[int, ...]
    num_warps: int = 0
    registers: int = 0
    local_bytes: int = 0  # per thread: stack frame (spills) + other local memory
    shared_bytes: int = 0  # per program: Triton's dynamic shared memory + the cubin's static
    programs_per_sm: int = 0
    programs_without_registers: int = 0  # what the warp and shared-memory limits alone allow
    error: str = ""

    def problems(self) -> List[str]:
        """Why this kernel is not fit for sm_90 at this configuration; empty when it is.

        "Halves occupancy", precisely: registers leave fewer than half the programs per SM that
        the warp and shared-memory limits alone allow (the student loss kernel at BLOCK_S = 4096 /
        16 warps sits exactly at half by design, 2 of 4 programs, at 64 registers; 65 would leave 1).
        """
        if self.error:
            return [f"compile error: {self.error}"]
        problems = []
        if self.local_bytes:
            problems.append(f"{self.local_bytes} bytes of local memory per thread (register spills)")
        if 2 * self.programs_per_sm < self.programs_without_registers:
            problems.append(
                f"{self.registers} registers x {32 * self.num_warps} threads leave "
                f"{self.programs_per_sm} programs per SM, fewer than half of "
                f"{self.programs_without_registers}")
        return problems


def unavailable_reason() -> str:
    """Why this machine cannot compile for sm_90 ahead of time; "" when it can."""
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no CUDA backend"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
            subprocess.run([path, "--version"], check=True, capture_output=True)
        except Exception as error:  # missing, not executable here, or no tool found at all
            return f"triton's {tool} cannot run here: {type(error).__name__}: {error}"
    return ""


class _Recorder:
    def __init__(self, kernel: JITFunction, launches: List[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


def record_launches(launcher: Callable, *args, **kwargs) -> List[Launch]:
    """The launches ``launcher(*args, **kwargs)`` makes, on meta tensors, as on an H200."""
    if tensor_lists.interpreter_active():
        raise RuntimeError(
            "sm90_report needs the compiled kernels: run it in a process without TRITON_INTERPRET=1 "
            "(e.g. python -m fastdino.kernels.sm90_report)")
    launches: List[Launch] = []
    check_device = tensor_lists.check_device

    def allow_meta(tensor, name):
        if tensor.device.type != "meta":
            check_device(tensor, name)

    with contextlib.ExitStack() as patches:
        for module in (dino_loss, ema, clip_grad, soft_cross_entropy, sinkhorn):
            kernels = [(name, value) for name, value in vars(module).items()
                       if isinstance(value, JITFunction)]
            for name, kernel in kernels:
                patches.enter_context(mock.patch.object(module, name, _Recorder(kernel, launches)))
        patches.enter_context(mock.patch.object(tensor_lists, "check_device", allow_meta))
        patches.enter_context(mock.patch.object(dino_loss, "_num_sms", lambda device_index: H200_SMS))
        launcher(*args, **kwargs)
    return launches


def compile_launch(launch: Launch, **options):
    """(CompiledKernel, signature, constexprs) for sm_90, bound as ``JITFunction.run`` binds
    (Triton 3.8's binder and ``_pack_args``: the launch's own type, ``tt.divisibility`` and
    constexpr specialization); ``options`` override launch options (e.g. ``maxnreg``)."""
    kernel = launch.kernel
    backend = make_backend(SM90)
    kwargs = dict(launch.kwargs, **options)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, parsed = binder(*launch.args, **kwargs)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, parsed)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=SM90,
                              options=parsed.__dict__)
    return compiled, signature, constexprs


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """cuobjdump's resource usage of the one function in ``cubin``: REG, STACK, SHARED, LOCAL, ..."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                 check=True, capture_output=True, text=True).stdout
    function = listing.split("Function ", 1)[1]
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", function)}


def _config(kernel: JITFunction, signature, constexprs, num_warps: int) -> str:
    values = [f"{kernel.arg_names[path[0]]}={value}" for path, value in sorted(constexprs.items())
              if kernel.arg_names[path[0]] != "INTERPRET"]
    pointers = [f"{name}:{kind[1:]}" for name, kind in signature.items()
                if kind.startswith("*") and kind not in ("*fp32", "*i64")]
    return " ".join(values + [f"warps={num_warps}"] + pointers)


def report_launch(scenario: str, sizes: Dict[str, int], launch: Launch, **options) -> KernelReport:
    name = launch.kernel.__name__
    try:
        compiled, signature, constexprs = compile_launch(launch, **options)
        resources = cubin_resources(compiled.asm["cubin"])
    except Exception as error:  # a compile error is a finding of its own row
        return KernelReport(scenario, sizes, name, str(launch.kwargs), launch.grid,
                            error=f"{type(error).__name__}: {error}"[-2000:])
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared + resources.get("SHARED", 0)
    occupancy = Occupancy(resources["REG"], num_warps, shared)
    return KernelReport(
        scenario, sizes, name, _config(launch.kernel, signature, constexprs, num_warps), launch.grid,
        num_warps=num_warps, registers=resources["REG"],
        local_bytes=resources.get("STACK", 0) + resources.get("LOCAL", 0), shared_bytes=shared,
        programs_per_sm=occupancy.programs_per_sm, programs_without_registers=occupancy.without_registers)


@functools.lru_cache(maxsize=None)
def _production():
    """(config, student parameters on the meta device) of the production preset. Imported here:
    the kernels themselves do not depend on the training code."""
    from fastdino.train.config import resolve_config
    from fastdino.train.networks import build_student_and_teacher

    config = resolve_config(PRESET)
    with torch.device("meta"):
        student, _teacher = build_student_and_teacher(config, torch.device("meta"))
    return config, [parameter.detach() for parameter in student.parameters()]


def _loss_scenario(dtype: torch.dtype, grad_dtype: torch.dtype):
    from fastdino.train.step import N_GLOBAL_CROPS

    config, _ = _production()
    batch, crops, K = config.batch_size_per_gpu, N_GLOBAL_CROPS + config.n_local_crops, config.out_dim
    student = torch.empty(crops * batch, K, dtype=dtype, device="meta")
    teacher = torch.empty(N_GLOBAL_CROPS * batch, K, dtype=dtype, device="meta")
    center = torch.empty(K, dtype=torch.float32, device="meta")
    # Training overwrites the student logits with their gradient (g_ptr is s_ptr).
    launches = record_launches(dino_loss.dino_loss_forward, student, teacher, center, student,
                               N_GLOBAL_CROPS, config.student_temp, config.teacher_temp)
    if grad_dtype != dtype:  # a gradient buffer of its own, in grad_dtype
        grad = torch.empty(student.shape, dtype=grad_dtype, device="meta")
        launches = [launch.with_argument("g_ptr", grad) if "g_ptr" in launch.kernel.arg_names else launch
                    for launch in launches]
    return {"crops": crops, "global_crops": N_GLOBAL_CROPS, "batch": batch, "K": K}, launches


def _parameter_sizes(parameters) -> Dict[str, int]:
    return {"tensors": len(parameters), "parameters": sum(p.numel() for p in parameters)}


def _ema_scenario(teacher_dtype: torch.dtype):
    config, students = _production()
    teachers = [torch.empty_like(p, dtype=teacher_dtype) for p in students]
    return _parameter_sizes(students), record_launches(ema.ema_update_, teachers, students,
                                                       config.momentum_teacher)


def _clip_scenario(grad_dtype: torch.dtype):
    config, parameters = _production()
    grads = [torch.empty_like(p, dtype=grad_dtype) for p in parameters]
    return _parameter_sizes(parameters), record_launches(clip_grad.clip_grad_per_param_, grads,
                                                         config.clip_grad)


# iBOT masked-patch rows per rank: 64 images x 2 global crops x 0.5 (images masked) x 256 patches
# x 0.3 (mean mask ratio).
IBOT_ROWS = 2458


def _soft_ce_scenario(dtype: torch.dtype, grad_dtype: torch.dtype, teacher_dtype: torch.dtype,
                      teacher_is_probs: bool):
    config, _ = _production()
    K = config.out_dim
    student = torch.empty(IBOT_ROWS, K, dtype=dtype, device="meta")
    teacher = torch.empty(IBOT_ROWS, K, dtype=teacher_dtype, device="meta")
    center = torch.empty(K, dtype=torch.float32, device="meta")
    weights = torch.empty(IBOT_ROWS, dtype=torch.float32, device="meta")
    # Training overwrites the student logits with their gradient, except for float16 (float32 grad).
    grad = student if grad_dtype == dtype else torch.empty(student.shape, dtype=grad_dtype, device="meta")
    launches = record_launches(soft_cross_entropy.soft_cross_entropy_forward, student, teacher, center,
                               weights, grad, config.student_temp, config.teacher_temp, teacher_is_probs)
    return {"rows": IBOT_ROWS, "teacher_rows": IBOT_ROWS, "K": K}, launches


def _sinkhorn_scenario(rows: int, logits_dtype: torch.dtype):
    """All five passes; float32 logits are exponentiated in place."""
    config, _ = _production()
    K = config.out_dim
    logits = torch.empty(rows, K, dtype=logits_dtype, device="meta")
    E = logits if logits_dtype == torch.float32 else torch.empty(rows, K, dtype=torch.float32, device="meta")
    column_scale = torch.empty(K, dtype=torch.float32, device="meta")
    row_scale = torch.empty(rows, dtype=torch.float32, device="meta")

    def passes():
        shift = sinkhorn.sinkhorn_column_max(logits)
        sinkhorn.sinkhorn_exp_(logits, shift, 1.0 / config.teacher_temp, E)
        sinkhorn.sinkhorn_row_scales(E, column_scale)
        sinkhorn.sinkhorn_column_sums(E, row_scale)
        sinkhorn.sinkhorn_normalize_rows_(E, column_scale)

    return {"rows": rows, "K": K}, record_launches(passes)


# name -> () -> (sizes, launches), at the sizes of the PRESET training run.
SCENARIOS: Dict[str, Callable[[], Tuple[Dict[str, int], List[Launch]]]] = {
    "dino_loss fp32": functools.partial(_loss_scenario, torch.float32, torch.float32),
    "dino_loss bf16": functools.partial(_loss_scenario, torch.bfloat16, torch.bfloat16),
    "dino_loss fp16": functools.partial(_loss_scenario, torch.float16, torch.float16),
    "dino_loss fp16, fp32 grad": functools.partial(_loss_scenario, torch.float16, torch.float32),
    "ema fp32 teacher": functools.partial(_ema_scenario, torch.float32),
    "ema bf16 teacher": functools.partial(_ema_scenario, torch.bfloat16),
    "clip fp32 grads": functools.partial(_clip_scenario, torch.float32),
    "soft_ce bf16": functools.partial(_soft_ce_scenario, torch.bfloat16, torch.bfloat16, torch.bfloat16,
                                      False),
    "soft_ce fp16, fp32 grad": functools.partial(_soft_ce_scenario, torch.float16, torch.float32,
                                                 torch.float16, False),
    "soft_ce bf16, fp32 probs": functools.partial(_soft_ce_scenario, torch.bfloat16, torch.bfloat16,
                                                  torch.float32, True),
    # the DINO class-token rows of a rank (2 global crops x 64 images), and the iBOT patch rows
    "sinkhorn 128 rows bf16": functools.partial(_sinkhorn_scenario, 128, torch.bfloat16),
    "sinkhorn 2458 rows fp32 in place": functools.partial(_sinkhorn_scenario, IBOT_ROWS, torch.float32),
}


def compile_report(scenarios: Optional[Sequence[str]] = None, **options) -> List[KernelReport]:
    """One row per launch of each scenario (all of SCENARIOS by default). Triton's cache compiles
    a kernel that several scenarios share once."""
    unknown = [name for name in scenarios or () if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    rows = []
    for scenario in scenarios or SCENARIOS:
        try:
            sizes, launches = SCENARIOS[scenario]()
        except Exception as error:  # the launcher refused the production inputs: a finding too
            rows.append(KernelReport(scenario, {}, "(launcher)", "", (),
                                     error=f"{type(error).__name__}: {error}"))
            continue
        rows += [report_launch(scenario, sizes, launch, **options) for launch in launches]
    return rows


def format_table(rows: Sequence[KernelReport]) -> str:
    header = ("scenario", "kernel", "config", "regs", "local B", "shared B", "programs/SM")
    lines = [header]
    for row in rows:
        if row.error:
            lines.append((row.scenario, row.kernel, row.config, "-", "-", "-", "compile error"))
        else:
            lines.append((row.scenario, row.kernel, row.config, str(row.registers), str(row.local_bytes),
                          str(row.shared_bytes), f"{row.programs_per_sm} of {row.programs_without_registers}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    sizes = {row.scenario: row.sizes for row in rows}
    return "\n".join(table + [f"{name}: " + ", ".join(f"{k}={v}" for k, v in value.items())
                              for name, value in sizes.items()])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"default: all of {', '.join(repr(name) for name in SCENARIOS)}")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of a table")
    parser.add_argument("--maxnreg", type=int, help="cap registers per thread (ptxas .maxnreg)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    reason = unavailable_reason()
    if reason:
        print(f"cannot compile for sm_90 here: {reason}", file=sys.stderr)
        return 2
    options = {} if args.maxnreg is None else {"maxnreg": args.maxnreg}
    rows = compile_report(args.scenarios or None, **options)
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows]))
    else:
        print(format_table(rows))
        for row in rows:
            for problem in row.problems():
                print(f"{row.scenario} / {row.kernel} [{row.config}]: {problem}")
    return 1 if any(row.problems() for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
