"""Tests for evals/sources.py: outside encoders through ``mae-bench eval --checkpoint`` (timm,
Hugging Face, torch.hub, Python callables), their input handling, rows and cache keys, and the
one-line errors for bad input. Offline: every model is built small and saved locally; the
Hugging Face hub is switched to offline mode and torch.hub's network calls fail at once."""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from cli_helpers import run_cli
from safetensors.torch import load_file, save_file

from evals.sources import SourceOptions, check_output, load_weights, resolve_source
from mae_bench.data import load_dataset
from mae_bench.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             image_size=16, patch_size=4, num_channels=3)


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, and every cache inside tmp_path (so the listings see any write)."""
    import huggingface_hub.constants as hf_constants
    import torch.hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home" / "torch"))
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "home" / "mae-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hf"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def eval_cli(monkeypatch, capsys, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "eval", *args, "--no-progress", "--precision", "fp32",
                   "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"))


def rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "res" / "results.jsonl").read_text()
            .splitlines()]


def listing(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")}


def refused(monkeypatch, capsys, tmp_path: Path, *args: str) -> str:
    """Exit 2, one stderr line starting with ``error:``, nothing written under tmp_path."""
    before = listing(tmp_path)
    code, _, err = eval_cli(monkeypatch, capsys, tmp_path, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert listing(tmp_path) == before
    return lines[0]


def random_timm(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=0).eval()


def timm_features(model, images: torch.Tensor, size: int) -> np.ndarray:
    """What a timm user computes by hand: bicubic resize, gray -> RGB, the model's own
    normalisation, its pre-logits output."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = images[start:start + 256].float()
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            x = x.clamp(0, 255).repeat(1, 3, 1, 1) / 255.0
            x = (x - mean) / std
            out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).numpy()


def test_timm_weights_give_the_rows_of_their_own_features(monkeypatch, capsys, tmp_path):
    """timm:NAME --weights FILE gives the k-NN rows of the same model's features computed with
    timm directly and passed through --features (digits: 8-px gray images resized to 32 px and
    replicated to RGB)."""
    model = random_timm("test_vit", seed=3)
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    reference = random_timm("test_vit", seed=99)  # other weights, replaced by the file's
    reference.load_state_dict(load_file(str(tmp_path / "vit.safetensors")))
    reference.set_input_size(img_size=32)
    feats = tmp_path / "feats"
    feats.mkdir()
    for split in ("train", "test"):
        ds = load_dataset("digits", split)
        np.save(feats / f"{split}_features.npy", timm_features(reference, ds.images, 32))
        np.save(feats / f"{split}_labels.npy", ds.labels.numpy())

    code, out, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint",
                              "timm:test_vit", "--weights", str(tmp_path / "vit.safetensors"),
                              "--img-size", "32", "--k", "5,20")
    assert code == 0, err
    code, out, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--features",
                              str(feats), "--dataset", "digits", "--k", "5,20")
    assert code == 0, err
    got = rows(tmp_path)
    ours = {(r["metric"], r.get("k")): r["value"] for r in got if r["method"] == "timm"}
    theirs = {(r["metric"], r.get("k")): r["value"] for r in got if r["method"] == "features"}
    assert len(ours) == 8 and ours == theirs
    first = next(r for r in got if r["method"] == "timm")
    assert (first["arch"], first["checkpoint"], first["pool"], first["img_size"]) == (
        "test_vit", "timm:test_vit", "model", 32)
    assert first["weights_file"] == str(tmp_path / "vit.safetensors")
    # the weights hash is the file's, however the file wraps it (a .pth under "model", with the
    # classifier of a 1000-class model that num_classes=0 drops)
    with_head = timm.create_model("test_vit")
    with_head.load_state_dict(model.state_dict(), strict=False)
    torch.save({"model": with_head.state_dict(), "epoch": 3}, tmp_path / "vit.pth")
    again = resolve_source("timm:test_vit", SourceOptions(weights=str(tmp_path / "vit.pth")))
    assert again.pretrain["weights"] == first["weights"]
    other = resolve_source("timm:test_vit", SourceOptions(seed=1))  # random, another seed
    assert other.pretrain["weights"] != first["weights"]
    assert other.fingerprint != again.fingerprint


def test_timm_convnet_offers_only_its_own_pooling(monkeypatch, capsys, tmp_path):
    code, _, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "linear",
                            "--checkpoint", "timm:test_resnet", "--img-size", "32")
    assert code == 0, err
    assert {(r["pool"], r["method"], r["arch"]) for r in rows(tmp_path)} == {
        ("model", "timm", "test_resnet")}
    line = refused(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint",
                   "timm:test_resnet", "--img-size", "32", "--pool", "cls")
    assert "--pool cls: timm:test_resnet offers model" in line


def test_a_convnet_runs_channels_last_with_the_same_features(tmp_path):
    from evals.features import extract_features

    source = resolve_source("timm:test_resnet", SourceOptions(img_size=32))
    vit = resolve_source("timm:test_vit", SourceOptions(img_size=32))
    assert source.encoder.channels_last and not vit.encoder.channels_last  # one conv: a ViT
    conv = next(m for m in source.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    data = load_dataset("digits", "test")
    feats, _ = extract_features(source.encoder, data, pools=("model",), img_size=32,
                                channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    # the same weights in the default layout, fed the same normalised images by hand
    plain = random_timm("test_resnet")
    plain.load_state_dict(source.encoder.model.state_dict())
    x = F.interpolate(data.images.float(), size=(32, 32), mode="bicubic", align_corners=False)
    x = (x.clamp(0, 255).repeat(1, 3, 1, 1) / 255.0 - 0.5) / 0.25
    with torch.no_grad():
        expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
    assert torch.allclose(feats["model"], expected, atol=1e-4, rtol=1e-4)


def test_a_vit_offers_cls_and_mean_beside_its_own_pooling(tmp_path):
    source = resolve_source("timm:test_vit", SourceOptions(img_size=32))
    check_output(source, 32, 3)
    assert source.pools == ("model", "cls", "mean") and source.default_pool == "model"
    x = torch.randn(3, 3, 32, 32)
    out = source.encoder.embed(x)
    tokens = source.encoder.model.forward_features(x)  # [3, 1 + 4 + ..., D]
    assert torch.equal(out["cls"], tokens[:, 0])
    assert torch.allclose(out["mean"], tokens[:, source.encoder.prefix:].mean(1))


@pytest.mark.parametrize("kind", ["vit", "vit_mae"])
def test_transformers_folders(monkeypatch, capsys, tmp_path, kind):
    """A tiny ViT / ViTMAE saved with save_pretrained evaluates through hf:DIR; ViTMAE with its
    masking off: two extractions are identical, and equal the model run on ordered noise."""
    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False)
    else:
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL))
    model.save_pretrained(str(tmp_path / kind))
    code, _, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "knn",
                            "--checkpoint", f"hf:{tmp_path / kind}", "--k", "20")
    assert code == 0, err
    got = rows(tmp_path)
    assert {(r["method"], r["pool"], r["img_size"]) for r in got} == {("hf", "cls", 16)}
    assert got[0]["arch"] == f"{kind}:{kind}"

    from evals.features import features_for

    source = resolve_source(f"hf:{tmp_path / kind}")
    check_output(source, 16, 3)
    ds = load_dataset("digits", "test")
    one = features_for(source, ds, dataset_name="digits", split="test", use_cache=False)
    two = features_for(source, ds, dataset_name="digits", split="test", use_cache=False)
    assert torch.equal(one.features, two.features)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = source.encoder.embed(x)["cls"]
        if kind == "vit_mae":
            fresh = transformers.ViTMAEModel.from_pretrained(str(tmp_path / kind)).eval()
            a, b = (fresh(pixel_values=x).last_hidden_state[:, 0] for _ in range(2))
            assert not torch.allclose(a, b)  # what the fix is for: random masking in eval mode
            fresh.config.mask_ratio = 0.0  # keep all 16 patches, in the noise's order
            noise = torch.arange(16.0).expand(2, 16)
            want = fresh(pixel_values=x, noise=noise).last_hidden_state[:, 0]
        else:
            want = model.eval()(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(ours, want, atol=1e-6)


def test_a_folder_without_its_pooler_loads_the_same_every_time(monkeypatch, capsys, tmp_path):
    """AutoModel adds ViTModel's pooler, which a folder saved without one lacks: its random
    init is seeded, so two loads give one weights hash and the second evaluation reads the
    feature cache (unseeded, every load hashed differently and the cache never hit)."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False)
    model.save_pretrained(str(tmp_path / "vit"))
    one, two = (resolve_source(f"hf:{tmp_path / 'vit'}") for _ in range(2))
    assert one.fingerprint == two.fingerprint
    assert any(k.startswith("pooler.") for k in one.encoder.model.state_dict())  # it is there
    for protocol in ("knn", "linear"):
        code, out, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", protocol,
                                  "--checkpoint", f"hf:{tmp_path / 'vit'}", "--k", "20")
        assert code == 0, err
    assert "train features [1437 x 32]: cache" in out + err  # the probe read k-NN's features
    assert len({r["weights"] for r in rows(tmp_path)}) == 1


HUBCONF = '''
import torch


class Tiny(torch.nn.Module):
    pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)}

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 12)

    def forward(self, x):
        return self.proj(x.flatten(1))


def tiny(pretrained=False):
    torch.manual_seed(0)
    return Tiny()


def tokens(pretrained=False):
    # [N, 1, 8, 8] -> [N, 4, 16]: not one vector per image
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Unflatten(1, (4, 16)))
'''


def test_torch_hub_folder_and_python_callable(monkeypatch, capsys, tmp_path):
    (tmp_path / "hubrepo").mkdir()
    (tmp_path / "hubrepo" / "hubconf.py").write_text(HUBCONF)
    (tmp_path / "my_models.py").write_text(HUBCONF)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    for checkpoint in (f"hub:{tmp_path / 'hubrepo'}:tiny", "python:my_models:tiny"):
        code, _, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "knn",
                                "--checkpoint", checkpoint, "--k", "20")
        assert code == 0, err
    got = rows(tmp_path)
    values = {r["method"]: r["value"] for r in got if r["metric"] == "top1"}
    assert set(values) == {"hub", "python"} and values["hub"] == values["python"]
    assert {r["pool"] for r in got} == {"model"} and "img_size" not in got[0]
    line = refused(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint",
                   "python:my_models:tokens")
    assert "its output for 2 images is [2, 4, 16], not one vector per image" in line


class Pixels(torch.nn.Flatten):
    """A hub model that declares 8-px grayscale input: its embedding is the pixels."""

    pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)}


def test_hub_trust_is_explicit(monkeypatch, capsys, tmp_path):
    """torch.hub runs a repository's code: trust_repo=True only with --trust-repo; else torch's
    own "check", and a repository torch does not trust is refused before torch would prompt."""
    calls = []

    def load(repo, entry, **kwargs):
        calls.append((repo, kwargs["trust_repo"]))
        return Pixels()

    monkeypatch.setattr(torch.hub, "load", load)
    resolve_source("hub:facebookresearch/dino:dino_vits16")  # an owner torch trusts
    assert calls == [("facebookresearch/dino", "check")]
    resolve_source("hub:someone/models:tiny", SourceOptions(trust_repo=True))
    code, _, err = eval_cli(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint",
                            "hub:someone/models:tiny", "--trust-repo", "--k", "5")
    assert code == 0, err
    hub = Path(torch.hub.get_dir())
    hub.mkdir(parents=True)
    (hub / "trusted_list").write_text("other_repo\nsomeone_listed\n")  # trusted before
    resolve_source("hub:someone/listed:tiny")
    assert calls == [("facebookresearch/dino", "check"), ("someone/models", True),
                     ("someone/models", True), ("someone/listed", "check")]
    with pytest.raises(ConfigError, match="pass --trust-repo if you trust that repository"):
        resolve_source("hub:someone/models:tiny")
    assert len(calls) == 4  # refused before torch.hub.load, which would wait for a "y"


def test_a_weights_file_that_does_not_fit(tmp_path):
    model = random_timm("test_vit")
    state = model.state_dict()
    del state["blocks.0.norm1.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 5, state["pos_embed"].shape[-1])
    with pytest.raises(CheckpointError) as err:
        load_weights(random_timm("test_vit"), _save(state, tmp_path / "bad.safetensors"),
                     "timm:test_vit")
    message = str(err.value)
    assert "does not fit timm:test_vit: missing 1 key (blocks.0.norm1.weight)" in message
    assert "unexpected 1 key (extra.weight)" in message
    assert "shape mismatch in 1 key (pos_embed [1, 5, 64] vs [1, 101, 64])" in message


def _save(state: dict, path: Path) -> str:
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (("--checkpoint", "timm:vit_smal_patch16_224"),
     "unknown timm model 'vit_smal_patch16_224'; close names: vit_small_patch16_224"),
    (("--checkpoint", "timm:test_vit", "--weights", "WEIGHTS2"),
     "does not fit timm:test_vit: missing"),
    (("--checkpoint", "timm:test_vit", "--weights", "nope.pth"), "--weights nope.pth: no such"),
    (("--checkpoint", "timm:test_vit", "--pretrained"),
     "timm:test_vit --pretrained: the weights could not be fetched (no network"),
    (("--checkpoint", "hf:nobody/no-such-model"),
     "hf:nobody/no-such-model: no such folder, and the hub id could not be loaded"),
    (("--checkpoint", "hub:nobody/nothing:entry", "--trust-repo"),
     "hub:nobody/nothing:entry: torch.hub could not load it (no network, and no copy in"),
    (("--checkpoint", "hub:nobody/nothing:entry"),
     "hub:nobody/nothing:entry runs the code of github.com/nobody/nothing, which torch.hub does "
     "not trust yet; pass --trust-repo if you trust that repository"),
    (("--checkpoint", "hub:nothing"), "expected hub:OWNER/REPO:ENTRY"),
    (("--checkpoint", "python:no_such_module:build"), "no module 'no_such_module' on the path"),
    (("--checkpoint", "timm:test_vit", "--protocol", "finetune"),
     "timm:test_vit is evaluated on frozen features only (finetune trains a mae-bench ViT); "
     "use knn, linear --probe fast, fewshot --probe fast"),
    (("--checkpoint", "timm:test_vit", "--protocol", "linear", "--probe", "mae"),
     "linear --probe mae trains a mae-bench ViT"),
    (("--checkpoint", "pixels", "--weights", "w.pth"), "--weights is for timm:, hub: and python:"),
    (("--checkpoint", "timm:"), "give the model after 'timm:'"),
])
def test_bad_outside_models_are_one_line(monkeypatch, capsys, tmp_path, args, message):
    save_file(random_timm("test_vit2").state_dict(), str(tmp_path / "w2.safetensors"))
    args = tuple(str(tmp_path / "w2.safetensors") if a == "WEIGHTS2" else a for a in args)
    if "--protocol" not in args:
        args = ("--protocol", "knn", *args)
    line = refused(monkeypatch, capsys, tmp_path, *args)
    assert message in line, line
