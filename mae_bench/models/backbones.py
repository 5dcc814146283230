"""Every backbone a method can train: the ViT presets, ResNet-18/34/50 and any timm model.

An ``--arch`` name is one of three kinds:

    vit_*         a preset of ``mae_bench.models.vit`` (every method; MAE needs one)
    resnet18/34/50  torchvision's ResNet, its keys unchanged (``conv1``, ``layer1``..``fc``), with
                  the CIFAR stem (3x3 stride-1 first convolution, no max-pool) for images of 64 px
                  or less, as solo-learn picks it; ``model.cifar_stem`` overrides the rule
    timm:NAME     ``timm.create_model(NAME, num_classes=0)`` at random init

Each backbone is an Encoder, the contract the methods and the protocols use (timm's hooks):

    forward_features(x)                 [N, C, H, W] -> tokens [N, T, D] or a map [N, D, h, w]
    forward_head(f, pre_logits=True)    -> [N, D], the pooled embedding a method trains on
                                        (ViT: the normed cls token; CNN: global average pool)
    num_features                        D
    no_weight_decay()                   parameter names without weight decay
    layer_id(name), num_layer_groups    the groups of layer-wise lr decay and partial
                                        fine-tuning, input side first (ViT: embeddings, each
                                        block, the head; ResNet: the stem, each stage, the head)
    has_batchnorm                       batch statistics: views go through it one at a time

Solo-learn's CIFAR stem pads its 3x3 convolution by 2 (34x34 maps for 32-px images); here the
padding is 1, as in He et al.'s CIFAR ResNets and lightly's: the maps keep the image's size.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from mae_bench.errors import ConfigError
from mae_bench.models.conv import set_conv
from mae_bench.models.vit import PRESETS, VisionTransformer, build_vit

CIFAR_STEM_MAX_SIZE = 64  # solo-learn: the CIFAR stem for CIFAR and STL-sized (64 px) crops
TIMM_PREFIX = "timm:"
RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
# timm model modules whose models are transformers: they train with the ViT recipes (AdamW)
_TIMM_TRANSFORMERS = ("vision_transformer", "deit", "beit", "eva", "swin", "vit", "cait",
                      "xcit", "levit", "pit", "tnt", "twins", "crossvit", "mvitv2", "volo",
                      "hiera", "sequencer", "mlp_mixer", "gcvit", "fastvit", "efficientvit")


def arch_names() -> list[str]:
    """The named backbones (timm's are ``timm:NAME``)."""
    return sorted(PRESETS) + list(RESNETS)


def is_vit(arch: str) -> bool:
    """A mae-bench ViT preset (what MAE and the masked methods need)."""
    return arch in PRESETS


def check_arch(arch: str) -> None:
    """Raise ConfigError unless ``arch`` names a backbone (a timm name is checked against
    timm's registry, the message giving close names)."""
    if arch in PRESETS or arch in RESNETS:
        return
    if arch.startswith(TIMM_PREFIX):
        check_timm_name(arch.removeprefix(TIMM_PREFIX))
        return
    close = difflib.get_close_matches(arch, arch_names(), n=3, cutoff=0.6)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ConfigError(f"unknown architecture {arch!r}{hint}; valid: {', '.join(arch_names())}, "
                      "or timm:NAME for a timm model")


def check_timm_name(name: str) -> None:
    """Raise ConfigError unless timm registers ``name`` (with up to three close names)."""
    import timm

    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "see timm.list_models()"
        raise ConfigError(f"unknown timm model {name!r}; {hint}")


def family(arch: str) -> str:
    """"vit" for transformers (the ViT presets, timm's transformers), "cnn" for the rest: which
    of a method's recipes a run starts from (``Method.defaults`` or ``cnn_defaults``)."""
    if arch in PRESETS:
        return "vit"
    if arch in RESNETS:
        return "cnn"
    from timm.models import get_arch_name, model_entrypoint

    check_arch(arch)
    name = arch.removeprefix(TIMM_PREFIX)
    module = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    is_transformer = any(module.startswith(t) for t in _TIMM_TRANSFORMERS) or \
        get_arch_name(name).startswith(("vit", "deit"))
    return "vit" if is_transformer else "cnn"


def use_cifar_stem(img_size: int, cifar_stem: bool | None) -> bool:
    """The rule: as set, else the CIFAR stem for images of at most 64 px."""
    return img_size <= CIFAR_STEM_MAX_SIZE if cifar_stem is None else cifar_stem


def build_backbone(arch: str, img_size: int, in_chans: int = 3,
                   cifar_stem: bool | None = None, num_classes: int = 0,
                   **vit_kwargs: Any) -> nn.Module:
    """The Encoder named ``arch`` for ``in_chans`` x ``img_size``^2 images, at random init.

    Args:
        arch: a ViT preset, a ResNet name or ``timm:NAME``.
        img_size: the training image side (ViTs: a multiple of the patch size).
        in_chans: image channels.
        cifar_stem: ResNets only: None for the rule (``use_cifar_stem``).
        num_classes: a classifier head of this width (0: none, the pooled features).
        **vit_kwargs: further VisionTransformer arguments (global_pool, drop_path_rate).

    Raises:
        ConfigError: an unknown name, or one timm cannot build at this size.
    """
    check_arch(arch)
    if arch in PRESETS:
        return build_vit(arch, img_size, in_chans, num_classes=num_classes, **vit_kwargs)
    if arch in RESNETS:
        block, layers = RESNETS[arch]
        model: nn.Module = ResNet(block, layers, in_chans=in_chans, num_classes=num_classes,
                                  cifar_stem=use_cifar_stem(img_size, cifar_stem))
    else:
        model = TimmBackbone(arch.removeprefix(TIMM_PREFIX), img_size, in_chans, num_classes)
    if is_convnet(model):
        set_conv(model, "auto")  # each convolution's kernel by mae_bench.models.conv's rule
    return model


def pooled(encoder: nn.Module, images: Tensor) -> Tensor:
    """[N, C, H, W] images -> [N, D]: the embedding a method trains on (``forward_head`` of
    ``forward_features`` with ``pre_logits``; a mae-bench ViT: the normed cls token)."""
    if isinstance(encoder, VisionTransformer):
        return encoder.forward_features(images)[:, 0]  # [N, D]
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)  # [N, D]


def has_batchnorm(module: nn.Module) -> bool:
    """Whether a module normalises with batch statistics (then how views are batched matters)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def is_convnet(module: nn.Module) -> bool:
    """More than one 2-D convolution (a ViT has one, its patch embedding): channels-last is
    oneDNN's and cuDNN's fast layout for it (``benchmarks/peers.py`` measures it)."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def vit_layer_id(name: str, depth: int) -> int:
    """A ViT parameter's layer-decay group: embeddings 0, ``blocks.i`` i + 1, the rest (norms,
    head) depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class ResNet(TorchvisionResNet):
    """torchvision's ResNet (same keys, same init) with the Encoder hooks and an optional CIFAR
    stem; ``fc`` is the classifier (an Identity without classes).

    Args:
        block, layers: torchvision's (``RESNETS``).
        in_chans: image channels.
        num_classes: classifier width (0: none).
        cifar_stem: 3x3 stride-1 first convolution and no max-pool (images of 64 px or less).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], in_chans: int = 3,
                 num_classes: int = 0, cifar_stem: bool = False) -> None:
        super().__init__(block, layers, num_classes=max(num_classes, 1))
        self.cifar_stem = cifar_stem
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.num_features = self.fc.in_features
        if num_classes == 0:
            self.fc = nn.Identity()

    num_layer_groups = 6  # stem, layer1..layer4, head

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> the last stage's map [N, D, h, w]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[N, D, h, w] -> [N, D] (global average pool) or [N, num_classes]."""
        x = torch.flatten(self.avgpool(x), 1)  # [N, D]
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        return set()

    def layer_id(self, name: str) -> int:
        """The stem 0, ``layerK`` K, the head 5."""
        if name.startswith(("conv1.", "bn1.")):
            return 0
        if name.startswith("layer"):
            return int(name[5])
        return 5


class TimmBackbone(nn.Module):
    """A timm model at random init as an Encoder (its keys under ``model.``). Transformers get
    ``img_size`` (their position embedding is made for it); convolutional nets take any size.

    Args:
        name: a registered timm model.
        img_size: the training image side.
        in_chans: image channels.
        num_classes: classifier width (0: none).
    """

    def __init__(self, name: str, img_size: int, in_chans: int = 3, num_classes: int = 0):
        super().__init__()
        import timm

        self.name = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("timm").setLevel(logging.ERROR)
            try:
                try:
                    self.model = timm.create_model(name, pretrained=False, in_chans=in_chans,
                                                   num_classes=num_classes, img_size=img_size)
                except TypeError:  # a model without an img_size argument (CNNs)
                    self.model = timm.create_model(name, pretrained=False, in_chans=in_chans,
                                                   num_classes=num_classes)
            except Exception as exc:  # the edge: whatever timm raises for this size
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(f"timm:{name} cannot be built for {in_chans}-channel "
                                  f"{img_size}-px images: {reason}") from None
        self.num_features = int(self.model.num_features)
        self._groups = self._layer_groups()

    @property
    def num_layer_groups(self) -> int:
        return max(self._groups.values(), default=0) + 1

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def no_weight_decay(self) -> set[str]:
        own = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in own()} if callable(own) else set()

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)
        self._groups = self._layer_groups()

    def layer_id(self, name: str) -> int:
        """timm's own grouping (``group_matcher``, what timm's layer decay uses); the head and
        anything unmatched is the last group."""
        return self._groups.get(name, self.num_layer_groups - 1)

    def _layer_groups(self) -> dict[str, int]:
        from timm.models import group_parameters

        matcher = getattr(self.model, "group_matcher", None)
        if not callable(matcher):
            return {}
        groups = group_parameters(self.model, matcher(coarse=False), reverse=False)
        return {f"model.{n}": gid for gid, names in groups.items() for n in names}
