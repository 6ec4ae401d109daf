"""The GPU machine's one command: ``python benchmarks/run.py --suite gpu`` (benchmarks/GPU.md).

Six sections in one process, each guarded (a failing section is reported with its error and the
next one runs), the report rewritten after each one (a run cut short keeps what it measured):

- environment: versions, the GPU, the measured copy bandwidth and bf16 matrix rate (the roofline
  and the MFU peak of every figure below);
- kernels: the fused dino_loss, EMA and clipping against the float64 reference and the code a
  user would otherwise run (gpu_ops.py);
- attention: the training step's attention backend; packed xformers and FlexAttention against
  per-resolution SDPA on ViT-S/8 multi-crop (gpu_models.py);
- data: DALI "mixed" against DALI's CPU operators on the same draws (gpu_data.py);
- train: the DINO step, eager and compiled, against the release's step (gpu_models.py);
- gpu tests: pytest on the GPU-relevant tests, compiled rather than interpreted (gpu_data.py).

Without a GPU the same code runs at tiny sizes on the CPU (the Triton interpreter, DALI's CPU
operators, SDPA, torch.compile through dynamo's "eager" backend) and every GPU figure reads
"not measured: no GPU", so that CI runs it and the GPU run cannot rot.
"""

from __future__ import annotations

import sys

import torch

import gpu_data
import gpu_models
import gpu_ops
from gpu_suite import TIME_BUDGET_S, SuiteRun
from measure import device_name

__all__ = ["SECTIONS", "TIME_BUDGET_S", "main"]

SECTIONS = (("environment", gpu_ops.environment), ("kernels", gpu_ops.kernels),
            ("attention", gpu_models.attention), ("data", gpu_data.data), ("train", gpu_models.train),
            ("gpu tests", gpu_data.gpu_tests))


def main(args, device: torch.device) -> int:
    """Run every section of SECTIONS on ``device`` and write the report to ``args.out``."""
    suite = SuiteRun(args, device)
    print(f"fastdino GPU suite on {device_name(device)}: {len(SECTIONS)} sections, "
          f"{args.time_budget:.0f} s budget", flush=True)
    try:
        for name, section in SECTIONS:
            suite.run_section(name, section)
        report = suite.write(final=True)
    finally:
        suite.close()
    print("\n" + report)
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'} and {args.out / 'results.png'}")
    missed = [figure for figure in suite.figures if figure.status == "missed"]
    if args.check_targets and missed:
        print(f"{len(missed)} target(s) missed", file=sys.stderr)
        return 1
    return 0
