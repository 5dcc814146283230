"""MAE's masked siblings everywhere MAE is (issue 31, point 3): a SimMIM, I-JEPA, iBOT and
data2vec 2.0 run on digits is an encoder source whose weights are the run's trained ViT; it goes
through the evaluation protocols, exports to timm with the same features, and a CNN backbone for
any of them is one error line. Their own losses, masks and schedules against the official code
are in tests/test_simmim.py, test_ijepa.py, test_ibot.py and test_data2vec2.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import run_cli

from evals.encoders import load_source
from evals.features import pool_tokens
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import method_from_checkpoint
from mae_bench.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")
SIBLINGS = ("simmim", "ijepa", "ibot", "data2vec2")
TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 32},
                           ssl={"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 24})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("siblings")
    for name in SIBLINGS:
        pretrain(TINY.replace(train={"method": name}), base / name, max_steps=2, progress=False)
    return {name: base / name for name in SIBLINGS}


@pytest.mark.parametrize("name", SIBLINGS)
def test_the_source_is_the_runs_trained_encoder(runs, name):
    """The evaluated encoder is the method's ``encoder`` as training left it, weight for
    weight (not a fresh ViT, not a teacher)."""
    run = runs[name]
    _, method = method_from_checkpoint(torch.load(run / "checkpoint.pt", weights_only=True),
                                       str(run))
    built = load_source(run).build().state_dict()
    trained = method.encoder.state_dict()
    assert built.keys() <= trained.keys() and len(built) > 10
    assert all(torch.equal(built[k], trained[k]) for k in built)


@pytest.mark.multiprocess  # DataLoader-free, but the CLI's eval may fork feature workers
def test_every_protocol_on_sibling_runs(monkeypatch, capsys, tmp_path, runs):
    few = ("--label-fraction", "0.1", "--epochs", "1")
    store = tmp_path / "res"
    for name in SIBLINGS:
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                               str(runs[name]), "--k", "5", "--results-dir", str(store),
                               "--cache-dir", str(tmp_path / "cache"))
        assert code in (0, None), err
    for args in (("linear",), ("finetune", *few), ("partial-finetune", "--blocks", "1", *few)):
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", args[0],
                               "--checkpoint", str(runs["ijepa"]), *args[1:],
                               "--results-dir", str(store),
                               "--cache-dir", str(tmp_path / "cache"))
        assert code in (0, None), err
    rows = read_results(store)
    ok = rows[rows["status"] == "ok"]
    knn = ok[(ok["protocol"] == "knn") & (ok["metric"] == "top1")]
    assert set(knn["method"]) == set(SIBLINGS)
    assert set(ok.loc[ok["method"] == "ijepa", "protocol"]) == {
        "knn", "linear", "finetune", "partial-finetune"}
    assert ok.loc[ok["metric"] == "top1", "value"].between(0, 100).all()
    # each row carries its method's mask knobs (Method.row_fields)
    assert set(knn.loc[knn["method"] == "ijepa", "num_targets"]) == {4}
    assert set(knn.loc[knn["method"] == "data2vec2", "mask_ratio"]) == {0.8}


@pytest.mark.parametrize("name", ["simmim", "data2vec2"])
def test_timm_export_of_a_sibling_gives_its_features(monkeypatch, capsys, tmp_path, runs,
                                                     name):
    out = tmp_path / "timm"
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs[name]), "--to", "timm",
                           "--out", str(out), "--pool", "mean")
    assert code in (0, None), err
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pool_tokens(load_source(runs[name]).build().eval().forward_features(x), "mean")
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert (model(x) - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", SIBLINGS)
def test_a_cnn_backbone_is_one_error_line(monkeypatch, capsys, tmp_path, name):
    code, out, err = run_cli(monkeypatch, capsys, "pretrain", "--method", name, "--arch",
                             "resnet18", "--out", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    assert " ".join(err.split()).startswith(
        f"error: {name} needs a ViT preset (it masks a ViT's patch tokens); resnet18 is not one")
