"""GPU suite sections "attention" and "train" (benchmarks/bench_gpu.py).

attention: which backend the training step resolves to (``resolve_backends``, as the trainer
does), then ViT-S/8 over a DINO multi-crop batch (bf16 autocast): packed xformers (one
block-diagonal attention per block over all crops), packed FlexAttention with a block mask (if
this torch has it) and per-resolution SDPA (the release's one forward per crop size). Equality
of the CLS features in eval mode against per-resolution SDPA (bf16) and against a float32
forward; forward + backward time and peak memory in train mode (drop path 0.1).

train: the DINO step (``fastdino.train.step.DINOStep``) on ViT-S/8 and ViT-S/16, bf16, batch 64,
2 x 224 + 10 x 96 crops, K = 65536: eager, compiled as ``compile=true`` compiles it
(``compile_backbone``), fed by the data loader (the data-wait share), and the release's step
(``baselines.release_train_step``) on the same batch. img/s, MFU (against the bf16 matrix rate
measured in "environment"), peak memory, and the host synchronizations inside one step
(``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings

import torch
from torch import nn

from baselines import release_step_on_copies
from bench_models import multicrop_step_flops
from fastdino.data import build_multicrop_loader
from fastdino.models import create_backbone, vision_transformer, xformers_status
from fastdino.train import build_schedules, resolve_config
from fastdino.train.config import resolve_backends
from fastdino.train.networks import build_optimizer, build_student_and_teacher, compile_backbone
from fastdino.train.step import DINOStep
from gpu_suite import failure
from measure import Case, Provider

BF16_FEATURE_TOLERANCE = 2e-2  # relative norm error of bf16 CLS features (tests/test_models.py's bound)
DROP_PATH_RATE = 0.1
# (label, preset architecture, img/s target per H200); on the CPU their ViT-Tiny counterparts.
TRAIN_MODELS = (("ViT-S/8", "vit_small_p8", 700.0), ("ViT-S/16", "vit_small_p16", 3000.0))
TINY_ARCHS = {"vit_small_p8": "vit_tiny_p8", "vit_small_p16": "vit_tiny_p16"}
SPEEDUP_TARGET = 2.0  # over the release's step


def train_config(run, arch: str):
    """The headline ViT-S/8 recipe (2 + 10 crops, K = 65536) with ``arch``, batch 64, bf16; on the
    CPU the tiny preset shrunk further (32 / 16 px crops, K = 256, float32)."""
    if run.on_gpu:
        return resolve_config("vit_small_p8", {"arch": arch, "batch_size_per_gpu": 64})
    return resolve_config("tiny", {"arch": TINY_ARCHS[arch], "batch_size_per_gpu": 2, "n_local_crops": 2,
                                   "global_crop_size": 32, "local_crop_size": 16, "out_dim": 256,
                                   "head_hidden_dim": 64, "head_bottleneck_dim": 32})


def _crops(config, device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [config.global_crop_size] * 2 + [config.local_crop_size] * config.n_local_crops
    return [torch.randn(config.batch_size_per_gpu, 3, size, size, generator=generator).to(device)
            for size in sizes]


def _gib(measurement) -> float | None:
    return measurement.peak_memory_bytes / 2**30 if measurement.peak_memory_bytes is not None else None


def _relative(actual: torch.Tensor, expected: torch.Tensor):
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return "non-finite result"
    return float((actual - expected).norm() / expected.norm())


# -- attention ---------------------------------------------------------------------------------

def _flex_attention(run):
    """(attend(query, key, value, packing), "") through FlexAttention with a block-diagonal block
    mask per packing, or (None, why not)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return None, f"this torch has no FlexAttention ({error})"
    compiled = torch.compile(flex_attention, backend=run.compile_backend)  # eager flex builds the T x T scores
    masks = {}

    def attend(query, key, value, packing):
        mask = masks.get(packing.groups)
        if mask is None:
            lengths = torch.tensor(packing.sequence_lengths(), device=query.device)
            sequence = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), lengths)

            def same_sequence(batch, head, query_index, key_index):
                return sequence[query_index] == sequence[key_index]

            mask = masks[packing.groups] = create_block_mask(
                same_sequence, None, None, packing.num_tokens, packing.num_tokens, device=query.device,
                _compile=run.on_gpu)  # compiled: without, the mask is evaluated on all T x T pairs at once
        # (1, T, H, d) -> FlexAttention's (1, H, T, d), a view
        out = compiled(*(tensor.transpose(1, 2) for tensor in (query, key, value)), block_mask=mask)
        return out.transpose(1, 2)

    return attend, ""


@contextlib.contextmanager
def _packed_attention_through(attend):
    """The ViT's attention over packed crops through ``attend`` while the block runs."""
    original = vision_transformer.multi_head_attention

    def multi_head_attention(query, key, value, backend, packing=None):
        if packing is None:
            return original(query, key, value, backend, packing)
        return attend(query, key, value, packing)

    vision_transformer.multi_head_attention = multi_head_attention
    try:
        yield
    finally:
        vision_transformer.multi_head_attention = original


def attention(run) -> None:
    config = train_config(run, "vit_small_p8")
    chosen = resolve_backends(config, run.device)["attention"]
    run.figure("attention backend of the training step", chosen)
    run.figure("training step's multi-crop forward", "packed (one forward over all crops)" if chosen == "xformers"
               else "one forward per crop size")

    model = create_backbone(config.arch, drop_path_rate=DROP_PATH_RATE).to(run.device)
    crops = _crops(config, run.device)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16)
    variants = {"SDPA, per-resolution": ("sdpa", False, contextlib.nullcontext)}
    xformers = xformers_status(run.device, torch.bfloat16)
    if xformers == "available":
        variants["xformers, packed"] = ("xformers", True, contextlib.nullcontext)
    else:
        run.unavailable("xformers, packed", xformers)
    flex = None
    if not run.compile:
        run.unavailable("FlexAttention, packed", "--no-compile (FlexAttention runs compiled)")
    elif run.fits(120, "FlexAttention, packed"):
        flex, why_not = _flex_attention(run)
        if flex is None:
            run.unavailable("FlexAttention, packed", why_not)
        else:
            variants["FlexAttention, packed (block mask)"] = ("sdpa", True, lambda: _packed_attention_through(flex))

    def features(name):
        backend, packed, context = variants[name]
        model.attn_backend = backend
        with context():
            return model.forward_multicrop(crops, packed=packed)

    model.eval()
    with torch.no_grad():
        model.attn_backend = "sdpa"
        float32_reference = model.forward_multicrop(crops, packed=False).float()
        with autocast:
            outputs = {}
            for name in variants:
                try:
                    outputs[name] = features(name).float()
                except Exception as error:
                    run.figure(f"{name}: features", failure(error), gpu=False)
    baseline = outputs.get("SDPA, per-resolution")
    for name, output in outputs.items():
        run.figure(f"{name}: features vs float32", _relative(output, float32_reference), gpu=False)
        if baseline is not None and name != "SDPA, per-resolution":
            run.figure(f"{name}: features vs SDPA per-resolution (bf16)", _relative(output, baseline),
                       at_most=BF16_FEATURE_TOLERANCE, gpu=False)
    del float32_reference, outputs, baseline

    model.train()

    def step(name):
        def forward_backward(_):
            with autocast:
                out = features(name)
            out.float().sum().backward()
        return forward_backward

    timed = dict(variants)
    if not run.on_gpu and flex is not None:
        timed.pop("FlexAttention, packed (block mask)")
        run.unavailable("FlexAttention fwd+bwd", "FlexAttention has no backward on the CPU")
    flops = multicrop_step_flops(model, config.batch_size_per_gpu, [tuple(crop.shape[-2:]) for crop in crops])
    results, metrics = run.measure(Case(
        suite=run.section, name=f"{config.arch} multi-crop fwd+bwd", dtype="bfloat16",
        sizes={"batch": config.batch_size_per_gpu,
               "crops": f"2x{config.global_crop_size}+{config.n_local_crops}x{config.local_crop_size}"},
        providers=[Provider(name, step(name), lambda: model.zero_grad(set_to_none=True)) for name in timed],
        baselines=["SDPA, per-resolution"], items_per_run=config.batch_size_per_gpu, flops_per_run=flops,
        repeats=(3 if run.quick else 10) if run.on_gpu else 1), warmup=2 if run.on_gpu else 0)
    for name, measurement in results.items():
        run.figure(f"{name}: fwd+bwd time", measurement.median, "ms")
        run.figure(f"{name}: peak memory", _gib(measurement), "GiB")
        if "SDPA, per-resolution" in results and name != "SDPA, per-resolution":
            run.figure(f"{name}: speedup over SDPA per-resolution",
                       results["SDPA, per-resolution"].median / measurement.median, "x")


# -- train -------------------------------------------------------------------------------------

def dino_step_flops(student: nn.Module, teacher_crops: int, crop_sizes: list[tuple[int, int]]) -> int:
    """Model FLOPs per image of one DINO step: the student's forward + backward (3x a forward)
    over every crop, the teacher's forward over the global crops, backbone and head (its linear
    layers, 2 FLOPs per weight per row)."""
    backbone, head = student.backbone, student.head
    head_flops = 2 * sum(module.weight.numel() for module in head.modules() if isinstance(module, nn.Linear))
    head_flops += 2 * head.last_layer.weight_v.numel()
    per_crop = [backbone.forward_flops(h, w) + head_flops for h, w in crop_sizes]
    return 3 * sum(per_crop) + sum(per_crop[:teacher_crops])


def _host_syncs(run, step) -> int | None:
    """Synchronizations of the host with the GPU during one ``step(None)`` (None on the CPU)."""
    if not run.on_gpu:
        return None
    torch.cuda.synchronize(run.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def train(run) -> None:
    models = TRAIN_MODELS if run.on_gpu else TRAIN_MODELS[:1]  # on the CPU one model exercises the code
    for label, arch, images_per_s in models:
        if run.fits(60, f"{label} training step"):
            _train_case(run, label, arch, images_per_s)
            torch._dynamo.reset()  # the next model's compilation starts afresh (dynamo's recompile limit)
            if run.on_gpu:
                torch.cuda.empty_cache()
    for label, _, _ in TRAIN_MODELS[len(models):]:
        run.unavailable(f"{label} training step", "the CPU run times one model")


def _train_case(run, label: str, arch: str, images_per_s: float) -> None:
    config = train_config(run, arch)
    device, batch = run.device, config.batch_size_per_gpu
    crops = _crops(config, device)
    values = build_schedules(config, iterations_per_epoch=100, world_size=1).at(150)  # past the warm-ups
    torch.manual_seed(config.seed)
    student, teacher = build_student_and_teacher(config, device)

    def dino_step(student, teacher):
        return DINOStep(student, teacher, build_optimizer(config, student, device),
                        torch.zeros(1, config.out_dim, device=device), student_temp=config.student_temp,
                        center_momentum=config.center_momentum, clip_grad=config.clip_grad,
                        autocast_dtype=config.autocast_dtype)

    def timed(step):
        return lambda _: step([crops], values, freeze_last_layer=False)

    release_step = release_step_on_copies(student, teacher, crops, values, clip_grad=config.clip_grad,
                                          autocast_dtype=config.autocast_dtype, out_dim=config.out_dim)

    providers = [Provider("release-style step", release_step)]
    compiled_networks = (copy.deepcopy(student), copy.deepcopy(teacher)) if run.compile else None
    providers.append(Provider("fastdino step", timed(dino_step(student, teacher))))
    eager_step = providers[-1].fn
    if not compiled_networks:
        run.unavailable(f"{label}: fastdino step, compiled", "--no-compile")
    elif run.fits(180, f"{label}: fastdino step, compiled"):
        def compiled_provider():
            for network in compiled_networks:
                compile_backbone(network, backend=run.compile_backend)
            step = timed(dino_step(*compiled_networks))
            started = time.perf_counter()
            step(None)  # compiles
            if run.on_gpu:
                torch.cuda.synchronize(device)
            run.figure(f"{label}: compiled step's first call (compiling)", time.perf_counter() - started, "s")
            return Provider("fastdino step, compiled", step)
        providers.append(run.provider(f"{label}: fastdino step, compiled", compiled_provider))

    def loader_provider():
        photos = run.photo_folder(*_photo_sizes(run))
        loader = build_multicrop_loader(photos, batch, n_local_crops=config.n_local_crops, backend=config.data_backend,
                                        device=device, dtype=torch.float32, recipe=config.multicrop_recipe(),
                                        seed=config.seed, verbose=False)
        steps, step = loader.steps(), dino_step(student, teacher)
        run.figure(f"{label}: data backend of the loader-fed step", loader.backend, gpu=False)
        return Provider("fastdino step + loader", lambda _: step(next(steps)[1], values, freeze_last_layer=False))

    providers.append(run.provider(f"{label}: fastdino step + loader", loader_provider))
    providers = [provider for provider in providers if provider is not None]
    crop_sizes = [tuple(crop.shape[-2:]) for crop in crops]
    flops_per_image = dino_step_flops(student, 2, crop_sizes)
    run.figure(f"{label}: model FLOPs per image and step", flops_per_image / 1e9, "GFLOP", gpu=False)
    results, metrics = run.measure(Case(
        suite=run.section, name=f"{label} training step",
        dtype="bfloat16" if config.autocast_dtype else "float32",
        sizes={"arch": config.arch, "batch": batch, "K": config.out_dim,
               "crops": f"2x{config.global_crop_size}+{config.n_local_crops}x{config.local_crop_size}"},
        providers=providers, baselines=["release-style step"], items_per_run=batch,
        flops_per_run=batch * flops_per_image,
        repeats=(5 if run.quick else 20) if run.on_gpu else 1), warmup=2 if run.on_gpu else 0)

    for name, measurement in results.items():
        target = name in ("fastdino step", "fastdino step, compiled")
        run.figure(f"{label}, {name}: img/s", metrics[name]["images_per_s"], "img/s",
                   at_least=images_per_s if target else None)
        run.figure(f"{label}, {name}: MFU", metrics[name].get("mfu"), "%")
        run.figure(f"{label}, {name}: peak memory", _gib(measurement), "GiB")
        if "release-style step" in results and name != "release-style step":
            run.figure(f"{label}, {name}: speedup over the release's step",
                       results["release-style step"].median / measurement.median, "x",
                       at_least=SPEEDUP_TARGET if target else None)
    if "fastdino step" in results and "fastdino step + loader" in results:
        waiting = 1 - results["fastdino step"].median / results["fastdino step + loader"].median
        run.figure(f"{label}: data-wait share of the loader-fed step", max(0.0, waiting), "%")
    for name, step in (("fastdino step", eager_step), ("release-style step", release_step)):
        run.figure(f"{label}, {name}: host synchronizations per step", _host_syncs(run, step))
    compiled = next((p.fn for p in providers if p.name == "fastdino step, compiled"), None)
    if compiled is not None:
        run.figure(f"{label}, fastdino step, compiled: host synchronizations per step", _host_syncs(run, compiled))


def _photo_sizes(run) -> tuple[int, tuple[int, int]]:
    """(images, (width, height)) of the photo folder the data and train sections read."""
    return (256, (500, 375)) if run.on_gpu else (8, (80, 60))
