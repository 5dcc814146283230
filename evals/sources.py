"""Outside encoders for ``--checkpoint``: one registry of model sources beside mae-bench's own (a
run folder, an official MAE checkpoint, ``pixels``, ``random``; ``evals/encoders.py``).

    timm:NAME             ``timm.create_model(NAME, num_classes=0)``, weights from ``--weights``
                          or timm's own download (``--pretrained``); NAME may also be a folder
                          written by ``mae-bench export --to timm`` or timm's ``local-dir:DIR``
    hf:ID_OR_DIR          transformers ``AutoModel``: ViT, ViTMAE (masking off), DINOv2, ...
    hub:OWNER/REPO:ENTRY  ``torch.hub.load`` (``hub:DIR:ENTRY`` for a local ``hubconf.py``)
    python:MODULE:NAME    a callable returning an ``nn.Module``

Each loader returns an ``EncoderSource`` of kind "outside": an ``Embedder`` around the loaded
model, the input size, channels and normalisation the model declares (timm's
``pretrained_cfg``, a Hugging Face ``preprocessor_config.json``), and a fingerprint of its
source, name and weights, which the feature cache key and every result row carry. Nothing here
downloads unless the user asked for a hub model or ``--pretrained``. ``hub:`` and ``python:`` run
the code they name; a GitHub repository that torch.hub does not trust yet needs ``--trust-repo``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evals.encoders import (
    MODEL_POOL,
    Embedder,
    EncoderSource,
    OutsideSource,
    hash_state,
    hash_text,
    load_source,
)
from mae_bench.errors import CheckpointError, ConfigError, MaeBenchError
from mae_bench.training.checkpoint import state_mismatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)
POOL_ORDER = (MODEL_POOL, "cls", "mean")
INSTALL_HF = "pip install 'mae-bench[hf]' (transformers and safetensors)"


@dataclass(frozen=True)
class SourceOptions:
    """What the command line adds to an outside model's name.

    Attributes:
        weights: a state dict to load (``.safetensors``, ``.pth``, ``.bin``; a state dict or
            one under a ``model`` / ``state_dict`` key).
        pretrained: timm's own pretrained weights (its download, or its cache).
        img_size: evaluate at this input size instead of the model's own.
        seed: seeds the random initialisation of a model without weights.
        trust: allow unsafe unpickling of a ``--weights`` file.
        trust_repo: run a ``hub:`` repository's code although torch.hub does not trust it yet
            (``torch.hub.load(trust_repo=True)``, which adds it to torch's trusted list).
    """

    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    seed: int = 0
    trust: bool = False
    trust_repo: bool = False


# --- the kinds: one class each, all "outside" in the identity ------------------------------


@dataclass
class TimmSource(OutsideSource):
    """``timm:NAME``: a timm model (registered name, exported folder, ``hf-hub:``)."""

    takes_pretrained: ClassVar[bool] = True


@dataclass
class HFSource(OutsideSource):
    """``hf:ID_OR_DIR``: a transformers vision backbone (the weights of its folder or id)."""

    takes_weights: ClassVar[bool] = False


@dataclass
class HubSource(OutsideSource):
    """``hub:OWNER/REPO:ENTRY``: a torch.hub entry point."""


@dataclass
class PythonSource(OutsideSource):
    """``python:MODULE:CALLABLE``, or an ``nn.Module`` given to ``mae_bench.evaluate``."""


@dataclass
class CallableSource(OutsideSource):
    """A plain callable given to ``mae_bench.evaluate``: its code may change under the same
    name, so its features are never cached and its evaluations never taken for one another."""

    def __post_init__(self) -> None:
        self.cacheable = False


# --- embedders: a loaded model -> {pool: [N, D]} -------------------------------------------


class HooksEmbedder(Embedder):
    """A model with timm's hooks: ``forward_features`` gives tokens or a feature map,
    ``forward_head(pre_logits=True)`` the model's own pooled embedding ("model"); tokens also
    give "cls" (with a class token) and "mean" (of the tokens after the prefix tokens)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.use_channels_last(model)
        cls_token = getattr(model, "cls_token", None) is not None
        self.has_cls = bool(getattr(model, "has_class_token", cls_token))
        self.prefix = int(getattr(model, "num_prefix_tokens", int(self.has_cls)))

    def embed(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.model.forward_features(images)  # [N, T, D] tokens or [N, C, h, w]
        out = {MODEL_POOL: self.model.forward_head(feats, pre_logits=True)}  # [N, D]
        if isinstance(feats, Tensor) and feats.ndim == 3:
            if self.has_cls:
                out["cls"] = feats[:, 0]  # [N, D]
            out["mean"] = feats[:, self.prefix:].mean(dim=1)  # [N, D]
        return out


class CallEmbedder(Embedder):
    """A module or callable whose output is the embedding: images -> [N, D] ("model")."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn  # an nn.Module is registered as a submodule, so eval() and to() reach it
        if isinstance(fn, nn.Module):
            self.use_channels_last(fn)

    def embed(self, images: Tensor) -> dict[str, Tensor]:
        return {MODEL_POOL: self.fn(images)}


class HFEmbedder(Embedder):
    """A transformers vision backbone: tokens (ViT, ViTMAE, DINOv2) give "cls" (the normed
    class token) and "mean" (the patch tokens after the class and register tokens); a feature
    map (ResNet, ConvNeXt) gives the model's own ``pooler_output`` ("model").

    ViTMAE masks at random even in eval mode (transformers issue 20431): its mask ratio is set to
    0 and the noise it sorts is the patch index, so every patch is kept, in order.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.use_channels_last(model)
        cfg = model.config
        self.is_mae = getattr(cfg, "model_type", "") == "vit_mae"
        if self.is_mae:
            cfg.mask_ratio = 0.0
        self.patch = _first(getattr(cfg, "patch_size", 1))
        self.native = _first(getattr(cfg, "image_size", 0))
        self.prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        params = inspect.signature(model.forward).parameters
        self.can_interpolate = "interpolate_pos_encoding" in params

    def embed(self, images: Tensor) -> dict[str, Tensor]:
        kwargs: dict[str, Any] = {}
        if self.is_mae:
            n, _, h, w = images.shape
            length = (h // self.patch) * (w // self.patch)
            noise = torch.arange(length, device=images.device, dtype=torch.float32)
            kwargs["noise"] = noise.expand(n, length)  # [N, L]: argsort is the identity
        if self.can_interpolate and self.native and images.shape[-1] != self.native:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=images, **kwargs)
        hidden = out.last_hidden_state  # [N, T, D] or [N, C, h, w]
        if hidden.ndim == 3:
            return {"cls": hidden[:, 0], "mean": hidden[:, self.prefix:].mean(dim=1)}
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return {MODEL_POOL: pooled.flatten(1)}  # [N, C]
        return {"mean": hidden.flatten(2).mean(dim=-1)}  # [N, C]


# --- the registry ----------------------------------------------------------------------------


def timm_source(name: str, options: SourceOptions) -> EncoderSource:
    """``timm:NAME``: a timm model with ``num_classes=0``; NAME a registered model, a folder
    with timm's ``config.json`` (``mae-bench export --to timm``), or timm's ``local-dir:`` /
    ``hf-hub:`` forms."""
    import timm

    folder = Path(name.removeprefix("local-dir:"))
    from_folder = name.startswith("local-dir:") or folder.is_dir()
    if from_folder:
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"timm:{name}: no timm folder (it needs config.json and "
                                  "model.safetensors, as mae-bench export --to timm writes)")
        model_name = f"local-dir:{folder}"
    elif name.startswith("hf-hub:"):
        model_name = name
    else:
        model_name = name
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "see timm.list_models()"
            raise ConfigError(f"unknown timm model {name!r}; {hint}")
    if options.weights and (options.pretrained or from_folder):
        raise ConfigError(f"timm:{name}: give --weights FILE or the model's own weights "
                          "(--pretrained, an exported folder), not both")
    pretrained = options.pretrained or from_folder
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
        except Exception as exc:  # the edge: whatever timm or its download raises
            if pretrained and not from_folder:
                raise CheckpointError(
                    f"timm:{name} --pretrained: the weights could not be fetched (no network, "
                    f"and not in the cache?): {_reason(exc)}; pass --weights FILE instead"
                ) from None
            raise CheckpointError(f"timm:{name}: timm could not build it ({_reason(exc)})") \
                from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if options.weights:
        load_weights(model, options.weights, f"timm:{name}", trust=options.trust,
                     classifier=cfg.get("classifier"))
    channels, size, _ = cfg.get("input_size", (3, 224, 224))
    weights = hash_state(model.state_dict())  # of the weights as loaded, at any input size
    if options.img_size and options.img_size != size:
        if hasattr(model, "set_input_size"):  # ViTs: the position embedding is resampled
            try:
                model.set_input_size(img_size=options.img_size)
            except Exception as exc:
                raise ConfigError(f"timm:{name} cannot take {options.img_size}-px images "
                                  f"({_reason(exc)})") from None
        elif cfg.get("fixed_input_size"):
            raise ConfigError(f"timm:{name} takes only {size}-px images; drop --img-size")
        size = options.img_size
    arch = cfg.get("architecture") or name
    extra: dict[str, Any] = {}
    if from_folder:
        saved = json.loads((folder / "config.json").read_text()).get("mae_bench", {})
        arch = saved.get("arch", arch)
        extra = {"exported_from": saved["run_id"]} if "run_id" in saved else {}
    elif options.pretrained:
        extra = {"pretrained_weights": cfg.get("hf_hub_id") or cfg.get("tag") or "timm"}
    return _outside(TimmSource, HooksEmbedder(model), label=f"timm:{name}", method="timm",
                    arch=arch,
                    size=size, channels=channels, mean=cfg.get("mean"), std=cfg.get("std"),
                    options=options, extra=extra, weights=weights)


def hf_source(name: str, options: SourceOptions) -> EncoderSource:
    """``hf:ID_OR_DIR``: a transformers ``AutoModel`` from a ``save_pretrained`` folder or a
    hub id (the Hugging Face cache, else the network)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"hf: models need transformers: {INSTALL_HF}") from None
    folder = Path(name)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise CheckpointError(f"hf:{name}: the folder holds no config.json (give a folder "
                              "written by save_pretrained)")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"hf:{name}: not a folder; give a save_pretrained folder or a "
                              "hub id")
    try:
        # Weights the folder lacks (ViTModel's pooler, under AutoModel, for a folder saved
        # without one) are initialised at random: seeded, so the same folder gives the same
        # model, weights hash and feature cache key every time.
        with _quiet(), hf_bars_off(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            model = transformers.AutoModel.from_pretrained(str(folder) if folder.is_dir()
                                                           else name)
    except Exception as exc:  # the edge: a missing id, no network, an unknown model type
        if folder.is_dir():
            raise CheckpointError(f"hf:{name}: transformers could not load the folder "
                                  f"({_reason(exc)})") from None
        raise CheckpointError(f"hf:{name}: no such folder, and the hub id could not be loaded "
                              f"(no network, and not in the Hugging Face cache?): "
                              f"{_reason(exc)}") from None
    model = model.float().eval()
    cfg = model.config
    processor = _hf_processor(folder if folder.is_dir() else None, name)
    size = _first(getattr(cfg, "image_size", None)) or _processor_size(processor) or 224
    mean = tuple(processor.get("image_mean") or IMAGENET_MEAN)
    std = tuple(processor.get("image_std") or IMAGENET_STD)
    embedder = HFEmbedder(model)
    if options.img_size and options.img_size != size and embedder.native and \
            not embedder.can_interpolate:
        raise ConfigError(f"hf:{name} takes only {size}-px images; drop --img-size")
    norm = "processor" if processor.get("image_mean") else "imagenet (no preprocessor_config)"
    arch = folder.name if folder.is_dir() else name
    return _outside(HFSource, embedder, label=f"hf:{name}", method="hf",
                    arch=f"{getattr(cfg, 'model_type', 'hf')}:{arch}",
                    size=size, channels=int(getattr(cfg, "num_channels", 3)), mean=mean,
                    std=std, options=options, extra={"input_norm": norm})


def hub_source(name: str, options: SourceOptions) -> EncoderSource:
    """``hub:OWNER/REPO:ENTRY`` (or ``OWNER/REPO:REF:ENTRY``) through ``torch.hub.load``: the hub
    cache, else GitHub; ``hub:DIR:ENTRY`` loads a local folder's ``hubconf.py``."""
    repo, sep, entry = name.rpartition(":")
    local = bool(repo) and Path(repo).is_dir()
    if not sep or not entry or not (local or repo.split(":")[0].count("/") == 1):
        raise ConfigError(f"hub:{name}: expected hub:OWNER/REPO:ENTRY (e.g. "
                          "hub:facebookresearch/dino:dino_vits16), hub:OWNER/REPO:REF:ENTRY or "
                          "hub:DIR:ENTRY for a folder with a hubconf.py")
    hub_dir = Path(torch.hub.get_dir())
    if not local and not options.trust_repo and not _hub_trusts(repo, hub_dir):
        owner_repo = repo.split(":")[0]
        raise ConfigError(f"hub:{name} runs the code of github.com/{owner_repo}, which torch.hub "
                          "does not trust yet; pass --trust-repo if you trust that repository")
    new = _first_missing(hub_dir)  # what torch.hub creates on the way (removed on failure)
    try:
        with _quiet():
            # "check": torch's own rule (its trusted owners and list); True only when asked
            model = torch.hub.load(repo, entry, source="local" if local else "github",
                                   trust_repo=True if options.trust_repo else "check",
                                   verbose=False)
    except Exception as exc:  # the edge: no network, no cache, no such entry
        _remove_empty(new)
        if local:
            raise CheckpointError(f"hub:{name}: {repo}/hubconf.py could not load {entry!r} "
                                  f"({_reason(exc)})") from None
        raise CheckpointError(f"hub:{name}: torch.hub could not load it (no network, and no "
                              f"copy in {hub_dir}?): {_reason(exc)}") from None
    return _module_source(HubSource, model, f"hub:{name}", "hub", name, options,
                          default=(224, 3, IMAGENET_MEAN, IMAGENET_STD))


def _hub_trusts(repo: str, hub_dir: Path) -> bool:
    """Whether ``torch.hub.load(repo, trust_repo="check")`` loads without asking: the owner is
    one torch trusts, or the repository is in torch's trusted list. Asked first, so that an
    untrusted one is a one-line error and never torch's prompt (which waits on stdin).
    Repositories torch.hub downloaded before it kept a trusted list are not counted (they need
    the network to name their branch): ``--trust-repo`` lists them once."""
    owner, _, rest = repo.split(":")[0].partition("/")
    owners = getattr(torch.hub, "_TRUSTED_REPO_OWNERS", ())
    try:
        trusted = (hub_dir / "trusted_list").read_text().split()
    except OSError:  # no list yet
        trusted = []
    return owner in owners or f"{owner}_{rest}" in trusted


def python_source(name: str, options: SourceOptions) -> EncoderSource:
    """``python:MODULE:CALLABLE``: import MODULE (the current folder is on the path) and call
    CALLABLE() for an ``nn.Module``."""
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"python:{name}: expected python:MODULE:CALLABLE, e.g. "
                          "python:my_models:build_encoder")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"python:{name}: no module {module_name!r} on the path (run from "
                              "the folder that holds it, or set PYTHONPATH)") from None
        raise ConfigError(f"python:{name}: importing {module_name} failed "
                          f"({_reason(exc)})") from None
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(f"python:{name}: importing {module_name} failed "
                          f"({_reason(exc)})") from None
    finally:
        sys.path.remove(os.getcwd())
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"python:{name}: {module_name} has no callable {attr!r}")
    try:
        model = fn()
    except Exception as exc:
        raise CheckpointError(f"python:{name}: {attr}() failed ({_reason(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"python:{name}: {attr}() returned a {type(model).__name__}, not an "
                          "nn.Module")
    return _module_source(PythonSource, model, f"python:{name}", "python", name, options)


Loader = Callable[[str, SourceOptions], EncoderSource]
# The class each loader returns, by prefix: what options it takes.
SOURCE_CLASSES: dict[str, type[OutsideSource]] = {
    "timm": TimmSource, "hf": HFSource, "hub": HubSource, "python": PythonSource}
SOURCES: dict[str, Loader] = {
    "timm": timm_source,
    "hf": hf_source,
    "hub": hub_source,
    "python": python_source,
}


def split_source(checkpoint: str | Path | None) -> tuple[str, str] | None:
    """("timm", "resnet18") for "timm:resnet18"; None for anything that is not an outside model
    (a run folder, a checkpoint file, a reference)."""
    if checkpoint is None:
        return None
    prefix, sep, rest = str(checkpoint).partition(":")
    return (prefix, rest) if sep and prefix in SOURCES else None


def is_outside(checkpoint: str | Path | None) -> bool:
    return split_source(checkpoint) is not None


def resolve_source(checkpoint: str | Path, options: SourceOptions = SourceOptions(), *,
                   arch: str | None = None, img_size: int | None = None,
                   channels: int | None = None, seed: int = 0,
                   trust: bool = False) -> EncoderSource:
    """Resolve ``--checkpoint``: an outside model (``timm:``, ``hf:``, ``hub:``, ``python:``,
    with ``options``), else what ``evals.encoders.load_source`` takes (a run, an official MAE
    checkpoint, ``pixels``, ``random``, with the other arguments)."""
    parts = split_source(checkpoint)
    if parts is None:
        if options.weights or options.pretrained:
            flag = "--weights" if options.weights else "--pretrained"
            raise ConfigError(f"{flag} is for timm:, hub: and python: models; {checkpoint} "
                              "brings its own weights")
        return load_source(checkpoint, arch=arch, img_size=img_size, channels=channels,
                           seed=seed, trust=trust)
    prefix, name = parts
    if not name:
        raise ConfigError(f"--checkpoint {checkpoint}: give the model after '{prefix}:' "
                          f"(e.g. {EXAMPLES[prefix]})")
    if arch is not None:
        raise ConfigError(f"--arch names a mae-bench preset; {checkpoint} brings its own")
    kind = SOURCE_CLASSES[prefix]
    if options.pretrained and not kind.takes_pretrained:
        raise ConfigError(f"--pretrained is timm's download; {checkpoint} loads its own weights")
    if options.weights and not kind.takes_weights:
        raise ConfigError(f"--weights is for timm:, hub: and python: models; {checkpoint} "
                          "loads the weights of its folder or hub id")
    return SOURCES[prefix](name, options)


EXAMPLES = {"timm": "timm:vit_small_patch16_224", "hf": "hf:facebook/dinov2-small",
            "hub": "hub:facebookresearch/dino:dino_vits16",
            "python": "python:my_models:build_encoder"}


def object_source(encoder: Any, options: SourceOptions = SourceOptions(),
                  name: str | None = None) -> EncoderSource:
    """An encoder given as a Python object (``mae_bench.evaluate``): an ``nn.Module`` (timm's
    hooks are used where it has them; a ``pretrained_cfg`` dict declares its input), or any
    callable from a normalised batch [N, C, H, W] to embeddings [N, D]."""
    if isinstance(encoder, EncoderSource):
        return encoder
    if isinstance(encoder, nn.Module):
        qualname = f"{type(encoder).__module__}.{type(encoder).__qualname__}"
        return _module_source(PythonSource, encoder, name or f"python:{qualname}", "python",
                              name or type(encoder).__name__, options)
    if not callable(encoder):
        raise ConfigError(f"encoder must be an nn.Module, a callable from images to features "
                          f"or a source string, got a {type(encoder).__name__}")
    qualname = getattr(encoder, "__qualname__", type(encoder).__qualname__)
    return _outside(CallableSource, CallEmbedder(encoder), label=name or f"python:{qualname}",
                    method="python", arch=name or qualname, size=options.img_size,
                    channels=None, mean=None, std=None, options=options,
                    code=_code_digest(encoder))


def check_output(source: EncoderSource, img_size: int, channels: int) -> None:
    """Run an outside model on a probe batch of two images and record the poolings it offers.

    Raises:
        CheckpointError: it fails on such a batch, or returns something other than one vector
            per image.
    """
    embedder = source.encoder
    x = torch.randn(2, channels, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), _quiet():
            out = embedder.eval().embed(x)
    except MaeBenchError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{source.label} failed on a batch of two {channels} x {img_size} "
                              f"x {img_size} images ({_reason(exc)})") from None
    for value in out.values():
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[0] != 2:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"{source.label}: its output for 2 images is {got}, not one "
                                  "vector per image ([2, D]); make it return [N, D] embeddings")
    embedder.pools = tuple(p for p in POOL_ORDER if p in out)


# --- weights ---------------------------------------------------------------------------------


def load_weights(model: nn.Module, path: str | Path, label: str, *, trust: bool = False,
                 classifier: str | tuple[str, ...] | None = None) -> None:
    """Load a weights file into ``model``, strictly: every key of the model, nothing else, the
    same shapes (a classifier the model does not have, e.g. ``head.*`` for ``num_classes=0``,
    is dropped).

    Raises:
        CheckpointError: the file is missing or unreadable, or does not fit (naming the
            missing, unexpected and mis-shaped keys).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"--weights {file}: no such file")
    state = _read_weights(file, trust)
    own = model.state_dict()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    state = {k: v for k, v in state.items()
             if k in own or not any(k.startswith(f"{h}.") for h in heads)}
    problems = state_mismatch(own, state)
    if problems:
        raise CheckpointError(f"--weights {file} does not fit {label}: {problems}")
    model.load_state_dict(state)


def _read_weights(file: Path, trust: bool) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(file)
        except Exception as exc:
            raise CheckpointError(f"--weights {file} is not a readable safetensors file "
                                  f"({_reason(exc)})") from None
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=not trust)
        except pickle.UnpicklingError as exc:
            if not trust and "Unsupported global" in str(exc):
                raise CheckpointError(f"--weights {file} holds objects that need unsafe "
                                      "unpickling; pass --trust-checkpoint only if you trust "
                                      "its source") from None
            raise CheckpointError(f"--weights {file} is not a readable weights file") from None
        except Exception as exc:
            raise CheckpointError(f"--weights {file} is not a readable weights file "
                                  f"({_reason(exc)})") from None
    for key in ("model", "state_dict", "model_state_dict"):  # a training checkpoint's weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)} \
        if isinstance(obj, dict) else {}
    if not state:
        raise CheckpointError(f"--weights {file} holds no tensors (expected a state dict, or "
                              "one under a 'model' or 'state_dict' key)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


# --- helpers ---------------------------------------------------------------------------------


def _module_source(kind: type[OutsideSource], model: nn.Module, label: str, method: str,
                   arch: str,
                   options: SourceOptions,
                   default: tuple[int | None, int | None, Any, Any] = (None, None, None, None)
                   ) -> EncoderSource:
    """An ``nn.Module`` from torch.hub, a Python callable or the API: timm's hooks where it has
    them, else its output is the embedding; a timm-style ``pretrained_cfg`` (or
    ``default_cfg``) dict declares its input, else ``default`` (None: the data's own)."""
    if options.weights:
        load_weights(model, options.weights, label, trust=options.trust)
    size, channels, mean, std = default
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        channels, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
        mean, std = cfg.get("mean", mean), cfg.get("std", std)
    hooks = callable(getattr(model, "forward_features", None)) and \
        callable(getattr(model, "forward_head", None))
    embedder = HooksEmbedder(model) if hooks else CallEmbedder(model)
    return _outside(kind, embedder, label=label, method=method, arch=arch,
                    size=options.img_size or size, channels=channels, mean=mean, std=std,
                    options=options, code=_code_digest(model))


def _outside(kind: type[OutsideSource], embedder: Embedder, *, label: str, method: str,
             arch: str, size: int | None,
             channels: int | None, mean: Any, std: Any, options: SourceOptions,
             extra: dict[str, Any] | None = None, code: str = "",
             weights: str | None = None) -> EncoderSource:
    """The source of a loaded outside model. ``weights``: a hash of its weights (default: of
    the embedder's state now); the fingerprint adds the source, name, input size and code."""
    state = embedder.state_dict()
    current = hash_state(state) if state else hash_text(code or label)  # as it will run
    weights = weights or current
    fingerprint = hash_text(f"{method}|{label}|{arch}|{code}|{weights}|{current}|{size}")
    facts: dict[str, Any] = {"weights": weights[:12], **(extra or {})}
    if options.weights:
        facts["weights_file"] = str(options.weights)
    return kind(label, method, arch, {}, None, fingerprint, facts,
                         encoder=embedder, input_size=options.img_size or size,
                         input_channels=channels,
                         mean=tuple(float(v) for v in mean) if mean is not None else None,
                         std=tuple(float(v) for v in std) if std is not None else None)


def _hf_processor(folder: Path | None, name: str) -> dict[str, Any]:
    """The model's ``preprocessor_config.json`` (its normalisation and size), or {}."""
    try:
        if folder is not None:
            path = folder / "preprocessor_config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "preprocessor_config.json"))
        return json.loads(path.read_text()) if path.is_file() else {}
    except Exception:  # no processor config: the ImageNet statistics, as most backbones use
        return {}


def _processor_size(processor: dict[str, Any]) -> int | None:
    for key in ("crop_size", "size"):
        value = processor.get(key)
        if isinstance(value, dict):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            return value
    return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _code_digest(obj: Any) -> str:
    """A hash of the source code of ``obj`` (a function) or of its class, so that editing a
    module's code under the same name is a new cache entry."""
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) else type(obj)
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        text = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text if len(text) <= 120 else text[:117] + '...'}"


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet (None: it does)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _remove_empty(folder: Path | None) -> None:
    """Undo what a failed torch.hub call created: ``folder`` and what is below it, where it
    holds only empty folders."""
    if folder is None or not folder.is_dir():
        return
    try:
        for sub in sorted(folder.rglob("*"), reverse=True):
            sub.rmdir()
        folder.rmdir()
    except OSError:
        pass


@contextmanager
def hf_bars_off() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights" on every ``from_pretrained``) off for
    a while: tqdm lines on stderr between mae-bench's own, and after them in a log file."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _quiet() -> Iterator[None]:
    """Loading outside models: their libraries' warnings and info logs would each be a line of
    their own around mae-bench's one-line output."""
    names = ("timm", "transformers", "huggingface_hub", "torch.hub")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
