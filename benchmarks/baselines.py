"""What a user runs without fastdino: the public DINO release's loss, EMA and clipping code.

Written the way the release writes them (main_dino.py, utils.py), so the benchmarks compare
fastdino with the code it replaces on the same inputs.
"""

import math

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


def release_multicrop_loader(data_path, batch_size, n_local_crops, num_workers, global_crop_size=224,
                             local_crop_size=96):
    """The release's ``DataAugmentationDINO`` on torchvision's ``ImageFolder`` in a DataLoader
    (main_dino.py, utils.GaussianBlur / Solarization), with the same default scales."""
    import random

    from PIL import ImageFilter, ImageOps
    from torchvision import datasets, transforms

    class GaussianBlur:
        def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
            self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

        def __call__(self, img):
            if random.random() > self.prob:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    class DataAugmentationDINO:
        def __init__(self, global_crops_scale, local_crops_scale, local_crops_number):
            flip_and_color_jitter = transforms.Compose([
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                       p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ])
            normalize = transforms.Compose([
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ])
            bicubic = transforms.InterpolationMode.BICUBIC
            self.global_transfo1 = transforms.Compose([
                transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter, GaussianBlur(1.0), normalize])
            self.global_transfo2 = transforms.Compose([
                transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
            self.local_crops_number = local_crops_number
            self.local_transfo = transforms.Compose([
                transforms.RandomResizedCrop(local_crop_size, scale=local_crops_scale, interpolation=bicubic),
                flip_and_color_jitter, GaussianBlur(p=0.5), normalize])

        def __call__(self, image):
            crops = [self.global_transfo1(image), self.global_transfo2(image)]
            crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
            return crops

    dataset = datasets.ImageFolder(data_path, transform=DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), n_local_crops))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=True,
                                       persistent_workers=num_workers > 0)


@torch.no_grad()
def release_update_center(center, teacher_output, center_momentum=0.9):
    """The release's DINOLoss.update_center: a blocking all-reduce of the batch's teacher sum."""
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(batch_center)
        world_size = torch.distributed.get_world_size()
    batch_center = batch_center / (len(teacher_output) * world_size)
    center.mul_(center_momentum).add_(batch_center * (1 - center_momentum))


def release_cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """The release's utils.cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for name, parameter in model.named_parameters():
        if "last_layer" in name:
            parameter.grad = None


def release_train_step(student, teacher, optimizer, center, crops, *, lr, weight_decay, momentum,
                       teacher_temp, clip_grad=3.0, epoch=1, freeze_last_layer=1, autocast_dtype=None):
    """One iteration of the release's train_one_epoch (main_dino.py) without fp16 scaling: the
    networks' per-resolution forward, the Python-loop loss, the center update, a host sync on the
    loss, per-parameter clipping with .item(), the last-layer freeze, the optimizer step, the
    per-parameter EMA loop, and the final synchronize."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if index == 0:  # only the first group is regularized
            group["weight_decay"] = weight_decay
    device_type = crops[0].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss = release_dino_loss(student_output.float(), teacher_output.float(), center, len(crops),
                                 teacher_temp=teacher_temp)
    release_update_center(center, teacher_output.float())
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"Loss is {loss.item()}, stopping training")
    optimizer.zero_grad()
    loss.backward()
    release_clip_gradients(student.parameters(), clip_grad)
    release_cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    release_ema(list(teacher.parameters()), list(student.parameters()), momentum)
    if torch.cuda.is_available() and crops[0].is_cuda:
        torch.cuda.synchronize()
    return loss


def release_step_on_copies(student, teacher, crops, values, *, clip_grad, autocast_dtype, out_dim):
    """A callable running ``release_train_step`` on copies of ``student`` and ``teacher`` as the
    release builds them: AdamW over the release's param groups, a zero center, one backbone
    forward per crop resolution with SDPA attention. ``values``: the schedules at the step."""
    import copy

    from fastdino.train.networks import parameter_groups

    release_student, release_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    optimizer = torch.optim.AdamW(parameter_groups(release_student))  # the release's choice
    center = torch.zeros(1, out_dim, device=next(student.parameters()).device)
    release_student.packed = release_teacher.packed = False
    release_student.backbone.attn_backend = release_teacher.backbone.attn_backend = "sdpa"

    def step(_=None):
        release_train_step(release_student, release_teacher, optimizer, center, crops,
                           lr=values.learning_rate, weight_decay=values.weight_decay,
                           momentum=values.teacher_momentum, teacher_temp=values.teacher_temperature,
                           clip_grad=clip_grad, autocast_dtype=autocast_dtype)
    return step


# -- DINOv2 (dinov2/loss/*.py), written as the release writes them ----------------------------

def dinov2_softmax_center_teacher(teacher_output, center, teacher_temp):
    """DINOLoss / iBOTPatchLoss.softmax_center_teacher (the center update is timed by nobody)."""
    return F.softmax((teacher_output - center) / teacher_temp, dim=-1)


def dinov2_dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp=0.1):
    """DINOLoss.forward: every student tensor against every teacher tensor."""
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


def dinov2_ibot_forward_masked(student_patch_tokens_masked, teacher_patch_tokens_masked, masks_weight,
                               n_crops, student_temp=0.1):
    """iBOTPatchLoss.forward_masked with its PyTorch ``lossfunc`` (public xformers has no
    ``cross_entropy``, so this is what DINOv2 runs)."""
    loss = torch.sum(teacher_patch_tokens_masked * F.log_softmax(student_patch_tokens_masked / student_temp, dim=-1),
                     dim=-1)
    return -(loss * masks_weight).sum() / n_crops


@torch.no_grad()
def dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """DINOLoss.sinkhorn_knopp_teacher on one process."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dinov2_koleo_loss(student_output, eps=1e-8):
    """KoLeoLoss.forward."""
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(student_output, student_output[nearest])
    return -torch.log(distances + eps).mean()


def dinov2_masked_patch_counts(n_global_crops, patches_per_crop, mask_probability=0.5, ratio_range=(0.1, 0.5)):
    """Masked patches per masked crop as DINOv2's collate draws them: int(n_global_crops *
    probability) crops, one ratio in each of as many equal intervals of ``ratio_range`` (the
    interval's midpoint here, so every run has the same sizes)."""
    n_masked_crops = int(n_global_crops * mask_probability)
    low, high = ratio_range
    width = (high - low) / n_masked_crops
    return [int(patches_per_crop * (low + (i + 0.5) * width)) for i in range(n_masked_crops)]
