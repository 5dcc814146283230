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


# ------------------------------------------------------------------ field metadata and types


def test_every_field_is_a_knob_with_help():
    """The command line is generated from these: each field has help and option names."""
    from dataclasses import fields

    from mae_bench.config import _SECTIONS, KNOBS

    declared = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in fields(cls)]
    assert [k.name for k in KNOBS] == declared and len(declared) == 88
    for knob in KNOBS:
        assert len(knob.help) > 20 and knob.help.endswith("."), knob.name
        assert knob.flags[0] == "--" + knob.key.replace("_", "-")
    renamed = {k.name: k.flags[1:] for k in KNOBS if len(k.flags) > 1}
    assert renamed == {"model.decoder_embed_dim": ("--decoder-dim",),
                       "model.decoder_num_heads": ("--decoder-heads",)}


def test_metadata_leaves_digests_unchanged():
    """Measured before the fields got their metadata: the default config and one with knobs
    of every section set."""
    cfg = RunConfig().replace(model={"decoder_embed_dim": 64, "decoder_num_heads": 4},
                              train={"epochs": 3, "blr": 1e-3, "lr_scaling": "sqrt"},
                              ssl={"teacher_temp": 0.07, "norm_last_layer": False},
                              mae={"norm_pix_loss": False})
    assert RunConfig().digest() == "a620a7f83f88"
    assert cfg.digest() == "f3b4f30031af"
    assert RunConfig.from_dict(cfg.to_dict()).digest() == "f3b4f30031af"


def test_every_field_round_trips_through_yaml(tmp_path):
    """A config.yaml with every field set to a non-default value reads back equal (types
    included), with the same digest; a text that looks like a number stays text."""
    from mae_bench.config import KNOBS

    samples = {int: 3, float: 0.125, bool: True, str: "1e3"}
    changes: dict = {}
    for k in KNOBS:
        value = samples[k.value_type]
        if value == k.default:
            value = not value if k.value_type is bool else value * 2
        changes.setdefault(k.section, {})[k.key] = value
    cfg = RunConfig.from_dict(changes)
    assert all(getattr(getattr(cfg, k.section), k.key) != k.default for k in KNOBS)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    back = RunConfig.from_yaml(path)
    assert back == cfg and back.digest() == cfg.digest()
    assert back.data.dataset == "1e3" and back.train.blr == 0.125


@pytest.mark.parametrize("text, match", [
    ("train: {epochs: five}\n", r"train\.epochs must be a number \(float\), got 'five'"),
    ("train: {epochs: [1, 2]}\n", r"train\.epochs must be a number \(float\), got \[1, 2\] "
                                  r"\(a list\)"),
    ("train: {batch_size: 64.0}\n", r"train\.batch_size must be an integer \(int\), got 64\.0"),
    ("train: {batch_size: null}\n", r"train\.batch_size must be an integer \(int\), got None"),
    ("model: {img_size: 8.5}\n", r"model\.img_size must be an integer \(int\) or null"),
    ("mae: {norm_pix_loss: 1}\n", r"mae\.norm_pix_loss must be true or false \(bool\), got 1"),
    ("data: {dataset: 7}\n", r"data\.dataset must be a string \(str\), got 7 \(an integer\)"),
    ("ssl: {temperature: {a: 1}}\n", r"ssl\.temperature must be a number \(float\) or null"),
    ("train: [1, 2]\n", r"config section 'train' must be a mapping of keys to values, got a list"),
    ("- train\n", r"a run config must be a mapping of sections, got a list"),
    ("just text\n", r"a run config must be a mapping of sections, got a string"),
])
def test_yaml_values_are_type_checked(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        RunConfig.from_yaml(path)
    assert str(err.value).startswith(f"config file {path}: ")


def test_numbers_fit_float_fields_unchanged_and_null_fits_optional_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 20, blr: 1e-3, lr: null, min_lr: 0}\nmae: {}\nssl:\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.train.epochs == 20 and type(cfg.train.epochs) is int  # kept: same digest
    assert cfg.train.blr == 1e-3 and type(cfg.train.blr) is float  # YAML 1.2 style exponent
    assert cfg.override({"train.blr": None}) == RunConfig()  # 0 == 0.0 for min_lr


@pytest.mark.parametrize("text, name, value", [
    ("train.epochs=5", "train.epochs", 5.0),  # a float field gets a float, as --epochs 5 does
    ("train.blr=1e-3", "train.blr", 1e-3),
    ("train.lr=null", "train.lr", None),
    ("train.lr=", "train.lr", None),
    ("mae.norm_pix_loss=false", "mae.norm_pix_loss", False),
    ("mae.mask_ratio=nan", "mae.mask_ratio", "nan"),
    ("ssl.teacher_temp=0.07", "ssl.teacher_temp", 0.07),
    ("data.data_dir=2024", "data.data_dir", "2024"),  # a text field takes the text
    ("data.data_dir=/data/a=b", "data.data_dir", "/data/a=b"),
    ("model.decoder_embed_dim=64", "model.decoder_embed_dim", 64),
])
def test_parse_assignment(text, name, value):
    from mae_bench.config import parse_assignment

    got_name, got = parse_assignment(text)
    assert got_name == name
    if value == "nan":
        assert got != got
    else:
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, match", [
    ("train.epochs=five", r"^--set train\.epochs=five: train\.epochs must be a number \(float\)"),
    ("train.epochs=[1, 2]", r"train\.epochs must be a number \(float\), got \[1, 2\] \(a list\)"),
    ("train.batch_size=2.5", r"train\.batch_size must be an integer \(int\), got 2\.5"),
    ("mae.norm_pix_loss=0", r"mae\.norm_pix_loss must be true or false \(bool\), got 0"),
    ("train.epoch=3", r"^--set train\.epoch=3: unknown key\(s\) epoch in config section 'train'"),
    ("trian.epochs=3", r"unknown config section 'trian'.*model, data, train, mae, ssl"),
    ("epochs", r"expected SECTION\.KEY=VALUE"),
    ("train=3", r"'train' is not SECTION\.KEY"),
])
def test_parse_assignment_errors(text, match):
    from mae_bench.config import parse_assignment

    with pytest.raises(ConfigError, match=match):
        parse_assignment(text)


def test_override_sets_none_and_checks_types():
    cfg = RunConfig().replace(train={"blr": 1e-3})
    assert cfg.override({"train.blr": None, "ssl.momentum": 0.9}) == RunConfig().replace(
        ssl={"momentum": 0.9})
    with pytest.raises(ConfigError, match=r"train\.seed must be an integer \(int\), got '1'"):
        cfg.override({"train.seed": "1"})
