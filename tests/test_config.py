"""Config: YAML round trip, unknown keys, validation messages."""

import pytest

from mae_bench.config import RunConfig, validate
from mae_bench.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig().replace(train={"epochs": 7, "lr": 1e-3}, mae={"mask_ratio": 0.5},
                              data={"dataset": "cifar10", "data_dir": "/x"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    back = RunConfig.from_yaml(path)
    assert back == cfg
    assert back.train.epochs == 7 and back.mae.mask_ratio == 0.5
    assert back.digest() == cfg.digest()
    assert RunConfig().digest() != cfg.digest()


def test_replace_ignores_none_and_rejects_unknown():
    cfg = RunConfig().replace(train={"epochs": None, "seed": 3})
    assert cfg.train.epochs == RunConfig().train.epochs and cfg.train.seed == 3
    with pytest.raises(ConfigError, match="unknown key.*epoch\\b"):
        RunConfig().replace(train={"epoch": 3})


@pytest.mark.parametrize("text, match", [
    ("train: {epoch: 3}\n", r"unknown key\(s\) epoch in config section 'train'"),
    ("trainer: {}\n", r"unknown key\(s\) trainer in config"),
    ("train: 3\n", "section 'train' must be a mapping"),
    ("train: [\n", "is not valid YAML"),
])
def test_bad_yaml(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_yaml(path)


def test_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("section, values, match", [
    ("train", {"epochs": 0}, "--epochs must be > 0, got 0"),
    ("train", {"batch_size": 0}, "--batch-size"),
    ("train", {"precision": "fp8"}, "unknown precision 'fp8'"),
    ("train", {"device": "tpu"}, "unknown device 'tpu'"),
    ("train", {"warmup_epochs": 40, "epochs": 10}, "--warmup-epochs"),
    ("mae", {"mask_ratio": 1.0}, "--mask-ratio must be strictly between 0 and 1, got 1.0"),
    ("mae", {"mask_ratio": 0.0}, "got 0.0"),
    ("model", {"img_size": -4}, "--img-size"),
])
def test_validate_messages(section, values, match):
    with pytest.raises(ConfigError, match=match):
        validate(RunConfig().replace(**{section: values}))


def test_defaults_are_valid():
    validate(RunConfig())
