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


def test_peak_lr_linear_and_square_root_rules():
    from mae_bench.config import TrainConfig, peak_lr

    # linear (Goyal et al.): blr x batch / 256, whatever the reference batch
    assert peak_lr(TrainConfig(blr=1.5e-4), 128) == pytest.approx(7.5e-5)
    assert peak_lr(TrainConfig(blr=1.5e-4, lr_scaling="linear", lr_ref_batch=4096), 128) == \
        pytest.approx(7.5e-5)
    # sqrt: the recipe's lr at its batch (1.5e-4 x 4096 / 256 = 2.4e-3) x sqrt(128 / 4096)
    sqrt = TrainConfig(blr=1.5e-4, lr_scaling="sqrt", lr_ref_batch=4096)
    assert peak_lr(sqrt, 128) == pytest.approx(2.4e-3 / 32 ** 0.5)
    assert peak_lr(sqrt, 4096) == pytest.approx(2.4e-3)  # the rules agree at the reference
    assert peak_lr(TrainConfig(blr=1.5e-4, lr=1e-3, lr_scaling="sqrt"), 128) == 1e-3


def test_bad_lr_scaling_is_named():
    with pytest.raises(ConfigError, match="unknown lr scaling 'cubic'; valid: linear, sqrt"):
        validate(RunConfig().replace(train={"lr_scaling": "cubic"}))
    with pytest.raises(ConfigError, match="--lr-ref-batch must be >= 1, got 0"):
        validate(RunConfig().replace(train={"lr_ref_batch": 0}))


def test_digest_ignores_later_knobs_until_set():
    """Configs written before lr_scaling, lr_ref_batch and norm_last_layer existed keep their
    digest (compare and sweep find their runs again)."""
    assert RunConfig().digest() == "a620a7f83f88"  # measured on the code before those knobs
    for section, key, value in (("train", "lr_scaling", "sqrt"), ("train", "lr_ref_batch", 64),
                                ("ssl", "norm_last_layer", False),
                                ("mae", "encoder_mask_tokens", True),
                                ("train", "attention", "math"),
                                ("train", "warmup_min_steps", 250)):
        assert RunConfig().replace(**{section: {key: value}}).digest() != "a620a7f83f88"
    # values that build the same run as before the knob existed keep the digest too
    for section, key, value in (("mae", "encoder_mask_tokens", False),
                                ("train", "attention", "auto")):
        assert RunConfig().replace(**{section: {key: value}}).digest() == "a620a7f83f88"
