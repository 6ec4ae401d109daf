"""What a user runs without fastdino: the public DINO release's loss, EMA and clipping code.

Written the way the release writes them (main_dino.py, utils.py), so the benchmarks compare
fastdino with the code it replaces on the same inputs.
"""

import torch
import torch.nn.functional as F


def release_dino_loss(student_output, teacher_output, center, ncrops, student_temp=0.1, teacher_temp=0.04):
    """The release's DINOLoss.forward without the center update (timed separately by nobody)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


@torch.no_grad()
def release_ema(teacher_params, student_params, momentum):
    """The release's per-parameter teacher update loop."""
    for param_q, param_k in zip(student_params, teacher_params):
        param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


@torch.no_grad()
def foreach_lerp_ema(teacher_params, student_params, momentum):
    """The usual multi-tensor alternative: teacher += (1 - m) * (student - teacher)."""
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


def release_clip_gradients(parameters, clip):
    """The release's utils.clip_gradients: per-parameter norms with a host sync each."""
    norms = []
    for p in parameters:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def vit_dino_parameter_shapes(embed_dim=384, depth=12, patch_size=8, img_size=224, out_dim=65536,
                              hidden_dim=2048, bottleneck_dim=256):
    """Parameter shapes of a DINO ViT backbone + head (ViT-S/8 defaults: 158 tensors, ~44M)."""
    n_patches = (img_size // patch_size) ** 2
    shapes = [(1, 1, embed_dim), (1, n_patches + 1, embed_dim),
              (embed_dim, 3, patch_size, patch_size), (embed_dim,)]
    mlp_dim = 4 * embed_dim
    for _ in range(depth):
        shapes += [(embed_dim,), (embed_dim,), (3 * embed_dim, embed_dim), (3 * embed_dim,),
                   (embed_dim, embed_dim), (embed_dim,), (embed_dim,), (embed_dim,),
                   (mlp_dim, embed_dim), (mlp_dim,), (embed_dim, mlp_dim), (embed_dim,)]
    shapes += [(embed_dim,), (embed_dim,)]
    shapes += [(hidden_dim, embed_dim), (hidden_dim,), (hidden_dim, hidden_dim), (hidden_dim,),
               (bottleneck_dim, hidden_dim), (bottleneck_dim,), (out_dim, 1), (out_dim, bottleneck_dim)]
    return shapes
