"""Training configs from a YAML file with command-line values over it (`--set KEY=VALUE`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from midog.errors import ConfigError, InputError
from training import train_classifier, train_verifier
from training.classifier_config import load_train_config
from training.config_file import parse_set_pairs
from training.train_verifier import load_verifier_config

REPO = Path(__file__).resolve().parents[2]
VERIFIER_CONFIG = REPO / "training/configs/verifier_fields_context_cpu.yaml"
CLASSIFIER_CONFIG = REPO / "training/configs/atypical_lite0_128.yaml"


def test_set_pairs_are_read_as_yaml() -> None:
    assert parse_set_pairs(["input_size=112", "lr=0.001", "tta=true", "ema_epochs=[2, 6]", "ship_ema=null",
                            " arch = resnet18"]) == \
        {"input_size": 112, "lr": 1e-3, "tta": True, "ema_epochs": [2, 6], "ship_ema": None, "arch": "resnet18"}


@pytest.mark.parametrize("pair", ["input_size", "=112", " =1"])
def test_a_pair_without_key_or_value_is_refused(pair: str) -> None:
    with pytest.raises(InputError, match="--set expects key=value"):
        parse_set_pairs([pair])


def test_a_dotted_key_sets_one_value_of_a_section_and_keeps_the_others() -> None:
    base = load_verifier_config(VERIFIER_CONFIG)
    cfg = load_verifier_config(VERIFIER_CONFIG, parse_set_pairs(["augment.hed_sigma=0.2", "input_size=112"]))
    assert cfg.augment.hed_sigma == 0.2 and base.augment.hed_sigma != 0.2
    assert cfg.input_size == 112 and base.input_size != 112
    assert cfg.augment.brightness == base.augment.brightness and cfg.arch == base.arch  # the file's, kept
    assert cfg.loss == base.loss


def test_a_dotted_key_under_a_value_or_unknown_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'arch' is .*not a section, so 'arch.depth' cannot be set"):
        load_verifier_config(VERIFIER_CONFIG, {"arch.depth": 2})
    with pytest.raises(ConfigError, match=r"unknown key 'augment.hed_sgma' \(did you mean 'augment.hed_sigma'\?\)"):
        load_verifier_config(VERIFIER_CONFIG, {"augment.hed_sgma": 0.2})
    with pytest.raises(ConfigError, match="input_size is 'big'"):
        load_verifier_config(VERIFIER_CONFIG, {"input_size": "big"})


def test_train_verifier_takes_any_config_value_on_the_command_line() -> None:
    args = train_verifier.parse_args(["--data", "crops", "--epochs", "3", "--set", "input_size=112",
                                      "--set", "augment.hed_sigma=0.1", "--set", "epochs=5", "--set", "lr=1e-3"])
    overrides = train_verifier.config_overrides(args)
    assert overrides == {"epochs": 5, "input_size": 112, "augment.hed_sigma": 0.1, "lr": "1e-3"}  # --set last
    cfg = load_verifier_config(VERIFIER_CONFIG, overrides)
    assert (cfg.epochs, cfg.input_size, cfg.augment.hed_sigma, cfg.lr) == (5, 112, 0.1, 0.001)  # YAML 1.1's '1e-3'



def test_train_classifier_takes_any_config_value_on_the_command_line() -> None:
    args = train_classifier.parse_args(["evaluate-tta", "--config", str(CLASSIFIER_CONFIG), "--epochs", "3",
                                        "--set", "augment.erase_p=0.5", "--set", "arch=tf_efficientnet_lite1",
                                        "--set", "pretrained=efficientnet_lite1.imagenet"])
    cfg = load_train_config(args.config, train_classifier.config_overrides(args))
    assert (cfg.epochs, cfg.augment.erase_p, cfg.arch) == (3, 0.5, "tf_efficientnet_lite1")
    assert cfg.pretrained == "efficientnet_lite1.imagenet" and cfg.augment.hed_sigma == 0.05
    assert train_classifier.with_command(["--set", "out=cv", "--fold", "1"])[0] == "cv"
