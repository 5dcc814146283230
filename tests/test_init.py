"""Pretraining from earlier or outside weights (``--init``): the encoder starts exactly from the
source's tensors (a run folder, an official-style checkpoint, a timm model with a weights file),
EMA teachers start from them too, run.json records the source and its hash, a resumed run does
not reload them, and weights that do not fit are one line naming the keys."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from evals.encoders import hash_state, load_source
from mae_bench.app.pretraining import encoder_init, pretrain_run
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import load_init
from mae_bench.methods.registry import build_method
from mae_bench.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = RunConfig().replace(
    model={"arch": "vit_micro_patch2", "img_size": 8},
    train={"epochs": 1, "batch_size": 256, "precision": "fp32", "device": "cpu",
           "online_eval": False},
    ssl={"proj_hidden_dim": 32, "proj_dim": 16})


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("init") / "mae"
    pretrain_run(BASE, run, results_dir=None, progress=False)
    return run


def _encoder(state: dict, prefix: str = "") -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_a_run_starts_from_another_runs_encoder_exactly(mae_run, tmp_path, monkeypatch):
    """A MAE run's encoder into a BYOL ViT: right after loading, the backbone and its EMA
    teacher equal the source's encoder tensor for tensor; the run then trains, records the
    source and its hash, and a resumed segment does not load it again."""
    import mae_bench.methods.engine as engine

    loaded = []
    real = engine.load_init

    def spy(method, init, arch):
        real(method, init, arch)
        loaded.append({k: v.clone() for k, v in method.state_dict().items()})

    monkeypatch.setattr(engine, "load_init", spy)
    cfg = BASE.replace(train={"method": "byol", "init": str(mae_run)})
    run = tmp_path / "byol"
    assert pretrain_run(cfg, run, results_dir=None, progress=False).finished
    source = encoder_init(cfg)
    (state,) = loaded
    for k, v in source.state.items():
        assert torch.equal(state[f"backbone.{k}"], v), k
        assert torch.equal(state[f"target_backbone.{k}"], v), k
    trained = load_checkpoint(run)["model"]
    assert not torch.equal(trained["backbone.cls_token"], source.state["cls_token"])
    info = json.loads((run / "run.json").read_text())
    assert info["init"] == {"source": str(mae_run), "sha256": hash_state(source.state)}
    pretrain_run(cfg.replace(train={"epochs": 2}), run, results_dir=None, progress=False)
    assert len(loaded) == 1  # resumed: the checkpoint's weights, not the source's
    assert json.loads((run / "run.json").read_text())["init"]["sha256"] == source.sha256
    # the facts every evaluation row of the run carries name the source and the hash
    provenance = load_source(run).pretrain
    assert provenance["pretrain_init"] == str(mae_run)
    assert provenance["pretrain_init_sha256"] == source.sha256


def test_mae_starts_from_a_run_with_a_random_decoder(mae_run):
    cfg = BASE.replace(train={"init": str(mae_run)})
    method = build_method(cfg, 1, 8)
    decoder_before = {k: v.clone() for k, v in method.mae.state_dict().items()
                      if k.startswith("decoder")}
    init = encoder_init(cfg)
    load_init(method, init, cfg.model.arch)
    state = method.mae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in init.state.items())
    assert all(torch.equal(state[k], v) for k, v in decoder_before.items())


def test_weights_that_do_not_fit_are_one_line(mae_run, monkeypatch, capsys, tmp_path):
    cfg = BASE.replace(model={"arch": "vit_tiny_patch4", "img_size": 8},
                       train={"init": str(mae_run)})
    with pytest.raises(ConfigError, match=r"^--init .* does not fit --arch vit_tiny_patch4: "
                                          r"missing 120 keys \(blocks\.2\.norm1\.weight, .*; "
                                          r"shape mismatch in 30 keys \(cls_token \[1, 1, 32\] vs "
                                          r"\[1, 1, 192\]"):
        load_init(build_method(cfg, 1, 8), encoder_init(cfg), cfg.model.arch)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_tiny_patch4",
                           "--img-size", "8", "--init", str(mae_run), "--out",
                           str(tmp_path / "bad"))
    assert code == 2 and err.startswith("error: --init ") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--init-weights", "w.pth",
                           "--out", str(tmp_path / "bad2"))
    assert code == 2 and err.strip() == "error: --init-weights goes with --init timm:NAME"


def test_a_timm_model_starts_from_a_weights_file(tmp_path):
    """--arch timm:resnet10t --init timm:resnet10t --init-weights FILE (no download)."""
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("resnet10t", num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    cfg = BASE.replace(model={"arch": "timm:resnet10t", "img_size": 16},
                       train={"method": "simclr", "init": "timm:resnet10t",
                              "init_weights": str(tmp_path / "w.pth")})
    method = build_method(cfg, 3, 16)  # an RGB data set (timm's resnet10t takes 3 channels)
    init = encoder_init(cfg)
    load_init(method, init, cfg.model.arch)
    for k, v in ref.state_dict().items():
        assert torch.equal(method.backbone.model.state_dict()[k], v), k
    other = cfg.replace(model={"arch": "resnet18"})
    with pytest.raises(ConfigError, match="needs --arch timm:resnet10t"):
        encoder_init(other)


def test_a_hugging_face_vit_starts_a_vit_preset(tmp_path):
    """hf:DIR (a transformers ViTMAE saved with save_pretrained) into ViT-Micro/2: its weights,
    renamed (export --to hf in reverse), exactly; another depth is one line."""
    import transformers
    hf_cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, image_size=8, patch_size=2,
                                       num_channels=1, qkv_bias=True, layer_norm_eps=1e-6,
                                       mask_ratio=0.0)
    torch.manual_seed(0)
    transformers.ViTMAEModel(hf_cfg).save_pretrained(tmp_path / "hf")
    theirs = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf").state_dict()
    cfg = BASE.replace(train={"init": f"hf:{tmp_path / 'hf'}"})
    method = build_method(cfg, 1, 8)
    load_init(method, encoder_init(cfg), cfg.model.arch)
    ours = method.mae.encoder_state_dict()
    # by hand, in whichever names this transformers gives a loaded model (5.x: layers.i.*)
    name = ("layers.{i}.attention.{p}_proj" if "layers.0.attention.q_proj.weight" in theirs
            else "encoder.layer.{i}.attention.attention.{p}")
    for i in range(2):
        for param in ("weight", "bias"):
            qkv = torch.cat([theirs[f"{name.format(i=i, p=p)}.{param}"]
                             for p in (("q", "k", "v") if "proj" in name
                                       else ("query", "key", "value"))])
            assert torch.equal(ours[f"blocks.{i}.attn.qkv.{param}"], qkv)
    assert torch.equal(ours["cls_token"], theirs["embeddings.cls_token"])
    assert torch.equal(ours["pos_embed"], theirs["embeddings.position_embeddings"])
    assert torch.equal(ours["norm.weight"], theirs["layernorm.weight"])
    assert torch.equal(ours["blocks.1.mlp.fc2.bias"], next(
        v for k, v in theirs.items() if k.endswith(("1.mlp.fc2.bias", "1.output.dense.bias"))))
    deeper = cfg.replace(model={"arch": "vit_tiny_patch4"})
    with pytest.raises(ConfigError, match=r"^--init hf:.* does not fit --arch vit_tiny_patch4"):
        encoder_init(deeper)
