"""Run configuration: frozen dataclasses built once at the edge (CLI or YAML), passed as values.

A run's final config is written into its run folder as ``config.yaml``; loading it back gives an
equal object. Unknown keys are errors, so a typo never silently falls back to a default; values
from YAML or ``--set`` are checked against the field types (``check_value``).

Each field carries its command-line help in ``metadata`` (``_knob``): ``mae-bench pretrain``
generates one option per field from it (``KNOBS``), so a new knob is one field here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mae_bench.errors import ConfigError

ATTENTION_PATHS = ("auto", "fused", "math")  # mae_bench.models.attention
CONV_PATHS = ("auto", "native", "matmul")  # mae_bench.models.conv
# mae_bench.data.pipeline
DATA_PIPELINES = ("auto", "device-resize", "device-decode", "workers", "dali")
TRACKERS = ("none", "tensorboard", "wandb")  # mae_bench.methods.trackers
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


def _knob(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field with its command-line help (say why, and what None means) and, where the
    option's historical name differs from the field's, that name (``--decoder-dim``)."""
    return field(default=default, metadata={"help": help} | ({"flag": flag} if flag else {}))


@dataclass(frozen=True)
class ModelConfig:
    """The ViT architecture (a preset name from ``mae_bench.models.vit.PRESETS``) and its
    overrides."""

    arch: str = _knob("vit_tiny_patch2", "Backbone: a ViT preset (vit_tiny_patch4 for 32-px "
                      "images, vit_base_patch16 for 224 px; every method), resnet18 | resnet34 "
                      "| resnet50, or timm:NAME for any timm model at random init (the "
                      "joint-embedding methods; MAE needs a ViT preset).")
    # ResNets: None = the CIFAR stem for images of 64 px or less (solo-learn's rule)
    cifar_stem: bool | None = _knob(None, "ResNets: a 3x3 stride-1 first convolution and no "
                                    "max-pool, for small images (default: on at 64 px or "
                                    "less, as solo-learn; --no-cifar-stem for the ImageNet "
                                    "stem).")
    img_size: int | None = _knob(None, "Training image size (default: the data set's); must be "
                                 "a multiple of the patch size.")
    decoder_embed_dim: int | None = _knob(None, "MAE decoder width (default: the preset's; "
                                          "also I-JEPA's predictor and data2vec 2.0's "
                                          "decoder). "
                                          "The decoder only serves pretraining, so it can be "
                                          "narrow (paper Table 1b).", flag="--decoder-dim")
    decoder_depth: int | None = _knob(None, "MAE decoder blocks (default: the preset's; also "
                                      "I-JEPA's predictor and data2vec 2.0's decoder); deeper "
                                      "helps linear probing more than fine-tuning (Table 1a).")
    decoder_num_heads: int | None = _knob(None, "MAE decoder attention heads (default: the "
                                          "preset's).", flag="--decoder-heads")


@dataclass(frozen=True)
class DataConfig:
    """Which data set to pretrain on, and where it lives."""

    dataset: str = _knob("digits", "Data set name; see `mae-bench datasets` (digits is "
                         "embedded, so it needs no download).")
    data_dir: str | None = _knob(None, "Where the data set lives (default: the location "
                                 "`mae-bench datasets` shows).")
    split: str = _knob("train", "Split to pretrain on (stl10 also has unlabeled and "
                       "train+unlabeled, its 100k unlabeled images).")
    num_workers: int = _knob(4, "DataLoader workers for streamed (large) data sets only; "
                             "in-memory sets are batched on the main process.")
    stream: bool = _knob(False, "Stream an image folder from its files even when it fits in "
                         "memory (default: past 4 GiB of pixels): crops from full resolution.")
    shuffle_buffer: int | None = _knob(None, "Tar shards: samples in the shuffle buffer that "
                                       "reorders each rank's stream (default 1000).")
    pipeline: str | None = _knob(None, "Streamed data: device-resize (auto: workers decode and "
                                 "crop, the device resizes) | device-decode (nvJPEG on CUDA) "
                                 "| workers (all in workers) | dali (NVIDIA DALI).")


@dataclass(frozen=True)
class MAEConfig:
    """Masked image modeling: MAE (He et al. 2021) and the knobs of its masked siblings (SimMIM,
    I-JEPA, iBOT, data2vec 2.0). None means the method's own default (written into the run's
    config.yaml once resolved); methods ignore knobs they do not have."""

    mask_ratio: float | None = _knob(None, "Fraction of patches masked (default: the method's: "
                                     "MAE 0.75, the paper's best; SimMIM 0.6; data2vec 2.0 "
                                     "0.8; iBOT 0.3 on average).")
    mask_strategy: str = _knob("random", "random | block | grid (paper Table 1f: random is "
                               "best and allows the highest ratio).")
    norm_pix_loss: bool = _knob(True, "Normalise each target patch by its own mean and "
                                "variance (the paper's default: better representations).")
    # Table 1c "encoder w/ [M]": every token through the encoder (None = False, MAE's design).
    encoder_mask_tokens: bool | None = _knob(None, "Paper Table 1c ablation: mask tokens go "
                                             "through the encoder too (slower and worse; off "
                                             "by default, MAE's design).")
    mask_ratio_var: float | None = _knob(None, "iBOT: per-image mask ratios are uniform in "
                                         "mask_ratio +- this (default 0.2).")
    mask_patch_size: int | None = _knob(None, "SimMIM: pixels a side of the units masked "
                                        "together (default: two ViT patches, as 32 / 16).")
    num_targets: int | None = _knob(None, "I-JEPA: target blocks per image (default 4, the "
                                    "paper's).")
    target_scale_min: float | None = _knob(None, "I-JEPA: smallest target block, as a fraction "
                                           "of the image (default 0.15, the paper's).")
    target_scale_max: float | None = _knob(None, "I-JEPA: largest target block, as a fraction "
                                           "of the image (default 0.2, the paper's).")
    num_masks: int | None = _knob(None, "data2vec 2.0: masked copies of each image (default "
                                  "4; the recipe's 16).")
    target_layers: int | None = _knob(None, "data2vec 2.0: top teacher blocks in the targets "
                                      "(default: the recipe's 10 of 12, scaled).")


# Knobs added after runs were published: (section, key) -> the values that mean "as before".
# ``RunConfig.digest`` leaves a knob out while it holds one of them, so older runs are found.
CENTER_INITS = ("zeros", "batch")  # DINO's center at step 0
ADDED_LATER: dict[tuple[str, str], tuple[Any, ...]] = {
    ("train", "lr_scaling"): (None,),
    ("train", "lr_ref_batch"): (None,),
    ("ssl", "norm_last_layer"): (None,),
    ("mae", "encoder_mask_tokens"): (None, False),
    ("train", "attention"): (None, "auto"),
    ("train", "conv"): (None, "auto"),
    ("data", "stream"): (False,),
    ("data", "pipeline"): (None, "auto"),
    ("data", "shuffle_buffer"): (None,),
    ("train", "online_eval"): (None,),
    ("train", "online_every"): (None,),
    ("train", "stop_on_collapse"): (False,),
    ("train", "tracker"): (None,),
    ("train", "init"): (None,),
    ("train", "init_weights"): (None,),
    ("ssl", "center_init"): (None,),
    ("train", "warmup_min_steps"): (None,),
    ("ssl", "head_output_bias"): (None,),
    ("ssl", "redundancy_weight"): (None,),
    ("ssl", "invariance_weight"): (None,),
    ("ssl", "variance_weight"): (None,),
    ("ssl", "covariance_weight"): (None,),
    ("model", "cifar_stem"): (None,),
    ("train", "optimizer"): (None, "adamw"),
    ("train", "sgd_momentum"): (None,),
    ("train", "lars_eta"): (None,),
    ("train", "lars_clip_lr"): (None,),
    ("ssl", "stop_gradient"): (None,),
    ("ssl", "queue_size"): (None,),
    ("ssl", "queue_start_epochs"): (None,),
    ("ssl", "num_prototypes"): (None,),
    ("ssl", "sinkhorn_iterations"): (None,),
    ("ssl", "sinkhorn_epsilon"): (None,),
    ("ssl", "pred_hidden_dim"): (None,),
    ("mae", "mask_ratio_var"): (None,),
    ("mae", "mask_patch_size"): (None,),
    ("mae", "num_targets"): (None,),
    ("mae", "target_scale_min"): (None,),
    ("mae", "target_scale_max"): (None,),
    ("mae", "num_masks"): (None,),
    ("mae", "target_layers"): (None,),
    ("ssl", "patch_out_dim"): (None,),
    ("ssl", "shared_head"): (None,),
    ("ssl", "patch_loss_weight"): (None,),
    ("ssl", "teacher_patch_temp"): (None,),
    ("train", "weight_decay_end"): (None,),
}
# Knobs whose default became None ("the method's") after runs were published: a config that
# leaves one None hashes as the old default did, so its digest stays what it was.
DEFAULTED_LATER: dict[tuple[str, str], Any] = {("mae", "mask_ratio"): 0.75}
MAE_MASK_RATIO = 0.75  # what a method without a mask ratio of its own records


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: the method's optimizer (AdamW(0.9, 0.95) on ViTs; LARS or SGD in the ResNet
    recipes), lr = blr x effective batch / 256 (or the square-root rule), warmup then cosine."""

    method: str = _knob("mae", "mae | simmim | ijepa | ibot | data2vec2 | simclr | mocov3 | "
                        "byol | dino | barlowtwins | vicreg | swav | simsiam | mocov2 | nnclr "
                        "(or a method you registered).")
    optimizer: str | None = _knob(None, "adamw | lars | sgd (default: the method's recipe for "
                                  "its backbone: AdamW on ViTs; on ResNets solo-learn's "
                                  "CIFAR choice, LARS or SGD).")
    sgd_momentum: float | None = _knob(None, "Momentum of lars and sgd (default 0.9).")
    lars_eta: float | None = _knob(None, "LARS trust coefficient eta (default 0.02, "
                                   "solo-learn's; biases and norm parameters are excluded "
                                   "from the trust ratio and the weight decay).")
    lars_clip_lr: bool | None = _knob(None, "LARS: clip each layer's adaptive lr at the "
                                      "global lr (solo-learn's clip_lr; default on).")
    # may be fractional (compare's time budgets); schedules follow it
    epochs: float = _knob(20, "Pretraining epochs, may be fractional; the lr, momentum and "
                          "temperature schedules follow it.")
    batch_size: int = _knob(128, "Images per micro-batch and process.")  # per process
    accum_iter: int = _knob(1, "Micro-batches per optimizer step; the effective batch is "
                            "batch x accum x processes.")
    blr: float | None = _knob(None, "Base lr; lr = blr x effective batch / 256 (default: the "
                              "method's: MAE, SimCLR, MoCo v3, BYOL 1.5e-4; DINO 5e-4).")
    lr: float | None = _knob(None, "Absolute peak lr; overrides --blr.")
    # How lr follows the batch (``peak_lr``): linear | sqrt; None: the method's (MAE linear,
    # the baselines sqrt from their paper's batch, lr_ref_batch).
    lr_scaling: str | None = _knob(None, "How the lr follows the effective batch: linear "
                                   "(Goyal et al.) | sqrt (Malladi et al., for Adam-type "
                                   "optimisers; from lr_ref_batch). Default: the method's: "
                                   "MAE and DINO linear, SimCLR / MoCo v3 / BYOL sqrt.")
    lr_ref_batch: int | None = _knob(None, "The batch the recipe's lr was tuned at, for sqrt "
                                     "scaling (default: the method's; 4096 for SimCLR / MoCo "
                                     "v3 / BYOL, else 256).")
    min_lr: float = _knob(0.0, "Floor of the cosine schedule.")
    weight_decay: float | None = _knob(None, "AdamW weight decay on weight matrices, not on "
                                       "biases, norms, tokens (default: the method's: MAE "
                                       "0.05, SimCLR / MoCo v3 / BYOL 0.1, DINO 0.04).")
    weight_decay_end: float | None = _knob(None, "Weight decay at the end of a half cosine "
                                           "from --weight-decay (I-JEPA and iBOT: 0.04 to "
                                           "0.4; default: the method's, constant for most).")
    warmup_epochs: float | None = _knob(None, "Linear lr warmup length in epochs (default: 5 % "
                                        "of the epochs, MAE's 40 of 800, lengthened to "
                                        "--warmup-min-steps).")
    # When warmup_epochs is None: warm up for at least this many optimizer steps, at most half
    # the run (None: the method's; DINO waits for its EMA teacher, the others need no floor).
    warmup_min_steps: int | None = _knob(None, "Without --warmup-epochs: warm up for at least "
                                         "this many optimizer steps, at most half the run "
                                         "(default: the method's: DINO 250, its teacher's EMA "
                                         "horizon; the others none).")
    seed: int = _knob(0, "Seeds data order, crops and masks.")
    precision: str = _knob("auto", "auto | bf16 | fp16 | fp32. auto: bf16 where the hardware "
                           "runs it fast (GPU, AMX/AVX512-BF16 CPUs), else fp32.")
    device: str = _knob("auto", "auto | cpu | cuda (auto: cuda when there is one).")
    deterministic: bool = _knob(False, "Deterministic kernels (bit-exact resume on CPU; "
                                "slower).")
    log_every: int = _knob(10, "Optimizer steps per metrics line in metrics.jsonl.")
    save_every: int = _knob(1, "Epochs between checkpoints (the last epoch is always saved).")
    clip_grad: float | None = _knob(None, "Clip the gradient norm at this value (default: no "
                                    "clipping, as in MAE).")
    # Attention kernel: fused (scaled_dot_product_attention) | math (explicit softmax) | auto
    # (None: a rule per call on the device, autocast dtype and length; mae_bench.models.attention).
    attention: str | None = _knob(None, "Attention kernel: auto (a rule per call: math under "
                                  "bf16 / fp16 on CPUs, where the flash kernel's backward is "
                                  "slow; fused elsewhere; results/speed-cpu.md) | fused | math.")
    # Convolution kernel: native (F.conv2d) | matmul (im2col + matmul) | auto (None: a rule per
    # call on the device, autocast dtype and the layer's size; mae_bench.models.conv).
    conv: str | None = _knob(None, "Convolution kernel: auto (a rule per call: im2col + matmul "
                             "for small wide layers under bf16 on CPUs, native elsewhere) | "
                             "native | matmul.")
    # Online evaluation while pretraining (evals/online.py); None: on where the data has labels.
    online_eval: bool | None = _knob(None, "Online k-NN, linear probe and collapse signals while "
                                     "pretraining (default: on for labelled data).")
    online_every: int | None = _knob(None, "Steps between online evaluations (default: whole "
                                     "epochs, about 2 % of the time).")
    stop_on_collapse: bool = _knob(False, "Stop at a collapse seen online instead of warning.")
    init: str | None = _knob(None, "Start the encoder from a run folder, an official MAE "
                             "checkpoint, timm:NAME or hf:ID (heads start random).")
    init_weights: str | None = _knob(None, "--init timm:NAME: a weights file instead of timm's "
                                     "download.")
    tracker: str | None = _knob(None, "Tracker besides the run folder: none | tensorboard | "
                                "wandb (default: tensorboard when installed).")


@dataclass(frozen=True)
class SSLConfig:
    """Knobs of the contrastive / self-distillation baselines. None means the method's own
    default (written into the run's config.yaml once resolved); methods ignore knobs they do
    not have."""

    temperature: float | None = _knob(None, "SimCLR / MoCo v3 softmax temperature (default "
                                      "0.5 / 0.2, the papers').")
    proj_hidden_dim: int | None = _knob(None, "Hidden width of the projector and predictor "
                                        "MLPs (default 2048).")
    proj_dim: int | None = _knob(None, "Projector output width (SimCLR 128, MoCo v3 / BYOL "
                                 "256; DINO: its bottleneck, 256).")
    momentum: float | None = _knob(None, "MoCo v3 / BYOL / DINO: teacher EMA momentum at the "
                                   "start, rising to 1 (0.99 / 0.996 / 0.996, the papers').")
    out_dim: int | None = _knob(None, "DINO prototypes K (default 4096; the paper's 65536).")
    teacher_temp: float | None = _knob(None, "DINO: final teacher temperature (default "
                                       "0.04); lower sharpens the targets.")
    warmup_teacher_temp: float | None = _knob(None, "DINO: teacher temperature at step 0 "
                                              "(default 0.04).")
    teacher_temp_warmup_epochs: float | None = _knob(None, "DINO: length of the linear "
                                                     "teacher-temperature warm-up, in epochs.")
    student_temp: float | None = _knob(None, "DINO: student temperature (default 0.1).")
    center_momentum: float | None = _knob(None, "DINO: EMA momentum of the center that keeps "
                                          "the teacher from collapsing (default 0.9).")
    center_init: str | None = _knob(None, "DINO: center at step 0: zeros (the paper) | batch "
                                    "(the first batch's mean; default).")
    norm_last_layer: bool | None = _knob(None, "DINO: prototypes' norm fixed at 1 (default) or "
                                         "learnt (--no-norm-last-layer; less stable).")
    freeze_last_layer_epochs: float | None = _knob(None, "DINO / SwAV: epochs before the "
                                                   "prototypes start to learn (default 0; "
                                                   "SwAV on CIFAR 2).")
    local_crops: int | None = _knob(None, "DINO / SwAV multi-crop: small crops per image "
                                    "(default 0: off).")
    local_crop_size: int | None = _knob(None, "DINO / SwAV multi-crop: their side in pixels.")
    freeze_patch_embed: bool | None = _knob(None, "MoCo v3: keep the random patch projection "
                                            "frozen, the paper's fix for its instability "
                                            "(default on).")
    head_output_bias: bool | None = _knob(None, "BYOL: the projector's and predictor's output "
                                          "Linear has a bias (default off, as in deepmind's "
                                          "byol; unset in runs made before this knob, whose "
                                          "heads had one).")
    redundancy_weight: float | None = _knob(None, "Barlow Twins: lambda, the weight of the "
                                            "off-diagonal (redundancy) terms against the "
                                            "diagonal ones (default 5e-3, the paper's).")
    invariance_weight: float | None = _knob(None, "VICReg: lambda, the weight of the "
                                            "invariance (mean squared distance) term (default "
                                            "25, the paper's).")
    variance_weight: float | None = _knob(None, "VICReg: mu, the weight of the variance hinge "
                                          "that keeps each dimension's std at 1 and so "
                                          "prevents collapse (default 25, the paper's).")
    covariance_weight: float | None = _knob(None, "VICReg: nu, the weight of the covariance "
                                            "term that decorrelates dimensions (default 1, "
                                            "the paper's).")
    stop_gradient: bool | None = _knob(None, "SimSiam: no gradient through the target branch "
                                       "(default on; off is the paper's collapse ablation, "
                                       "Fig. 2).")
    queue_size: int | None = _knob(None, "MoCo v2+: negatives in the queue; NNCLR: the support "
                                   "set; SwAV: stored features for Sinkhorn (0: none).")
    queue_start_epochs: float | None = _knob(None, "SwAV: epochs before the feature queue is "
                                             "used.")
    num_prototypes: int | None = _knob(None, "SwAV: prototypes K (default 3000, the paper's).")
    sinkhorn_iterations: int | None = _knob(None, "SwAV: Sinkhorn-Knopp iterations (default 3).")
    sinkhorn_epsilon: float | None = _knob(None, "SwAV: entropy regularisation of the "
                                           "Sinkhorn codes (default 0.05).")
    pred_hidden_dim: int | None = _knob(None, "Hidden width of the predictor where it differs "
                                        "from the projector's (SimSiam 512, NNCLR 4096).")
    patch_out_dim: int | None = _knob(None, "iBOT: prototypes of the patch-token head "
                                      "(default 4096 here; the paper's 8192).")
    shared_head: bool | None = _knob(None, "iBOT: one head for the [CLS] and the patch tokens "
                                     "(default on, as the official ViT-S/B recipes) or two.")
    patch_loss_weight: float | None = _knob(None, "iBOT: weight of the masked-patch loss "
                                            "against the [CLS] loss (lambda2, default 1).")
    teacher_patch_temp: float | None = _knob(None, "iBOT: final teacher temperature of the "
                                             "patch tokens (default 0.04: the official 0.07 "
                                             "flattened short runs; above "
                                             "--warmup-teacher-temp it warms up as DINO's).")


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
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def digest(self) -> str:
        """A short content hash, stable across processes (for provenance and cache keys).

        Knobs added after runs were published (``ADDED_LATER``) count only when set to
        something new, so a config written before they existed keeps its digest, and its runs
        are found again."""
        raw = self.to_dict()
        for (section, key), old_default in DEFAULTED_LATER.items():
            if raw[section][key] is None:
                raw[section][key] = old_default
        for (section, key), as_before in ADDED_LATER.items():
            value = raw[section].get(key)
            # identity for None / False (so 0 is not taken for False), equality for names
            if any(value is v or (isinstance(v, str) and value == v) for v in as_before):
                del raw[section][key]
        blob = json.dumps(raw, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build a config from plain values (parsed YAML), checking every key and value type.

        Raises:
            ConfigError: not a mapping of sections, an unknown section or key, or a value of
                the wrong type (the message names ``section.key`` and the expected type).
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a run config must be a mapping of sections, got {_kind(raw)}")
        _reject_unknown(raw, cls, "config")
        parts = {}
        for f in fields(cls):
            sub = raw.get(f.name)
            if sub is None:  # a missing or empty section: all defaults
                sub = {}
            if not isinstance(sub, Mapping):
                raise ConfigError(f"config section '{f.name}' must be a mapping of keys to "
                                  f"values, got {_kind(sub)}")
            _reject_unknown(sub, _SECTIONS[f.name], f"config section '{f.name}'")
            parts[f.name] = _SECTIONS[f.name](
                **{key: check_value(f"{f.name}.{key}", value) for key, value in sub.items()})
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Read a YAML config file (a run's config.yaml works). Raises ConfigError naming the
        file and the bad key."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        try:
            return cls.from_dict({} if raw is None else raw)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None

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

    def override(self, values: Mapping[str, Any]) -> RunConfig:
        """Return a copy with the fields named ``section.key`` set, e.g.
        ``cfg.override({"ssl.teacher_temp": 0.07})``. None sets a field to None (unlike
        ``replace``). Raises ConfigError for an unknown name or a value of the wrong type."""
        raw = self.to_dict()
        for name, value in values.items():
            knob = knob_named(name)
            raw[knob.section][knob.key] = check_value(name, value)
        return RunConfig.from_dict(raw)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mae": MAEConfig,
             "ssl": SSLConfig}


def _reject_unknown(raw: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(known))}"
        )


# ---------------------------------------------------------------------------- knobs and types


@dataclass(frozen=True)
class Knob:
    """One field of ``RunConfig`` as the command line sees it.

    Attributes:
        section / key: where it lives (``model`` / ``decoder_embed_dim``).
        value_type: the type of a value other than None: int, float, bool or str.
        optional: None is a valid value (it means "the method's / the data set's default").
        default: the dataclass default.
        help: the option's help text.
        flags: the option names, the field's own first (``--decoder-embed-dim``), then the
            historical one from the metadata (``--decoder-dim``) if it differs.
    """

    section: str
    key: str
    value_type: type
    optional: bool
    default: Any
    help: str
    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _split_optional(hint: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``float`` -> (float, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields take one type or one type | None, not {hint}")
        return args[0], True
    return hint, False


def _knobs() -> tuple[Knob, ...]:
    knobs = []
    for section in fields(RunConfig):
        cls = _SECTIONS[section.name]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp, optional = _split_optional(hints[f.name])
            if tp not in _TYPE_NAMES:
                raise TypeError(f"{section.name}.{f.name}: config fields are int, float, bool "
                                f"or str (optionally | None), not {tp}")
            if "help" not in f.metadata:
                raise TypeError(f"{section.name}.{f.name} has no help; declare it with _knob")
            own = "--" + f.name.replace("_", "-")
            flags = (own, f.metadata["flag"]) if f.metadata.get("flag", own) != own else (own,)
            knobs.append(Knob(section.name, f.name, tp, optional, f.default, f.metadata["help"],
                              flags))
    return tuple(knobs)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
KNOBS: tuple[Knob, ...] = _knobs()  # every field of RunConfig, in order
_BY_NAME = {k.name: k for k in KNOBS}


def knob_named(name: str) -> Knob:
    """The knob ``section.key``. Raises ConfigError naming the valid sections or keys."""
    section, _, key = name.partition(".")
    if not key:
        raise ConfigError(f"'{name}' is not SECTION.KEY, e.g. train.epochs")
    if section not in _SECTIONS:
        raise ConfigError(f"unknown config section '{section}' in '{name}'; expected "
                          f"SECTION.KEY with SECTION one of {', '.join(_SECTIONS)}")
    _reject_unknown({key: None}, _SECTIONS[section], f"config section '{section}'")
    return _BY_NAME[name]


def _kind(value: Any) -> str:
    """How a value reads to the user: 'a string', 'a list', ..."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}
    return next((v for t, v in kinds.items() if isinstance(value, t)), type(value).__name__)


def check_value(name: str, value: Any) -> Any:
    """Return ``value`` if it fits the type of the field ``section.key`` (an int is fine for a
    float, and kept as it is, so digests do not change); raise ConfigError otherwise."""
    knob = knob_named(name)
    if value is None and knob.optional:
        return value
    tp = knob.value_type
    fits = (isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not fits:
        expected = f"{_TYPE_NAMES[tp]} ({tp.__name__})" + (" or null" if knob.optional else "")
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({_kind(value)})")
    return value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` -> ``("train.epochs", 5.0)``: the value is a YAML scalar (``null``,
    ``true``, ``1e-3``), checked against the field's type. For a text field any scalar is taken
    as the text typed (``--set data.data_dir=2024``). A float field gets a float, as from its
    named option (``--set train.epochs=5`` and ``--epochs 5`` give the same digest), and
    Python's spellings ``nan`` and ``inf`` work there too.

    Raises:
        ConfigError: no ``=``, an unknown name, or a value of the wrong type.
    """
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. "
                          "--set train.epochs=5")
    try:
        knob = knob_named(name)
    except ConfigError as exc:
        raise ConfigError(f"--set {text}: {exc}") from None
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw.strip()
    scalar = value is not None and not isinstance(value, str | list | dict)
    if knob.value_type is str and scalar:  # 2024, true, 2024-01-01: the text as typed
        value = raw.strip()
    elif knob.value_type is float and isinstance(value, str):  # nan, inf
        try:
            value = float(value)
        except ValueError:
            pass
    elif knob.value_type is float and type(value) is int:  # 5 -> 5.0, as --epochs 5 gives
        value = float(value)
    try:
        return name, check_value(name, value)
    except ConfigError as exc:
        raise ConfigError(f"--set {text}: {exc}") from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) plus 1.2's floats without a dot: ``1e-3`` is a number, not a string."""


class _Dumper(yaml.SafeDumper):
    """Quotes the strings that ``_Loader`` would read as numbers, so config.yaml round-trips."""


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


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
OPTIMIZERS = ("adamw", "lars", "sgd")  # mae_bench.training.optim


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
    run is built, see ``mae_bench.methods.registry.build_method``). Raises ConfigError."""
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
        (t.conv is None or t.conv in CONV_PATHS,
         f"unknown convolution path '{t.conv}'; valid: {', '.join(CONV_PATHS)}"),
        (t.online_every is None or t.online_every >= 1,
         f"--online-every must be >= 1, got {t.online_every}"),
        (t.tracker is None or t.tracker in TRACKERS,
         f"unknown tracker '{t.tracker}'; valid: {', '.join(TRACKERS)}"),
        (t.init_weights is None or (t.init or "").startswith("timm:"),
         "--init-weights goes with --init timm:NAME"),
        (cfg.mae.mask_ratio is None or 0.0 < cfg.mae.mask_ratio < 1.0,
         f"--mask-ratio must be strictly between 0 and 1, got {cfg.mae.mask_ratio}"),
        (t.weight_decay_end is None or t.weight_decay_end >= 0,
         f"--weight-decay-end must be >= 0, got {t.weight_decay_end}"),
        (cfg.data.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.data.num_workers}"),
        (cfg.data.shuffle_buffer is None or cfg.data.shuffle_buffer >= 1,
         f"--shuffle-buffer must be >= 1, got {cfg.data.shuffle_buffer}"),
        (cfg.data.pipeline is None or cfg.data.pipeline in DATA_PIPELINES,
         f"unknown data pipeline '{cfg.data.pipeline}'; valid: {', '.join(DATA_PIPELINES)}"),
        (cfg.model.img_size is None or cfg.model.img_size > 0,
         f"--img-size must be > 0, got {cfg.model.img_size}"),
        (t.optimizer is None or t.optimizer in OPTIMIZERS,
         f"unknown optimizer '{t.optimizer}'; valid: {', '.join(OPTIMIZERS)}"),
        (t.sgd_momentum is None or 0 <= t.sgd_momentum < 1,
         f"--sgd-momentum must be in [0, 1), got {t.sgd_momentum}"),
        (t.lars_eta is None or t.lars_eta > 0,
         f"--lars-eta (the LARS trust coefficient) must be > 0, got {t.lars_eta}"),
    ]
    s = cfg.ssl
    positive = ("temperature", "proj_hidden_dim", "proj_dim", "out_dim", "teacher_temp",
                "warmup_teacher_temp", "student_temp", "local_crop_size", "redundancy_weight",
                "invariance_weight", "variance_weight", "covariance_weight", "num_prototypes",
                "sinkhorn_iterations", "sinkhorn_epsilon", "pred_hidden_dim")
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
    m = cfg.mae
    for name in ("mask_patch_size", "num_targets", "num_masks", "target_layers"):
        value = getattr(m, name)
        checks.append((value is None or value >= 1, f"mae.{name} must be >= 1, got {value}"))
    for name in ("target_scale_min", "target_scale_max"):
        value = getattr(m, name)
        checks.append((value is None or 0 < value < 1,
                       f"mae.{name} must be in (0, 1), got {value}"))
    low, high = m.target_scale_min, m.target_scale_max
    checks.append((low is None or high is None or low <= high,
                   f"mae.target_scale_min ({low}) must not exceed mae.target_scale_max ({high})"))
    checks.append((m.mask_ratio_var is None or m.mask_ratio_var >= 0,
                   f"mae.mask_ratio_var must be >= 0, got {m.mask_ratio_var}"))
    for name in ("patch_out_dim", "teacher_patch_temp"):
        value = getattr(s, name)
        checks.append((value is None or value > 0, f"ssl.{name} must be > 0, got {value}"))
    checks.append((s.patch_loss_weight is None or s.patch_loss_weight >= 0,
                   f"ssl.patch_loss_weight must be >= 0, got {s.patch_loss_weight}"))
    for name in ("teacher_temp_warmup_epochs", "freeze_last_layer_epochs", "local_crops",
                 "queue_size", "queue_start_epochs"):
        value = getattr(s, name)
        checks.append((value is None or value >= 0, f"ssl.{name} must be >= 0, got {value}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
