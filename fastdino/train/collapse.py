"""Signs of DINO's two collapse modes, from the teacher's output distribution.

The loss is H(P_t, P_s) = h(P_t) + KL(P_t || P_s). Both collapses drive the KL to 0; they differ
in the teacher entropy h(P_t): near 0 when one dimension dominates (centering too weak), near
ln K when the output is uniform (sharpening too weak; the loss then sits at ln K). Every teacher
view is paired with the same number of student views, so the mean over pairs of h(P_t) is the
mean teacher entropy over rows, and KL = loss - h(P_t) on the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean over rows of h(softmax((t - c) / tau_t)), in nats, as a 0-d float32 tensor."""
    log_probabilities = F.log_softmax((teacher_logits.float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)
    return -(log_probabilities.exp() * log_probabilities).sum(dim=-1).mean()


@dataclass
class CollapseMonitor:
    """Flags h(P_t) within ``margin`` x ln K of 0 or of ln K.

    At initialization the teacher is close to uniform (its entropy starts near ln K and falls as
    the teacher sharpens), so the uniform sign is only raised after ``grace_steps``.
    """

    n_classes: int
    margin: float = 0.02
    grace_steps: int = 0

    @property
    def max_entropy(self) -> float:
        return math.log(self.n_classes)

    def sign(self, entropy: float, step: int) -> tuple[str, str] | None:
        """None, or (mode, sentence): mode "dominant" (entropy near 0) or "uniform" (near ln K)."""
        if entropy <= self.margin * self.max_entropy:
            return "dominant", (f"teacher entropy {entropy:.3f} is near 0: one output dimension dominates "
                                f"(collapse; centering too weak?)")
        if step >= self.grace_steps and entropy >= (1 - self.margin) * self.max_entropy:
            return "uniform", (f"teacher entropy {entropy:.3f} is near ln K = {self.max_entropy:.3f}: the "
                               f"output is uniform (collapse; sharpening too weak? lower teacher_temp)")
        return None
