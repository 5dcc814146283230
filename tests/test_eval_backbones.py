"""Evaluating runs whose backbone is not a ViT (evals/encoders.py ``BackboneSource``, the
protocols, ``mae-bench export``): a ResNet-18 and a timm ResNet-18 SimCLR run on digits (8 px, the
CIFAR stem) go through every protocol; their features are the trained backbone's own pooled
embedding, their layer groups and partial freezing are the stages, BatchNorm trains only where
the backbone trains, and the exported state dict or timm folder gives the same features."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import run_cli
from recipe_helpers import run_finetune, run_probe

from evals.encoders import BackboneRunSource, RandomBackboneSource, hash_state, load_source
from evals.features import features_for
from evals.finetune import freeze_for_partial, param_groups_lrd, partial_units
from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import method_from_checkpoint
from mae_bench.models.backbones import pooled

pytestmark = pytest.mark.usefixtures("one_thread")
# fp32: these runs test export and evaluation; a bf16 LARS step of the ImageNet-stem ResNet at
# 8 px (1 x 1 maps from the third stage on, batch 16) gave a non-finite loss once in CI
SIMCLR = RunConfig().replace(model={"img_size": 8}, train={"method": "simclr", "epochs": 1,
                                                           "batch_size": 16,
                                                           "precision": "fp32"})


def _run(tmp_path_factory, name: str, **model) -> Path:
    path = tmp_path_factory.mktemp("run") / name
    pretrain(SIMCLR.replace(model=model), path, max_steps=2, progress=False)
    return path


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "simclr-r18", arch="resnet18")  # 8 px: the CIFAR stem


@pytest.fixture(scope="module")
def timm_r18(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "simclr-timm-r18", arch="timm:resnet18")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def trained_backbone(run: Path) -> torch.nn.Module:
    """The run's backbone as pretraining left it, read through the method registry (not
    through the eval sources)."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return method_from_checkpoint(ckpt, str(run))[1].backbone.eval()


def normalised(dataset) -> torch.Tensor:
    info = dataset.info
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (dataset.images.float() / 255 - mean) / std  # [N, 1, 8, 8]


def rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]


def evaluate(monkeypatch, capsys, tmp_path, *args) -> str:
    code, out, err = run_cli(monkeypatch, capsys, "eval", *map(str, args), "--no-progress",
                             "--precision", "fp32", "--results-dir", str(tmp_path / "res"),
                             "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    return err


def test_a_resnet_run_is_a_backbone_source_with_its_trained_weights(r18):
    source = load_source(r18)
    assert isinstance(source, BackboneRunSource) and source.kind == "run"
    assert (source.arch, source.method, source.img_size, source.channels) == (
        "resnet18", "simclr", 8, 1)
    assert source.cifar_stem is True and source.pools == ("mean",)
    assert source.default_pool == "mean" and not source.vit and not source.has_drop_path
    # The identity is the hash of the checkpoint's backbone.* weights, BatchNorm statistics too.
    model = torch.load(r18 / "checkpoint.pt", weights_only=True)["model"]
    state = {k.removeprefix("backbone."): v for k, v in model.items()
             if k.startswith("backbone.")}
    assert "bn1.running_mean" in state and source.fingerprint == hash_state(state)
    built = source.build().state_dict()
    assert built.keys() == state.keys()
    assert all(torch.equal(built[k], state[k]) for k in state)


@pytest.mark.parametrize("run", ["r18", "timm_r18"])
def test_features_are_the_trained_backbones_pooled_embedding(request, tmp_path, digits, run):
    path = request.getfixturevalue(run)
    test = digits[1]
    feats = features_for(load_source(path), test, dataset_name="digits", split="test",
                         pool="mean", cache_dir=tmp_path, use_cache=False)
    with torch.no_grad():
        want = pooled(trained_backbone(path), normalised(test))  # [360, 512], eval mode
    assert feats.features.shape == (len(test), 512)
    torch.testing.assert_close(feats.features, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(feats.labels, test.labels)


def test_every_protocol_on_a_resnet_run(monkeypatch, capsys, tmp_path, r18):
    few = ("--label-fraction", "0.1", "--epochs", "1")  # the trained protocols: 144 images
    for args in (("knn", "--k", "5,20"), ("linear",), ("linear", "--probe", "mae", *few),
                 ("fewshot", "--label-fraction", "0.1"), ("finetune", *few),
                 ("partial-finetune", "--blocks", "1", *few)):
        err = evaluate(monkeypatch, capsys, tmp_path, "--protocol", args[0], "--checkpoint", r18,
                       *args[1:])
    # the fine-tuning recipe's note (wrapped to the terminal's width)
    assert "no drop path: resnet18 has no stochastic depth" in " ".join(err.split())
    got = rows(tmp_path / "res")
    assert {r["protocol"] for r in got} == {"knn", "linear", "fewshot", "finetune",
                                            "partial-finetune"}
    assert len({(r["protocol"], r.get("probe")) for r in got}) == 6
    for r in got:
        assert (r["arch"], r["method"], r["status"]) == ("resnet18", "simclr", "ok")
        assert r["weights"] == load_source(r18).fingerprint[:12]
        assert 0 <= r["value"] <= 100 and "attention" not in r
    assert {r.get("pool") for r in got if r["protocol"] in ("knn", "linear", "fewshot")} == {
        "mean"}
    partial = [r for r in got if r["protocol"] == "partial-finetune"]
    assert {(r["blocks"], r["drop_path"]) for r in partial} == {(1, 0.0)}
    top1 = {(r["protocol"], r.get("probe")): r["value"] for r in got
            if r["metric"] == "top1" and r.get("k", 20) == 20}
    assert top1[("knn", None)] > 50 and top1[("linear", "fast")] > 50  # digits: 10 classes


def test_resnet_layer_groups_and_partial_freezing_are_the_stages(r18):
    model = load_source(r18).build(num_classes=10)
    assert partial_units(model) == (4, "stages")

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything = {n for n, _ in model.named_parameters()}
    freeze_for_partial(model, 1)
    assert trainable() == {n for n in everything if n.startswith(("layer4.", "fc."))}
    freeze_for_partial(model, 0)
    assert trainable() == {"fc.weight", "fc.bias"}
    freeze_for_partial(model, 4)  # every stage: the stem trains too (full fine-tuning)
    assert trainable() == everything
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match=rf"^partial fine-tuning blocks must be in 0\.\.4 "
                                              rf"for this model of 4 stages below its head, "
                                              rf"got {bad}$"):
            freeze_for_partial(model, bad)
    # lr decay 0.5 over 6 groups: stem 0.5^5, layerK 0.5^(5-K), fc 1; BatchNorm: no decay
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale.keys() == everything
    expect = {"conv1.": 1 / 32, "bn1.": 1 / 32, "layer1.": 1 / 16, "layer2.": 1 / 8,
              "layer3.": 1 / 4, "layer4.": 1 / 2, "fc.": 1.0}
    for name, value in scale.items():
        assert value == next(v for k, v in expect.items() if name.startswith(k)), name
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1}


def test_partial_finetune_trains_layer4_and_leaves_frozen_batchnorm_statistics(r18, digits):
    """Frozen stages run in eval mode: their BatchNorm statistics stay as pretrained, while the
    trained stage's move (BatchNorm in train mode)."""
    model = load_source(r18).build(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_finetune(model, *digits, partial_blocks=1, epochs=1, batch_size=32, mixup=0.0,
                       cutmix=0.0, train_indices=torch.arange(96))
    assert 0 <= out["top1"] <= 100
    after = model.state_dict()
    for key, value in before.items():
        trained = key.startswith(("layer4.", "fc."))  # weights and BatchNorm statistics
        assert torch.equal(after[key], value) != trained, key
    assert after["conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_the_mae_probe_keeps_a_resnet_frozen_in_eval_mode(r18, digits):
    encoder = load_source(r18).build()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    out = run_probe(encoder, *digits, pool="mean", epochs=1, batch_size=64,
                    train_indices=torch.arange(256))
    assert 0 <= out["top1"] <= 100 and out["steps"] == 4
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ConfigError, match=r"^unknown pool 'cls'; valid: mean$"):
        run_probe(encoder, *digits, pool="cls", epochs=1)


def test_a_timm_backbone_run_and_the_random_resnet_through_knn(monkeypatch, capsys, tmp_path,
                                                               timm_r18):
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint", timm_r18,
             "--k", "5")
    for _ in range(2):  # the same seed: the same weights, so the second is already stored
        evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint", "random",
                 "--arch", "resnet18", "--k", "5")
    got = rows(tmp_path / "res")
    assert len(got) == 12
    assert {(r["method"], r["arch"], r["pool"]) for r in got} == {
        ("simclr", "timm:resnet18", "mean"), ("random", "resnet18", "mean")}
    assert all(0 <= r["value"] <= 100 for r in got)
    random = load_source("random", arch="resnet18", img_size=8, channels=1, seed=0)
    assert isinstance(random, RandomBackboneSource) and random.cifar_stem is True
    with torch.no_grad():
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(pooled(random.build(init_seed=0).eval(), x),
                                   pooled(random.frozen_model().backbone, x))


@pytest.mark.parametrize(("args", "message"), [
    (("--protocol", "knn", "--pool", "cls"), "--pool cls: simclr-r18 offers mean"),
    (("--protocol", "partial-finetune", "--blocks", "5"),
     "--blocks 5 is more than the encoder's 4 stages; use 0..4"),
    (("--protocol", "finetune", "--drop-path", "0.1"),
     "--drop-path 0.1: resnet18 has no stochastic depth (a ViT knob here); leave --drop-path "
     "unset or 0"),
    (("--protocol", "knn", "--arch", "vit_micro_patch2"),
     "holds a resnet18 encoder, not --arch vit_micro_patch2"),
])
def test_bad_backbone_evals_are_one_line(monkeypatch, capsys, tmp_path, r18, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", str(r18), *args,
                           "--epochs", "1", "--no-progress",
                           "--results-dir", str(tmp_path / "res"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not (tmp_path / "res").exists()


def export(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "export", *map(str, args))


@pytest.mark.parametrize("run", ["r18", "timm_r18"])
def test_torch_export_loads_without_mae_bench_with_the_same_features(
        monkeypatch, capsys, tmp_path, request, run):
    path = request.getfixturevalue(run)
    code, out, err = export(monkeypatch, capsys, path, "--to", "torch", "--out", tmp_path / "t")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["README.md", "load.py",
                                                                   "model.pt"]
    assert 'runpy.run_path("' in out.splitlines()[1]
    state = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith(("model.", "fc.")) for k in state)
    model = runpy.run_path(str(tmp_path / "t" / "load.py"))["load_encoder"]()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled(trained_backbone(path), x))
    uses = "import torchvision" if run == "r18" else "import timm"
    assert uses in (tmp_path / "t" / "load.py").read_text()


def test_a_resnet_exports_to_timm_with_the_imagenet_stem_only(monkeypatch, capsys, tmp_path,
                                                              tmp_path_factory, r18):
    code, _, err = export(monkeypatch, capsys, r18, "--to", "timm", "--out", tmp_path / "no")
    assert code == 2 and err.strip() == (
        "error: --to timm: resnet18 with the CIFAR stem (3x3 stride-1 first convolution, no "
        "max-pool) has no timm counterpart; export it --to torch (torchvision builds it)")
    code, _, err = export(monkeypatch, capsys, r18, "--to", "hf", "--out", tmp_path / "no")
    assert code == 2 and "--to hf writes a transformers ViT; resnet18 exports --to torch" in err
    assert not (tmp_path / "no").exists()
    imagenet = _run(tmp_path_factory, "simclr-r18-imagenet-stem", arch="resnet18",
                    cifar_stem=False)
    out = tmp_path / "timm"
    code, _, err = export(monkeypatch, capsys, imagenet, "--to", "timm", "--out", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["model_args"] == {"num_classes": 0,
                                                                        "in_chans": 1}
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled(trained_backbone(imagenet), x))
    # Evaluated back as an outside timm model, it gives the run's own k-NN numbers.
    values = {}
    for checkpoint in (imagenet, f"timm:{out}"):
        evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint",
                 checkpoint, "--k", "5")
    for row in rows(tmp_path / "res"):
        values.setdefault(row["method"], {})[(row["metric"], row.get("k"))] = row["value"]
    assert len(values["simclr"]) == 6 and values["timm"] == values["simclr"]
