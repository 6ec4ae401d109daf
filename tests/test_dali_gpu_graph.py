"""The DALI GPU pipeline ("mixed" decoding, GPU operators), checked as far as DALI allows
without a GPU, and run against the CPU pipeline where there is one.

Without a CUDA driver DALI refuses to build a pipeline with a device id, but it defines the
graph: every operator instance with its placement and the devices of its inputs. Defining it
already runs DALI's own checks of the inputs' devices (a "mixed" or CPU operator refuses GPU
inputs, a named argument refuses a GPU node); it does not check whether an operator exists on
the device it is placed on, which only ``build`` (on a GPU machine) does. These tests define the graph fastdino's
loader defines for a CUDA device (its ``Pipeline.build`` replaced by a stop) and check it
against DALI's registry of operators per device.
"""

import collections

import pytest
import torch

from fastdino.data import MultiCropRecipe, build_multicrop_loader, dali_available, write_synthetic_image_folder

pytestmark = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
SMALL = dict(global_crop_size=40, local_crop_size=24)
# every branch of the graph taken by some samples and skipped by others
BOTH_BRANCHES = dict(SMALL, flip_probability=0.5, color_jitter_probability=1.0, grayscale_probability=0.5,
                     blur_probabilities=(0.5, 0.5, 0.5), solarize_probabilities=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("jpegs"), n_images=8, image_size=(96, 72))


class _Defined(Exception):
    """Raised in place of ``Pipeline.build``; carries the defined, unbuilt pipeline."""

    def __init__(self, pipeline):
        super().__init__("stopped before build")
        self.pipeline = pipeline


def defined_operators(folder, device, monkeypatch, **recipe_fields):
    """(operator instances, output nodes) of the pipeline the loader defines for ``device``,
    stopped before build (which for a CUDA device needs the driver)."""
    from nvidia.dali import Pipeline

    def stop(pipeline):
        raise _Defined(pipeline)

    monkeypatch.setattr(Pipeline, "build", stop)
    loader = build_multicrop_loader(folder, 4, n_local_crops=2, backend="dali", device=device, num_threads=1,
                                    recipe=MultiCropRecipe(**{**SMALL, **recipe_fields}), verbose=False)
    with pytest.raises(_Defined) as defined:
        next(iter(loader))
    pipeline = defined.value.pipeline
    assert pipeline.device_id == (None if device == "cpu" else torch.device(device).index)
    pipeline._build_graph()  # build's first, Python-only step: DALI's walk from the outputs
    return pipeline._ops, pipeline._graph_outputs


def schema_name(op) -> str:
    return op._op.schema.Name()


def inputs(op, argument: bool) -> list[tuple[str, str]]:
    """(node name, device) of the operator's regular inputs, or of its argument inputs (the
    per-sample named arguments, which follow the regular inputs in the spec)."""
    spec = op.spec
    indices = range(spec.NumRegularInput(), spec.NumInput()) if argument else range(spec.NumRegularInput())
    return [(spec.InputName(i), spec.InputDevice(i)) for i in indices]


def placement_errors(ops) -> list[str]:
    """What ``build`` would refuse about where the operators run: an operator placed on a
    device it has no implementation for, an argument input that is not a CPU node."""
    import nvidia.dali.backend as dali_backend

    registered = {"cpu": set(dali_backend.RegisteredCPUOps()), "gpu": set(dali_backend.RegisteredGPUOps()),
                  "mixed": set(dali_backend.RegisteredMixedOps())}
    errors = []
    for op in ops:
        if schema_name(op) not in registered[op._op.device]:
            errors.append(f"{op.name}: {schema_name(op)} has no {op._op.device} implementation")
        errors += [f"{op.name}: argument input {name} is on {device}, DALI requires the CPU"
                   for name, device in inputs(op, argument=True) if device != "cpu"]
    return errors


def test_every_gpu_operator_exists_on_its_device_and_takes_cpu_arguments(jpegs, monkeypatch):
    ops, outputs = defined_operators(jpegs, "cuda:0", monkeypatch, **BOTH_BRANCHES)
    assert placement_errors(ops) == []
    assert [node.device for node in outputs] == ["gpu"] * 4  # copied device to device into torch

    decoders = [op for op in ops if schema_name(op) == "decoders__Image"]
    assert len(decoders) == 1, "each image is decoded once"
    assert decoders[0]._op.device == "mixed"
    # the image data stays on the GPU from the decoder to the outputs: every operator that reads
    # it (through its regular inputs) runs there, and the GPU runs nothing else
    image_nodes, image_ops = {node.name for node in decoders[0].outputs}, set()
    for op in ops[ops.index(decoders[0]) + 1:]:  # DALI sorts them topologically
        if any(name in image_nodes for name, _ in inputs(op, argument=False)):
            assert op._op.device == "gpu", f"{op.name} ({schema_name(op)}) takes image data on the CPU"
            image_ops.add(op.name)
            image_nodes.update(node.name for node in op.outputs)
    assert image_ops == {op.name for op in ops if op._op.device == "gpu"}
    assert all(node.name in image_nodes for node in outputs)


def test_the_gpu_graph_is_the_tested_cpu_graph(jpegs, monkeypatch):
    """The same operators on both devices: the CPU pipeline, which the data loader's tests
    check against the draws, is what the GPU computes."""
    gpu_ops, _ = defined_operators(jpegs, "cuda:0", monkeypatch, **BOTH_BRANCHES)
    cpu_ops, _ = defined_operators(jpegs, "cpu", monkeypatch, **BOTH_BRANCHES)
    assert placement_errors(cpu_ops) == []
    assert {op._op.device for op in gpu_ops} == {"cpu", "mixed", "gpu"}
    assert {op._op.device for op in cpu_ops} == {"cpu"}
    assert collections.Counter(map(schema_name, gpu_ops)) == collections.Counter(map(schema_name, cpu_ops))


def test_an_operator_without_a_gpu_implementation_is_found():
    """DALI defines this graph without complaint (PowerSpectrum has only a CPU implementation,
    MedianBlur only a GPU one); only build, on a GPU machine, would refuse it."""
    import numpy as np
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def wrong():
        images = fn.external_source(source=lambda: [np.zeros((8, 8, 3), np.uint8)] * 2, batch=True)
        return fn.power_spectrum(images.gpu()), fn.experimental.median_blur(images)

    pipeline = wrong()
    pipeline._build_graph()
    errors = placement_errors(pipeline._ops)
    assert len(errors) == 2
    assert "PowerSpectrum has no gpu implementation" in errors[0]
    assert "experimental__MedianBlur has no cpu implementation" in errors[1]


def test_a_gpu_node_as_argument_input_stops_the_definition(jpegs, monkeypatch):
    """Feeding a per-sample argument of fastdino's graph from a GPU node fails where the graph
    is defined, so the tests above fail with it."""
    import nvidia.dali.fn as fn

    blur = fn.gaussian_blur
    monkeypatch.setattr(fn, "gaussian_blur",
                        lambda image, sigma, **arguments: blur(image, sigma=sigma.gpu(), **arguments))
    with pytest.raises(ValueError, match="argument 'sigma' .* must be on CPU"):
        defined_operators(jpegs, "cuda:0", monkeypatch, **BOTH_BRANCHES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_pipeline_runs_and_matches_the_cpu_pipeline(jpegs, dtype, random_seed):
    """Two batches with every branch taken by some samples, on the same draws. nvJPEG and
    libjpeg-turbo may differ by a level here and there (the tolerance of the loader tests)."""
    def loader(device):
        return build_multicrop_loader(jpegs, 4, n_local_crops=2, backend="dali", device=device, dtype=dtype,
                                      seed=random_seed, num_threads=2, recipe=MultiCropRecipe(**BOTH_BRANCHES),
                                      verbose=False)

    gpu, cpu = loader("cuda"), loader("cpu")
    assert gpu.backend == "dali-gpu"
    draws = [crop for step in range(len(gpu)) for crop in gpu.plan.request(0, step)[1]]
    for branch in ("blur", "solarize", "grayscale", "flip"):
        taken = [getattr(crop, branch) for crop in draws]
        assert any(t.any() for t in taken) and not all(t.all() for t in taken), branch
    for gpu_crops, cpu_crops in zip(gpu, cpu, strict=True):
        for a, b in zip(gpu_crops, cpu_crops, strict=True):
            assert a.device == torch.device("cuda", torch.cuda.current_device()) and a.dtype == dtype
            assert a.shape == b.shape
            assert (a.cpu().float() - b.float()).abs().mean() < 0.02
