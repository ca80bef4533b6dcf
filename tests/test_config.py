"""The run configuration (config.py): defaults, the original's commands, the persisted-settings table."""

import json
import os

import pytest
from helpers import ROOT

import config
import errors
import model
from config import PERSISTED, adopt_saved_settings

SEED_TRAIN = ("-path_prediction YOURPATH -checkpoint_dir YOURCHECKPOINTPATH -residual_blocks 8 "
              "-upsampling_factor 2 -subpixel_NN True -feature_size 64").split()


SEED_TEST = ("-path_volumes YOURPATH -checkpoint_dir_restore YOURCHECKPOINTPATH -residual_blocks 8 "
             "-upsampling_factor 2 -subpixel_NN True -feature_size 64 -evaluate True").split()


def test_seed_readme_train_command_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")  # the default -data_path
    command = model.parse_command(SEED_TRAIN, log=lambda *_: None)
    cfg = command.settings
    assert cfg.path_prediction == "YOURPATH" and cfg.checkpoint_dir == "YOURCHECKPOINTPATH"
    assert cfg.residual_blocks == 8 and cfg.upsampling_factor.value == 2 and cfg.feature_size == 64
    assert cfg.upsampling_mode == "subpixel_NN" and command.action == "train"
    assert cfg.restore is None and cfg.epochs == 10


def test_seed_readme_test_command_parses_and_needs_a_checkpoint(tmp_path):
    args = model.build_parser().parse_args(SEED_TEST)
    assert args.evaluate is True and args.checkpoint_dir_restore == "YOURCHECKPOINTPATH"
    assert args.path_volumes == "YOURPATH" and args.subpixel_NN is True
    with pytest.raises(errors.UserError, match="YOURCHECKPOINTPATH.*does not exist"):
        model.resolve_command(args, log=lambda *_: None)


def test_defaults_match_the_original(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    command = model.parse_command([], log=lambda *_: None)
    cfg = command.settings
    assert (cfg.residual_blocks, cfg.upsampling_factor.value, cfg.feature_size) == (6, 4, 32)
    assert cfg.slice_profile == "gaussian" and cfg.sigma == 1.0
    assert cfg.upsampling_mode == "subpixel" and cfg.epochs == 10 and cfg.batch_size == 2
    assert cfg.volume_shape == (224, 224, 152) and cfg.patch_shape == (128, 128, 92)
    assert cfg.patch_margin == 16 and cfg.train_fraction == 0.8 and cfg.learning_rate == 1e-4
    assert command.action == "train"


SAVED = {"upsampling_factor": 2, "residual_blocks": 1, "feature_size": 4, "upsampling_mode": "nn",
         "volume_shape": [32, 32, 24], "patch_shape": [20, 20, 16], "patch_margin": 2, "sigma": 0.5,
         "mixed_precision": "none", "data_path": "/d", "seed": 3, "batch_size": 4, "epochs": 7}


@pytest.mark.parametrize("given, action, key, expected", [
    ({}, "train", "feature_size", 4),                      # architecture comes from the checkpoint
    ({}, "evaluate", "volume_shape", (32, 32, 24)),        # lists become tuples again
    ({}, "evaluate", "sigma", 0.5),                        # evaluation degrades as the training did
    ({}, "train", "seed", 3),                              # run settings are inherited ...
    ({"seed": 9}, "train", "seed", 9),                     # ... unless given
    ({"batch_size": 1}, "evaluate", "batch_size", 1),
    ({}, "train", "mixed_precision", "none"),              # a resumed run keeps its precision
    ({"mixed_precision": "float16"}, "evaluate", "mixed_precision", "float16"),  # evaluation may choose
    ({"upsampling_mode": "nn"}, "evaluate", "upsampling_mode", "nn"),  # agreeing flags are fine
    ({}, "train", "gan_lr_scale", 0.1),                    # a config.json without it ran at 0.1 ...
    ({"gan_lr_scale": 0.5}, "train", "gan_lr_scale", 0.5),  # ... unless given
])
def test_saved_settings_are_adopted_by_the_table(given, action, key, expected):
    values = config.defaults()
    values.update(given)
    adopt_saved_settings(values, SAVED, given, action, "ckpt")
    assert values[key] == expected


def test_a_saved_gan_lr_scale_is_resumed_and_a_fresh_run_takes_the_default():
    values = config.defaults()
    adopt_saved_settings(values, dict(SAVED, gan_lr_scale=0.3), {}, "train", "ckpt")
    assert values["gan_lr_scale"] == 0.3
    assert config.defaults()["gan_lr_scale"] != config.LEGACY_VALUES["gan_lr_scale"]


@pytest.mark.parametrize("given, action, fragment", [
    ({"feature_size": 8}, "evaluate", "-feature_size 8, the checkpoint uses -feature_size 4"),
    ({"sigma": 1.0}, "evaluate", "-sigma 1.0, the checkpoint uses -sigma 0.5"),
    ({"upsampling_mode": "subpixel"}, "train", "'subpixel' (-subpixel_NN False -nn False)"),
    ({"mixed_precision": "float16"}, "train", "-mixed_precision float16"),
])
def test_contradicting_the_checkpoint_is_an_error(given, action, fragment):
    values = dict(config.defaults(), **given)
    with pytest.raises(errors.UserError, match="do not match the checkpoint") as err:
        adopt_saved_settings(values, SAVED, given, action, "ckpt")
    assert fragment in str(err.value)


def test_config_json_holds_exactly_the_persisted_settings(run):
    saved = json.loads((run["ckpt"] / "config.json").read_text())
    assert set(saved) == set(PERSISTED) | {"tensorflow", "keras", "strategy", "replicas", "workers"}
    assert saved["replicas"] == 1 and saved["workers"] == 1
    assert saved["sigma"] == 1.0 and "subpixel_NN" not in saved and "nn" not in saved


def test_the_demo_runs_the_recipe_the_readme_states(tmp_path, monkeypatch):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## The demo"):readme.index("## How good is it")]
    flags = section.split("```")[1].split()  # the recipe, as flags
    monkeypatch.chdir(tmp_path)
    demo = model.parse_command(["-demo", "True"], log=lambda *_: None).settings
    stated = model.parse_command(["-demo", "True", *flags], log=lambda *_: None).settings
    assert demo == stated
    # Every setting the demo changes is stated, and nothing else.
    changed = {k for k, v in config.DEMO.items() if getattr(config.Settings(), k) != v and "path" not in k
               and "dir" not in k}
    assert {f.lstrip("-") for f in flags if f.startswith("-")} == changed
