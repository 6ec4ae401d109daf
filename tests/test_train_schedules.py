"""Schedules against the release's formulas, written here independently with NumPy."""

import math

import numpy as np
import pytest

from fastdino.ops import teacher_temperature_schedule
from fastdino.train import build_schedules, cosine_schedule, resolve_config


def release_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.cosine_scheduler of the public DINO release."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("base, final, epochs, niter, warmup, start", [
    (0.0005 * 1024 / 256, 1e-6, 100, 37, 10, 0.0),
    (0.04, 0.4, 30, 11, 0, 0.0),
    (0.996, 1.0, 7, 5, 0, 0.0),
    (1.0, 0.1, 3, 4, 1, 0.2),
    (2.0, 0.0, 2, 1, 2, 0.0),  # warm-up over the whole run
])
def test_cosine_schedule_matches_the_release(base, final, epochs, niter, warmup, start):
    ours = cosine_schedule(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
    expected = release_cosine_scheduler(base, final, epochs, niter, warmup, start)
    assert len(ours) == len(expected) == epochs * niter
    np.testing.assert_allclose([ours[i] for i in range(len(ours))], expected, rtol=1e-13, atol=1e-16)
    with pytest.raises(IndexError):
        ours[len(ours)]


@pytest.mark.parametrize("warmup_iterations", range(6))
def test_warmup_of_any_length_is_numpy_linspace(warmup_iterations):
    # np.linspace(start, stop, 1) is [start]: a one-iteration warm-up stays at the start value.
    ours = cosine_schedule(1.0, 0.1, 6, 1, warmup_epochs=warmup_iterations, start_warmup_value=0.2)
    expected = release_cosine_scheduler(1.0, 0.1, 6, 1, warmup_iterations, 0.2)
    assert [ours[i] for i in range(warmup_iterations)] == expected[:warmup_iterations].tolist()
    np.testing.assert_allclose([ours[i] for i in range(len(ours))], expected, rtol=1e-13, atol=1e-16)


def test_training_schedules_scale_lr_with_the_global_batch_and_follow_the_formulas():
    config = resolve_config("vit_small_p16", ["epochs=20", "warmup_epochs=3", "warmup_teacher_temp_epochs=5",
                                              "teacher_temp=0.07", "batch_size_per_gpu=32",
                                              "grad_accumulation_steps=2"])
    world_size, niter = 4, 9
    schedules = build_schedules(config, niter, world_size)
    global_batch = 32 * 2 * 4
    peak_lr = 0.0005 * global_batch / 256
    total = 20 * niter
    assert schedules.total_iterations == total
    # warm-up: linear from 0 to the peak over 3 epochs, then cosine to min_lr
    assert schedules.at(0).learning_rate == 0.0
    assert schedules.at(3 * niter - 1).learning_rate == pytest.approx(peak_lr, rel=1e-12)
    it = 3 * niter + 40
    cosine = 1e-6 + 0.5 * (peak_lr - 1e-6) * (1 + math.cos(math.pi * 40 / (total - 3 * niter)))
    assert schedules.at(it).learning_rate == pytest.approx(cosine, rel=1e-12)
    # weight decay 0.04 -> 0.4 and teacher momentum 0.996 -> 1 by cosine over every iteration
    for it in (0, 17, total - 1):
        factor = 0.5 * (1 + math.cos(math.pi * it / total))
        values = schedules.at(it)
        assert values.weight_decay == pytest.approx(0.4 + (0.04 - 0.4) * factor, rel=1e-12)
        assert values.teacher_momentum == pytest.approx(1.0 + (0.996 - 1.0) * factor, rel=1e-12)
        assert values.epoch == it // niter
    assert schedules.at(total - 1).teacher_momentum > 0.99999
    # teacher temperature: per epoch, linear 0.04 -> 0.07 over 5 epochs, then constant
    for epoch in range(20):
        expected = 0.04 + (0.07 - 0.04) * epoch / 4 if epoch < 5 else 0.07
        assert schedules.at(epoch * niter).teacher_temperature == pytest.approx(expected, rel=1e-12)
    assert schedules.teacher_temperature == teacher_temperature_schedule(0.04, 0.07, 5, 20)
