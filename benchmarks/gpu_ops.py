"""GPU suite sections "environment" and "kernels" (benchmarks/bench_gpu.py).

kernels: fastdino's fused ops on the "triton" backend (compiled on a GPU, interpreted on the CPU)
against the float64 reference (relative errors from tests/tolerances.py's error model) and
against what a user would otherwise run (benchmarks/baselines.py): the DINO loss forward +
backward in float32, bfloat16 and float16 (the release's loop under autocast, as main_dino.py
calls it, and torch.compile of that loop); the teacher EMA with a float32 and a bfloat16 teacher
(the release's loop, torch._foreach_lerp_); per-parameter clipping (the release's .item() loop);
DINOv2's terms (the iBOT patch loss, its DINO loss on teacher targets, Sinkhorn-Knopp, KoLeo) at
DINOv2's sizes against its modules and torch.compile of them (bench_dinov2_losses.py).
Each op's bytes moved over its time, as a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys

import torch

import bench_dinov2_losses
from baselines import (
    foreach_lerp_ema,
    release_clip_gradients,
    release_dino_loss,
    release_ema,
    vit_dino_parameter_shapes,
)
from fastdino.ops import (
    backend_status,
    clip_grad_per_param_,
    clip_grad_per_param_reference,
    dino_loss,
    dino_loss_reference,
    ema_update_,
    ema_update_reference,
    ibot_masks_weight,
    ibot_patch_loss,
    sinkhorn_knopp_,
    sinkhorn_knopp_reference,
    soft_cross_entropy_reference,
)
from fastdino.ops.dino_loss import count_loss_pairs
from gpu_suite import REPOSITORY, time_on_device
from measure import Case, Provider, copy_bandwidth

sys.path.append(str(REPOSITORY / "tests"))
from tolerances import TOLERANCES, relative_error  # noqa: E402  (the one error model, tests' and ours)

LOSS_TARGET = 0.80  # of the copy bandwidth
EMA_CLIP_TARGET = 0.85
STUDENT_TEMP = 0.1  # dino_loss's and the release's default
MOMENTUM = 0.996
CLIP = 3.0
OVERRIDES = ("FASTDINO_BACKEND", "FASTDINO_ATTENTION", "FASTDINO_DATA_BACKEND", "TRITON_INTERPRET")


def _version(module_name: str) -> str:
    try:
        return importlib.import_module(module_name).__version__
    except Exception as error:  # missing, or built for another torch / CUDA
        return f"unavailable: {type(error).__name__}: {error}"[:300]


def environment(run) -> None:
    from fastdino.models import xformers_status

    for label, module in (("torch", "torch"), ("triton", "triton"), ("DALI", "nvidia.dali"), ("xformers", "xformers")):
        run.figure(label, _version(module), gpu=False)
    run.figure("torch's CUDA", torch.version.cuda or "none (CPU build)", gpu=False)
    for name, status in backend_status().items():
        run.figure(f"fastdino ops backend {name}", status, gpu=False)
    run.figure("environment overrides", ", ".join(f"{key}={os.environ[key]}" for key in OVERRIDES
                                                 if os.environ.get(key)) or "none", gpu=False)
    run.figure("torch.compile backend", run.compile_backend if run.compile else "off (--no-compile)", gpu=False)
    properties = torch.cuda.get_device_properties(run.device) if run.on_gpu else None
    run.figure("GPU", properties and properties.name)
    run.figure("streaming multiprocessors", properties and properties.multi_processor_count)
    run.figure("GPU memory", properties and properties.total_memory / 2**30, "GiB")
    run.figure("xformers kernels (bfloat16)", xformers_status(run.device, torch.bfloat16))

    # A large device-to-device copy: the roofline of the memory-bound ops below.
    run.peaks["copy_bandwidth"] = copy_bandwidth(run.device, megabytes=2048 if run.on_gpu else 16)
    run.figure("device-to-device copy bandwidth (read + write)", run.peaks["copy_bandwidth"] / 1e9, "GB/s")
    # A large bf16 matrix product on random data: the peak that MFU is reported against.
    size = 8192 if run.on_gpu else 128
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(run.device, torch.bfloat16) for _ in range(2))
    times, _ = time_on_device(lambda _: torch.mm(left, right), run.device, warmup=3, repeats=10)
    rate = 2 * size**3 / (statistics.median(times) / 1e3)
    run.peaks["flops"] = rate if run.on_gpu else None
    run.figure(f"bf16 matmul {size}x{size}x{size}", rate / 1e12, "TFLOP/s")


def _sizes(run) -> dict:
    if run.on_gpu:
        return dict(batch=64, n_classes=65536, ncrops=12, shapes=vit_dino_parameter_shapes(),
                    repeats=10 if run.quick else 20, warmup=3)
    # The Triton interpreter costs ~0.3 s per launch whatever the size: the fewest calls.
    return dict(batch=1, n_classes=256, ncrops=4, repeats=1, warmup=0,
                shapes=vit_dino_parameter_shapes(embed_dim=16, depth=1, patch_size=16, img_size=32, out_dim=256,
                                                 hidden_dim=32, bottleneck_dim=16))


def _error(actual, expected, scale: float = 0.0):
    """tests/tolerances.py's relative error, or "non-finite" (a missed target)."""
    if not torch.isfinite(actual).all():
        return "non-finite result"
    return relative_error(actual, expected, scale)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1).double() for tensor in tensors])


def kernels(run) -> None:
    sizes = _sizes(run)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _loss(run, sizes, dtype)
    for teacher_dtype in (torch.float32, torch.bfloat16):
        _ema(run, sizes, teacher_dtype)
    _clip(run, sizes)
    for dtype in (torch.float32, torch.bfloat16):
        _dinov2_accuracy(run, sizes, dtype)
    _dinov2_speed(run, sizes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bandwidth_figures(run, label: str, names, results, metrics, target: float) -> None:
    for name in names:
        if name in results:
            run.figure(f"{label}, {name}: time", results[name].median, "ms")
            if "copy_bandwidth_fraction" in metrics[name]:
                run.figure(f"{label}, {name}: bytes / copy bandwidth", metrics[name]["copy_bandwidth_fraction"],
                           "%", at_least=target)


def _loss(run, sizes, dtype) -> None:
    batch, n_classes, ncrops = sizes["batch"], sizes["n_classes"], sizes["ncrops"]
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(ncrops * batch, n_classes, generator=generator) * 3).to(run.device, dtype)
    teacher = (torch.randn(2 * batch, n_classes, generator=generator) * 3).to(run.device, dtype)
    center = (torch.randn(1, n_classes, generator=generator) * 0.5).to(run.device)
    label = f"dino_loss {_dtype_name(dtype)}"

    # Against the float64 reference, with the tests' scales (tests/test_dino_loss.py).
    reference_input = student.double().requires_grad_()
    reference_loss, _ = dino_loss_reference(reference_input, teacher.double(), center.double())
    reference_grad, = torch.autograd.grad(reference_loss, reference_input)
    fused_input = student.clone().requires_grad_()
    fused_loss, _ = dino_loss(fused_input, teacher, center, backend="triton")
    fused_grad, = torch.autograd.grad(fused_loss, fused_input)
    n_pairs = count_loss_pairs(2, ncrops)
    tolerance = TOLERANCES[dtype]
    run.figure(f"{label}: triton loss vs float64", _error(fused_loss, reference_loss,
                                                         float(student.double().abs().mean()) / STUDENT_TEMP),
               at_most=tolerance["loss"], gpu=False)
    run.figure(f"{label}: triton gradient vs float64",
               _error(fused_grad, reference_grad, len(student) ** 0.5 / (STUDENT_TEMP * batch * n_pairs)),
               at_most=tolerance["grad"], gpu=False)
    del reference_input, reference_loss, reference_grad, fused_input, fused_grad

    student.requires_grad_()
    # main_dino.py computes the loss under autocast (fp16 there): softmax and log_softmax in float32.
    autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def release_with(loss_function):
        def release(_):
            with autocast:
                loss = loss_function(student, teacher, center, ncrops)
            return torch.autograd.grad(loss, student)
        return release

    def fused(_):
        loss, _teacher_sum = dino_loss(student, teacher, center, backend="triton")
        return torch.autograd.grad(loss, student)

    def fresh_logits():  # overwrite mode consumes its input: a new copy each run, untimed
        return student.detach().clone().requires_grad_()

    def fused_overwrite(logits):
        loss, _teacher_sum = dino_loss(logits, teacher, center, backend="triton", overwrite_student_logits=True)
        return torch.autograd.grad(loss, logits)

    providers = [Provider("release loop", release_with(release_dino_loss))]
    if not run.compile:
        run.unavailable(f"{label}: release loop, torch.compile", "--no-compile")
    elif run.fits(60, f"{label}: release loop, torch.compile"):
        providers.append(Provider("release loop, torch.compile",
                                  release_with(torch.compile(release_dino_loss, backend=run.compile_backend))))
    fused_names = ["fastdino triton", "fastdino triton, overwrite logits"]
    providers += [Provider(fused_names[0], fused), Provider(fused_names[1], fused_overwrite, fresh_logits)]
    results, metrics = run.measure(Case(
        suite=run.section, name=f"{label} fwd+bwd", dtype=_dtype_name(dtype),
        sizes={"batch": batch, "K": n_classes, "crops": f"2+{ncrops - 2}"}, providers=providers,
        baselines=[p.name for p in providers if p.name.startswith("release")],
        # The op's floor: read the student and the teacher logits once, write the gradient once.
        # The kernels read each student row a second time in their gradient pass (mostly from
        # L2, kernels/dino_loss.py), which the floor does not count: a fraction near 1 means
        # that pass costs (almost) no memory traffic.
        bytes_moved=(2 * student.numel() + teacher.numel()) * student.element_size(),
        repeats=sizes["repeats"]), warmup=sizes["warmup"])
    _bandwidth_figures(run, label, fused_names, results, metrics, LOSS_TARGET)


def _ema(run, sizes, teacher_dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(shape, generator=generator).to(run.device, teacher_dtype) for shape in sizes["shapes"]]
    student = [torch.randn(shape, generator=generator).to(run.device) for shape in sizes["shapes"]]  # fp32 master
    label = f"EMA, {_dtype_name(teacher_dtype)} teacher"

    updated = [tensor.clone() for tensor in teacher]
    ema_update_(updated, student, MOMENTUM, backend="triton")
    expected = [tensor.double() for tensor in teacher]
    ema_update_reference(expected, [tensor.double() for tensor in student], MOMENTUM)
    size = float((MOMENTUM * _flat(teacher).abs() + (1 - MOMENTUM) * _flat(student).abs()).norm())
    run.figure(f"{label}: triton vs float64", _error(_flat(updated), _flat(expected), size),
               at_most=TOLERANCES[teacher_dtype]["ema"], gpu=False)
    del updated, expected

    names = ["fastdino triton"]
    if teacher_dtype == torch.float32:
        foreach = Provider("torch._foreach_lerp_", lambda _: foreach_lerp_ema(teacher, student, MOMENTUM))
    else:  # _foreach_lerp_ takes one dtype: a user casts the student first
        foreach = Provider("torch._foreach_lerp_ (student cast)", lambda _: foreach_lerp_ema(
            teacher, [tensor.to(teacher_dtype) for tensor in student], MOMENTUM))
    results, metrics = run.measure(Case(
        suite=run.section, name=label, dtype=f"{_dtype_name(teacher_dtype)} teacher, float32 student",
        sizes={"tensors": len(teacher), "params_M": round(sum(t.numel() for t in teacher) / 1e6, 1)},
        providers=[Provider("release per-parameter loop", lambda _: release_ema(teacher, student, MOMENTUM)),
                   foreach,
                   Provider(names[0], lambda _: ema_update_(teacher, student, MOMENTUM, backend="triton"))],
        baselines=["release per-parameter loop", foreach.name],
        # read the teacher and the student, write the teacher
        bytes_moved=sum(t.numel() * (2 * t.element_size() + s.element_size()) for t, s in zip(teacher, student)),
        repeats=sizes["repeats"]), warmup=sizes["warmup"])
    _bandwidth_figures(run, label, names, results, metrics, EMA_CLIP_TARGET)


def _clip(run, sizes) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = sizes["shapes"]
    parameters = [torch.nn.Parameter(torch.empty(shape, device=run.device)) for shape in shapes]
    # Norms spread over 1..6 around the clip value 3: some gradients are clipped, some are not.
    norms = torch.empty(len(shapes)).uniform_(1.0, 6.0, generator=generator)
    original = [(torch.randn(shape, generator=generator) * norm / torch.Size(shape).numel() ** 0.5).to(run.device)
                for shape, norm in zip(shapes, norms.tolist())]

    def restore_grads():  # clipping is in place: every run starts from the same gradients
        for parameter, grad in zip(parameters, original):
            parameter.grad = grad.clone()

    restore_grads()
    fused_norms = clip_grad_per_param_(parameters, CLIP, backend="triton")
    expected = [grad.double() for grad in original]
    expected_norms = clip_grad_per_param_reference(expected, CLIP)
    tolerance = TOLERANCES[torch.float32]["clip"]
    run.figure("clipping: triton norms vs float64", _error(fused_norms, expected_norms), at_most=tolerance, gpu=False)
    run.figure("clipping: triton gradients vs float64", _error(_flat(p.grad for p in parameters), _flat(expected)),
               at_most=tolerance, gpu=False)
    n_params = sum(grad.numel() for grad in original)
    clipped = sum(grad.numel() for grad, norm in zip(original, expected_norms.tolist()) if norm > CLIP)

    names = ["fastdino triton"]
    results, metrics = run.measure(Case(
        suite=run.section, name="per-parameter clipping", dtype="float32",
        sizes={"tensors": len(shapes), "params_M": round(n_params / 1e6, 1), "clipped_M": round(clipped / 1e6, 1)},
        providers=[Provider("release .item() loop", lambda _: release_clip_gradients(parameters, CLIP), restore_grads),
                   Provider("fastdino torch (foreach)",
                            lambda _: clip_grad_per_param_(parameters, CLIP, backend="torch"), restore_grads),
                   Provider(names[0], lambda _: clip_grad_per_param_(parameters, CLIP, backend="triton"),
                            restore_grads)],
        baselines=["release .item() loop"],
        # every gradient read once for its norm; the clipped ones read and written once more
        bytes_moved=(n_params + 2 * clipped) * 4,
        repeats=sizes["repeats"]), warmup=sizes["warmup"])
    _bandwidth_figures(run, "clipping", names, results, metrics, EMA_CLIP_TARGET)


def _dinov2_accuracy(run, sizes, dtype) -> None:
    """The iBOT loss (logits and probabilities teachers) and Sinkhorn-Knopp on "triton" against
    the float64 reference, at the benchmark's sizes (tests/test_ibot_loss.py's scales)."""
    batch, n_classes = sizes["batch"], sizes["n_classes"]
    masks = bench_dinov2_losses._masks(batch)
    weights = (ibot_masks_weight(masks) / masks.shape[0]).to(run.device)
    rows = int(masks.sum())
    generator = torch.Generator().manual_seed(1)
    student = (torch.rand(rows, n_classes, generator=generator) * 2 - 1).to(run.device, dtype)
    teacher = (torch.rand(rows, n_classes, generator=generator) * 2 - 1).to(run.device, dtype)
    center = torch.zeros(n_classes, device=run.device)
    tolerance = TOLERANCES[dtype]
    label = f"ibot_patch_loss {_dtype_name(dtype)}"
    reference_input = student.double().requires_grad_()
    reference_loss, _ = soft_cross_entropy_reference(reference_input, teacher.double(), center.double(),
                                                     weights.double(), teacher_temp=0.07)
    reference_grad, = torch.autograd.grad(reference_loss, reference_input)
    fused_input = student.clone().requires_grad_()
    fused_loss, _ = ibot_patch_loss(fused_input, teacher, center, weights * masks.shape[0], n_crops=masks.shape[0],
                                    teacher_temp=0.07, backend="triton")
    fused_grad, = torch.autograd.grad(fused_loss, fused_input)
    loss_scale = float((weights.double() * student.double().abs().mean(-1)).sum()) / STUDENT_TEMP
    run.figure(f"{label}: triton loss vs float64", _error(fused_loss, reference_loss, loss_scale),
               at_most=tolerance["loss"], gpu=False)
    run.figure(f"{label}: triton gradient vs float64",
               _error(fused_grad, reference_grad, float(weights.double().norm()) / STUDENT_TEMP),
               at_most=tolerance["grad"], gpu=False)
    del reference_input, reference_loss, reference_grad, fused_input, fused_grad
    expected = sinkhorn_knopp_reference(teacher.double(), 0.07)
    fused = sinkhorn_knopp_(teacher.clone(), 0.07, backend="triton")
    run.figure(f"sinkhorn_knopp_ {_dtype_name(dtype)}: triton vs float64", _error(fused, expected),
               at_most=tolerance["sinkhorn"], gpu=False)


def _dinov2_speed(run, sizes) -> None:
    """bench_dinov2_losses' cases on the GPU (DINOv2's sizes) or interpreted (tiny)."""
    compile_backend = run.compile_backend if run.compile else None
    if not run.compile:
        run.unavailable("dinov2 losses: torch.compile baselines", "--no-compile")
    elif not run.fits(120, "dinov2 losses: torch.compile baselines"):
        compile_backend = None
    batch = None if run.on_gpu else 1
    for case in bench_dinov2_losses.cases(run.device, run.quick, compile_backend is not None, batch=batch,
                                          n_classes=sizes["n_classes"], compile_backend=compile_backend,
                                          repeats=sizes["repeats"], backend="triton"):
        if run.fits(30, case.name):
            run.measure(dataclasses.replace(case, suite=run.section), warmup=sizes["warmup"])
