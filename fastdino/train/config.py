"""The training configuration, in one place: the schema, named presets, overrides, the
environment, and every check a run needs before it starts.

    config = resolve_config("vit_small_p8", ["epochs=300", "teacher_temp=0.07"], data="/data/train")

Every field has a type and, where a bad value would only fail hours later, a check in
``TrainConfig.validate``; overrides are parsed against the field's type, so unknown keys and bad
values fail before anything starts, naming the key. The environment variables that force a
backend for the whole process (``FASTDINO_BACKEND``, ``FASTDINO_ATTENTION``,
``FASTDINO_DATA_BACKEND``) are applied here, once, as overrides of their keys. Fields marked
``flag`` are also command-line flags (``--data``). ``resolve_backends`` records what "auto" and
the environment chose on this machine; the resolved config and those backends are written to
the output directory and into every checkpoint, and compared on resume.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdino.data import DATA_BACKEND_ENV_VAR, DATA_BACKENDS, MultiCropRecipe
from fastdino.models import ATTENTION_BACKENDS, ATTENTION_ENV_VAR, list_backbones
from fastdino.ops import BACKEND_ENV_VAR, BACKENDS
from fastdino.runtime import DEVICES, device_type, get_logger

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
OPTIMIZERS = ("adamw", "sgd")
METHODS = ("dino", "dinov2")
CENTERINGS = ("centering", "sinkhorn_knopp")
LR_SCALINGS = ("linear", "sqrt")
FFN_LAYERS = ("default", "mlp", "swiglu")
RESUME_MODES = ("auto", "never", "restart")
PARALLELISMS = ("ddp", "fsdp")
# key -> the environment variable that forces it for the whole process (and for fastdino.ops,
# fastdino.models and fastdino.data outside training too)
ENVIRONMENT_OVERRIDES = {"ops_backend": BACKEND_ENV_VAR, "attn_backend": ATTENTION_ENV_VAR,
                         "data_backend": DATA_BACKEND_ENV_VAR}
_RECIPE_DEFAULTS = MultiCropRecipe()
logger = get_logger("train")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


def _choice(default: str, choices: tuple[str, ...], help: str) -> str:
    return field(default=default, metadata={"choices": choices, "help": help})


def _doc(default, help: str, flag: bool = False):
    """A field with its help; ``flag``: also a command-line flag (``--batch-size-per-gpu``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class TrainConfig:
    """Everything a DINO run depends on. Defaults are the public release's (main_dino.py)."""

    # -- run -------------------------------------------------------------------------------------
    preset: str = _doc("vit_small_p16", "the preset this config started from (informational)")
    data: str = _doc("", "image folder (class subfolders or flat) or a file list; empty: synthetic "
                         "images in <output_dir>/synthetic_images", flag=True)
    output_dir: str = _doc("", "checkpoints, metrics.jsonl, config.json, teacher_backbone.pth; "
                               "empty: runs/<preset>", flag=True)
    seed: int = _doc(0, "seed of the initialization, data order, augmentations and drop path", flag=True)
    device: str = _choice("auto", DEVICES, "auto: this rank's GPU when there is one, else the CPU")
    resume: str = _doc("auto", "auto (also a bare --resume): continue from the newest readable "
                               "checkpoint in output_dir if any (a lone checkpoint.pth of the release "
                               "too), refusing when none can be read; never: refuse to run over "
                               "checkpoints; restart: start at step 0, the checkpoints moved to "
                               "output_dir/replaced-<time>; or a checkpoint path", flag=True)
    max_steps: int = _doc(0, "stop (with a checkpoint) after this many optimizer steps in total; "
                             "0: run all epochs. Schedules still span all epochs")
    method: str = _choice("dino", METHODS, "dino: the DINO loss; dinov2: DINOv2's recipe (the DINO loss as "
                                           "DINOv2 pairs the crops, the iBOT masked-patch loss, KoLeo), "
                                           "on a ViT built with a mask token")
    # -- networks --------------------------------------------------------------------------------
    arch: str = _doc("vit_small_p16", "backbone name (fastdino.models.list_backbones())")
    out_dim: int = _doc(65536, "K, the number of prototypes of the DINO head")
    head_hidden_dim: int = _doc(2048, "hidden width of the head's MLP")
    head_bottleneck_dim: int = _doc(256, "width of the head's bottleneck before the prototypes")
    norm_last_layer: bool = _doc(True, "fix the prototypes' weight-norm magnitude to 1")
    use_bn_in_head: bool = _doc(False, "batch norm after the head's hidden layers (the release's --use_bn_in_head)")
    drop_path_rate: float = _doc(0.1, "stochastic depth of the student")
    ffn_layer: str = _choice("default", FFN_LAYERS, "the ViT blocks' feed-forward layer: default (the arch's: "
                                                    "SwiGLU for vit_giant_p14, else the MLP), mlp or swiglu")
    attn_backend: str = _choice("auto", ATTENTION_BACKENDS, "attention implementation of the ViTs "
                                                            f"(fastdino.models); {ATTENTION_ENV_VAR} overrides it")
    activation_checkpointing: bool = _doc(False, "recompute each ViT block in the backward (less memory)")
    compile: bool = _doc(False, "torch.compile the backbones (each ViT block)")
    parallelism: str = _choice("ddp", PARALLELISMS, "ddp: the student replicated on every rank; fsdp: "
                                                    "student, teacher and optimizer state sharded with "
                                                    "FSDP2 (ViT-L and larger)")
    # -- loss and teacher --------------------------------------------------------------------------
    student_temp: float = _doc(0.1, "student softmax temperature")
    warmup_teacher_temp: float = _doc(0.04, "teacher temperature at the start of its warm-up")
    teacher_temp: float = _doc(0.04, "teacher temperature after its warm-up")
    warmup_teacher_temp_epochs: int = _doc(0, "epochs of linear teacher-temperature warm-up")
    center_momentum: float = _doc(0.9, "momentum of the teacher center")
    momentum_teacher: float = _doc(0.996, "teacher EMA momentum at the start (cosine to 1)")
    ops_backend: str = _choice("auto", BACKENDS, "fused loss, EMA and clipping (fastdino.ops): triton on "
                                                 f"GPUs, cpp on CPUs under auto; {BACKEND_ENV_VAR} overrides it")
    # -- DINOv2 (method=dinov2) -------------------------------------------------------------------
    dino_loss_weight: float = _doc(1.0, "dinov2: weight of the DINO (CLS) loss")
    ibot_loss_weight: float = _doc(1.0, "dinov2: weight of the iBOT masked-patch loss; 0 turns masking off")
    koleo_loss_weight: float = _doc(0.1, "dinov2: weight of the KoLeo regularizer on the student's global "
                                         "CLS features")
    ibot_separate_head: bool = _doc(False, "dinov2: a head of its own for the patch tokens (else the DINO "
                                           "head serves both, DINOv2's default)")
    ibot_out_dim: int = _doc(65536, "dinov2: prototypes of the iBOT head (with ibot_separate_head)")
    centering: str = _choice("centering", CENTERINGS, "dinov2: the teacher's targets: centering (a momentum "
                                                      "center, as DINO) or sinkhorn_knopp (3 iterations over "
                                                      "the global batch)")
    mask_sample_probability: float = _doc(0.5, "dinov2: fraction of the global crops that are masked")
    mask_ratio_min_max: tuple[float, float] = _doc((0.1, 0.5), "dinov2: the masked crops' patch ratios are "
                                                               "spread over this range")
    # -- optimization ------------------------------------------------------------------------------
    epochs: int = _doc(100, "training epochs", flag=True)
    batch_size_per_gpu: int = _doc(64, "images per rank per forward (micro-batch)", flag=True)
    grad_accumulation_steps: int = _doc(1, "micro-batches per optimizer step")
    optimizer: str = _choice("adamw", OPTIMIZERS, "adamw (ViTs) or sgd with momentum 0.9 (ResNet-50)")
    lr: float = _doc(0.0005, "peak learning rate at a global batch of 256 (lr_scaling=linear), or of 1024 "
                             "(lr_scaling=sqrt)", flag=True)
    lr_scaling: str = _choice("linear", LR_SCALINGS, "linear: lr x global batch / 256 (DINO); sqrt: lr x "
                                                     "sqrt(global batch / 1024) (DINOv2)")
    layerwise_decay: float = _doc(1.0, "lr of ViT block i x decay^(depth - i), the head and the last "
                                       "block at full lr (DINOv2: 0.9); 1: off")
    patch_embed_lr_mult: float = _doc(1.0, "extra lr factor of the patch embedding (DINOv2: 0.2)")
    min_lr: float = _doc(1e-6, "learning rate at the end of the cosine")
    warmup_epochs: int = _doc(10, "epochs of linear learning-rate warm-up")
    weight_decay: float = _doc(0.04, "weight decay at the start (cosine)")
    weight_decay_end: float = _doc(0.4, "weight decay at the end")
    clip_grad: float = _doc(3.0, "per-parameter gradient norm clip; 0 disables")
    freeze_last_layer: int = _doc(1, "epochs during which the head's last layer is not updated")
    precision: str = _choice("auto", PRECISIONS, "auto: bf16 autocast on GPUs, fp32 on CPUs; "
                                                 "fp16 uses a gradient scaler")
    # -- data ------------------------------------------------------------------------------------
    n_local_crops: int = _doc(8, "local crops per image (2 global crops always)", flag=True)
    global_crop_size: int = _doc(_RECIPE_DEFAULTS.global_crop_size, "side of the global crops in pixels")
    local_crop_size: int = _doc(_RECIPE_DEFAULTS.local_crop_size, "side of the local crops in pixels")
    global_crop_scale: tuple[float, float] = _doc(_RECIPE_DEFAULTS.global_crop_scale,
                                                  "area fraction range of the global crops")
    local_crop_scale: tuple[float, float] = _doc(_RECIPE_DEFAULTS.local_crop_scale,
                                                 "area fraction range of the local crops")
    # the rest of the augmentation recipe (fastdino.data.MultiCropRecipe; defaults: the release's);
    # a triple applies to (first global crop, second global crop, each local crop)
    aspect_ratio: tuple[float, float] = _doc(_RECIPE_DEFAULTS.aspect_ratio, "aspect ratio range of the crops")
    flip_probability: float = _doc(_RECIPE_DEFAULTS.flip_probability, "horizontal flip probability")
    color_jitter_probability: float = _doc(_RECIPE_DEFAULTS.color_jitter_probability,
                                           "probability of the colour jitter")
    brightness: float = _doc(_RECIPE_DEFAULTS.brightness, "colour jitter: brightness strength")
    contrast: float = _doc(_RECIPE_DEFAULTS.contrast, "colour jitter: contrast strength")
    saturation: float = _doc(_RECIPE_DEFAULTS.saturation, "colour jitter: saturation strength")
    hue: float = _doc(_RECIPE_DEFAULTS.hue, "colour jitter: hue strength, in [0, 0.5]")
    grayscale_probability: float = _doc(_RECIPE_DEFAULTS.grayscale_probability, "grayscale probability")
    blur_probabilities: tuple[float, float, float] = _doc(_RECIPE_DEFAULTS.blur_probabilities,
                                                          "Gaussian blur probability per crop kind")
    blur_sigma: tuple[float, float] = _doc(_RECIPE_DEFAULTS.blur_sigma, "Gaussian blur sigma range")
    blur_kernel_size: int = _doc(_RECIPE_DEFAULTS.blur_kernel_size, "Gaussian blur kernel side (odd)")
    solarize_probabilities: tuple[float, float, float] = _doc(_RECIPE_DEFAULTS.solarize_probabilities,
                                                              "solarization probability per crop kind")
    mean: tuple[float, float, float] = _doc(_RECIPE_DEFAULTS.mean, "normalization mean (RGB, in [0, 1])")
    std: tuple[float, float, float] = _doc(_RECIPE_DEFAULTS.std, "normalization std (RGB)")
    data_backend: str = _choice("auto", DATA_BACKENDS, "multi-crop pipeline (fastdino.data); "
                                                       f"{DATA_BACKEND_ENV_VAR} overrides it")
    data_threads: int = _doc(0, "decoding threads/workers per rank; 0: the loader's default (the "
                                "cores this process may use, divided by LOCAL_WORLD_SIZE)")
    data_cache_dir: str = _doc("", "where the checked index of each dataset is cached; empty: "
                                   "$FASTDINO_CACHE_DIR/index, else ~/.cache/fastdino/index")
    skip_bad_files: bool = _doc(False, "leave out files that cannot be decoded (named and counted in a "
                                       "warning) instead of refusing to start")
    synthetic_images: int = _doc(64, "images generated when data is empty")
    # -- checkpoints and logs --------------------------------------------------------------------
    checkpoint_every_steps: int = _doc(1000, "checkpoint every N optimizer steps (and at each epoch end); 0: epoch ends only")
    keep_last_checkpoints: int = _doc(3, "checkpoints kept (older ones are deleted)")
    log_every_steps: int = _doc(10, "metrics (a host sync) every N optimizer steps")
    tensorboard: bool = _doc(False, "also write the metrics to TensorBoard in <output_dir>/tensorboard "
                                    "(needs the tensorboard package)")
    # -- the job --------------------------------------------------------------------------------
    distributed_timeout_minutes: float = _doc(30.0, "how long a rank waits in a collective for the others "
                                                    "(a stopped or stalled rank) before the run stops, "
                                                    "naming the collective and the missing ranks")

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad key; returns self."""
        def fail(key, why):
            raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        for spec in dataclasses.fields(self):
            choices = spec.metadata.get("choices")
            if choices and getattr(self, spec.name) not in choices:
                fail(spec.name, f"choose one of {', '.join(choices)}")
        if self.arch not in list_backbones():
            fail("arch", f"choose one of {', '.join(list_backbones())}")
        for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "epochs", "batch_size_per_gpu",
                    "grad_accumulation_steps", "global_crop_size", "local_crop_size",
                    "keep_last_checkpoints", "log_every_steps", "synthetic_images"):
            if getattr(self, key) < 1:
                fail(key, "must be >= 1")
        for key in ("max_steps", "n_local_crops", "warmup_epochs", "warmup_teacher_temp_epochs",
                    "freeze_last_layer", "checkpoint_every_steps", "data_threads", "seed"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp", "lr", "distributed_timeout_minutes"):
            if not getattr(self, key) > 0:
                fail(key, "must be > 0")
        if self.patch_size:
            crops = ("global_crop_size", "local_crop_size") if self.n_local_crops else ("global_crop_size",)
            for key in crops:
                if getattr(self, key) < self.patch_size:
                    fail(key, f"smaller than one {self.patch_size} x {self.patch_size} patch of arch={self.arch}")
        for key in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            if not getattr(self, key) >= 0:
                fail(key, "must be >= 0")
        for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
            if not getattr(self, key) >= 0:
                fail(key, "must be >= 0")
        for key in ("layerwise_decay", "patch_embed_lr_mult"):
            if not 0 < getattr(self, key) <= 1:
                fail(key, "must be in (0, 1]")
        if self.ibot_out_dim < 1:
            fail("ibot_out_dim", "must be >= 1")
        low, high = self.mask_ratio_min_max
        if not 0 <= low <= high <= 1:
            fail("mask_ratio_min_max", "must be two ratios 0 <= min <= max <= 1")
        if self.method == "dinov2":
            if not self.dino_loss_weight > 0:
                fail("dino_loss_weight", "must be > 0 with method=dinov2 (its teacher entropy is the collapse "
                                         "monitor's signal)")
            if not self.is_vit:
                fail("method", f"dinov2 needs a ViT backbone (its mask token and patch tokens), not arch={self.arch!r}")
            if self.global_crop_size % self.patch_size:
                fail("global_crop_size", f"dinov2 masks whole patches: must be a multiple of patch {self.patch_size}")
        for key in ("center_momentum", "momentum_teacher", "drop_path_rate", "mask_sample_probability"):
            if not 0 <= getattr(self, key) <= 1:
                fail(key, "must be in [0, 1]")
        if self.warmup_epochs > self.epochs:
            fail("warmup_epochs", f"longer than epochs={self.epochs}")
        if self.warmup_teacher_temp_epochs > self.epochs:
            fail("warmup_teacher_temp_epochs", f"longer than epochs={self.epochs}")
        try:
            self.multicrop_recipe()  # the recipe checks its crop sizes and scales itself
        except ValueError as error:
            raise ConfigError(str(error).removeprefix(f"{MultiCropRecipe.__name__}.")) from None
        if not self.is_vit:
            for key in ("attn_backend", "activation_checkpointing", "ffn_layer"):
                if getattr(self, key) != TrainConfig.__dataclass_fields__[key].default:
                    fail(key, f"applies to the ViT backbones only, not to arch={self.arch!r}")
        if self.data and not Path(self.data).exists():
            fail("data", "no such file or folder")
        if self.resume not in RESUME_MODES and not Path(self.resume).is_file():
            fail("resume", f"neither {' nor '.join(RESUME_MODES)} nor an existing checkpoint file")
        if self.device == "cuda" and not torch.cuda.is_available():
            fail("device", "no CUDA device is available")
        if self.precision == "fp16" and device_type(self.device) != "cuda":
            fail("precision", "float16 with a gradient scaler needs a GPU; use bf16 or fp32")
        if self.parallelism == "fsdp" and self.resolved_precision == "fp16":
            fail("precision", "float16's gradient scaler is not supported with parallelism=fsdp; use bf16")
        if self.parallelism == "fsdp" and self.compile:
            fail("compile", "torch.compile of sharded blocks is not supported yet with parallelism=fsdp")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            fail("tensorboard", "the tensorboard package is not installed: pip install tensorboard")
        return self

    @property
    def is_vit(self) -> bool:
        """A ViT backbone: the attention and activation-checkpointing keys apply to it."""
        return self.arch.startswith("vit")

    @property
    def patch_size(self) -> int | None:
        """The ViT's patch size (``vit_*_p<N>``), None for other backbones."""
        match = re.fullmatch(r"vit_[a-z]+_p(\d+)(_reg\d+)?", self.arch)
        return int(match.group(1)) if match else None

    @property
    def uses_masks(self) -> bool:
        """The student sees masked global crops (DINOv2's iBOT term): its ViT needs a mask token."""
        return self.method == "dinov2" and self.ibot_loss_weight > 0

    @property
    def resolved_precision(self) -> str:
        """"bf16", "fp16" or "fp32": "auto" is bf16 autocast on GPUs and fp32 on CPUs."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type(self.device) == "cuda" else "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.resolved_precision]

    def multicrop_recipe(self) -> MultiCropRecipe:
        """The augmentation recipe: every field of ``MultiCropRecipe`` is a key of this config."""
        return MultiCropRecipe(**{spec.name: getattr(self, spec.name) for spec in dataclasses.fields(MultiCropRecipe)})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.preset))

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples become lists), for config.json and checkpoints."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """The inverse of ``to_dict``, type-checked; unknown keys raise ConfigError."""
        known = {spec.name: spec for spec in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
        return cls(**{key: _coerce(key, value, known[key].type) for key, value in values.items()}).validate()


@dataclass(frozen=True)
class Preset:
    description: str
    overrides: dict


# DINOv2's defaults (dinov2/configs/ssl_default_config.yaml) as overrides of DINO's. Its local
# crops are 98 px at patch 14 (7 x 7 patches; DINOv2's vitl14.yaml), its lr is for a batch of 1024.
DINOV2_RECIPE = dict(
    method="dinov2", lr=0.004, lr_scaling="sqrt", layerwise_decay=0.9, patch_embed_lr_mult=0.2,
    min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.992,
    warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, n_local_crops=8,
    global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), local_crop_size=98, clip_grad=3.0,
    freeze_last_layer=1, epochs=100)

# Presets change only what differs from the release's defaults (the dataclass above).
PRESETS: dict[str, Preset] = {
    "vit_small_p16": Preset("the public release's defaults: ViT-S/16, 100 epochs, 2+8 crops", {}),
    "vit_small_p8": Preset(
        "the headline ViT-S/8 run: 2+10 crops, teacher temperature 0.04 -> 0.07 over 30 epochs, "
        "800 epochs",
        dict(arch="vit_small_p8", n_local_crops=10, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
             norm_last_layer=False, epochs=800, min_lr=1e-5, global_crop_scale=(0.25, 1.0),
             local_crop_scale=(0.05, 0.25))),
    "vit_base_p16": Preset(
        "ViT-B/16 as released: 400 epochs, lr 0.00075, teacher temperature 0.07 over 50 epochs",
        dict(arch="vit_base_p16", batch_size_per_gpu=32, epochs=400, lr=0.00075, min_lr=2e-6,
             teacher_temp=0.07, warmup_teacher_temp_epochs=50, freeze_last_layer=3, n_local_crops=10,
             global_crop_scale=(0.25, 1.0), local_crop_scale=(0.05, 0.25))),
    "vit_base_p8": Preset(
        "ViT-B/8: the ViT-B/16 recipe at patch 8",
        dict(arch="vit_base_p8", batch_size_per_gpu=32, epochs=400, lr=0.00075, min_lr=2e-6,
             teacher_temp=0.07, warmup_teacher_temp_epochs=50, freeze_last_layer=3, n_local_crops=10,
             global_crop_scale=(0.25, 1.0), local_crop_scale=(0.05, 0.25))),
    "vit_large_p16": Preset(
        "ViT-L/16 sharded with FSDP2: the ViT-B/16 recipe, bf16, activation checkpointing, drop path 0.4 "
        "(no published DINO recipe: DINOv2's drop path for ViT-L)",
        dict(arch="vit_large_p16", parallelism="fsdp", precision="bf16", activation_checkpointing=True,
             drop_path_rate=0.4, batch_size_per_gpu=32, epochs=400, lr=0.00075, min_lr=2e-6,
             teacher_temp=0.07, warmup_teacher_temp_epochs=50, freeze_last_layer=3, n_local_crops=10,
             global_crop_scale=(0.25, 1.0), local_crop_scale=(0.05, 0.25))),
    "dinov2_vits14": Preset(
        "DINOv2's recipe (ssl_default_config.yaml) on ViT-S/14: DINO + iBOT + KoLeo (1 / 1 / 0.1), "
        "centering, lr 0.004 at batch 1024 (sqrt scaling), layer-wise decay 0.9, 100 epochs",
        dict(DINOV2_RECIPE, arch="vit_small_p14", drop_path_rate=0.1)),
    "dinov2_vitl14": Preset(
        "DINOv2's ViT-L/14 (train/vitl14.yaml): SwiGLU FFN, separate iBOT head, 131072 prototypes "
        "each, Sinkhorn-Knopp, drop path 0.4; FSDP2, bf16, activation checkpointing",
        dict(DINOV2_RECIPE, arch="vit_large_p14", ffn_layer="swiglu", out_dim=131072, head_bottleneck_dim=384,
             ibot_separate_head=True, ibot_out_dim=131072, centering="sinkhorn_knopp", drop_path_rate=0.4,
             batch_size_per_gpu=32, momentum_teacher=0.994, lr=2e-4, warmup_epochs=80, weight_decay_end=0.2,
             layerwise_decay=1.0, epochs=500, parallelism="fsdp", precision="bf16",
             activation_checkpointing=True)),
    "resnet50": Preset(
        "ResNet-50 as the release's README runs it: SGD, lr 0.03, weight decay 1e-4, tighter crops",
        dict(arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
             global_crop_scale=(0.14, 1.0), local_crop_scale=(0.05, 0.14), drop_path_rate=0.0)),
    "tiny": Preset(
        "a CPU smoke run in about a minute: ViT-Tiny/16 on 64 px / 32 px crops, synthetic images",
        dict(arch="vit_tiny_p16", out_dim=4096, head_hidden_dim=512, head_bottleneck_dim=128,
             global_crop_size=64, local_crop_size=32, n_local_crops=2, batch_size_per_gpu=16,
             epochs=4, warmup_epochs=1, lr=0.02, min_lr=1e-5, freeze_last_layer=1,
             momentum_teacher=0.99, checkpoint_every_steps=0, log_every_steps=2, keep_last_checkpoints=2,
             precision="fp32")),
}


def _coerce(key: str, value, annotation):
    """``value`` (a string from the command line, or a JSON value) as the field's type."""
    annotation = typing.get_type_hints(TrainConfig)[key] if isinstance(annotation, str) else annotation
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(typing.get_args(annotation)):
            raise ConfigError(f"{key}={value!r}: expected {len(typing.get_args(annotation))} "
                              f"comma-separated numbers, e.g. {key}=0.4,1.0")
        return tuple(_coerce(key, item, item_type) for item in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if annotation is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"{key}: unsupported config field type {annotation!r}")


def parse_overrides(items: Iterable[str]) -> dict:
    """``["epochs=10", "lr=1e-3"]`` -> ``{"epochs": 10, "lr": 0.001}``, typed, or ConfigError."""
    hints = typing.get_type_hints(TrainConfig)
    parsed = {}
    for item in items:
        key, separator, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not key:
            raise ConfigError(f"{item!r}: overrides are written key=value, e.g. epochs=300")
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r} (in {item!r}); "
                              f"`python -m fastdino.train --help-config` lists the keys")
        parsed[key] = _coerce(key, value, hints[key])
    return parsed


def resolve_config(preset: str = "vit_small_p16", overrides: Iterable[str] | Mapping = (),
                   **fields) -> TrainConfig:
    """The validated config of ``preset`` with ``overrides`` (``key=value`` strings or a mapping),
    then ``fields`` (typed keyword values, e.g. from command-line flags), then the environment's
    backend variables (``ENVIRONMENT_OVERRIDES``) applied."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {"preset": preset, **PRESETS[preset].overrides}
    if isinstance(overrides, Mapping):
        values.update(overrides)
    else:
        values.update(parse_overrides(overrides))
    values.update({key: value for key, value in fields.items() if value is not None})
    return apply_environment(TrainConfig.from_dict(values))


def apply_environment(config: TrainConfig) -> TrainConfig:
    """``config`` with the keys that environment variables force (``FASTDINO_BACKEND=torch`` sets
    ops_backend=torch, ...), each change said once; ``FASTDINO_ATTENTION`` only for ViTs."""
    forced = {}
    for key, variable in ENVIRONMENT_OVERRIDES.items():
        value = os.environ.get(variable)
        if not value or getattr(config, key) == value:
            continue
        if key == "attn_backend" and not config.is_vit:
            continue
        choices = TrainConfig.__dataclass_fields__[key].metadata["choices"]
        if value not in choices:
            raise ConfigError(f"{variable}={value!r} (which sets {key}): choose one of {', '.join(choices)}")
        logger.info(f"{variable}={value} overrides {key}={getattr(config, key)}")
        forced[key] = value
    return dataclasses.replace(config, **forced).validate() if forced else config


def resolve_backends(config: TrainConfig, device: torch.device) -> dict[str, str]:
    """What runs on ``device`` for ``config``, with "auto" (and the environment) resolved: the
    device type, precision, fused ops, attention and data pipeline. Raises ConfigError naming
    the key when a backend asked for by name cannot run here."""
    from fastdino.data import resolve_data_backend
    from fastdino.models import resolve_attention_backend
    from fastdino.ops.backends import BackendUnavailableError, resolve_backend

    try:
        ops = resolve_backend("dino_loss", config.ops_backend, [torch.empty(0, device=device)])
    except BackendUnavailableError as error:
        raise ConfigError(f"ops_backend={config.ops_backend!r}: {error}") from None
    attention = "none (not a ViT)"
    if config.is_vit:
        attention = resolve_attention_backend(config.attn_backend, device, config.autocast_dtype or torch.float32)
    try:
        data = resolve_data_backend(config.data_backend)
    except ImportError as error:
        raise ConfigError(f"data_backend={config.data_backend!r}: {error}") from None
    if data == "dali":
        data = "dali-gpu" if device.type == "cuda" else "dali-cpu"
    return {"device": device.type, "precision": config.resolved_precision, "ops": ops,
            "attention": attention, "data": data}


def config_fields_help() -> str:
    """One line per key: name, type, default and what it does (``--help-config``)."""
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for spec in dataclasses.fields(TrainConfig):
        type_name = getattr(hints[spec.name], "__name__", str(hints[spec.name]))
        if typing.get_origin(hints[spec.name]) is tuple:
            type_name = ",".join(arg.__name__ for arg in typing.get_args(hints[spec.name]))
        default = spec.default
        choices = spec.metadata.get("choices")
        kind = "|".join(choices) if choices else type_name
        lines.append(f"  {spec.name}={kind}  (default {default!r})\n      {spec.metadata.get('help', '')}")
    return "\n".join(lines)


def presets_table() -> str:
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"{name}\n    {preset.description}")
        if preset.overrides:
            lines.append("    " + " ".join(f"{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
                                           for key, value in preset.overrides.items()))
    return "\n".join(lines)


def save_config_json(config: TrainConfig, backends: Mapping[str, str], path: Path) -> None:
    """The resolved config, and under "resolved_backends" what ran (``resolve_backends``)."""
    path.write_text(json.dumps({**config.to_dict(), "resolved_backends": dict(backends)}, indent=1) + "\n")
