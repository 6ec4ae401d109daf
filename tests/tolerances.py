"""The one table of numerical tolerances, per input dtype, used by every op test.

Errors are relative in norm, ||actual - expected|| / max(||expected||, scale), against a float64
reference computed on the very same (upcast) inputs. ``scale`` is the natural size of the
quantity's terms where the result can cancel to ~0: the DINO gradient of a row is
(n_t * softmax - Q) / (tau_s * B * n_pairs), which vanishes when student and teacher agree, so
its errors are measured against sqrt(rows) / (tau_s * B * n_pairs), the size of those terms;
likewise the loss against mean |s| / tau_s. float32 math over K = 65536
terms lands near 1e-6 to 5e-6; bfloat16/float16 outputs carry one rounding to 8 / 11 mantissa bits.
"""

import torch

TOLERANCES = {
    # quantity:       loss   gradient  teacher_sum  center  ema   clip (norms and clipped grads)
    torch.float32: dict(loss=1e-5, grad=2e-5, teacher_sum=1e-6, center=1e-6, ema=1e-6, clip=1e-6),
    torch.bfloat16: dict(loss=1e-5, grad=4e-3, teacher_sum=1e-6, center=1e-6, ema=4e-3, clip=4e-3),
    torch.float16: dict(loss=1e-5, grad=5e-4, teacher_sum=1e-6, center=1e-6, ema=5e-4, clip=5e-4),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    return float((actual - expected).norm() / expected.norm().clamp_min(max(scale, 1e-300)))


def assert_close(actual, expected, dtype, quantity, context="", scale=0.0, conditioning=1.0):
    """``conditioning`` widens the tolerance for inputs whose float32 rounding alone costs more
    (logits far larger than a DINO head produces)."""
    tolerance = TOLERANCES[dtype][quantity] * conditioning
    error = relative_error(actual, expected, scale)
    assert error <= tolerance, f"{quantity}: relative error {error:.3g} > {tolerance:g} {context}"
