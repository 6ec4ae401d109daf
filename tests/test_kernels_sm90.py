"""Every Triton kernel compiles ahead of time for sm_90 (H100 / H200) at the configurations its
launcher chooses at production sizes (the vit_small_p8 run: 12 x 64 student rows, 2 x 64 teacher
rows, K = 65536; the 158 ViT-S/8 + head parameter tensors; the soft cross-entropy and the
Sinkhorn passes at a rank's 2458 iBOT masked-patch rows and 128 DINO rows), without register
spills and without registers halving occupancy. No GPU needed: see kernels/sm90_report.py. ``pytest -s`` prints the
registers, local memory, shared memory and programs per SM of every kernel.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

from fastdino.kernels import clip_grad, dino_loss, ema, sinkhorn, sm90_report, soft_cross_entropy
from fastdino.kernels.sm90_report import SCENARIOS, KernelReport, Occupancy
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

UNAVAILABLE = sm90_report.unavailable_reason()
needs_sm90_compiler = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE)


@functools.lru_cache(maxsize=None)
def compiled(scenarios, maxnreg=None):
    """The report's rows, from a process of its own: the kernels must be compiled ones, and
    conftest sets TRITON_INTERPRET=1 for this one on machines without a GPU."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastdino.kernels.sm90_report", "--json", *scenarios]
    if maxnreg is not None:
        command += ["--maxnreg", str(maxnreg)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    # 1: some row has a problem, which the tests below name.
    assert completed.returncode in (0, 1), completed.stderr[-3000:]
    return [KernelReport(**dict(row, grid=tuple(row["grid"]))) for row in json.loads(completed.stdout)]


@pytest.fixture(scope="module")
def report():
    rows = compiled(tuple(SCENARIOS))
    print("\n" + sm90_report.format_table(rows))
    return rows


@needs_sm90_compiler
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_compiles_without_spills_or_lost_occupancy(report, scenario):
    rows = [row for row in report if row.scenario == scenario]
    assert rows, f"no launches recorded for {scenario!r}"
    problems = [f"{row.kernel} [{row.config}]: {problem}" for row in rows for problem in row.problems()]
    assert not problems, f"{scenario} on sm_90 at {rows[0].sizes}:\n" + "\n".join(problems)


@needs_sm90_compiler
def test_covers_every_kernel_at_production_sizes(report):
    kernels = {name for module in (dino_loss, ema, clip_grad, soft_cross_entropy, sinkhorn)
               for name, value in vars(module).items()
               if isinstance(value, (JITFunction, InterpretedFunction)) and name.endswith("_kernel")}
    assert len(kernels) >= 12, kernels
    assert kernels <= {row.kernel for row in report}
    sizes = {row.scenario: row.sizes for row in report}
    assert sizes["dino_loss bf16"] == {"crops": 12, "global_crops": 2, "batch": 64, "K": 65536}
    assert sizes["ema bf16 teacher"]["tensors"] == 158
    assert round(sizes["ema bf16 teacher"]["parameters"] / 1e6) == 44
    # Both crop groups of the loss: NT = G - 1 and NT = G.
    student = [row.config for row in report
               if row.scenario == "dino_loss bf16" and row.kernel == "_student_kernel"]
    assert sorted(config.split()[0] for config in student) == ["NT=1", "NT=2"]
    assert sizes["soft_ce bf16"] == {"rows": 2458, "teacher_rows": 2458, "K": 65536}
    assert {sizes[name]["rows"] for name in sizes if name.startswith("sinkhorn")} == {128, 2458}
    # Both teacher modes of the soft cross-entropy: logits (the DINO loss's teacher pass, at the
    # soft cross-entropy's own sizes) and probabilities.
    soft_ce = {(row.scenario, row.kernel) for row in report if row.scenario.startswith("soft_ce")}
    assert ("soft_ce bf16", "_teacher_kernel") in soft_ce
    assert ("soft_ce bf16, fp32 probs", "_column_sums_kernel") in soft_ce


@needs_sm90_compiler
def test_detects_spills():
    # A register cap forces spills: the offline readout of the cubin must see them.
    (row,) = compiled(("ema fp32 teacher",), maxnreg=24)
    assert row.registers <= 24 and row.local_bytes > 0, row
    assert "register spills" in " ".join(row.problems())


def test_occupancy_model():
    # The student loss kernel's design point: 64 registers x 512 threads, 2 of the 4 programs that
    # the 64 warps per SM allow; one register more leaves 1 (72 allocated per thread).
    design = Occupancy(registers=64, num_warps=16, shared_bytes=1088)
    assert (design.by_registers, design.without_registers, design.programs_per_sm) == (2, 4, 2)
    assert Occupancy(65, 16, 1088).programs_per_sm == 1
    # Allocation per warp in 256-register units from 4 sub-partitions of 16384 each.
    assert Occupancy(255, 1, 0).by_registers == 8
    assert Occupancy(40, 8, 0).by_registers == 6
    # Shared memory: 228 KiB per SM, 1 KiB reserved per program, at most 227 KiB per program.
    assert Occupancy(32, 4, 100 * 1024).without_registers == 2
    assert Occupancy(32, 4, 228 * 1024).programs_per_sm == 0


def test_problems_name_spills_occupancy_and_errors():
    fine = KernelReport("s", {}, "_k", "warps=16", (1,), num_warps=16, registers=64, shared_bytes=1088,
                        programs_per_sm=2, programs_without_registers=4)
    assert fine.problems() == []
    halved = KernelReport("s", {}, "_k", "warps=16", (1,), num_warps=16, registers=65, shared_bytes=1088,
                          programs_per_sm=1, programs_without_registers=4)
    assert halved.problems() == ["65 registers x 512 threads leave 1 programs per SM, fewer than half of 4"]
    spilled = KernelReport("s", {}, "_k", "", (1,), local_bytes=96, programs_per_sm=2,
                           programs_without_registers=4)
    assert spilled.problems() == ["96 bytes of local memory per thread (register spills)"]
    broken = KernelReport("s", {}, "_k", "", (1,), error="CompilationError: x")
    assert broken.problems() == ["compile error: CompilationError: x"]
