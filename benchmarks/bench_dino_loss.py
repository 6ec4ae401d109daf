"""dino_loss forward + backward: fastdino's fused op against the release's loop (and compiled)."""

import torch

from baselines import release_dino_loss
from fastdino.ops import dino_loss
from measure import Case, Provider, Target, fastdino_backend


def cases(device: torch.device, quick: bool, compile_baseline: bool = True):
    batch, n_classes, ncrops = (8 if quick else 32), 65536, 12
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(ncrops * batch, n_classes, generator=generator) * 3).to(device)
    teacher = (torch.randn(2 * batch, n_classes, generator=generator) * 3).to(device)
    center = torch.zeros(1, n_classes, device=device)
    student.requires_grad_()
    backend = fastdino_backend(device)

    def release(_):
        return torch.autograd.grad(release_dino_loss(student, teacher, center, ncrops), student)

    compiled_loss = torch.compile(release_dino_loss)

    def release_compiled(_):
        return torch.autograd.grad(compiled_loss(student, teacher, center, ncrops), student)

    def fused(_):
        loss, _teacher_sum = dino_loss(student, teacher, center, backend=backend)
        return torch.autograd.grad(loss, student)

    def fresh_logits():  # overwrite mode consumes its input: a new copy each run, untimed
        return student.detach().clone().requires_grad_()

    def fused_overwrite(logits):
        loss, _teacher_sum = dino_loss(logits, teacher, center, backend=backend,
                                       overwrite_student_logits=True)
        return torch.autograd.grad(loss, logits)

    providers = [Provider("release loop", release)]
    if compile_baseline:
        providers.append(Provider("release loop, torch.compile", release_compiled))
    providers += [Provider(f"fastdino {backend}", fused),
                  Provider(f"fastdino {backend}, overwrite logits", fused_overwrite, fresh_logits)]
    targets = []
    if device.type == "cpu":
        targets = [Target(f"fastdino {backend}", "release loop", 4.5),
                   Target(f"fastdino {backend}, overwrite logits", "release loop", 10.0)]
        if compile_baseline:
            targets.append(Target(f"fastdino {backend}", "release loop, torch.compile", 1.6))
    element = student.element_size()
    return [Case(
        suite="ops", name="dino_loss fwd+bwd", dtype=str(student.dtype).replace("torch.", ""),
        sizes={"batch": batch, "K": n_classes, "crops": f"2+{ncrops - 2}"},
        providers=providers,
        baselines=[p.name for p in providers if p.name.startswith("release")],
        targets=targets,
        # read student + teacher once, write the gradient once
        bytes_moved=(2 * student.numel() + teacher.numel()) * element,
        repeats=5 if quick else 10,
    )]
