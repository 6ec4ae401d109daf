"""fastdino.models: attention backends, the ViT (position embeddings, multi-crop packing,
gradients, FLOPs), the DINO head, the multi-crop wrapper and the backbone registry.

Small on purpose (ViT-Tiny, 16-48 px crops); checkpoint formats are in test_models_checkpoints.py.
"""

import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastdino.models import (
    ATTENTION_ENV_VAR,
    DINOHead,
    MultiCropWrapper,
    PackedSequences,
    convert_weight_norm_keys,
    create_backbone,
    list_backbones,
    resolve_attention_backend,
    vit_tiny,
    xformers_status,
)
from fastdino.models import attention as attention_module
from fastdino.models.attention import multi_head_attention
from fastdino.runtime import warn_once
from fastdino.models.vision_transformer import POS_EMBED_CACHE_SIZE, batch_same_size_crops, drop_path
from model_comparison import max_relative_difference, needs_timm, randomize_parameters, release_interpolation

FP32_TOLERANCE = 1e-5  # max relative difference, the bar for equal features
CUDA = torch.cuda.is_available()
XFORMERS_ON_GPU = CUDA and xformers_status("cuda") == "available"
needs_xformers = pytest.mark.skipif(not XFORMERS_ON_GPU, reason=(
    xformers_status("cuda") if CUDA else "xformers needs a CUDA device; none here"))


@pytest.fixture(autouse=True)
def no_forced_attention_backend(monkeypatch):
    # The tests choose backends themselves; a process-wide override would silently redirect them.
    monkeypatch.delenv(ATTENTION_ENV_VAR, raising=False)


def tiny_vit(generator, patch_size=8, img_size=32, **kwargs):
    """ViT-Tiny with random weights, in eval mode (no drop path) unless the test trains it."""
    return randomize_parameters(vit_tiny(patch_size=patch_size, img_size=img_size, **kwargs),
                                generator).eval()


def multicrop_batch(generator, batch=2, global_size=32, local_sizes=((16, 16),) * 3):
    """2 global crops then local crops, as lists of (B, 3, H, W) images."""
    sizes = [(global_size, global_size)] * 2 + list(local_sizes)
    return [torch.randn(batch, 3, h, w, generator=generator) for h, w in sizes]


# -- attention backends ------------------------------------------------------------------------

def random_qkv(generator, batch, tokens, heads=3, head_dim=16, dtype=torch.float32, device="cpu"):
    return [torch.randn(batch, tokens, heads, head_dim, generator=generator).to(device, dtype)
            for _ in range(3)]


def block_diagonal_reference(query, key, value, packing):
    """Attention over a packed (1, T, H, d) batch with an explicit (T x T) block-diagonal mask."""
    sequence_id = torch.repeat_interleave(torch.tensor(packing.sequence_lengths()))
    mask = sequence_id[:, None] == sequence_id[None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)),
                                         attn_mask=mask.to(query.device))
    return out.transpose(1, 2)


@pytest.mark.parametrize("tokens", [1, 17, 50])
def test_sdpa_and_explicit_attention_agree(generator, tokens):
    query, key, value = random_qkv(generator, 4, tokens)
    sdpa = multi_head_attention(query, key, value, "sdpa")
    explicit = multi_head_attention(query, key, value, "explicit")
    assert sdpa.shape == explicit.shape == (4, tokens, 3, 16)
    assert max_relative_difference(explicit, sdpa) <= FP32_TOLERANCE


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_packed_attention_stays_within_each_sequence(generator, backend):
    packing = PackedSequences(((4, 17), (6, 5), (2, 10)))
    query, key, value = random_qkv(generator, 1, packing.num_tokens)
    out = multi_head_attention(query, key, value, backend, packing)
    expected = block_diagonal_reference(query, key, value, packing)
    assert max_relative_difference(out, expected) <= FP32_TOLERANCE


def test_packing_round_trip_and_cls_positions(generator):
    batches = [torch.randn(count, length, 8, generator=generator) for count, length in ((4, 17), (6, 5))]
    packed, packing = PackedSequences.pack(batches)
    assert packed.shape == (1, 4 * 17 + 6 * 5, 8) and packing.num_sequences == 10
    for original, unpacked in zip(batches, packing.unpack(packed)):
        assert torch.equal(original, unpacked)
    assert torch.equal(packing.first_tokens(packed), torch.cat([b[:, 0] for b in batches]))
    per_token = packing.spread_over_tokens(torch.arange(10.0))
    assert per_token.shape == (1, 98, 1)
    lengths = torch.tensor(packing.sequence_lengths())
    assert torch.equal(per_token.flatten(), torch.repeat_interleave(torch.arange(10.0), lengths))
    with pytest.raises(ValueError, match="packed tensor of shape"):
        packing.unpack(packed[:, 1:])


def test_vit_features_agree_across_sdpa_and_explicit(generator):
    model = tiny_vit(generator)
    images = torch.randn(3, 3, 32, 48, generator=generator)
    with torch.no_grad():
        model.attn_backend = "sdpa"
        sdpa = model(images)
        model.attn_backend = "explicit"
        explicit = model(images)
    assert max_relative_difference(explicit, sdpa) <= FP32_TOLERANCE


def real_fmha():
    """xformers' own ``fmha`` module (its masks import without CUDA; its kernels need a GPU)."""
    fmha = pytest.importorskip("xformers.ops.fmha", reason="xformers is not installed (pip install "
                                                           "-e '.[xformers]'; CI installs it)")
    return fmha


def seqlens_of(mask) -> list[int]:
    starts = mask.q_seqinfo.seqstart_py
    return [end - start for start, end in zip(starts, starts[1:])]


def memory_efficient_attention_stand_in(calls):
    """xformers' documented function on (B, M, H, K) tensors, computed by SDPA with xformers' real
    ``attn_bias`` materialized as an additive mask; records each call."""
    def attend(query, key, value, attn_bias=None):
        calls.append((tuple(query.shape), attn_bias))
        mask = None
        if attn_bias is not None:
            tokens = query.shape[1]
            mask = attn_bias.materialize((tokens, tokens), dtype=query.dtype, device=query.device)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)),
                                             attn_mask=mask)
        return out.transpose(1, 2)
    return attend


@pytest.fixture
def xformers_stand_in(monkeypatch):
    """Routes the "xformers" backend to xformers' real masks and a stand-in for its kernel, so its
    wiring runs on the CPU."""
    calls = []
    stand_in_ops = SimpleNamespace(memory_efficient_attention=memory_efficient_attention_stand_in(calls),
                                   fmha=real_fmha())
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: stand_in_ops)
    monkeypatch.setattr(attention_module, "xformers_status", lambda device, dtype: "available")
    attention_module._block_diagonal_mask.cache_clear()
    yield calls
    attention_module._block_diagonal_mask.cache_clear()


def test_the_xformers_probe_ignores_the_callers_grad_mode_and_autocast(monkeypatch):
    # The first attention call of a DINO step is the teacher's, under no_grad (and autocast):
    # a probe that inherits those modes fails its backward and disables xformers for the run.
    calls = []
    stand_in_ops = SimpleNamespace(memory_efficient_attention=memory_efficient_attention_stand_in(calls),
                                   fmha=real_fmha())
    monkeypatch.setattr(attention_module, "_xformers_import", lambda: (stand_in_ops, ""))
    probe = attention_module._xformers_kernel_error.__wrapped__  # uncached
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert probe(cpu, torch.float32) == ""
    with torch.inference_mode():
        assert probe(cpu, torch.float32) == ""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe(cpu, torch.float32) == ""
    assert len(calls) == 3 and all(seqlens_of(mask) == [8, 8] for _, mask in calls)


def test_the_block_diagonal_mask_is_built_on_the_tensors_device_and_cached_per_device(monkeypatch):
    fmha = real_fmha()
    packing = PackedSequences(((2, 3), (1, 2)))
    attention_module._block_diagonal_mask.cache_clear()
    mask = packing.xformers_mask(torch.device("cpu"))
    assert seqlens_of(mask) == [3, 3, 2] and mask.q_seqinfo.seqstart.device.type == "cpu"
    expected = torch.block_diag(*(torch.ones(n, n) for n in (3, 3, 2))).bool()
    assert torch.equal(mask.materialize((8, 8), dtype=torch.float32) == 0, expected)

    # cuda:1 without set_device: the mask must not land on the current device (cuda:0).
    built_on = []
    real_from_seqlens = fmha.BlockDiagonalMask.from_seqlens

    def from_seqlens(seqlens, device=None):
        built_on.append(device)
        return real_from_seqlens(seqlens, device=torch.device("cpu"))

    monkeypatch.setattr(fmha.BlockDiagonalMask, "from_seqlens", from_seqlens)
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: SimpleNamespace(fmha=fmha))
    attention_module._block_diagonal_mask.cache_clear()
    first, second = (torch.device("cuda", index) for index in (0, 1))
    masks = [packing.xformers_mask(device) for device in (first, second, first, second)]
    assert built_on == [first, second]  # once per device, then cached
    assert masks[0] is masks[2] and masks[1] is masks[3] and masks[0] is not masks[1]
    attention_module._block_diagonal_mask.cache_clear()


def test_xformers_path_packs_all_crops_into_one_call_per_block(generator, xformers_stand_in):
    model = tiny_vit(generator, attn_backend="xformers")
    crops = multicrop_batch(generator, batch=2, local_sizes=[(16, 16), (16, 16), (16, 24)])
    with torch.no_grad():
        packed = model.forward_multicrop(crops)  # packs by default on the xformers backend
        model.attn_backend = "sdpa"
        per_resolution = model.forward_multicrop(crops, packed=False)
    tokens = 4 * 17 + 4 * 5 + 2 * 7
    assert len(xformers_stand_in) == 12  # one attention call per block for all crops
    assert all(shape == (1, tokens, 3, 64) for shape, _ in xformers_stand_in)
    assert seqlens_of(xformers_stand_in[0][1]) == [17] * 4 + [5] * 4 + [7] * 2
    assert len({id(mask) for _, mask in xformers_stand_in}) == 1  # one mask, built once
    assert max_relative_difference(packed, per_resolution) <= FP32_TOLERANCE

    xformers_stand_in.clear()
    model.attn_backend = "xformers"
    with torch.no_grad():
        unpacked = model.forward_multicrop(crops, packed=False)
    assert [shape for shape, _ in xformers_stand_in[::12]] == [(4, 17, 3, 64), (4, 5, 3, 64), (2, 7, 3, 64)]
    assert all(mask is None for _, mask in xformers_stand_in)
    assert max_relative_difference(unpacked, per_resolution) <= FP32_TOLERANCE


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_a_compiled_block_on_the_packed_path_compiles_once_per_layout(generator, backend, request):
    """compile=true compiles each block; on the packed multi-crop path it must neither recompile
    at every step nor break its graph anywhere but at the xformers call (run eagerly on purpose,
    with xformers' real mask)."""
    from torch._dynamo.testing import CompileCounter
    if backend == "xformers":
        request.getfixturevalue("xformers_stand_in")
    block = tiny_vit(generator).blocks[0]
    packing = PackedSequences(((4, 17), (8, 5)))
    tokens = torch.randn(1, packing.num_tokens, 192, generator=generator)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(tokens, backend, packing)
    reasons = {reason.reason.splitlines()[0] for reason in explanation.break_reasons}
    assert reasons == ({"Skip calling `torch.compiler.disable()`d function"} if backend == "xformers" else set())

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(block, backend=counter)
    expected = block(tokens, backend, packing)
    for _ in range(3):  # the steps of a run: one layout
        out = compiled(tokens, backend, packing)
    frames = counter.frame_count
    assert frames == (1 if backend == "sdpa" else 4)  # the xformers call splits block and attention
    assert max_relative_difference(out, expected) <= FP32_TOLERANCE
    other = PackedSequences(((2, 17), (4, 5)))
    compiled(torch.randn(1, other.num_tokens, 192, generator=generator), backend, other)
    assert counter.frame_count == 2 * frames  # another crop layout: compiled once more
    torch._dynamo.reset()


@needs_xformers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_xformers_matches_sdpa_on_gpu(generator, dtype):
    query, key, value = random_qkv(generator, 4, 197, heads=6, head_dim=64, dtype=dtype, device="cuda")
    expected = multi_head_attention(query, key, value, "sdpa")
    assert max_relative_difference(multi_head_attention(query, key, value, "xformers"), expected) <= 2e-2
    packing = PackedSequences(((4, 197), (8, 37)))
    query, key, value = random_qkv(generator, 1, packing.num_tokens, heads=6, head_dim=64,
                                   dtype=dtype, device="cuda")
    packed = multi_head_attention(query, key, value, "xformers", packing)
    assert max_relative_difference(packed, multi_head_attention(query, key, value, "sdpa", packing)) <= 2e-2


@needs_xformers
def test_packed_xformers_multicrop_matches_per_resolution_sdpa_on_gpu(generator):
    model = tiny_vit(generator, patch_size=16, img_size=64).cuda()
    crops = [crop.cuda() for crop in multicrop_batch(generator, 4, 64, ((32, 32),) * 4)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.attn_backend = "xformers"
        packed = model.forward_multicrop(crops)  # packs: the backend resolves to xformers
        model.attn_backend = "sdpa"
        per_resolution = model.forward_multicrop(crops, packed=False)
    assert max_relative_difference(packed.float(), per_resolution.float()) <= 3e-2


# -- the backend switch ------------------------------------------------------------------------

def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_attention_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention_backend("explicit", cpu, torch.float32) == "explicit"
    with pytest.raises(ValueError, match="not an attention backend"):
        resolve_attention_backend("flash", cpu, torch.float32)


def test_environment_variable_overrides_the_argument(monkeypatch, generator):
    monkeypatch.setenv(ATTENTION_ENV_VAR, "explicit")
    assert resolve_attention_backend("sdpa", torch.device("cpu"), torch.float32) == "explicit"
    model = tiny_vit(generator, attn_backend="sdpa")
    assert model.resolved_attn_backend(torch.zeros(1)) == "explicit"
    monkeypatch.setenv(ATTENTION_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ATTENTION_ENV_VAR}='fast'"):
        resolve_attention_backend("sdpa", torch.device("cpu"), torch.float32)


def test_xformers_without_cuda_falls_back_with_one_warning(generator):
    warn_once.cache_clear()
    model = tiny_vit(generator, attn_backend="xformers")
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with pytest.warns(RuntimeWarning, match="falls back to 'sdpa'.*CUDA") as caught:
        with torch.no_grad():
            features = model(images)
            model(images)
            model.forward_multicrop([images, images])
    assert len(caught) == 1
    model.attn_backend = "sdpa"
    with torch.no_grad():
        assert torch.equal(features, model(images))


@pytest.mark.parametrize("requested", ["auto", "xformers"])
def test_broken_xformers_falls_back_once_and_never_raises(monkeypatch, requested):
    """A GPU whose xformers kernels do not load (simulated: the probe's verdict is replaced)."""
    warn_once.cache_clear()
    reason = "xformers is installed but its kernels do not run on cuda:0 with this torch (NotImplementedError)"
    monkeypatch.setattr(attention_module, "xformers_status", lambda device, dtype: reason)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert resolve_attention_backend(requested, cuda, torch.bfloat16) == "sdpa"
    assert len(caught) == 1 and "kernels do not run" in str(caught[0].message)
    # float32 never picks xformers under "auto", so there is nothing to warn about
    assert resolve_attention_backend("auto", cuda, torch.float32) == "sdpa"


def test_xformers_status_explains_why_not_here():
    if CUDA:
        pytest.skip("this machine has CUDA")
    assert "CUDA" in xformers_status("cpu") and "CUDA" in xformers_status("cuda")


# -- position embeddings -----------------------------------------------------------------------

@pytest.mark.parametrize("image_size", [(32, 32), (16, 16), (16, 24), (48, 40), (8, 64)])
def test_pos_embed_interpolation_matches_release(generator, image_size):
    model = tiny_vit(generator)  # native grid 4 x 4
    grid_h, grid_w = image_size[0] // 8, image_size[1] // 8
    with torch.no_grad():
        table = model.interpolated_pos_embed(grid_h, grid_w)
        tokens = model.prepare_tokens(torch.randn(2, 3, *image_size, generator=generator))
    assert table.shape == (1, 1 + grid_h * grid_w, 192)
    assert tokens.shape == (2, 1 + grid_h * grid_w, 192)
    expected = model.pos_embed if (grid_h, grid_w) == (4, 4) else release_interpolation(model.pos_embed, grid_h, grid_w)
    assert torch.equal(table, expected)


def test_exact_size_interpolation_without_offset(generator):
    model = tiny_vit(generator, interpolate_offset=0)
    with torch.no_grad():
        table = model.interpolated_pos_embed(3, 5)
    patch = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(patch, size=(3, 5), mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.equal(table[:, 1:], expected) and torch.equal(table[:, :1], model.pos_embed[:, :1])


def test_pos_embed_cache_is_reused_and_invalidated(generator):
    model = tiny_vit(generator)
    with torch.no_grad():
        first = model.interpolated_pos_embed(2, 3)
        assert model.interpolated_pos_embed(2, 3) is first
        assert model.interpolated_pos_embed(3, 2) is not first
        model.pos_embed.add_(1.0)  # an in-place update, as an optimizer or EMA step does
        updated = model.interpolated_pos_embed(2, 3)
        assert updated is not first
        assert torch.equal(updated, release_interpolation(model.pos_embed, 2, 3))
        model.load_state_dict(randomize_parameters(vit_tiny(patch_size=8, img_size=32), generator).state_dict())
        reloaded = model.interpolated_pos_embed(2, 3)
        assert torch.equal(reloaded, release_interpolation(model.pos_embed, 2, 3))
        model.double()
        assert model.interpolated_pos_embed(2, 3).dtype == torch.float64
        for grid_w in range(1, 21):
            model.interpolated_pos_embed(1, grid_w)
    assert len(model._pos_embed_cache) == POS_EMBED_CACHE_SIZE  # bounded, least recent dropped


def test_gradients_reach_pos_embed_through_the_interpolation_every_step(generator):
    model = tiny_vit(generator)
    small = torch.randn(2, 3, 16, 24, generator=generator)
    for _ in range(2):  # no optimizer step in between: a cached graph would be freed by now
        model.zero_grad()
        model(small).square().sum().backward()
        assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0
    assert not model._pos_embed_cache  # nothing is cached while gradients are recorded


# -- the ViT -----------------------------------------------------------------------------------

def test_multicrop_is_crop_major_and_packing_changes_nothing(generator):
    model = tiny_vit(generator)
    crops = multicrop_batch(generator, batch=3, local_sizes=[(16, 16), (16, 16), (24, 16), (16, 16)])
    with torch.no_grad():
        packed = model.forward_multicrop(crops, packed=True)
        per_resolution = model.forward_multicrop(crops, packed=False)
        one_by_one = torch.cat([model(crop) for crop in crops])
    assert packed.shape == (len(crops) * 3, 192)
    assert max_relative_difference(packed, per_resolution) <= FP32_TOLERANCE
    assert max_relative_difference(per_resolution, one_by_one) <= FP32_TOLERANCE
    assert model.forward_multicrop(crops[:1]).shape == (3, 192)  # a single crop, or a tensor
    assert model.forward_multicrop(crops[0]).shape == (3, 192)


def test_same_size_crops_are_batched_in_order(generator):
    crops = multicrop_batch(generator, batch=2, local_sizes=[(16, 16), (24, 16), (24, 16), (16, 16)])
    batches = batch_same_size_crops(crops)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (2, 3, 16, 16), (4, 3, 24, 16), (2, 3, 16, 16)]
    assert torch.equal(batches[0], torch.cat(crops[:2])) and torch.equal(batches[2], torch.cat(crops[3:5]))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_gradients_reach_every_parameter(generator, packed, activation_checkpointing):
    backbone = tiny_vit(generator, activation_checkpointing=activation_checkpointing).train()
    student = MultiCropWrapper(backbone, DINOHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16),
                               packed=packed)
    student(multicrop_batch(generator)).logsumexp(-1).mean().backward()
    for name, parameter in student.named_parameters():
        if name == "head.last_layer.weight_g":  # frozen by norm_last_layer=True
            assert not parameter.requires_grad and parameter.grad is None
            continue
        assert parameter.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_packed_and_checkpointed_gradients_equal_the_plain_ones(generator):
    crops = multicrop_batch(generator, local_sizes=[(16, 16), (24, 16)])
    reference = tiny_vit(generator)
    grads = {}
    for packed, checkpointing in [(False, False), (True, False), (True, True)]:
        reference.zero_grad()
        reference.activation_checkpointing = checkpointing
        reference.forward_multicrop(crops, packed=packed).square().sum().backward()
        grads[packed, checkpointing] = [p.grad.clone() for p in reference.parameters()]
    for variant in [(True, False), (True, True)]:
        for actual, expected in zip(grads[variant], grads[False, False]):
            assert max_relative_difference(actual, expected) <= FP32_TOLERANCE


def test_packed_drop_path_drops_whole_sequences(generator):
    packing = PackedSequences(((6, 5), (20, 3)))
    x = torch.ones(1, packing.num_tokens, 4)
    torch.manual_seed(0)
    out = drop_path(x, 0.5, True, packing)
    per_sequence = [seq for group in packing.unpack(out) for seq in group]
    values = {float(seq.unique()) for seq in per_sequence if seq.unique().numel() == 1}
    assert len(values) == 2 and values == {0.0, 2.0}, "each sequence must be all 0 or all 1 / keep_prob"
    assert all(seq.unique().numel() == 1 for seq in per_sequence)
    assert torch.equal(drop_path(x, 0.5, False, packing), x)


def test_last_selfattention_and_intermediate_layers(generator):
    model = tiny_vit(generator, attn_backend="sdpa")
    images = torch.randn(2, 3, 32, 24, generator=generator)
    with torch.no_grad():
        attention = model.get_last_selfattention(images)
        layers = model.get_intermediate_layers(images, n=4)
        features = model(images)
        tokens = model.prepare_tokens(images)
        for block in model.blocks:
            tokens = block(tokens, "sdpa")
        all_tokens = model.norm(tokens)
    assert attention.shape == (2, 3, 1 + 4 * 3, 1 + 4 * 3)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 3, 13)) and (attention >= 0).all()
    assert len(layers) == 4 and all(layer.shape == (2, 13, 192) for layer in layers)
    assert max_relative_difference(layers[-1][:, 0], features) <= FP32_TOLERANCE
    assert torch.equal(all_tokens, layers[-1])


@pytest.mark.parametrize("patch_size,image_size", [(8, (32, 32)), (16, (48, 32)), (8, (24, 40))])
def test_forward_flops_match_torch_flop_counter(generator, patch_size, image_size):
    model = tiny_vit(generator, patch_size=patch_size, img_size=32, attn_backend="explicit")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(3, 3, *image_size, generator=generator))
    # the counter sees every matmul and the convolution; the final LayerNorm etc. are not counted
    assert counter.get_total_flops() == 3 * model.forward_flops(*image_size)


def test_vit_rejects_bad_shapes(generator):
    model = tiny_vit(generator)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one"):
        model(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match="not a multiple"):
        vit_tiny(patch_size=16, img_size=40)
    with pytest.raises(ValueError, match="at least one crop"):
        model.forward_multicrop([])


# -- head and wrapper --------------------------------------------------------------------------

def release_head(in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256, parametrization=False):
    """The release's DINOHead (its arguments, layout and frozen magnitude) built from torch
    modules, with the old or the new weight norm."""
    head = nn.Module()
    if nlayers == 1:
        head.mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
        norm = (lambda: [nn.BatchNorm1d(hidden_dim)]) if use_bn else list
        layers = [nn.Linear(in_dim, hidden_dim), *norm(), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), *norm(), nn.GELU()]
        head.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
    linear = nn.Linear(bottleneck_dim, out_dim, bias=False)
    if parametrization:
        head.last_layer = nn.utils.parametrizations.weight_norm(linear)
        magnitude = head.last_layer.parametrizations.weight.original0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, but the release uses it
            head.last_layer = nn.utils.weight_norm(linear)
        magnitude = head.last_layer.weight_g
    magnitude.requires_grad_(not norm_last_layer)
    head.forward = lambda x: head.last_layer(F.normalize(head.mlp(x), dim=-1, p=2))
    return head


def test_head_layout_and_norm_last_layer(generator):
    head = DINOHead(32, out_dim=100, hidden_dim=24, bottleneck_dim=8)
    assert list(head.state_dict()) == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_v", "last_layer.weight_g"]
    assert head.last_layer.weight_g.shape == (100, 1) and not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(100, 1))
    weight = head.last_layer.weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(100))
    assert head(torch.randn(5, 32, generator=generator)).shape == (5, 100)
    assert DINOHead(32, out_dim=10, norm_last_layer=False).last_layer.weight_g.requires_grad
    single = DINOHead(32, out_dim=10, bottleneck_dim=8, nlayers=1)
    assert list(single.state_dict())[:2] == ["mlp.weight", "mlp.bias"]
    with pytest.raises(ValueError, match="at least one layer"):
        DINOHead(32, nlayers=0)


@pytest.mark.parametrize("args, kwargs", [
    ((32, 100, True), {}),  # the release's teacher head: DINOHead(embed_dim, out_dim, use_bn_in_head)
    ((32, 100), dict(use_bn=True, norm_last_layer=False)),  # and its student head
    ((32, 100, False, False, 2, 24, 8), {}),  # every argument by position
    ((32, 100), dict(nlayers=4, hidden_dim=24, bottleneck_dim=8)),
    ((32, 100, False, True, 1), dict(bottleneck_dim=8)),
])
def test_head_takes_the_release_arguments_and_builds_its_module(args, kwargs):
    head, reference = DINOHead(*args, **kwargs), release_head(*args, **kwargs)
    assert ({key: value.shape for key, value in head.state_dict().items()}
            == {key: value.shape for key, value in reference.state_dict().items()})
    assert ({name: p.requires_grad for name, p in head.named_parameters()}
            == {name: p.requires_grad for name, p in reference.named_parameters()})


def test_head_with_batch_norm_is_the_release_use_bn_head(generator):
    reference = randomize_parameters(release_head(32, 100, use_bn=True, hidden_dim=24, bottleneck_dim=8), generator)
    head = DINOHead(32, out_dim=100, hidden_dim=24, bottleneck_dim=8, use_bn=True)
    assert [key for key in head.state_dict() if key.endswith("running_mean")] == [
        "mlp.1.running_mean", "mlp.4.running_mean"]
    head.load_state_dict(reference.state_dict(), strict=True)
    features = torch.randn(7, 32, generator=generator)
    for train in (True, False):  # batch statistics, then the running ones
        head.train(train), reference.train(train)
        with torch.no_grad():
            assert max_relative_difference(head(features), reference(features)) <= FP32_TOLERANCE


@pytest.mark.parametrize("parametrization", [False, True], ids=["weight_g/weight_v", "parametrizations"])
def test_head_loads_both_key_styles_both_ways(generator, parametrization):
    reference = randomize_parameters(release_head(32, 100, hidden_dim=24, bottleneck_dim=8,
                                                  parametrization=parametrization), generator)
    head = DINOHead(32, out_dim=100, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(reference.state_dict(), strict=True)  # their keys -> ours
    features = torch.randn(6, 32, generator=generator)
    with torch.no_grad():
        assert max_relative_difference(head(features), reference(features)) <= FP32_TOLERANCE
    fresh = release_head(32, 100, hidden_dim=24, bottleneck_dim=8, parametrization=parametrization)
    style = "parametrization" if parametrization else "release"
    fresh.load_state_dict(convert_weight_norm_keys(head.state_dict(), style), strict=True)  # ours -> theirs
    with torch.no_grad():
        assert max_relative_difference(fresh(features), reference(features)) <= FP32_TOLERANCE
    with pytest.raises(ValueError, match="choose one of"):
        convert_weight_norm_keys(head.state_dict(), "timm")


def test_wrapper_runs_head_once_over_crop_major_features(generator):
    backbone = tiny_vit(generator)
    head = DINOHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    calls = []
    head.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    student = MultiCropWrapper(backbone, head)
    teacher = MultiCropWrapper(backbone, head, global_crops_only=True)
    crops = multicrop_batch(generator, batch=2)
    with torch.no_grad():
        student_logits = student(crops)
        teacher_logits = teacher(crops)
        expected = head(torch.cat([backbone(crop) for crop in crops]))
    assert calls[:2] == [(10, 192), (4, 192)]
    assert student_logits.shape == (10, 64) and teacher_logits.shape == (4, 64)
    assert max_relative_difference(student_logits, expected) <= FP32_TOLERANCE
    assert max_relative_difference(teacher_logits, expected[:4]) <= FP32_TOLERANCE
    with pytest.raises(ValueError, match="global crops"):
        teacher(crops[:1])


def test_wrapper_batches_per_resolution_for_other_backbones(generator):
    class PooledLinear(nn.Module):  # a stand-in for a ConvNet: any image size -> (B, 8)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 8)
            self.batch_sizes = []

        def forward(self, images):
            self.batch_sizes.append(images.shape[0])
            return self.fc(images.mean(dim=(2, 3)))

    backbone = PooledLinear()
    wrapper = MultiCropWrapper(backbone, DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4))
    crops = multicrop_batch(generator, batch=2)
    with torch.no_grad():
        logits = wrapper(crops)
        expected = wrapper.head(torch.cat([backbone.fc(crop.mean(dim=(2, 3))) for crop in crops]))
    assert backbone.batch_sizes == [4, 6]  # one forward per resolution, as the release
    assert max_relative_difference(logits, expected) <= FP32_TOLERANCE


# -- registry and imports ----------------------------------------------------------------------

def test_registry_lists_and_builds_every_vit():
    names = list_backbones()
    dino = [f"vit_{size}_p{patch}" for size in ("tiny", "small", "base", "large") for patch in (8, 16)]
    dinov2 = [f"vit_{size}_p14{registers}" for size in ("small", "base", "large", "giant") for registers in ("", "_reg4")]
    assert names == sorted(["resnet50"] + dino + dinov2)
    dims = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "giant": (1536, 24)}
    for name in dino + dinov2:
        with torch.device("meta"):  # shapes and settings only: no memory, no init time
            model = create_backbone(name, img_size=28 if name in dinov2 else 32, drop_path_rate=0.1)
        size, patch = name.split("_")[1], int(name.split("_p")[1][:2].rstrip("_"))
        assert (model.embed_dim, model.num_heads, model.patch_size) == (*dims[size], patch)
        assert model.blocks[-1].drop_path_rate == pytest.approx(0.1)
        # DINO's drop path rises linearly from 0; DINOv2's is uniform over depth
        assert model.blocks[0].drop_path_rate == (pytest.approx(0.1) if name in dinov2 else 0)
        assert model.num_prefix_tokens == (5 if name.endswith("_reg4") else 1)
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge_p14'.*vit_small_p8"):
        create_backbone("vit_huge_p14")


@needs_timm
def test_resnet50_through_timm_has_torchvision_keys(generator):
    model = create_backbone("resnet50").eval()
    keys = list(model.state_dict())
    assert keys[0] == "conv1.weight" and "layer4.2.bn3.running_var" in keys
    assert not any(key.startswith("fc.") for key in keys)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, generator=generator)).shape == (1, 2048)


def test_importing_fastdino_models_does_not_import_timm():
    code = ("import sys, fastdino.models\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
