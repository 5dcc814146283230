"""Tests for mae_bench/app/export.py and ``mae-bench export``: a run (MAE, SimCLR) or an official
MAE checkpoint exported to timm and to transformers, loaded there without mae-bench, gives
mae-bench's features (max abs difference < 1e-5 in fp32), and evaluates back to the run's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import run_cli

from evals.encoders import load_source
from evals.features import pool_tokens
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.models.mae import build_mae

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 64})


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "mae-micro"
    pretrain(TINY, path, max_steps=3, progress=False)
    return path


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "simclr-micro"
    pretrain(TINY.replace(train={"method": "simclr"}), path, max_steps=2, progress=False)
    return path


def export(monkeypatch, capsys, *args) -> str:
    code, out, err = run_cli(monkeypatch, capsys, "export", *map(str, args))
    assert code == 0, err
    return out


def ours(checkpoint: Path, x: torch.Tensor, pool: str) -> torch.Tensor:
    with torch.no_grad():
        return pool_tokens(load_source(checkpoint).build().eval().forward_features(x), pool)


def images(source_dir: Path, n: int = 5) -> torch.Tensor:
    kw = load_source(source_dir).vit_kwargs
    return torch.randn(n, kw["in_chans"], kw["img_size"], kw["img_size"],
                       generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_timm_export_loads_in_timm_with_the_same_features(monkeypatch, capsys, tmp_path,
                                                          mae_run, pool):
    out = tmp_path / "timm"
    printed = export(monkeypatch, capsys, mae_run, "--to", "timm", "--out", out, "--pool", pool)
    assert "model.safetensors" in printed and "local-dir:" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    x = images(mae_run)
    want = ours(mae_run, x, pool)
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert (model(x) - want).abs().max() < 1e-5
        # the README's other form: architecture name, kwargs and a pretrained_cfg overlay
        cfg = json.loads((out / "config.json").read_text())
        overlay = {k: cfg["pretrained_cfg"][k] for k in ("input_size", "mean", "std",
                                                          "num_classes", "custom_load")}
        named = timm.create_model(cfg["architecture"], pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                              **overlay),
                                  **cfg["model_args"]).eval()
        assert (named(x) - want).abs().max() < 1e-5
    assert cfg["architecture"] == "vit_base_patch16_224"  # no timm name for vit_micro_patch2
    assert cfg["model_args"]["embed_dim"] == 32 and cfg["model_args"]["in_chans"] == 1
    readme = (out / "README.md").read_text()
    assert f'timm.create_model("{cfg["architecture"]}", pretrained=True' in readme
    assert f"mae-bench eval --protocol knn --checkpoint timm:{out}" in readme


@pytest.mark.parametrize("hf_class", ["vit", "vit_mae"])
def test_hf_export_loads_in_transformers_with_the_same_features(monkeypatch, capsys, tmp_path,
                                                                simclr_run, hf_class):
    out = tmp_path / "hf"
    export(monkeypatch, capsys, simclr_run, "--to", "hf", "--out", out, "--hf-class", hf_class)
    x = images(simclr_run)
    with torch.no_grad():
        if hf_class == "vit":
            model = transformers.ViTModel.from_pretrained(str(out), add_pooling_layer=False)
            hidden = model.eval()(pixel_values=x).last_hidden_state
        else:
            model = transformers.ViTMAEModel.from_pretrained(str(out)).eval()
            assert model.config.mask_ratio == 0.0
            noise = torch.arange(16.0).expand(len(x), 16)  # 8 px / 2 px patches: 16
            hidden = model(pixel_values=x, noise=noise).last_hidden_state
    assert (hidden[:, 0] - ours(simclr_run, x, "cls")).abs().max() < 1e-5
    assert (hidden[:, 1:].mean(1) - ours(simclr_run, x, "mean")).abs().max() < 1e-5
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.3054] and processor["size"]["height"] == 8


def test_hf_export_prints_no_progress_bar_of_transformers(monkeypatch, capsys, tmp_path,
                                                         simclr_run):
    """Loading the export back in transformers draws its "Loading weights" bar unless told not
    to: export's output is its own two lines, and the user's setting is left as it was."""
    hf_logging = transformers.utils.logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        code, out, err = run_cli(monkeypatch, capsys, "export", str(simclr_run), "--to", "hf",
                                 "--out", str(tmp_path / "hf"))
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith(f"wrote {tmp_path / 'hf'}: README.md, config.json")
    assert out.splitlines()[1] == (f'load: transformers.ViTModel.from_pretrained("{tmp_path / "hf"}'
                                   '", add_pooling_layer=False)')  # one line, to copy


def test_an_official_checkpoint_exports(monkeypatch, capsys, tmp_path):
    mae = build_mae("vit_micro_patch4", img_size=16, in_chans=3)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_pretrain.pth")
    export(monkeypatch, capsys, tmp_path / "mae_pretrain.pth", "--to", "timm",
           "--out", tmp_path / "timm")
    export(monkeypatch, capsys, tmp_path / "mae_pretrain.pth", "--to", "hf",
           "--out", tmp_path / "hf")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = mae.eval().forward_features(x)[:, 0]
        got = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(x)
        hf = transformers.ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False)
        hidden = hf.eval()(pixel_values=x).last_hidden_state
    assert (got - want).abs().max() < 1e-5 and (hidden[:, 0] - want).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet's, as MAE's


def test_an_exported_run_evaluates_back_to_its_own_rows(monkeypatch, capsys, tmp_path, mae_run):
    export(monkeypatch, capsys, mae_run, "--to", "timm", "--out", tmp_path / "timm")
    values = {}
    for checkpoint in (mae_run, f"timm:{tmp_path / 'timm'}"):
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                               str(checkpoint), "--k", "5,20", "--precision", "fp32",
                               "--no-progress", "--results-dir", str(tmp_path / "res"),
                               "--cache-dir", str(tmp_path / "cache"))
        assert code == 0, err
    for line in (tmp_path / "res" / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        values.setdefault(row["method"], {})[(row["metric"], row.get("k"))] = row["value"]
    assert len(values["mae"]) == 8 and values["timm"] == values["mae"]
    last = json.loads(line)
    assert last["arch"] == "vit_micro_patch2" and last["exported_from"].startswith("mae-micro-")


@pytest.mark.parametrize(("args", "message"), [
    (("RUN", "--to", "onnx", "--out", "new"), "unknown export format 'onnx'; valid: timm, hf"),
    (("RUN", "--to", "timm", "--out", "full"), "--out"),
    (("RUN", "--to", "timm", "--out", "new", "--pool", "max"), "unknown pool 'max'"),
    (("RUN", "--to", "hf", "--out", "new", "--hf-class", "bert"), "unknown --hf-class 'bert'"),
    (("pixels", "--to", "timm", "--out", "new"), "export takes a run folder"),
    (("no-such-run", "--to", "timm", "--out", "new"), "error: no-such-run: no such run folder or "
                                                      "file (expected a run folder"),
    (("full", "--to", "timm", "--out", "new"), "error: full: the folder holds no checkpoint.pt"),
])
def test_bad_exports_are_one_line_and_write_nothing(monkeypatch, capsys, tmp_path, mae_run,
                                                    args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args = [str(mae_run) if a == "RUN" else a for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "export", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
