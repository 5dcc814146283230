"""Run configuration: frozen dataclasses built once at the edge (CLI or YAML), passed as values.

A run's final config is written into its run folder as ``config.yaml``; loading it back gives an
equal object. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mae_bench.errors import ConfigError

ATTENTION_PATHS = ("auto", "fused", "math")  # mae_bench.attention
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """The ViT architecture (a preset name from ``mae_bench.vit.PRESETS``) and its overrides."""

    arch: str = "vit_tiny_patch2"
    img_size: int | None = None  # None: the data set's default image size
    decoder_embed_dim: int | None = None  # None: the preset's decoder
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None


@dataclass(frozen=True)
class DataConfig:
    """Which data set to pretrain on, and where it lives."""

    dataset: str = "digits"
    data_dir: str | None = None  # None: the data set's default location
    split: str = "train"
    num_workers: int = 4  # DataLoader workers for streamed (large) data sets only


@dataclass(frozen=True)
class MAEConfig:
    """Masked-autoencoder knobs (He et al. 2021)."""

    mask_ratio: float = 0.75
    mask_strategy: str = "random"  # random | block | grid (paper Table 1f)
    norm_pix_loss: bool = True  # the paper's default for its best representations
    # Table 1c "encoder w/ [M]": every token through the encoder (None = False, MAE's design).
    encoder_mask_tokens: bool | None = None


# Knobs added after runs were published: (section, key) -> the values that mean "as before".
# ``RunConfig.digest`` leaves a knob out while it holds one of them, so older runs are found.
CENTER_INITS = ("zeros", "batch")  # DINO's center at step 0
ADDED_LATER: dict[tuple[str, str], tuple[Any, ...]] = {
    ("train", "lr_scaling"): (None,),
    ("train", "lr_ref_batch"): (None,),
    ("ssl", "norm_last_layer"): (None,),
    ("mae", "encoder_mask_tokens"): (None, False),
    ("train", "attention"): (None, "auto"),
    ("ssl", "center_init"): (None,),
    ("train", "warmup_min_steps"): (None,),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW(0.9, 0.95), lr = blr x effective batch / 256, warmup then cosine."""

    method: str = "mae"
    epochs: float = 20  # may be fractional (compare's time budgets); schedules follow it
    batch_size: int = 128  # per process and per micro-batch
    accum_iter: int = 1  # micro-batches per optimizer step
    blr: float | None = None  # None: the method's (MAE 1.5e-4; see each baseline's docstring)
    lr: float | None = None  # absolute learning rate; overrides blr when set
    # How lr follows the batch (``peak_lr``): linear | sqrt; None: the method's (MAE linear,
    # the baselines sqrt from their paper's batch, lr_ref_batch).
    lr_scaling: str | None = None
    lr_ref_batch: int | None = None
    min_lr: float = 0.0
    weight_decay: float | None = None  # None: the method's (MAE 0.05)
    warmup_epochs: float | None = None  # None: 5 % of the epochs (MAE: 40 of 800), see below
    # When warmup_epochs is None: warm up for at least this many optimizer steps, at most half
    # the run (None: the method's; DINO waits for its EMA teacher, the others need no floor).
    warmup_min_steps: int | None = None
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False
    log_every: int = 10  # optimizer steps between metric lines
    save_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    clip_grad: float | None = None
    # Attention kernel: fused (scaled_dot_product_attention) | math (explicit softmax) | auto
    # (None: time both on the model's shape at start, keep the faster; mae_bench.attention).
    attention: str | None = None


@dataclass(frozen=True)
class SSLConfig:
    """Knobs of the contrastive / self-distillation baselines. None means the method's own
    default (written into the run's config.yaml once resolved); methods ignore knobs they do
    not have."""

    temperature: float | None = None  # SimCLR / MoCo v3 softmax temperature
    proj_hidden_dim: int | None = None  # hidden width of projector / predictor MLPs
    proj_dim: int | None = None  # output width of the projector (DINO: bottleneck)
    momentum: float | None = None  # EMA teacher momentum at step 0 (cosine to 1)
    out_dim: int | None = None  # DINO: prototypes K (65,536 in the paper)
    teacher_temp: float | None = None  # DINO: final teacher temperature
    warmup_teacher_temp: float | None = None  # DINO: teacher temperature at step 0
    teacher_temp_warmup_epochs: float | None = None  # DINO: linear warm-up length
    student_temp: float | None = None  # DINO
    center_momentum: float | None = None  # DINO
    center_init: str | None = None  # DINO: center at step 0: zeros (paper) | batch (its mean)
    norm_last_layer: bool | None = None  # DINO: prototypes' norm fixed at 1 (None, True) or learnt
    freeze_last_layer_epochs: float | None = None  # DINO: no update of the last layer before
    local_crops: int | None = None  # DINO multi-crop: small crops per image (0 = off)
    local_crop_size: int | None = None  # DINO multi-crop: their side in pixels
    freeze_patch_embed: bool | None = None  # MoCo v3: random (frozen) patch projection


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short content hash, stable across processes (for provenance and cache keys).

        Knobs added after runs were published (``ADDED_LATER``) count only when set to
        something new, so a config written before they existed keeps its digest, and its runs
        are found again."""
        raw = self.to_dict()
        for (section, key), as_before in ADDED_LATER.items():
            value = raw[section].get(key)
            # identity for None / False (so 0 is not taken for False), equality for names
            if any(value is v or (isinstance(v, str) and value == v) for v in as_before):
                del raw[section][key]
        blob = json.dumps(raw, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
        _reject_unknown(raw, cls, "config")
        parts = {}
        for f in fields(cls):
            sub = raw.get(f.name, {}) or {}
            sub_cls = _SECTIONS[f.name]
            if not isinstance(sub, dict):
                raise ConfigError(f"config section '{f.name}' must be a mapping")
            _reject_unknown(sub, sub_cls, f"config section '{f.name}'")
            parts[f.name] = sub_cls(**sub)
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        return cls.from_dict(raw)

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """Return a copy with some fields of some sections replaced, e.g.
        ``cfg.replace(train={"epochs": 5})``. Values of None are ignored (not given)."""
        parts = {}
        for f in fields(self):
            current = getattr(self, f.name)
            changes = {k: v for k, v in sections.get(f.name, {}).items() if v is not None}
            _reject_unknown(changes, type(current), f"config section '{f.name}'")
            parts[f.name] = dataclasses.replace(current, **changes)
        return RunConfig(**parts)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mae": MAEConfig,
             "ssl": SSLConfig}


def _reject_unknown(raw: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(known))}"
        )


def warmup_epochs(t: TrainConfig, steps_per_epoch: int | None = None) -> float:
    """The warmup length in epochs: as set; else 5 % of the run (the MAE recipe: 40 of 800),
    lengthened to ``warmup_min_steps`` optimizer steps when the config asks for a floor (and
    ``steps_per_epoch`` is known), but never past half the run."""
    if t.warmup_epochs is not None:
        return t.warmup_epochs
    warm = 0.05 * t.epochs
    if t.warmup_min_steps and steps_per_epoch:
        warm = max(warm, min(t.warmup_min_steps / steps_per_epoch, 0.5 * t.epochs))
    return warm


LR_SCALINGS = ("linear", "sqrt")


def peak_lr(t: TrainConfig, eff_batch: int) -> float:
    """The peak learning rate for an effective batch of ``eff_batch`` images.

    ``lr`` when set. Otherwise the recipe's lr is ``blr x lr_ref_batch / 256`` at its own batch
    ``lr_ref_batch``, carried to ``eff_batch`` linearly (Goyal et al. 2017: ``blr x eff_batch /
    256``, whatever the reference) or by the square root (Malladi et al. 2022, the rule for
    Adam-type optimisers: ``x sqrt(eff_batch / lr_ref_batch)``). The two agree at the reference
    batch; far below it, the linear rule leaves a few hundred steps almost no learning rate.
    """
    if t.lr is not None:
        return t.lr
    if t.blr is None:
        raise ValueError("peak_lr needs a resolved config (blr is None)")
    if t.lr_scaling in (None, "linear"):
        return t.blr * eff_batch / 256
    ref = t.lr_ref_batch if t.lr_ref_batch is not None else 256
    return t.blr * ref / 256 * math.sqrt(eff_batch / ref)


def validate(cfg: RunConfig) -> None:
    """Check values that do not depend on the data set or the model (those are checked when the
    run is built, see ``mae_bench.methods.build_method``). Raises ConfigError."""
    t = cfg.train
    checks = [
        (t.epochs > 0, f"--epochs must be > 0, got {t.epochs}"),
        (t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}"),
        (t.accum_iter >= 1, f"--accum-iter must be >= 1, got {t.accum_iter}"),
        (t.blr is None or t.blr > 0, f"--blr must be > 0, got {t.blr}"),
        (t.lr is None or t.lr > 0, f"--lr must be > 0, got {t.lr}"),
        (t.lr_scaling is None or t.lr_scaling in LR_SCALINGS,
         f"unknown lr scaling '{t.lr_scaling}'; valid: {', '.join(LR_SCALINGS)}"),
        (t.lr_ref_batch is None or t.lr_ref_batch >= 1,
         f"--lr-ref-batch must be >= 1, got {t.lr_ref_batch}"),
        (t.min_lr >= 0, f"--min-lr must be >= 0, got {t.min_lr}"),
        (t.weight_decay is None or t.weight_decay >= 0,
         f"--weight-decay must be >= 0, got {t.weight_decay}"),
        (t.warmup_epochs is None or 0 <= t.warmup_epochs < t.epochs,
         f"--warmup-epochs must be in [0, epochs={t.epochs}), got {t.warmup_epochs}"),
        (t.warmup_min_steps is None or t.warmup_min_steps >= 0,
         f"--warmup-min-steps must be >= 0, got {t.warmup_min_steps}"),
        (t.precision in PRECISIONS,
         f"unknown precision '{t.precision}'; valid: {', '.join(PRECISIONS)}"),
        (t.device in DEVICES, f"unknown device '{t.device}'; valid: {', '.join(DEVICES)}"),
        (t.log_every >= 1, f"--log-every must be >= 1, got {t.log_every}"),
        (t.save_every >= 1, f"--save-every must be >= 1, got {t.save_every}"),
        (t.clip_grad is None or t.clip_grad > 0, f"--clip-grad must be > 0, got {t.clip_grad}"),
        (t.attention is None or t.attention in ATTENTION_PATHS,
         f"unknown attention path '{t.attention}'; valid: {', '.join(ATTENTION_PATHS)}"),
        (0.0 < cfg.mae.mask_ratio < 1.0,
         f"--mask-ratio must be strictly between 0 and 1, got {cfg.mae.mask_ratio}"),
        (cfg.data.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.data.num_workers}"),
        (cfg.model.img_size is None or cfg.model.img_size > 0,
         f"--img-size must be > 0, got {cfg.model.img_size}"),
    ]
    s = cfg.ssl
    positive = ("temperature", "proj_hidden_dim", "proj_dim", "out_dim", "teacher_temp",
                "warmup_teacher_temp", "student_temp", "local_crop_size")
    for name in positive:
        value = getattr(s, name)
        checks.append((value is None or value > 0,
                       f"ssl.{name} must be > 0, got {value}"))
    for name in ("momentum", "center_momentum"):
        value = getattr(s, name)
        checks.append((value is None or 0 <= value < 1,
                       f"ssl.{name} must be in [0, 1), got {value}"))
    checks.append((s.center_init in (None, *CENTER_INITS),
                   f"unknown ssl.center_init '{s.center_init}'; valid: {', '.join(CENTER_INITS)}"))
    for name in ("teacher_temp_warmup_epochs", "freeze_last_layer_epochs", "local_crops"):
        value = getattr(s, name)
        checks.append((value is None or value >= 0, f"ssl.{name} must be >= 0, got {value}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
