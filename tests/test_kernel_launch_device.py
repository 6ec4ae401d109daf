"""Every Triton launch runs on its tensors' device, not on the current CUDA device.

Triton launches on the current device and stream; a process using cuda:1 without
``torch.cuda.set_device`` (an evaluation script, a notebook) would otherwise crash or compute on
cuda:0. Without a GPU, the launches are checked to happen inside ``on_device_of`` of the tensors
they were given (interpreted kernels on CPU tensors), and ``on_device_of`` itself on a cuda:1
device object.
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import fastdino.kernels.clip_grad as clip_grad_kernels
import fastdino.kernels.dino_loss as dino_loss_kernels
import fastdino.kernels.ema as ema_kernels
from fastdino.kernels.tensor_lists import on_device_of


def test_on_device_of_selects_the_tensors_cuda_device():
    second_gpu = SimpleNamespace(device=torch.device("cuda", 1))
    context = on_device_of([second_gpu])
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(on_device_of([torch.zeros(1)]), contextlib.nullcontext)
    assert isinstance(on_device_of([]), contextlib.nullcontext)


class LaunchRecorder:
    """Stands in for ``on_device_of`` in one kernel module and wraps its kernels, recording the
    device each launch was entered with (None: a launch outside any device context)."""

    def __init__(self, monkeypatch, module, kernel_names):
        self.entered: list[torch.device] = []
        self.launches: list[torch.device | None] = []
        monkeypatch.setattr(module, "on_device_of", self.on_device_of)
        for name in kernel_names:
            monkeypatch.setattr(module, name, self.recording(getattr(module, name)))

    @contextlib.contextmanager
    def on_device_of(self, tensors):
        self.entered.append(tensors[0].device)
        try:
            yield
        finally:
            self.entered.pop()

    def recording(self, kernel):
        recorder = self

        class Recording:
            def __getitem__(self, grid):
                recorder.launches.append(recorder.entered[-1] if recorder.entered else None)
                return kernel[grid]
        return Recording()


def test_ema_and_clipping_launch_on_the_tensors_device(monkeypatch, generator):
    teacher = [torch.randn(5, generator=generator), torch.randn(3, 2, generator=generator)]
    student = [torch.randn_like(tensor) for tensor in teacher]
    ema = LaunchRecorder(monkeypatch, ema_kernels, ["_ema_kernel"])
    ema_kernels.ema_update_(teacher, student, 0.9)
    assert ema.launches == [torch.device("cpu")]

    clip = LaunchRecorder(monkeypatch, clip_grad_kernels, ["_sumsq_kernel", "_norm_kernel", "_scale_kernel"])
    clip_grad_kernels.clip_grad_per_param_(student, 1.0)
    assert clip.launches == [torch.device("cpu")] * 3


def test_the_loss_launches_on_the_tensors_device(monkeypatch, generator):
    batch, classes = 3, 40
    student = torch.randn(4 * batch, classes, generator=generator)
    teacher = torch.randn(2 * batch, classes, generator=generator)
    loss = LaunchRecorder(monkeypatch, dino_loss_kernels, ["_teacher_kernel", "_student_kernel"])
    dino_loss_kernels.dino_loss_forward(student, teacher, torch.zeros(classes), torch.empty_like(student),
                                        2, 0.1, 0.04)
    assert loss.launches == [torch.device("cpu")] * 3  # the teacher pass, then global and local crops


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_the_second_gpu_without_set_device(generator):
    from fastdino.ops import clip_grad_per_param_, ema_update_
    assert torch.cuda.current_device() == 0
    device = torch.device("cuda", 1)
    teacher = [torch.randn(1000, generator=generator).to(device)]
    student = [torch.randn(1000, generator=generator).to(device)]
    expected = 0.9 * teacher[0] + 0.1 * student[0]
    ema_update_(teacher, student, 0.9, backend="triton")
    torch.testing.assert_close(teacher[0], expected)
    norms = clip_grad_per_param_(student, 1.0, backend="triton")
    assert norms.device == device
