"""fastdino.train.config and the command line: presets, typed overrides, clear errors."""

import json

import pytest

from fastdino.train import PRESETS, ConfigError, TrainConfig, parse_overrides, resolve_config
from fastdino.train.cli import main


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
    ("no_such_key=1", "no_such_key"),
])
def test_bad_values_and_unknown_keys_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        resolve_config("tiny", [override])


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
