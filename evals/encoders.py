"""Where an evaluated encoder comes from: a mae-bench run, an official MAE checkpoint, or one of
the two reference rows every table carries (``pixels`` and ``random``).

``load_source`` turns the ``--checkpoint`` argument into an ``EncoderSource``: the encoder's
architecture, its weights (as the keys of a ``VisionTransformer`` with cls pooling), a content
fingerprint for the feature cache, and what is known about its pretraining (for result rows).
``EncoderSource.build`` makes a fresh ``VisionTransformer`` from it with any pooling, head and
drop path, as the protocols need.

A run (or ``--checkpoint random --arch``) whose backbone is not a ViT preset (``resnet18``,
``timm:NAME``; ``mae_bench.models.backbones``) is a ``BackboneSource``: ``build`` makes that
backbone (with a classifier for fine-tuning) and loads its weights; its frozen features are its
own pooled embedding, ``forward_head(pre_logits=True)``, the vector its method trained on.

Outside models (timm, Hugging Face, torch.hub, a Python callable: ``evals/sources.py``) are an
``EncoderSource`` of kind "outside" holding an ``Embedder``: a built, loaded module that maps a
normalised batch to one embedding per image for each pooling it offers. They declare their own
input size, channels and normalisation; the frozen-feature protocols use them as they use a ViT.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mae_bench.errors import CheckpointError, ConfigError, DataError
from mae_bench.files import RUN_FILE
from mae_bench.models.backbones import (
    RESNETS,
    ResNet,
    TimmBackbone,
    build_backbone,
    check_arch,
    family,
    is_vit,
    pooled,
    use_cifar_stem,
)
from mae_bench.models.conv import set_conv
from mae_bench.models.vit import POOLS as VIT_POOLS
from mae_bench.models.vit import PRESETS, VisionTransformer, vit_kwargs
from mae_bench.training.checkpoint import find_checkpoint, is_official_mae, load_checkpoint

REFERENCES = ("pixels", "random")
# What an outside model (or the pixels reference) supports: protocols on frozen features.
FROZEN_PROTOCOLS = ("knn", "linear --probe fast", "fewshot --probe fast")
MODEL_POOL = "model"  # an outside encoder's own pooled output (timm: forward_head(pre_logits))
CNN_POOL = "mean"  # a convolutional backbone's global average pool (its forward_head)


def backbone_pools(arch: str) -> tuple[str, ...]:
    """The frozen-feature pools of a mae-bench backbone: a ViT preset "cls" and "mean" (of its
    normed tokens); a convolutional one "mean", its global average pool; any other (a timm
    transformer) "model", its own pooling (timm's ``global_pool``). Outside a ViT preset it is
    ``forward_head(pre_logits=True)``, the embedding the method trained on."""
    if is_vit(arch):
        return tuple(VIT_POOLS)
    return (CNN_POOL,) if family(arch) == "cnn" else (MODEL_POOL,)


def encoder_pools(encoder: nn.Module) -> tuple[str, ...]:
    """``backbone_pools`` of a built encoder (a ViT, a ResNet, a timm backbone)."""
    if isinstance(encoder, VisionTransformer):
        return tuple(VIT_POOLS)
    if isinstance(encoder, TimmBackbone):
        return backbone_pools(f"timm:{encoder.name}")
    return (CNN_POOL,)


class Embedder(nn.Module, metaclass=abc.ABCMeta):
    """An outside encoder as the feature extractor sees it: normalised images [N, C, S, S] ->
    {pool: [N, D]} for every pooling in ``pools`` (a subset of "model", "cls", "mean").

    Subclasses set ``pools`` once ``embed`` has been run on a probe batch (``evals.sources``).
    """

    pools: tuple[str, ...] = (MODEL_POOL,)
    # A convolutional network runs in channels-last memory format (its weights converted once,
    # each batch by the feature extractor): oneDNN's and cuDNN's fast convolution layout
    # (measured for a timm ResNet-18 in results/outside-encoders-cifar10/README.md).
    channels_last: bool = False

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[N, C, S, S] normalised images -> {pool: [N, D]}; every subclass defines it (an
        Embedder without it cannot be instantiated)."""

    def use_channels_last(self, model: nn.Module) -> None:
        """Convert ``model`` (in place) to channels-last if it is a convolutional network: more
        than one 2-D convolution (a ViT has one, its patch embedding, and gains nothing); its
        convolutions pick their kernel by ``mae_bench.models.conv``'s rule."""
        if sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1:
            model.to(memory_format=torch.channels_last)
            set_conv(model, "auto")
            self.channels_last = True


@dataclass
class EncoderSource:
    """An encoder to evaluate. One subclass per kind of source (a run folder, an official
    checkpoint, the two references here; timm, Hugging Face, torch.hub, Python models and the
    API's objects in ``evals/sources.py``): what differs between kinds is a method or a class
    attribute of the subclass, never a comparison of ``kind``.

    Attributes:
        kind: the identity's name of the kind: "run", "official", "random", "pixels" or
            "outside" (part of every evaluation's ``eval_key``, so it stays as it was).
        label: how the source is named in tables (run folder name, file name, "pixels", ...).
        method: pretraining method ("mae", "simclr", ...; "official-mae"; "pixels"; "random");
            for outside models the source that made them ("timm", "hf", "hub", "python").
        arch: preset name, or a description such as "vit(d=768, depth=12, p=16)"; a run's
            backbone ("resnet18", "timm:NAME"); for outside models their name
            ("vit_small_patch16_224", a Hugging Face id, ...).
        vit_kwargs: VisionTransformer arguments (img_size, patch_size, in_chans, embed_dim,
            depth, num_heads, mlp_ratio); empty for pixels and backbones (``BackboneSource``).
        state: encoder weights with cls-pooling keys (a backbone: its own keys); None for
            random and pixels.
        fingerprint: a hash of the weights (or of the seed / arch for references; outside
            models: of their source, name and weights).
        pretrain: facts about pretraining for result rows (dataset, epochs, mask_ratio, seed,
            pretrain_seconds, config_hash, data_dir; outside models: source, weights hash).
        encoder: the outside model (kind "outside"), built and loaded.
        input_size, input_channels: what an outside model or a backbone takes (None: the
            data's own).
        mean, std: the normalisation an outside model expects (None: the data set's).
        cacheable: False for a plain callable, whose code the fingerprint cannot see.
    """

    kind: ClassVar[str] = ""
    # Class facts, overridden by the kinds they differ for:
    pooled: ClassVar[bool] = True  # features are a pooling of tokens (pixels: no pool)
    random_weights: ClassVar[bool] = False  # the weights are a seeded random init
    reference: ClassVar[bool] = False  # a reference row (pixels, random): seeded by --seed
    own_weights: ClassVar[bool] = False  # mae-bench weights: rows carry their hash
    # A mae-bench ViT: it has an attention kernel and it can train (pixels, features and outside
    # models have neither; a ResNet or timm backbone has no mae-bench kernel but trains).
    vit: ClassVar[bool] = True
    sized_by_data: ClassVar[bool] = False  # its input size and channels follow the data
    takes_weights: ClassVar[bool] = False  # accepts --weights FILE
    takes_pretrained: ClassVar[bool] = False  # accepts --pretrained (a library's download)
    has_drop_path: ClassVar[bool] = True  # build(drop_path_rate=...) applies (a ViT's blocks)

    label: str
    method: str
    arch: str
    vit_kwargs: dict[str, Any]
    state: dict[str, torch.Tensor] | None
    fingerprint: str
    pretrain: dict[str, Any] = field(default_factory=dict)
    encoder: Embedder | None = None
    input_size: int | None = None
    input_channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    cacheable: bool = True

    @property
    def img_size(self) -> int | None:
        return self.vit_kwargs.get("img_size", self.input_size)

    @property
    def channels(self) -> int | None:
        return self.vit_kwargs.get("in_chans", self.input_channels)

    @property
    def pools(self) -> tuple[str, ...]:
        """The poolings of frozen features this source offers (pixels: any, it has none)."""
        return self.encoder.pools if self.encoder is not None else ("cls", "mean")

    @property
    def default_pool(self) -> str:
        """The pooling used when ``--pool`` is not given: the normed cls token for mae-bench
        encoders, an outside model's own pooled output where it has one."""
        return MODEL_POOL if MODEL_POOL in self.pools else self.pools[0]

    @property
    def run_id(self) -> str:
        return f"{self.label}-{self.fingerprint[:8]}"

    @property
    def checkpoint_name(self) -> str:
        """What a row's ``checkpoint`` column says: the label."""
        return self.label

    def identity(self) -> list[str]:
        """The source's part of an evaluation's ``eval_key``."""
        return [self.kind, self.run_id, self.label, self.fingerprint]

    def given_features(self) -> dict[str, torch.Tensor] | None:
        """Embeddings that come with the source, so no image is read (None: the data set's
        images go through the encoder)."""
        return None

    def build(self, global_pool: str = "cls", num_classes: int = 0,
              drop_path_rate: float = 0.0, init_seed: int | None = None,
              pretrained: bool = True) -> VisionTransformer:
        """A fresh VisionTransformer of this architecture.

        Args:
            global_pool: "cls" or "avg" (fine-tuning: mean patch token + fc_norm).
            num_classes: width of a new head (0: none).
            drop_path_rate: stochastic depth for fine-tuning.
            init_seed: seeds the random initialisation (random encoder, new heads).
            pretrained: load this source's weights; False gives the from-scratch baseline.
        """
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            vit = VisionTransformer(**self.vit_kwargs, global_pool=global_pool,
                                    num_classes=num_classes, drop_path_rate=drop_path_rate)
        if pretrained and self.state is not None:
            # avg pooling replaces the pretrained final norm with a fresh fc_norm (official
            # fine-tuning); a new head always starts fresh.
            state = {k: v for k, v in self.state.items()
                     if global_pool == "cls" or not k.startswith("norm.")}
            result = vit.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith(("fc_norm.", "head."))]
            if missing or result.unexpected_keys:
                raise CheckpointError(f"{self.label}: encoder weights do not fit the "
                                      f"architecture (missing {missing[:3]}, unexpected "
                                      f"{result.unexpected_keys[:3]})")
        return vit


    def frozen_model(self) -> VisionTransformer | Embedder | None:
        """The frozen feature extractor in eval mode (a ViT in the cls-pool layout; an outside
        model's ``Embedder``; None for pixels)."""
        return self.build().eval()

    def takes_channels(self, channels: int) -> bool:
        """Whether it evaluates images of ``channels`` channels (None: any)."""
        return self.channels is None or self.channels == channels


@dataclass
class RunSource(EncoderSource):
    """A mae-bench run folder or checkpoint file."""

    kind: ClassVar[str] = "run"
    own_weights: ClassVar[bool] = True


@dataclass
class OfficialSource(EncoderSource):
    """An official MAE pretrain checkpoint (facebookresearch/mae)."""

    kind: ClassVar[str] = "official"
    own_weights: ClassVar[bool] = True


@dataclass
class RandomSource(EncoderSource):
    """The random reference: a ViT of ``--arch`` at a seeded random init, built for the data
    as loaded (their size and channels) unless ``--img-size`` says otherwise."""

    kind: ClassVar[str] = "random"
    sized_by_data: ClassVar[bool] = True
    random_weights: ClassVar[bool] = True
    reference: ClassVar[bool] = True

    def frozen_model(self) -> VisionTransformer:
        return self.build(init_seed=self.pretrain.get("seed", 0)).eval()

    @classmethod
    def create(cls, *, arch: str | None, img_size: int | None, channels: int | None,
               seed: int) -> RandomSource:
        """``--checkpoint random``: ``arch`` at ``img_size`` (default: the preset's) with
        ``channels`` (default 3), initialised from ``seed``."""
        if arch is None:
            raise ConfigError("--checkpoint random needs --arch (the architecture to initialise "
                              "at random, e.g. the one of the run it is compared with)")
        if arch not in PRESETS:  # a ResNet or timm:NAME (an unknown name: the valid ones)
            return RandomBackboneSource.create_backbone(arch=arch, img_size=img_size,
                                                        channels=channels, seed=seed)
        kwargs = vit_kwargs(arch, img_size, channels or 3)
        digest = hash_text(f"random:{arch}:{kwargs}:{seed}")
        return cls("random", "random", arch, kwargs, None, digest, {"seed": seed})


class BackboneEmbedder(Embedder):
    """A mae-bench backbone that is not a ViT preset, as the feature extractor sees it: its
    pooled embedding (``backbones.pooled``) under its one pool name, in channels-last for a
    convolutional network."""

    def __init__(self, backbone: nn.Module, pool: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pools = (pool,)
        self.use_channels_last(backbone)

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.pools[0]: pooled(self.backbone, images)}  # [N, D]


@dataclass
class BackboneSource(EncoderSource):
    """The part shared by the sources whose encoder is a ResNet or a timm model
    (``mae_bench.models.backbones``): ``state`` holds the backbone's own keys (``conv1.weight``,
    ``layer1...``; timm's under ``model.``), ``vit_kwargs`` is empty and ``input_size`` /
    ``input_channels`` are the run's. Subclassed together with the kind (run, random).

    Attributes:
        cifar_stem: ResNets: the CIFAR stem as the run resolved it (None: timm models).
    """

    vit: ClassVar[bool] = False  # no mae-bench attention kernel; still trainable
    has_drop_path: ClassVar[bool] = False  # a ResNet has no stochastic depth; timm's is not set

    cifar_stem: bool | None = None

    @property
    def pools(self) -> tuple[str, ...]:
        return backbone_pools(self.arch)

    def build(self, global_pool: str = "cls", num_classes: int = 0,
              drop_path_rate: float = 0.0, init_seed: int | None = None,
              pretrained: bool = True) -> nn.Module:
        """A fresh backbone of this architecture, its weights loaded, with a classifier of
        ``num_classes`` (ResNet: a new ``fc``; timm: ``reset_classifier``) where asked.

        Args:
            global_pool: ignored: a backbone pools its own way (a CNN: the average pool).
            num_classes: width of a new classifier (0: none, the pooled features).
            drop_path_rate: must be 0 (these backbones have no stochastic depth here).
            init_seed: seeds the random initialisation (random encoder, new classifier).
            pretrained: load this source's weights; False gives the from-scratch baseline.
        """
        if drop_path_rate:
            raise ConfigError(f"drop path {drop_path_rate:g}: {self.arch} has no stochastic "
                              "depth here (a ViT knob); set it to 0")
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            model = build_backbone(self.arch, self.img_size, self.channels,
                                   cifar_stem=self.cifar_stem)
            if pretrained and self.state is not None:
                result = model.load_state_dict(self.state, strict=False)
                if result.missing_keys or result.unexpected_keys:
                    raise CheckpointError(f"{self.label}: encoder weights do not fit {self.arch} "
                                          f"(missing {result.missing_keys[:3]}, unexpected "
                                          f"{result.unexpected_keys[:3]})")
            if num_classes:
                if isinstance(model, ResNet):
                    model.fc = nn.Linear(model.num_features, num_classes)
                else:
                    model.reset_classifier(num_classes)
        return model

    def frozen_model(self) -> BackboneEmbedder:
        seed = self.pretrain.get("seed", 0) if self.random_weights else None
        return BackboneEmbedder(self.build(init_seed=seed), self.default_pool).eval()


@dataclass
class BackboneRunSource(BackboneSource, RunSource):
    """A mae-bench run whose backbone is a ResNet or a timm model."""


@dataclass
class RandomBackboneSource(BackboneSource, RandomSource):
    """``--checkpoint random --arch resnet18`` (or ``timm:NAME``): that backbone at a seeded
    random init, for the data as loaded (a ResNet's stem by the size rule)."""

    @classmethod
    def create_backbone(cls, *, arch: str, img_size: int | None, channels: int | None,
                        seed: int) -> RandomBackboneSource:
        check_arch(arch)  # an unknown name: ConfigError with the valid ones
        if img_size is None:
            raise ConfigError(f"--checkpoint random --arch {arch} needs an image size "
                              "(--img-size, or the data's own)")
        channels = channels or 3
        stem = use_cifar_stem(img_size, None) if arch in RESNETS else None
        digest = hash_text(f"random:{arch}:{img_size}:{channels}:{stem}:{seed}")
        return cls("random", "random", arch, {}, None, digest, {"seed": seed},
                   input_size=img_size, input_channels=channels, cifar_stem=stem)


@dataclass
class PixelsSource(EncoderSource):
    """The pixels reference: no encoder, flattened normalised pixels are the features."""

    kind: ClassVar[str] = "pixels"
    pooled: ClassVar[bool] = False
    reference: ClassVar[bool] = True
    vit: ClassVar[bool] = False

    def build(self, *args: Any, **kwargs: Any) -> VisionTransformer:
        raise ConfigError("the pixels reference has no encoder; use it with knn or linear")

    def frozen_model(self) -> None:
        return None

    @classmethod
    def create(cls, **_: Any) -> PixelsSource:
        """``--checkpoint pixels``: nothing to build or load."""
        return cls("pixels", "pixels", "pixels", {}, None, "pixels")


FEATURE_FILES = ("train_features.npy", "train_labels.npy", "test_features.npy",
                 "test_labels.npy")


@dataclass
class FeaturesSource(EncoderSource):
    """``--features DIR``: precomputed embeddings, which are both the source and the data (no
    encoder, no images). Its rows name the folder as given, its ``run_id`` and ``eval_key``
    the folder's name and a hash of the arrays."""

    kind: ClassVar[str] = "features"
    pooled: ClassVar[bool] = False
    vit: ClassVar[bool] = False

    folder: str = ""
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"features-{self.label}"

    @property
    def checkpoint_name(self) -> str:
        return self.folder

    def identity(self) -> list[str]:
        return [self.kind, self.label, self.fingerprint]

    def given_features(self) -> dict[str, torch.Tensor]:
        return self.features

    def build(self, *args: Any, **kwargs: Any) -> VisionTransformer:
        raise ConfigError(f"--features {self.folder} holds embeddings, not an encoder; use "
                          "them with knn or linear")

    def frozen_model(self) -> None:
        return None

    @classmethod
    def load(cls, folder: str | Path) -> FeaturesSource:
        """Read and check DIR/{train,test}_{features,labels}.npy.

        Raises:
            DataError: a file is missing or unreadable, or the arrays do not fit together.
        """
        features = read_feature_dir(folder)
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(features):
            h.update(features[name].numpy().tobytes())
        label = Path(folder).resolve().name
        return cls(label, "features", "-", {}, None, h.hexdigest(), folder=str(folder),
                   features=features)


def read_feature_dir(folder: str | Path) -> dict[str, torch.Tensor]:
    """The four arrays of a ``--features`` folder as tensors (features float32 [N, D], labels
    int64 [N]), each checked."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"--features {path}: no such folder; it must hold "
                        f"{', '.join(FEATURE_FILES)}")
    missing = [f for f in FEATURE_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"--features {path} lacks {', '.join(missing)} (it must hold "
                        f"{', '.join(FEATURE_FILES)})")
    arrays = {}
    for name in FEATURE_FILES:
        try:
            arrays[name] = np.load(path / name, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"--features: {path / name} is not a readable .npy array "
                            f"({str(exc).splitlines()[0][:80]})") from None
    out = {}
    for split in ("train", "test"):
        feats, labels = arrays[f"{split}_features.npy"], arrays[f"{split}_labels.npy"]
        _check_split(split, feats, labels)
        out[f"{split}_features"] = torch.from_numpy(np.ascontiguousarray(feats)).float()
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    if out["train_features"].shape[1] != out["test_features"].shape[1]:
        raise DataError(f"--features: train features have {out['train_features'].shape[1]} "
                        f"dimensions, test features {out['test_features'].shape[1]}")
    return out


def _check_split(split: str, feats: np.ndarray, labels: np.ndarray) -> None:
    if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.number):
        raise DataError(f"--features: {split}_features.npy must be a non-empty numeric "
                        f"[N, D] array, got shape {feats.shape} ({feats.dtype})")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"--features: {split}_labels.npy must be a 1-D integer array, got "
                        f"shape {labels.shape} ({labels.dtype})")
    if labels.shape[0] != feats.shape[0]:
        raise DataError(f"--features: {split}_features.npy has {feats.shape[0]} rows but "
                        f"{split}_labels.npy has {labels.shape[0]} labels")
    if labels.min() < 0:
        raise DataError(f"--features: {split}_labels.npy has negative labels (unlabeled "
                        "samples cannot be evaluated)")
    if not np.isfinite(feats).all():
        raise DataError(f"--features: {split}_features.npy holds NaN or inf values")


@dataclass
class OutsideSource(EncoderSource):
    """A model from outside mae-bench (timm, Hugging Face, torch.hub, Python; subclasses in
    ``evals/sources.py``) in ``encoder``: frozen features only."""

    kind: ClassVar[str] = "outside"
    vit: ClassVar[bool] = False
    takes_weights: ClassVar[bool] = True

    def build(self, *args: Any, **kwargs: Any) -> VisionTransformer:
        raise ConfigError(f"{self.label} is an outside model, evaluated on frozen features "
                          f"only: {', '.join(FROZEN_PROTOCOLS)}")

    def frozen_model(self) -> Embedder:
        return self.encoder.eval()

    def takes_channels(self, channels: int) -> bool:
        # An RGB model sees grayscale images replicated to three channels.
        return super().takes_channels(channels) or (self.channels, channels) == (3, 1)


def reference_kind(checkpoint: str | Path | None) -> type[EncoderSource] | None:
    """The class of a reference named by ``--checkpoint`` ("pixels", "random"), else None."""
    return REFERENCE_KINDS.get(str(checkpoint)) if checkpoint is not None else None


REFERENCE_KINDS: dict[str, type[EncoderSource]] = {"pixels": PixelsSource,
                                                   "random": RandomSource}


def load_source(checkpoint: str | Path, *, arch: str | None = None, img_size: int | None = None,
                channels: int | None = None, seed: int = 0, trust: bool = False) -> EncoderSource:
    """Resolve ``--checkpoint``: "pixels", "random" (needs ``arch``), a mae-bench run folder or
    checkpoint file, or an official MAE pretrain checkpoint.

    Args:
        checkpoint: the argument as given.
        arch: preset for "random"; for a checkpoint, the architecture the user expects (an
            error when the checkpoint holds another).
        img_size: image size for "random" (default: the preset's); ignored for checkpoints.
        channels: image channels for "random" (default 3).
        seed: initialisation seed of the random encoder.
        trust: allow unsafe unpickling (official checkpoints that pickled their arguments).
    """
    reference = reference_kind(checkpoint)
    if reference is not None:
        return reference.create(arch=arch, img_size=img_size, channels=channels, seed=seed)
    path = Path(checkpoint)
    if find_checkpoint(path) is None:  # eval and export both land here: name the path only
        if path.is_dir():
            raise CheckpointError(f"{path}: the folder holds no checkpoint.pt (a run that has not "
                                  "saved one yet?); give a run folder written by mae-bench "
                                  "pretrain, or a checkpoint file")
        raise CheckpointError(f"{path}: no such run folder or file (expected a run folder, a "
                              "checkpoint file, 'pixels' or 'random'; the last two for eval only)")
    ckpt = load_checkpoint(path, trust=trust)
    if "format_version" in ckpt and "config" in ckpt:
        source = _from_run(path, ckpt)
    elif is_official_mae(ckpt):
        source = _from_official(path, ckpt)
    else:
        raise CheckpointError(f"{path} is neither a mae-bench checkpoint nor an official MAE "
                              "pretrain checkpoint; give a run folder written by mae-bench "
                              "pretrain or the official mae_pretrain_vit_*.pth")
    if arch is not None and (isinstance(source, BackboneSource) or arch not in PRESETS):
        if arch != source.arch:
            raise CheckpointError(f"{path} holds a {source.arch} encoder, not --arch {arch}; "
                                  "drop --arch or pass the matching one")
    elif arch is not None:
        expected = vit_kwargs(arch, source.img_size, source.channels)
        shape_keys = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        diff = [k for k in shape_keys if expected[k] != source.vit_kwargs[k]]
        if diff:
            got = ", ".join(f"{k}={source.vit_kwargs[k]}" for k in diff)
            raise CheckpointError(f"{path} holds a {source.arch} encoder ({got}), not --arch "
                                  f"{arch}; drop --arch or pass the matching one")
    return source


def _from_run(path: Path, ckpt: dict[str, Any]) -> EncoderSource:
    from mae_bench.methods.registry import method_class, method_from_checkpoint

    cfg, method = method_from_checkpoint(ckpt, str(path))
    extra = ckpt.get("extra", {})
    img_size, channels = int(extra["img_size"]), int(extra["channels"])
    encoder_state = method.encoder.state_dict()
    if is_vit(cfg.model.arch):
        kwargs = vit_kwargs(cfg.model.arch, img_size, channels)
        wanted = VisionTransformer(**kwargs).state_dict().keys()
    else:  # the whole backbone (BatchNorm statistics too), its own keys
        kwargs, wanted = {}, encoder_state.keys()
    state = {k: encoder_state[k].detach().clone() for k in wanted}
    run_dir = path if path.is_dir() else path.parent
    total, step = extra.get("total_steps"), int(ckpt.get("step", 0))
    try:  # how the run was made (its first command), for the provenance of every row
        command = json.loads((run_dir / RUN_FILE).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    epochs_done = cfg.train.epochs * step / total if total else None
    pretrain = {
        "pretrain_dataset": cfg.data.dataset,
        "data_dir": cfg.data.data_dir,
        "pretrain_epochs": round(epochs_done, 3) if epochs_done is not None else None,
        "seed": cfg.train.seed,
        "pretrain_seconds": extra.get("train_seconds"),
        "config_hash": cfg.digest(),
        "checkpoint": str(path),
    }
    if command:
        pretrain["pretrain_command"] = command
    if extra.get("collapse"):  # the online evaluation saw the representation collapse
        pretrain["pretrain_collapse_step"] = extra["collapse"]["step"]
    if cfg.train.init is not None:  # started from earlier or outside weights (--init)
        pretrain["pretrain_init"] = cfg.train.init
        pretrain["pretrain_init_sha256"] = (extra.get("init") or {}).get("sha256")
    pretrain |= method_class(cfg.train.method).row_fields(cfg)  # its mask knobs, if any
    if cfg.train.method == "mae":
        pretrain |= {"mask_strategy": cfg.mae.mask_strategy,
                     "norm_pix_loss": cfg.mae.norm_pix_loss}
        if cfg.mae.encoder_mask_tokens:  # only when set, so MAE rows keep their columns
            pretrain["encoder_mask_tokens"] = True
    if not is_vit(cfg.model.arch):
        stem = (use_cifar_stem(img_size, cfg.model.cifar_stem) if cfg.model.arch in RESNETS
                else None)
        return BackboneRunSource(run_dir.name, cfg.train.method, cfg.model.arch, kwargs, state,
                                 hash_state(state), pretrain, input_size=img_size,
                                 input_channels=channels, cifar_stem=stem)
    return RunSource(run_dir.name, cfg.train.method, cfg.model.arch, kwargs, state,
                     hash_state(state), pretrain)


def _from_official(path: Path, ckpt: dict[str, Any]) -> EncoderSource:
    sd = ckpt["model"]
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = math.isqrt(int(sd["pos_embed"].shape[1]) - 1)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    # Head count is not in the weights: take a preset of the same shape, else 64-d heads (every
    # published ViT-B/L/H uses them).
    arch, heads = None, max(1, embed_dim // 64)
    for name, p in PRESETS.items():
        if (p.patch_size, p.embed_dim, p.depth) == (patch, embed_dim, depth):
            arch, heads = name, p.num_heads
            break
    kwargs = {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans,
              "embed_dim": embed_dim, "depth": depth, "num_heads": heads,
              "mlp_ratio": mlp_ratio}
    wanted = VisionTransformer(**kwargs).state_dict().keys()
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: official checkpoint lacks encoder keys {missing[:3]}")
    state = {k: sd[k].float() for k in wanted}
    label = arch or f"vit(d={embed_dim}, depth={depth}, p={patch})"
    return OfficialSource(path.stem, "official-mae", label, kwargs, state,
                         hash_state(state), {"checkpoint": str(path)})


def hash_state(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict: every key, shape and byte of its tensors."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape(-1): a 0-d buffer (BatchNorm's num_batches_tracked) has bytes too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_text(text: str) -> str:
    """The sha256 hex digest of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()


def model_for(source: EncoderSource) -> VisionTransformer | Embedder | None:
    """The frozen feature extractor in eval mode: a ViT (cls-pool layout), an outside model's
    ``Embedder``, or None for pixels."""
    return source.frozen_model()
