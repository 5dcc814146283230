"""``mae-bench export``: the encoder of a run (any method) or of an official MAE checkpoint as a
standard artifact that timm or transformers users load without mae-bench.

    --to timm  DIR/model.safetensors (timm ``vision_transformer`` keys, which mae-bench's ViT
               already has), DIR/config.json (timm's hub format: ``timm.create_model(
               "local-dir:DIR", pretrained=True)``), DIR/README.md with the
               ``pretrained_cfg_overlay`` form and its architecture name and kwargs
    --to hf    DIR/model.safetensors + config.json of a transformers ``ViTModel`` (or
               ``ViTMAEModel``), DIR/preprocessor_config.json, DIR/README.md:
               ``ViTModel.from_pretrained(DIR)``

The exported model is loaded back with timm / transformers before the folder is put in place,
and its features are compared with mae-bench's on a random batch; the largest difference is in
the README. The folder is written under a temporary name and renamed: a failed export leaves
nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.encoders import EncoderSource, load_source
from evals.features import pool_tokens
from evals.sources import INSTALL_HF, HFEmbedder, hf_bars_off, is_outside
from mae_bench.data import get_dataset_info
from mae_bench.errors import ConfigError

FORMATS = ("timm", "hf")
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


def export_encoder(checkpoint: str | Path, to: str, out: str | Path, *, pool: str = "cls",
                   hf_class: str = "vit", trust: bool = False) -> ExportResult:
    """Export the encoder of ``checkpoint`` (a run folder / checkpoint file, any method, or an
    official MAE checkpoint) to ``out``.

    Args:
        checkpoint: what ``--checkpoint`` of ``mae-bench eval`` takes, except references and
            outside models.
        to: "timm" or "hf".
        out: a new (or empty) folder.
        pool: the embedding the exported model returns: "cls" (normed cls token, mae-bench's
            default) or "mean" (mean of the normed patch tokens). timm: its ``global_pool``;
            transformers has no pooling setting: the README says which token(s) to take.
        hf_class: "vit" (``ViTModel``) or "vit_mae" (``ViTMAEModel``, mask ratio 0).
        trust: allow unsafe unpickling of the checkpoint.

    Raises:
        ConfigError: a bad format, pool, class or output folder; transformers missing for hf.
        CheckpointError: the checkpoint cannot be read.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown export format {to!r}; valid: {', '.join(FORMATS)}")
    if pool not in EXPORT_POOLS:
        raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(EXPORT_POOLS)}")
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
    mean, std = _normalisation(source)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if to == "timm":
            diff = _write_timm(source, tmp, pool, mean, std)
            load = f'timm.create_model("local-dir:{out}", pretrained=True)'
        else:
            diff = _write_hf(source, tmp, hf_class, mean, std)
            load = (f'transformers.{HF_CLASSES[hf_class]}.from_pretrained("{out}"'
                    + (", add_pooling_layer=False" if hf_class == "vit" else "") + ")")
        (tmp / "README.md").write_text(_readme(source, to, out, pool, hf_class, mean, std, diff))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, sorted(p.name for p in out.iterdir()), load, diff)


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
    kw = source.vit_kwargs
    x = torch.randn(4, kw["in_chans"], kw["img_size"], kw["img_size"],
                    generator=torch.Generator().manual_seed(0))
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


def _pool_words(pool: str) -> str:
    return "normed cls token" if pool == "cls" else "mean of the normed patch tokens"


def _save_file(state: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, but the file gets the mode a plain ``open()`` gives
    (the umask applies; safetensors' own writer makes it 0600), like every other file
    mae-bench writes, so that a group can share an export."""
    from safetensors.torch import save

    Path(filename).write_bytes(save(state, metadata=metadata))
