"""``mae-bench export``: the encoder of a run (any method) or of an official MAE checkpoint as a
standard artifact that timm or transformers users load without mae-bench.

    --to timm  DIR/model.safetensors (timm ``vision_transformer`` keys, which mae-bench's ViT
               already has), DIR/config.json (timm's hub format: ``timm.create_model(
               "local-dir:DIR", pretrained=True)``), DIR/README.md with the
               ``pretrained_cfg_overlay`` form and its architecture name and kwargs
    --to hf    DIR/model.safetensors + config.json of a transformers ``ViTModel`` (or
               ``ViTMAEModel``), DIR/preprocessor_config.json, DIR/README.md:
               ``ViTModel.from_pretrained(DIR)``

A run whose backbone is a ResNet or a timm model (``mae_bench.models.backbones``) exports

    --to torch DIR/model.pt (the backbone's plain state dict: torchvision's ResNet keys, or the
               timm model's) and DIR/load.py (``load_encoder()``: torchvision or timm alone
               builds it, CIFAR stem included, and loads the weights), DIR/README.md
    --to timm  as a ViT does, where timm has the same model: a timm backbone, or a ResNet
               with the ImageNet stem (its keys are timm's ``resnet18`` / ``34`` / ``50``'s, 1:1);
               the CIFAR stem has no timm counterpart and is refused

The exported model is loaded back with timm / transformers before the folder is put in place,
and its features are compared with mae-bench's on a random batch; the largest difference is in
the README. The folder is written under a temporary name and renamed: a failed export leaves
nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.encoders import MODEL_POOL, BackboneSource, EncoderSource, load_source
from evals.features import pool_tokens
from evals.sources import INSTALL_HF, HFEmbedder, hf_bars_off, is_outside
from mae_bench.data import get_dataset_info
from mae_bench.errors import ConfigError
from mae_bench.models.backbones import TIMM_PREFIX, pooled

FORMATS = ("timm", "hf", "torch")
HF_CLASSES = {"vit": "ViTModel", "vit_mae": "ViTMAEModel"}
EXPORT_POOLS = ("cls", "mean")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # official MAE's normalisation
# timm's names of the paper's ViT sizes: (embed_dim, depth, heads) -> size
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
              (1024, 24, 16): "large", (1280, 32, 16): "huge"}
GENERIC_TIMM = "vit_base_patch16_224"  # any ViT entry point: the kwargs make the model


@dataclass
class ExportResult:
    """What an export wrote and how to load it."""

    out: Path
    files: list[str]
    load: str  # a Python line that loads it
    max_abs_diff: float  # exported vs mae-bench features on a random batch (fp32)


def export_encoder(checkpoint: str | Path, to: str, out: str | Path, *, pool: str | None = None,
                   hf_class: str = "vit", trust: bool = False) -> ExportResult:
    """Export the encoder of ``checkpoint`` (a run folder / checkpoint file, any method, or an
    official MAE checkpoint) to ``out``.

    Args:
        checkpoint: what ``--checkpoint`` of ``mae-bench eval`` takes, except references and
            outside models.
        to: "timm" or "hf"; "torch" (or "timm") for a ResNet or timm backbone.
        out: a new (or empty) folder.
        pool: the embedding the exported model returns: "cls" (normed cls token, mae-bench's
            default) or "mean" (mean of the normed patch tokens). timm: its ``global_pool``;
            transformers has no pooling setting: the README says which token(s) to take. A
            ResNet or timm backbone has one, its own (None: that one).
        hf_class: "vit" (``ViTModel``) or "vit_mae" (``ViTMAEModel``, mask ratio 0).
        trust: allow unsafe unpickling of the checkpoint.

    Raises:
        ConfigError: a bad format, pool, class or output folder; transformers missing for hf;
            a format the encoder has no counterpart in (``_check_format``).
        CheckpointError: the checkpoint cannot be read.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown export format {to!r}; valid: {', '.join(FORMATS)}")
    if pool is not None and pool not in (*EXPORT_POOLS, MODEL_POOL):
        raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(EXPORT_POOLS)} (a ViT's), "
                          f"or a backbone's own (mean: a CNN's average pool; {MODEL_POOL})")
    if hf_class not in HF_CLASSES:
        raise ConfigError(f"unknown --hf-class {hf_class!r}; valid: {', '.join(HF_CLASSES)}")
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; give a new one")
    if str(checkpoint) in ("pixels", "random") or is_outside(checkpoint):
        raise ConfigError(f"export takes a run folder, a checkpoint file or an official MAE "
                          f"checkpoint, not {checkpoint}")
    if to == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(f"--to hf needs transformers: {INSTALL_HF}") from None
    source = load_source(checkpoint, trust=trust)
    pool = _check_format(source, to, pool)
    mean, std = _normalisation(source)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if isinstance(source, BackboneSource):
            diff = _write_backbone(source, tmp, to, mean, std)
            load = (f'timm.create_model("local-dir:{out}", pretrained=True)' if to == "timm"
                    else f'runpy.run_path("{out / "load.py"}")["load_encoder"]()')
        elif to == "timm":
            diff = _write_timm(source, tmp, pool, mean, std)
            load = f'timm.create_model("local-dir:{out}", pretrained=True)'
        else:
            diff = _write_hf(source, tmp, hf_class, mean, std)
            load = (f'transformers.{HF_CLASSES[hf_class]}.from_pretrained("{out}"'
                    + (", add_pooling_layer=False" if hf_class == "vit" else "") + ")")
        readme = (_backbone_readme(source, to, out, pool, mean, std, diff)
                  if isinstance(source, BackboneSource)
                  else _readme(source, to, out, pool, hf_class, mean, std, diff))
        (tmp / "README.md").write_text(readme)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, sorted(p.name for p in out.iterdir()), load, diff)


def _check_format(source: EncoderSource, to: str, pool: str | None) -> str:
    """The pool to export, after refusing what this encoder has no counterpart for: hf and
    another pool than its own for a backbone; torch for a ViT; timm for the CIFAR stem."""
    if not isinstance(source, BackboneSource):
        if to == "torch":
            raise ConfigError(f"--to torch exports a ResNet or timm backbone; {source.label} is "
                              f"a ViT ({source.arch}): export it --to timm or --to hf")
        pool = pool or "cls"
        if pool not in EXPORT_POOLS:
            raise ConfigError(f"unknown pool {pool!r} for a ViT; valid: "
                              f"{', '.join(EXPORT_POOLS)}")
        return pool
    pool = pool or source.default_pool
    if pool not in source.pools:
        raise ConfigError(f"--pool {pool}: {source.arch} offers {', '.join(source.pools)}")
    if to == "hf":
        raise ConfigError(f"--to hf writes a transformers ViT; {source.arch} exports --to torch "
                          "(a state dict and a loader) or --to timm")
    if to == "timm" and source.cifar_stem:
        raise ConfigError(f"--to timm: {source.arch} with the CIFAR stem (3x3 stride-1 first "
                          "convolution, no max-pool) has no timm counterpart; export it --to "
                          "torch (torchvision builds it)")
    return pool


# --- timm ------------------------------------------------------------------------------------


def timm_name(kwargs: dict[str, Any]) -> str:
    """The timm model name of this ViT when timm registers one (``vit_base_patch16_224``), else a
    generic ViT entry point that the model arguments turn into it."""
    import timm

    size = TIMM_SIZES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    if size and kwargs["mlp_ratio"] == 4.0:
        name = f"vit_{size}_patch{kwargs['patch_size']}_{kwargs['img_size']}"
        if timm.is_model(name):
            return name
    return GENERIC_TIMM


def timm_config(source: EncoderSource, pool: str, mean: tuple[float, ...],
                std: tuple[float, ...]) -> dict[str, Any]:
    """timm's ``config.json`` (its hub format) for this encoder: architecture, model arguments,
    pretrained config; plus what mae-bench knows of it under "mae_bench" (timm ignores it)."""
    kw = source.vit_kwargs
    global_pool = "token" if pool == "cls" else "avg"
    model_args = {
        "img_size": kw["img_size"], "patch_size": kw["patch_size"], "in_chans": kw["in_chans"],
        "embed_dim": kw["embed_dim"], "depth": kw["depth"], "num_heads": kw["num_heads"],
        "mlp_ratio": kw["mlp_ratio"], "qkv_bias": True, "class_token": True,
        # fc_norm False: the final norm stays on the tokens (mae-bench's features pool the normed
        # tokens), for "avg" as well as "token" pooling
        "global_pool": global_pool, "fc_norm": False, "num_classes": 0,
    }
    size = kw["img_size"]
    pretrained_cfg = {
        "input_size": [kw["in_chans"], size, size], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
        "mean": list(mean), "std": list(std), "num_classes": 0,
        "first_conv": "patch_embed.proj", "classifier": "head", "custom_load": False,
    }
    return {
        "architecture": timm_name(kw), "num_classes": 0, "num_features": kw["embed_dim"],
        "global_pool": global_pool, "model_args": model_args, "pretrained_cfg": pretrained_cfg,
        "mae_bench": {"run_id": source.run_id, "method": source.method, "arch": source.arch,
                      "weights": source.fingerprint[:12], "pool": pool,
                      **{k: source.pretrain[k] for k in ("pretrain_dataset", "pretrain_epochs")
                         if source.pretrain.get(k) is not None}},
    }


def _write_timm(source: EncoderSource, folder: Path, pool: str, mean: tuple[float, ...],
                std: tuple[float, ...]) -> float:

    config = timm_config(source, pool, mean, std)
    _save_file(_plain(source.state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return _max_diff(source, pool, lambda x: model(x))


# --- Hugging Face ----------------------------------------------------------------------------


def hf_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """mae-bench / timm ViT keys -> the keys of a transformers ViT / ViTMAE checkpoint (the
    fused qkv projection split into query, key and value)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
               "mlp.fc2": "output.dense"}
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for param in ("weight", "bias"):
            q, k, v = state[f"{block}attn.qkv.{param}"].chunk(3, dim=0)  # [3D, ...] -> 3 x [D]
            for name, value in (("query", q), ("key", k), ("value", v)):
                out[f"{layer}attention.attention.{name}.{param}"] = value
            for ours, theirs in renames.items():
                out[f"{layer}{theirs}.{param}"] = state[f"{block}{ours}.{param}"]
    return out


def vit_state_from_hf(hf: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """The inverse of ``hf_state``: a transformers ViT / ViTMAE encoder's tensors -> mae-bench
    ViT keys (query, key and value fused into qkv). Tensors outside the encoder (a ViTModel's
    pooler) are left out.

    Raises:
        ConfigError: a tensor the ViT needs is missing (naming it and the depth expected).
    """
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
               "mlp.fc2": "output.dense"}
    hf = {_checkpoint_name(k): v for k, v in hf.items()}
    try:
        out = {"cls_token": hf["embeddings.cls_token"],
               "pos_embed": hf["embeddings.position_embeddings"],
               "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
               "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
               "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
        for i in range(depth):
            block, layer = f"blocks.{i}.", f"encoder.layer.{i}."
            for param in ("weight", "bias"):
                out[f"{block}attn.qkv.{param}"] = torch.cat(
                    [hf[f"{layer}attention.attention.{n}.{param}"]
                     for n in ("query", "key", "value")])  # 3 x [D, ...] -> [3D, ...]
                for mine, theirs in renames.items():
                    out[f"{block}{mine}.{param}"] = hf[f"{layer}{theirs}.{param}"]
    except KeyError as exc:
        raise ConfigError(f"the Hugging Face model has no {exc.args[0]} (a ViT / ViTMAE of "
                          f"depth {depth} is expected)") from None
    if f"encoder.layer.{depth}.layernorm_before.weight" in hf:
        raise ConfigError(f"the Hugging Face model is deeper than {depth} blocks")
    return out


# transformers 5 names a loaded ViT's modules otherwise than its checkpoints do (it converts on
# load): its in-memory names -> the checkpoint names ``hf_state`` writes
_HF5_NAMES = (("attention.q_proj.", "attention.attention.query."),
              ("attention.k_proj.", "attention.attention.key."),
              ("attention.v_proj.", "attention.attention.value."),
              ("attention.o_proj.", "attention.output.dense."),
              ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))


def _checkpoint_name(key: str) -> str:
    if not key.startswith("layers."):
        return key
    key = "encoder.layer." + key.removeprefix("layers.")
    for new, old in _HF5_NAMES:
        key = key.replace(new, old)
    return key


def _write_hf(source: EncoderSource, folder: Path, hf_class: str, mean: tuple[float, ...],
              std: tuple[float, ...]) -> float:
    import transformers

    kw = source.vit_kwargs
    common = dict(hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"],
                  num_attention_heads=kw["num_heads"],
                  intermediate_size=int(kw["embed_dim"] * kw["mlp_ratio"]), hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  layer_norm_eps=1e-6, image_size=kw["img_size"], patch_size=kw["patch_size"],
                  num_channels=kw["in_chans"], qkv_bias=True,
                  architectures=[HF_CLASSES[hf_class]])
    if hf_class == "vit_mae":
        config = transformers.ViTMAEConfig(**common, mask_ratio=0.0)
    else:
        config = transformers.ViTConfig(**common)
    config.save_pretrained(str(folder))
    _save_file(_plain(hf_state(source.state, kw["depth"])), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    size = kw["img_size"]
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
                 "image_std": list(std)}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    cls = getattr(transformers, HF_CLASSES[hf_class])
    extra = {"add_pooling_layer": False} if hf_class == "vit" else {}
    with hf_bars_off():  # its "Loading weights" bar would print among export's own lines
        model = HFEmbedder(cls.from_pretrained(str(folder), **extra).float().eval())
    return max(_max_diff(source, pool, lambda x, p=pool: model.embed(x)[p])
               for pool in EXPORT_POOLS)


# --- shared ----------------------------------------------------------------------------------


def _normalisation(source: EncoderSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the encoder was pretrained with: its data set's (an image folder's own
    statistics, read from the folder), ImageNet's for an official MAE checkpoint."""
    if source.kind == "official":
        return IMAGENET
    name = source.pretrain.get("pretrain_dataset") or "imagenet"
    info = get_dataset_info(name)
    if name == "imagefolder" and source.pretrain.get("data_dir"):
        from mae_bench.data import load_dataset

        info = load_dataset(name, "train", source.pretrain["data_dir"]).info
    return tuple(info.mean), tuple(info.std)


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}


@torch.no_grad()
def _max_diff(source: EncoderSource, pool: str, exported: Any) -> float:
    """Largest |exported - mae-bench| over the features of a random batch, in fp32."""
    size = source.img_size
    x = torch.randn(4, source.channels, size, size, generator=torch.Generator().manual_seed(0))
    if isinstance(source, BackboneSource):  # its one pooling, BatchNorm in eval mode
        ours = pooled(source.build().eval(), x)  # [N, D]
    else:
        ours = pool_tokens(source.build().eval().forward_features(x), pool)  # [N, D]
    diff = float((exported(x) - ours).abs().max())
    if not diff < 1e-4:  # a wrong artifact is never put in place
        raise RuntimeError(f"the exported model's {pool} features differ from mae-bench's by "
                           f"{diff:.3g}; nothing was written")
    return diff


def _readme(source: EncoderSource, to: str, out: Path, pool: str, hf_class: str,
            mean: tuple[float, ...], std: tuple[float, ...], diff: float) -> str:
    kw = source.vit_kwargs
    facts = ", ".join(f"{k} {source.pretrain[k]}" for k in ("pretrain_dataset", "pretrain_epochs")
                      if source.pretrain.get(k) is not None)
    lines = [
        f"# {source.label}: the {source.method} encoder ({source.arch}), exported by mae-bench",
        "",
        f"Weights hash {source.fingerprint[:12]} (mae-bench run id {source.run_id})"
        + (f"; {facts}" if facts else "") + ".",
        f"Input: {kw['in_chans']} x {kw['img_size']} x {kw['img_size']}, pixels in [0, 1] "
        f"normalised with mean {list(mean)} and std {list(std)} (bicubic resize, no crop).",
        "",
    ]
    if to == "timm":
        cfg = timm_config(source, pool, mean, std)
        args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
        overlay = ", ".join(f"{k}={v!r}" for k, v in cfg["pretrained_cfg"].items()
                            if k in ("num_classes", "custom_load", "input_size", "mean", "std"))
        lines += [
            f"The model returns the {_pool_words(pool)} ([N, {kw['embed_dim']}]), as mae-bench's "
            f"`--pool {pool}` features.",
            "",
            "```python",
            "import timm",
            f'model = timm.create_model("local-dir:{out}", pretrained=True).eval()',
            "# or by architecture name and kwargs:",
            f'model = timm.create_model("{cfg["architecture"]}", pretrained=True,',
            f'    pretrained_cfg_overlay=dict(file="{out / "model.safetensors"}", {overlay}),',
            f"    {args})",
            "features = model(x)  # = model.forward_head(model.forward_features(x), "
            "pre_logits=True)",
            "```",
            "",
            f"Evaluate it back: `mae-bench eval --protocol knn --checkpoint timm:{out}`.",
        ]
    else:
        cls = HF_CLASSES[hf_class]
        extra = ", add_pooling_layer=False" if hf_class == "vit" else ""
        take = ("hidden[:, 0]  # the normed cls token (mae-bench --pool cls)" if pool == "cls"
                else "hidden[:, 1:].mean(1)  # mean of the normed patch tokens (--pool mean)")
        noise = ""
        if hf_class == "vit_mae":
            noise = (", noise=torch.arange(L).expand(len(x), L).float()"
                     "  # L patches: no masking, patches in order")
        lines += [
            "```python",
            "import torch, transformers",
            f'model = transformers.{cls}.from_pretrained("{out}"{extra}).eval()',
            f"hidden = model(pixel_values=x{noise}).last_hidden_state",
            f"features = {take}",
            "```",
            "",
        ]
        if hf_class == "vit_mae":
            lines += ["ViTMAEModel shuffles and masks patches at random even in eval mode "
                      "(transformers issue 20431); the config's mask_ratio is 0 and the noise "
                      "above keeps every patch in order.", ""]
        lines += [f"Evaluate it back: `mae-bench eval --protocol knn --checkpoint hf:{out}`."]
    lines += ["", f"Checked at export: the features of a random batch match mae-bench's to "
              f"{diff:.2g} (max abs difference, fp32).", ""]
    return "\n".join(lines)


# --- ResNet and timm backbones -----------------------------------------------------------------


def _write_backbone(source: BackboneSource, folder: Path, to: str, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> float:
    """model.pt + load.py (torch), or model.safetensors + timm's config.json (timm); loaded back
    as a user would (the loader run, timm's ``local-dir:``) and checked against our features."""
    state = _plain({k.removeprefix("model."): v for k, v in source.state.items()}
                   if source.arch.startswith(TIMM_PREFIX) else source.state)
    if to == "torch":
        torch.save(state, folder / "model.pt")
        (folder / "load.py").write_text(_loader(source))
        import runpy

        model = runpy.run_path(str(folder / "load.py"))["load_encoder"](folder / "model.pt")
    else:
        import timm

        _save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = _backbone_timm_config(source, mean, std)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.eval()
    return _max_diff(source, source.default_pool, lambda x: model(x))


def _timm_args(source: BackboneSource) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of the backbone as built: no classifier, its input
    channels, and its image size where the model takes one (a transformer's position
    embedding), as ``backbones.TimmBackbone`` builds it."""
    args: dict[str, Any] = {"num_classes": 0, "in_chans": source.channels}
    if source.arch.startswith(TIMM_PREFIX):
        import timm

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timm.create_model(source.arch.removeprefix(TIMM_PREFIX), pretrained=False,
                                  img_size=source.img_size, **args)
            args["img_size"] = source.img_size
        except TypeError:  # a model without an img_size argument (CNNs)
            pass
    return args


def _backbone_timm_config(source: BackboneSource, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> dict[str, Any]:
    """timm's ``config.json`` for a ResNet (the same keys as timm's) or a timm backbone."""
    name = source.arch.removeprefix(TIMM_PREFIX)
    own = source.build()
    cfg = dict(getattr(getattr(own, "model", None), "pretrained_cfg", None) or {})
    size = source.img_size
    pretrained_cfg = {
        "input_size": [source.channels, size, size], "fixed_input_size": False,
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
        "mean": list(mean), "std": list(std), "num_classes": 0,
        "first_conv": cfg.get("first_conv", "conv1"), "classifier": cfg.get("classifier", "fc"),
        "custom_load": False,
    }
    return {"architecture": name, "num_classes": 0, "num_features": int(own.num_features),
            "model_args": _timm_args(source), "pretrained_cfg": pretrained_cfg,
            "mae_bench": {"run_id": source.run_id, "method": source.method, "arch": source.arch,
                          "weights": source.fingerprint[:12], "pool": source.default_pool,
                          **{k: source.pretrain[k] for k in ("pretrain_dataset",
                                                             "pretrain_epochs")
                             if source.pretrain.get(k) is not None}}}


def _loader(source: BackboneSource) -> str:
    """load.py: ``load_encoder(path)`` builds the backbone with torchvision (a ResNet: its stem
    as the run had it, no classifier) or timm, loads model.pt, returns it in eval mode."""
    c = source.channels
    if source.arch.startswith(TIMM_PREFIX):
        args = ", ".join(f"{k}={v!r}" for k, v in _timm_args(source).items())
        imports = "import timm\nimport torch\nfrom torch import nn"
        build = [f'model = timm.create_model("{source.arch.removeprefix(TIMM_PREFIX)}", '
                 f"pretrained=False, {args})"]
    else:
        imports = "import torch\nimport torchvision\nfrom torch import nn"
        build = [f"model = torchvision.models.{source.arch}()"]
        if source.cifar_stem:  # 3x3 stride-1 convolution and no max-pool, for small images
            build += [f"model.conv1 = nn.Conv2d({c}, 64, kernel_size=3, stride=1, padding=1, "
                      "bias=False)", "model.maxpool = nn.Identity()"]
        elif c != 3:
            build += [f"model.conv1 = nn.Conv2d({c}, 64, kernel_size=7, stride=2, padding=3, "
                      "bias=False)"]
        build += ["model.fc = nn.Identity()  # the pooled features, no classifier"]
    body = "\n".join(f"    {line}" for line in build)
    return (f'"""The {source.arch} encoder of mae-bench run {source.run_id} ({source.method}), '
            f"without mae-bench:\nmodel(x) on [N, {c}, {source.img_size}, {source.img_size}] "
            f'normalised images is the [N, D] embedding (README.md)."""\n\n'
            f"from pathlib import Path\n\n{imports}\n\n\n"
            'def load_encoder(path: str | Path = Path(__file__).with_name("model.pt")) '
            "-> nn.Module:\n"
            f"{body}\n"
            '    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))\n'
            "    return model.eval()\n")


def _backbone_readme(source: BackboneSource, to: str, out: Path, pool: str,
                     mean: tuple[float, ...], std: tuple[float, ...], diff: float) -> str:
    facts = ", ".join(f"{k} {source.pretrain[k]}" for k in ("pretrain_dataset", "pretrain_epochs")
                      if source.pretrain.get(k) is not None)
    size = source.img_size
    lines = [
        f"# {source.label}: the {source.method} encoder ({source.arch}), exported by mae-bench",
        "",
        f"Weights hash {source.fingerprint[:12]} (mae-bench run id {source.run_id})"
        + (f"; {facts}" if facts else "") + ".",
        f"Input: {source.channels} x {size} x {size}, pixels in [0, 1] normalised with mean "
        f"{list(mean)} and std {list(std)} (bicubic resize, no crop); BatchNorm in eval mode.",
        f"The model returns mae-bench's `--pool {pool}` features"
        + (" (the global average pool of the last stage)" if pool == "mean" else "") + ".",
        "",
        "```python",
    ]
    if to == "torch":
        lines += ["import runpy",
                  f'model = runpy.run_path("{out / "load.py"}")["load_encoder"]()',
                  "features = model(x)",
                  "```", "", "load.py needs torch and "
                  + ("timm" if source.arch.startswith(TIMM_PREFIX) else "torchvision")
                  + " only; model.pt is a plain state dict (`torch.load(weights_only=True)`)."]
    else:
        lines += ["import timm",
                  f'model = timm.create_model("local-dir:{out}", pretrained=True).eval()',
                  "features = model(x)",
                  "```", "",
                  f"Evaluate it back: `mae-bench eval --protocol knn --checkpoint timm:{out}`."]
    lines += ["", f"Checked at export: the features of a random batch match mae-bench's to "
              f"{diff:.2g} (max abs difference, fp32).", ""]
    return "\n".join(lines)


def _pool_words(pool: str) -> str:
    return "normed cls token" if pool == "cls" else "mean of the normed patch tokens"


def _save_file(state: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, but the file gets the mode a plain ``open()`` gives
    (the umask applies; safetensors' own writer makes it 0600), like every other file
    mae-bench writes, so that a group can share an export."""
    from safetensors.torch import save

    Path(filename).write_bytes(save(state, metadata=metadata))
