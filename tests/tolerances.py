"""The one table of numerical tolerances, per input dtype, used by every op test.

Errors are relative in norm, ||actual - expected|| / max(||expected||, scale), against a float64
reference computed on the very same (upcast) inputs. ``scale`` is the natural size of the
quantity's terms where the result can cancel to ~0: the DINO gradient of a row is
(n_t * softmax - Q) / (tau_s * B * n_pairs), which vanishes when student and teacher agree, so
its errors are measured against sqrt(rows) / (tau_s * B * n_pairs), the size of those terms;
likewise the loss against mean |s| / tau_s, the teacher column sum against the column sums of
|t|, an EMA against |m t| + |(1 - m) s| and the center against the momentum average of |t|. Never a per-element rtol on a quantity that can
cancel: float32 cannot resolve an entry far below its terms, so such a test passes or fails
with the seed.

The error model, float32 (unit roundoff u = 2^-24 = 6e-8):
- dino_loss: every probability is an exp of a difference of scaled logits z = (t - c) / tau_t
  or s / tau_s, computed to about half an ulp of max |z| (1.5e-5 for |z| ~ 300: logits of
  scale 3 at tau_t = 0.04, as the tests draw them), whatever K; so a gradient row is off by
  ~1e-5 of its terms (grad 2e-5) and the loss by less (1e-5). Larger logits widen both in
  proportion (``conditioning``).
- teacher_sum and center: float32 sums of a few O(1) rows and a momentum average of them: a few
  u per step (1e-6).
- ema: one float32 multiply-add per element (1e-6).
- clip: norms over up to 65537 terms, and the clipped gradients inherit the norm's error through
  the factor. torch's CPU float32 norm (the "torch" backend) errs there by 3e-7 rms, set by its
  accumulation order (1.05e-6 in the worst of 2000 draws); 2e-6 is 6 times that rms.
- sinkhorn: each entry of Q is exp(z) of z = (t - m) / tau to half an ulp of |z| (z <= 2 max|t|
  / tau = 50 for head logits |t| <= 1 at tau = 0.04: 3e-6), then 2n + 1 float32 divisions by sums
  (a few u each); the output is float32 whatever the input dtype.
bfloat16/float16 outputs (gradients, EMA teachers, clipped gradients) carry one rounding to
8 / 11 significant bits, a relative error of at most u = 3.9e-3 / 4.9e-4 per element: their
tolerances are just above u. Losses and sums are float32 whatever the input dtype.
"""

import torch

TOLERANCES = {
    # quantity:       loss   gradient  teacher_sum  center  ema   clip (norms and clipped grads)
    torch.float32: dict(loss=1e-5, grad=2e-5, teacher_sum=1e-6, center=1e-6, ema=1e-6, clip=2e-6,
                        sinkhorn=2e-5),
    torch.bfloat16: dict(loss=1e-5, grad=4e-3, teacher_sum=1e-6, center=1e-6, ema=4e-3, clip=4e-3,
                         sinkhorn=2e-5),
    torch.float16: dict(loss=1e-5, grad=5e-4, teacher_sum=1e-6, center=1e-6, ema=5e-4, clip=5e-4,
                        sinkhorn=2e-5),
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
