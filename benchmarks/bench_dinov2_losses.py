"""DINOv2's loss terms: fastdino's ops and drop-ins against DINOv2's modules (and compiled).

Sizes are DINOv2's (full run): B = 64 images per rank, 2 global + 8 local crops, K = 65536 for
both heads, 224 px global crops at patch 14 (16 x 16 = 256 patches), half of the 2B global
crops masked with ratios spread over [0.1, 0.5] (~4900 masked patch rows). --quick: B = 8.
"""

import torch

from baselines import (dinov2_dino_loss, dinov2_ibot_forward_masked, dinov2_koleo_loss, dinov2_masked_patch_counts,
                       dinov2_sinkhorn_knopp, dinov2_softmax_center_teacher)
from fastdino.ops import ibot_masks_weight, ibot_patch_loss, koleo_loss, sinkhorn_knopp_
from fastdino.ops.dinov2 import DINOLoss, iBOTPatchLoss
from measure import Case, Provider, fastdino_backend

N_CLASSES, PATCHES, N_LOCAL, EMBED_DIM = 65536, 256, 8, 384
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.07


def _masks(batch):
    """(2B, 256) masks, the masked crops first (DINOv2 shuffles them; the order costs nothing)."""
    counts = dinov2_masked_patch_counts(2 * batch, PATCHES)
    masks = torch.zeros(2 * batch, PATCHES, dtype=torch.bool)
    for crop, count in enumerate(counts):
        masks[crop, :count] = True
    return masks


def _head_logits(generator, rows, n_classes, device):
    """The head's logits are cosines (|t| <= 1): uniform in [-1, 1]."""
    return (torch.rand(rows, n_classes, generator=generator) * 2 - 1).to(device)


def _ibot_case(device, repeats, compile_backend, backend, generator, batch, n_classes):
    masks = _masks(batch)
    masks_weight = ibot_masks_weight(masks).to(device)
    rows = int(masks.sum())
    student = _head_logits(generator, rows, n_classes, device).requires_grad_()
    teacher = _head_logits(generator, rows, n_classes, device)
    center = torch.zeros(1, n_classes, device=device)
    n_crops = masks.shape[0]

    def dinov2(_):
        targets = dinov2_softmax_center_teacher(teacher, center, TEACHER_TEMP)
        loss = dinov2_ibot_forward_masked(student, targets, masks_weight, n_crops)
        return torch.autograd.grad(loss, student)

    def dinov2_step(student, teacher):
        targets = dinov2_softmax_center_teacher(teacher, center, TEACHER_TEMP)
        return dinov2_ibot_forward_masked(student, targets, masks_weight, n_crops)

    compiled = torch.compile(dinov2_step, backend=compile_backend or "inductor")

    def dinov2_compiled(_):
        return torch.autograd.grad(compiled(student, teacher), student)

    drop_in = iBOTPatchLoss(n_classes, backend=backend).to(device)
    masks_on_device = masks.to(device)

    def fastdino_drop_in(_):  # called as DINOv2's meta-architecture calls it
        targets = drop_in.softmax_center_teacher(teacher.unsqueeze(0), TEACHER_TEMP).squeeze(0)
        loss = drop_in.forward_masked(student, targets, masks_on_device, masks_weight=masks_weight)
        return torch.autograd.grad(loss, student)

    def fastdino_op(_):
        loss, _teacher_sum = ibot_patch_loss(student, teacher, center, masks_weight, n_crops=n_crops,
                                             teacher_temp=TEACHER_TEMP, backend=backend)
        return torch.autograd.grad(loss, student)

    providers = [Provider("dinov2 iBOTPatchLoss", dinov2)]
    if compile_backend:
        providers.append(Provider("dinov2 iBOTPatchLoss, torch.compile", dinov2_compiled))
    providers += [Provider(f"fastdino {backend}, dinov2 drop-in", fastdino_drop_in),
                  Provider(f"fastdino {backend}, ibot_patch_loss", fastdino_op)]
    return Case(
        suite="ops", name="ibot patch loss fwd+bwd", dtype="float32",
        sizes={"batch": batch, "masked rows": rows, "K": n_classes},
        providers=providers, baselines=[p.name for p in providers if p.name.startswith("dinov2")],
        bytes_moved=3 * student.numel() * student.element_size(),  # read s and t, write the gradient
        repeats=repeats,
    )


def _dino_case(device, repeats, compile_backend, backend, generator, batch, n_classes):
    """The local-crop term of DINOv2's meta-architecture: 8 local crops against both global
    crops' (already centered) teacher targets."""
    students = [_head_logits(generator, batch, n_classes, device).requires_grad_() for _ in range(N_LOCAL)]
    targets = [torch.softmax(_head_logits(generator, batch, n_classes, device) / TEACHER_TEMP, -1) for _ in range(2)]

    def dinov2(_):
        return torch.autograd.grad(dinov2_dino_loss(students, targets), students)

    compiled = torch.compile(dinov2_dino_loss, backend=compile_backend or "inductor")

    def dinov2_compiled(_):
        return torch.autograd.grad(compiled(students, targets), students)

    drop_in = DINOLoss(n_classes, backend=backend).to(device)

    def fastdino_drop_in(_):
        return torch.autograd.grad(drop_in(students, targets), students)

    providers = [Provider("dinov2 DINOLoss", dinov2)]
    if compile_backend:
        providers.append(Provider("dinov2 DINOLoss, torch.compile", dinov2_compiled))
    providers.append(Provider(f"fastdino {backend}, dinov2 drop-in", fastdino_drop_in))
    element = students[0].element_size()
    return Case(
        suite="ops", name="dinov2 DINOLoss fwd+bwd (local crops)", dtype="float32",
        sizes={"batch": batch, "K": n_classes, "crops": f"{N_LOCAL} vs 2"},
        providers=providers, baselines=[p.name for p in providers if p.name.startswith("dinov2")],
        bytes_moved=(2 * N_LOCAL + 2) * batch * n_classes * element,
        repeats=repeats,
    )


def _sinkhorn_case(device, repeats, compile_backend, backend, generator, rows, n_classes, name):
    logits = _head_logits(generator, rows, n_classes, device)

    def dinov2(_):
        return dinov2_sinkhorn_knopp(logits, TEACHER_TEMP)

    compiled = torch.compile(dinov2_sinkhorn_knopp, backend=compile_backend or "inductor")

    def dinov2_compiled(_):
        return compiled(logits, TEACHER_TEMP)

    def fresh_copy():  # the fused op works in place: a new copy each run, untimed
        return logits.clone()

    def fastdino(copy):
        return sinkhorn_knopp_(copy, TEACHER_TEMP, backend=backend)

    providers = [Provider("dinov2 sinkhorn_knopp_teacher", dinov2)]
    if compile_backend:
        providers.append(Provider("dinov2 sinkhorn_knopp_teacher, torch.compile", dinov2_compiled))
    providers.append(Provider(f"fastdino {backend}, sinkhorn_knopp_", fastdino, fresh_copy))
    return Case(
        suite="ops", name=f"sinkhorn-knopp, 3 iterations ({name})", dtype="float32",
        sizes={"rows": rows, "K": n_classes},
        providers=providers, baselines=[p.name for p in providers if p.name.startswith("dinov2")],
        bytes_moved=2 * logits.numel() * logits.element_size(),  # read the logits, write Q
        repeats=repeats,
    )


def _koleo_case(device, repeats, generator, batch):
    features = torch.randn(batch, EMBED_DIM, generator=generator).to(device).requires_grad_()

    def dinov2(_):
        return torch.autograd.grad(dinov2_koleo_loss(features), features)

    def fastdino(_):
        return torch.autograd.grad(koleo_loss(features), features)

    return Case(
        suite="ops", name="koleo fwd+bwd (one global crop)", dtype="float32",
        sizes={"batch": batch, "dim": EMBED_DIM},
        providers=[Provider("dinov2 KoLeoLoss", dinov2), Provider("fastdino koleo_loss", fastdino)],
        baselines=["dinov2 KoLeoLoss"], repeats=4 * repeats,
    )


def cases(device: torch.device, quick: bool, compile_baseline: bool = True, *, batch: int | None = None,
          n_classes: int = N_CLASSES, compile_backend: str = "inductor", repeats: int | None = None,
          backend: str | None = None):
    """The cases at DINOv2's sizes (``batch`` and ``n_classes`` smaller for the GPU suite's CPU
    run); ``compile_backend`` None (or ``compile_baseline`` False) leaves out torch.compile."""
    backend = backend or fastdino_backend(device)
    generator = torch.Generator().manual_seed(0)
    batch = batch or (8 if quick else 64)
    repeats = repeats or (3 if quick else 5)
    compile_backend = compile_backend if compile_baseline else None
    masked_rows = int(_masks(batch).sum())
    common = (device, repeats, compile_backend, backend, generator)
    return [
        _ibot_case(*common, batch, n_classes),
        _dino_case(*common, batch, n_classes),
        _sinkhorn_case(*common, 2 * batch, n_classes, "CLS rows"),
        _sinkhorn_case(*common, masked_rows, n_classes, "masked patch rows"),
        _koleo_case(device, repeats, generator, batch),
    ]
