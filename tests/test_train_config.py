"""fastdino.train.config and the command line: presets, typed overrides, clear errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdino.data import MultiCropRecipe
from fastdino.train import PRESETS, ConfigError, TrainConfig, parse_overrides, resolve_config
from fastdino.train.cli import flag_keys, main
from fastdino.train.config import apply_environment, resolve_backends


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips_through_json(name):
    config = resolve_config(name)
    assert config.preset == name
    restored = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_the_issue_presets_exist_with_their_defining_values():
    assert {"vit_small_p16", "vit_small_p8", "vit_base_p8", "vit_base_p16", "resnet50", "tiny"} <= set(PRESETS)
    release = resolve_config("vit_small_p16")
    assert (release.arch, release.out_dim, release.n_local_crops, release.lr, release.epochs) == (
        "vit_small_p16", 65536, 8, 0.0005, 100)
    headline = resolve_config("vit_small_p8")
    assert (headline.arch, headline.n_local_crops) == ("vit_small_p8", 10)
    tiny = resolve_config("tiny")
    assert tiny.arch == "vit_tiny_p16" and tiny.precision == "fp32" and tiny.data == ""


def test_overrides_are_parsed_with_the_field_types():
    config = resolve_config("tiny", ["epochs=7", "lr=1e-3", "norm_last_layer=false",
                                     "global_crop_scale=0.3,0.9", "data_backend=torchvision"])
    assert config.epochs == 7 and isinstance(config.epochs, int)
    assert config.lr == 1e-3
    assert config.norm_last_layer is False
    assert config.global_crop_scale == (0.3, 0.9)
    assert config.data_backend == "torchvision"


def test_keyword_fields_win_over_overrides_and_presets():
    config = resolve_config("tiny", ["epochs=7"], epochs=9, seed=None)
    assert config.epochs == 9 and config.seed == 0


@pytest.mark.parametrize("override, key", [
    ("epochs=ten", "epochs"),
    ("epochs=2.5", "epochs"),
    ("epochs=0", "epochs"),
    ("lr=nan", "lr"),
    ("lr=-1", "lr"),
    ("precision=fp8", "precision"),
    ("norm_last_layer=maybe", "norm_last_layer"),
    ("global_crop_scale=0.5", "global_crop_scale"),
    ("global_crop_scale=0.9,0.4", "global_crop_scale"),
    ("arch=vit_huge_p14", "arch"),
    ("momentum_teacher=1.5", "momentum_teacher"),
    ("warmup_epochs=500", "warmup_epochs"),
    ("data=/no/such/folder", "data"),
    ("resume=/no/such/checkpoint.pth", "resume"),
    ("local_crop_size=8", "local_crop_size=8: smaller than one 16 x 16 patch"),  # tiny is a ViT/16
    ("global_crop_size=12", "global_crop_size=12: smaller than one 16 x 16 patch"),
    ("no_such_key=1", "no_such_key"),
])
def test_bad_values_and_unknown_keys_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        resolve_config("tiny", [override])


def test_a_local_crop_size_is_not_checked_without_local_crops():
    assert resolve_config("tiny", ["local_crop_size=8", "n_local_crops=0"]).patch_size == 16
    assert resolve_config("tiny", ["arch=resnet50", "global_crop_size=8"]).patch_size is None


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="vit_giant"):
        resolve_config("vit_giant")


def test_command_line_rejects_bad_values_before_anything_starts(capsys, tmp_path):
    assert main(["--output-dir", str(tmp_path / "run"), "--epochs", "zero"]) == 2
    assert "epochs='zero'" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "run"), "batch_size=3"]) == 2
    assert "unknown config key 'batch_size'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_command_line_lists_presets_and_prints_the_resolved_config(capsys):
    assert main(["--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)
    assert main(["--preset", "vit_small_p8", "--lr", "0.001", "epochs=300", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["arch"], printed["lr"], printed["epochs"]) == ("vit_small_p8", 0.001, 300)
    assert main(["--help-config"]) == 0
    assert "teacher_temp=float" in capsys.readouterr().out


def test_environment_variables_set_their_keys_once_and_are_checked(monkeypatch, capsys):
    monkeypatch.setenv("FASTDINO_BACKEND", "torch")
    monkeypatch.setenv("FASTDINO_ATTENTION", "explicit")
    monkeypatch.setenv("FASTDINO_DATA_BACKEND", "torchvision")
    config = resolve_config("tiny", ["attn_backend=sdpa"])
    assert (config.ops_backend, config.attn_backend, config.data_backend) == ("torch", "explicit", "torchvision")
    said = capsys.readouterr().err
    assert "FASTDINO_ATTENTION=explicit overrides attn_backend=sdpa" in said
    assert apply_environment(config) is config  # applied once: nothing left to change
    # A convnet has no attention to choose: the process-wide variable does not make it invalid.
    assert resolve_config("resnet50").attn_backend == "auto"
    monkeypatch.setenv("FASTDINO_DATA_BACKEND", "pillow")
    with pytest.raises(ConfigError, match="FASTDINO_DATA_BACKEND='pillow' .*data_backend"):
        resolve_config("tiny")


@pytest.mark.parametrize("overrides, message", [
    (["arch=resnet50", "attn_backend=sdpa"], "attn_backend='sdpa': applies to the ViT backbones only"),
    (["arch=resnet50", "activation_checkpointing=true"], "activation_checkpointing=True: applies to the ViT"),
    (["device=cpu", "precision=fp16"], "precision='fp16': float16 with a gradient scaler needs a GPU"),
    (["global_crop_scale=0,0.5"], "global_crop_scale=\\(0.0, 0.5\\): need 0 < low <= high"),
    (["local_crop_scale=0.5,1.5"], "local_crop_scale=\\(0.5, 1.5\\): an area fraction cannot exceed 1"),
    (["ops_backend=fast"], "ops_backend='fast': choose one of auto, triton, cpp, torch"),
])
def test_rules_that_used_to_live_elsewhere_are_checked_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("tiny", overrides)


def test_tensorboard_needs_its_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="tensorboard=True: the tensorboard package is not installed"):
        resolve_config("tiny", ["tensorboard=true"])


def test_crop_defaults_are_the_recipes():
    recipe, config = MultiCropRecipe(), TrainConfig()
    assert (config.global_crop_size, config.local_crop_size, config.global_crop_scale, config.local_crop_scale) == (
        recipe.global_crop_size, recipe.local_crop_size, recipe.global_crop_scale, recipe.local_crop_scale)
    assert resolve_config("vit_small_p8").multicrop_recipe().global_crop_scale == (0.25, 1.0)


def test_resolved_backends_name_what_runs_here(monkeypatch):
    backends = resolve_backends(resolve_config("tiny", ["data_backend=torchvision"]), torch.device("cpu"))
    assert backends == {"device": "cpu", "precision": "fp32", "ops": backends["ops"], "attention": "sdpa",
                        "data": "torchvision"}
    assert backends["ops"] in ("cpp", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled Triton needs CUDA tensors
    with pytest.raises(ConfigError, match="ops_backend='triton': .*needs CUDA tensors"):
        resolve_backends(resolve_config("tiny", ["ops_backend=triton"]), torch.device("cpu"))


def test_every_flag_is_a_config_field_and_sets_it(capsys):
    assert set(flag_keys()) == {"--data", "--output-dir", "--seed", "--resume", "--epochs",
                                "--batch-size-per-gpu", "--lr", "--n-local-crops"}
    assert main(["--batch-size-per-gpu", "3", "--n-local-crops", "4", "--seed", "7", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["batch_size_per_gpu"], printed["n_local_crops"], printed["seed"]) == (3, 4, 7)


def test_listing_and_printing_the_config_import_neither_xformers_nor_dali(tmp_path):
    # Stand-ins that fail loudly when imported, ahead of any real installation on the path.
    for package in ("xformers", "nvidia/dali"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text(f"raise SystemExit('imported {package}')\n")
    (tmp_path / "nvidia" / "__init__.py").write_text("")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for flag in ("--help-config", "--list-presets", "--print-config"):
        result = subprocess.run([sys.executable, "-m", "fastdino.train", flag], env=environment,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "imported" not in result.stderr, (flag, result.stderr[-2000:])


def test_every_augmentation_field_is_a_config_key_with_the_recipes_default():
    from fastdino.data import MultiCropRecipe
    recipe = resolve_config("vit_small_p16").multicrop_recipe()
    assert recipe == MultiCropRecipe()  # the release's recipe, field by field
    tuned = resolve_config("tiny", ["blur_probabilities=1,0.2,0.3", "hue=0.05", "mean=0.5,0.5,0.5",
                                    "skip_bad_files=true"])
    assert tuned.multicrop_recipe().blur_probabilities == (1.0, 0.2, 0.3)
    assert tuned.multicrop_recipe().hue == 0.05 and tuned.multicrop_recipe().mean == (0.5, 0.5, 0.5)
    assert tuned.skip_bad_files is True
    with pytest.raises(ConfigError, match=r"blur_kernel_size=4: must be odd"):
        resolve_config("tiny", ["blur_kernel_size=4"])


def test_fsdp_refuses_what_it_does_not_support_yet():
    assert resolve_config("vit_large_p16").parallelism == "fsdp"
    with pytest.raises(ConfigError, match=r"compile=True: torch.compile of sharded blocks"):
        resolve_config("tiny", ["parallelism=fsdp", "compile=true"])
