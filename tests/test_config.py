"""Config: recipes + flags + --set, type and key validation before any work, saved config round-trips."""
import glob
import os
import subprocess
import sys

import pytest
import yaml
from cli_helpers import run_together

from utils import config as C
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precedence_defaults_recipe_flags_set():
    cfg = C.build_config({"lr": 0.5, "epochs": 3, "nesterov": False}, "r.yaml", {"lr": 0.2},
                         ["nesterov=true", "mean=[0.1, 0.2, 0.3]", "lr=0.05"])
    assert cfg.epochs == 3 and cfg.lr == 0.05 and cfg.nesterov is True and cfg.mean == [0.1, 0.2, 0.3]
    assert cfg.weight_decay == C.TrainConfig().weight_decay  # untouched default
    assert cfg.resize_size == round(cfg.img_size * 256 / 224)


def test_val_resize_follows_img_size_through_crop_pct():
    assert C.build_config({}, "r", {"img_size": 224}, []).resize_size == 256
    assert C.build_config({"crop_pct": 1.0}, "r", {"img_size": 32}, []).resize_size == 32
    assert C.build_config({"crop_pct": 0.5}, "r", {"img_size": 48}, []).resize_size == 96
    assert C.build_config({"resize_size": 40, "crop_pct": 1.0}, "r", {"img_size": 32}, []).resize_size == 40
    with pytest.raises(UserError, match=r"crop_pct must be in \(0, 1\]"):
        C.build_config({"crop_pct": 1.2}, "r", {}, [])
    with pytest.raises(UserError, match="resize_size=32 is smaller than img_size=48"):
        C.build_config({"resize_size": 32}, "r", {"img_size": 48}, [])


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert C.build_config({"lr": 1}, "r.yaml", {}, []).lr == 1.0
    with pytest.raises(UserError, match=r"r.yaml: 'epochs' must be int, got 2.5"):
        C.build_config({"epochs": 2.5}, "r.yaml", {}, [])


def test_unknown_key_names_the_source():
    with pytest.raises(UserError, match=r"r.yaml: unknown config key\(s\) learning_rate"):
        C.build_config({"learning_rate": 0.1}, "r.yaml", {}, [])
    with pytest.raises(UserError, match=r"--set: unknown config key\(s\) lable_smoothing"):
        C.build_config({}, "r.yaml", {}, ["lable_smoothing=0.1"])


def test_wrong_types_and_choices():
    with pytest.raises(UserError, match="'nesterov' must be bool"):
        C.build_config({}, "r", {}, ["nesterov=maybe"])
    with pytest.raises(UserError, match="'optimizer' must be one of sgd, adamw, rmsprop"):
        C.build_config({}, "r", {}, ["optimizer=adam"])
    with pytest.raises(UserError, match="expected key=value"):
        C.build_config({}, "r", {}, ["lr"])
    with pytest.raises(UserError, match="label_smoothing must be in"):
        C.build_config({}, "r", {}, ["label_smoothing=1.5"])
    # checked with the config, before any data is read (the cached-feature path ran out of memory instead)
    with pytest.raises(UserError, match=r"img_size=5000: use a size between 28 and 224 \(16..1024 accepted\)"):
        C.build_config({}, "r", {"img_size": 5000}, [])


def test_finetune_recipe_with_few_epochs_names_the_ways_on():
    recipe = C.read_yaml(os.path.join(ROOT, "configs", "finetune.yaml"))
    with pytest.raises(UserError) as e:
        C.build_config(recipe, "finetune.yaml", {"epochs": 5}, [])
    assert str(e.value) == ("config: head_epochs=30 leaves no epoch for the whole network (epochs=5); pass --epochs "
                            "31 or more, fewer classifier epochs (--set head_epochs=4), or train the classifier alone "
                            "with --freeze features")
    assert C.build_config(recipe, "finetune.yaml", {"epochs": 5}, ["head_epochs=4"]).head_epochs == 4


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_recipe_is_valid(path):
    cfg = C.build_config(C.read_yaml(path), path, {}, [])
    assert cfg.epochs >= 1


def test_recipes_exist():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert {"default.yaml", "finetune.yaml", "imagenet.yaml", "cifar10.yaml"} <= names
    imagenet = C.read_yaml(os.path.join(ROOT, "configs", "imagenet.yaml"))
    assert (imagenet["momentum"], imagenet["weight_decay"], imagenet["label_smoothing"], imagenet["batch_size"],
            imagenet["epochs"]) == (0.9, 4e-5, 0.1, 256, 300)


def test_saved_config_round_trips(tmp_path):
    cfg = C.build_config({}, "r", {"epochs": 7}, ["auto_augment=trivial"])
    C.save_config(cfg, str(tmp_path / "config.yaml"))
    again = C.build_config(yaml.safe_load((tmp_path / "config.yaml").read_text()), "saved", {}, [])
    assert again == cfg


def test_train_rejects_bad_config_before_work(tmp_path):
    # The data folder does not exist either: the config error must come first, on one line, exit status 2.
    train_py = os.path.join(ROOT, "train.py")
    r, bad_int = run_together([[train_py, "--data", str(tmp_path / "nope"), "--set", "warmup=3"],
                               [train_py, "--epochs", "two"]], cwd=str(tmp_path), env=dict(os.environ), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --set: unknown config key(s) warmup; valid keys are listed by "
                                             "`python train.py --help`"]
    assert not (tmp_path / "runs").exists()
    assert bad_int.returncode == 2 and "--epochs: invalid int value: 'two'" in bad_int.stderr


def test_help_lists_every_key():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for key in C.field_types():
        assert f"  {key} (default" in r.stdout, key


def test_model_name_and_width_checked_before_any_work():
    from utils.config import build_config

    with pytest.raises(UserError, match="config: unknown model 'mobilenet_v9'; choose one of: mobilenet_v1, mobilenet_v2"):
        build_config({}, "test", {"model": "mobilenet_v9"}, [])
    with pytest.raises(UserError, match="config: width_mult must be positive"):
        build_config({}, "test", {}, ["width_mult=0"])
