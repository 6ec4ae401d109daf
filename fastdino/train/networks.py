"""Student, teacher and optimizer of a run, built from its config.

The student is backbone + DINO head with drop path; the teacher has the same architecture
without drop path, starts as a copy of the student and never gets gradients. Only the student
is wrapped for data parallelism (DDP); the teacher follows it by EMA on every rank alike.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.models import DINOHead, MultiCropWrapper, create_backbone


def _backbone(config, drop_path_rate: float) -> nn.Module:
    if config.is_vit:
        # A mask token only where the student is masked: an unused parameter would stall DDP.
        ffn = {} if config.ffn_layer == "default" else {"ffn_layer": config.ffn_layer}
        return create_backbone(config.arch, drop_path_rate=drop_path_rate, attn_backend=config.attn_backend,
                               activation_checkpointing=config.activation_checkpointing,
                               mask_token=config.uses_masks, **ffn)
    return create_backbone(config.arch, drop_path_rate=drop_path_rate)


def _head(config, backbone: nn.Module, out_dim: int) -> DINOHead:
    return DINOHead(backbone.num_features, out_dim, hidden_dim=config.head_hidden_dim,
                    bottleneck_dim=config.head_bottleneck_dim, norm_last_layer=config.norm_last_layer,
                    use_bn=config.use_bn_in_head)


def _network(config, drop_path_rate: float, teacher: bool) -> MultiCropWrapper:
    backbone = _backbone(config, drop_path_rate)
    head = _head(config, backbone, config.out_dim)
    ibot_head = _head(config, backbone, config.ibot_out_dim) if config.uses_masks and config.ibot_separate_head else None
    return MultiCropWrapper(backbone, head, global_crops_only=teacher, ibot_head=ibot_head)


def build_student_and_teacher(config, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Freshly initialized networks on ``device``; the caller seeds the RNG identically on every
    rank so that every rank starts from the same weights."""
    student = _network(config, config.drop_path_rate, teacher=False).to(device)
    teacher = _network(config, 0.0, teacher=True).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if device.type == "cuda" and torch.distributed.is_initialized() and _has_batch_norm(student):
        # The release synchronizes the batch statistics of convnets across GPUs (student and teacher).
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    return student, teacher


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def compile_backbone(network: MultiCropWrapper, **compile_options) -> None:
    """torch.compile in place (state-dict keys unchanged): each ViT block, which serves the
    packed and per-resolution multi-crop forwards alike, or the whole convnet.
    ``compile_options`` go to ``torch.compile`` (the GPU benchmark's CPU run passes a backend)."""
    blocks = getattr(network.backbone, "blocks", None)
    if blocks is not None:
        for block in blocks:
            block.compile(**compile_options)
    else:
        network.backbone.compile(**compile_options)


def lr_multiplier(name: str, depth: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> float:
    """DINOv2's layer-wise lr decay (get_vit_lr_decay_rate): block i of ``depth`` at decay^(depth - i),
    the embeddings and tokens (layer 0) at decay^(depth + 1), the head at full lr; the patch
    embedding's lr further x ``patch_embed_lr_mult``."""
    layer = depth + 1
    if name.startswith("backbone."):
        if any(part in name for part in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token",
                                         ".register_tokens")):
            layer = 0
        elif ".blocks." in name:
            layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
    multiplier = layerwise_decay ** (depth + 1 - layer)
    return multiplier * patch_embed_lr_mult if "patch_embed" in name else multiplier


def parameter_groups(network: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """The release's get_params_groups: no weight decay for biases and 1-D parameters; with
    DINOv2's layer-wise lr decay, one group per (weight decay, lr multiplier) besides."""
    blocks = getattr(getattr(network, "backbone", None), "blocks", None)
    depth = len(blocks) if blocks is not None else 0
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        decayed = not (name.endswith(".bias") or parameter.ndim == 1)
        multiplier = lr_multiplier(name, depth, layerwise_decay, patch_embed_lr_mult) if depth else 1.0
        groups.setdefault((decayed, multiplier), []).append(parameter)
    return [{"params": params, "apply_weight_decay": decayed, "lr_multiplier": multiplier,
             **({} if decayed else {"weight_decay": 0.0})}
            for (decayed, multiplier), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def last_layer_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The head's prototypes layer, by the release's name rule (cancel_gradients_last_layer
    matches "last_layer" in the parameter name): what the freeze of its first epochs holds."""
    return [parameter for name, parameter in network.named_parameters() if "last_layer" in name]


def _last_layer_apart(groups: list[dict], network: nn.Module) -> list[dict]:
    """``groups`` with the head's last layer moved to groups of its own (same settings, after
    the others).

    Fused SGD starts the momentum of a whole group in one step (when every buffer of the group
    is missing) and fails on a group where only some are: the frozen last layer has no gradient,
    hence no momentum buffer, while the rest trains. In groups of its own its momentum starts at
    its first gradient, as in the release's (non-fused) SGD.
    """
    last_layer = {id(p) for p in last_layer_parameters(network)}

    def part(group: dict, of_last_layer: bool) -> dict:
        return {**group, "params": [p for p in group["params"] if (id(p) in last_layer) == of_last_layer]}

    split = [part(group, False) for group in groups] + [part(group, True) for group in groups]
    return [group for group in split if group["params"]]


def _mark_parameters_written(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # The fused kernels write the parameters without bumping their version counters, which
    # tell derived caches (the ViT's interpolated position tables) that the values changed.
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def build_optimizer(config, network: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or SGD, momentum 0.9) with the fused multi-tensor kernels; lr and weight decay are
    set by the schedules before every step. Every step bumps the parameters' version counters,
    as an unfused in-place update would."""
    groups = parameter_groups(network, config.layerwise_decay, config.patch_embed_lr_mult)
    fused = device.type in ("cuda", "cpu")
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(_last_layer_apart(groups, network), lr=0.0, momentum=0.9, fused=fused,
                                    foreach=None if fused else True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=0.0, fused=fused, foreach=None if fused else True)
    if fused:
        optimizer.register_step_post_hook(_mark_parameters_written)
    return optimizer
