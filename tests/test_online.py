"""The online evaluation (``evals/online.py``) inside the training loop: it never changes what
a run learns, a resumed run measures what an uninterrupted one does, a collapse is one warning
(and a stop when asked), and ``mae-bench pretrain`` shows it by default on labelled data."""

from __future__ import annotations

import io
import json

import pytest
import torch
from cli_helpers import run_cli
from rich.console import Console

from evals.online import COST_FACTOR, OnlineMonitor
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.methods.monitor import Monitor
from mae_bench.methods.registry import build_method
from mae_bench.training.checkpoint import load_checkpoint

ONLINE = ("online_knn_top1", "online_linear_top1", "feature_rankme", "online_seconds")
# digits at 8 px: 1437 training images -> 22 steps of 64 per epoch
TINY = RunConfig().replace(
    model={"arch": "vit_micro_patch2", "img_size": 8},
    train={"epochs": 2, "batch_size": 64, "log_every": 5, "deterministic": True,
           "precision": "fp32", "device": "cpu"})


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _online(rows):
    return {r["step"]: {k: r[k] for k in ONLINE[:-1]} for r in rows if "online_knn_top1" in r}


def test_the_online_evaluation_never_changes_what_a_run_learns(tmp_path):
    watched = pretrain(TINY, tmp_path / "watched", progress=False,
                       monitor=OnlineMonitor(TINY, every=8))
    plain = pretrain(TINY, tmp_path / "plain", progress=False)
    assert watched.finished and plain.finished and watched.step == 44
    a, b = load_checkpoint(tmp_path / "watched"), load_checkpoint(tmp_path / "plain")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = _rows(tmp_path / "watched")
    online = _online(rows)
    assert sorted(online) == [8, 16, 24, 32, 40, 44]  # every 8 steps and the last
    for values in online.values():
        assert 10 < values["online_knn_top1"] <= 100 and 0 <= values["online_linear_top1"] <= 100
        assert 1 <= values["feature_rankme"] <= 32 and "rankme" not in values  # MAE: no
        # training embedding, so no embedding std / rank (its features' rank instead)
    assert online[44]["online_linear_top1"] > 20  # 10 digits: learnt above chance
    summary = json.loads((tmp_path / "watched" / "summary.json").read_text())
    assert summary["collapse"] is None and summary["online_seconds"] > 0
    state = load_checkpoint(tmp_path / "watched")["monitor"]
    assert state["classifier"]["1.weight"].shape == (10, 32)  # 10 digits x ViT-Micro features
    assert state["per_batch"] is False  # MAE embeds no whole view: trained on the subset


def test_a_resumed_run_measures_what_an_uninterrupted_one_does(tmp_path):
    pretrain(TINY, tmp_path / "full", progress=False, monitor=OnlineMonitor(TINY, every=8))
    part = pretrain(TINY, tmp_path / "part", max_steps=20, progress=False,
                    monitor=OnlineMonitor(TINY, every=8))
    assert part.step == 20 and not part.finished
    pretrain(TINY, tmp_path / "part", progress=False, monitor=OnlineMonitor(TINY, every=8))
    assert _online(_rows(tmp_path / "full")) == _online(_rows(tmp_path / "part"))


def test_default_frequency_holds_twenty_times_the_monitors_images():
    monitor = OnlineMonitor(TINY)
    monitor.start(device=torch.device("cpu"), precision="fp32", img_size=8,
                  steps_per_epoch=22, images_per_epoch=22 * 64)
    assert (len(monitor.train_x), len(monitor.test_x)) == (1437, 360)  # all of digits
    per = monitor.images_per_measurement  # 1437 + 360 (+ no second view for MAE's one)
    epochs = monitor.every // 22
    assert monitor.every % 22 == 0 and (epochs - 1) * 1408 < COST_FACTOR * per <= epochs * 1408


def test_a_collapsed_encoder_is_called_collapsed_and_a_healthy_one_not():
    monitor = OnlineMonitor(TINY, every=1)
    monitor.start(device=torch.device("cpu"), precision="fp32", img_size=8,
                  steps_per_epoch=22, images_per_epoch=1408)
    method = build_method(TINY, 1, 8)
    values = monitor.measure(method, 1)
    assert monitor.collapse(values) is None
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.zero_()  # every image -> the same (zero) embedding
    values = monitor.measure(method, 2)
    assert values["feature_rankme"] < 1.01
    assert monitor.collapse(values).startswith("effective rank (RankMe) 1.00")
    assert method.training  # the monitor restored the mode


def test_a_two_view_method_gets_its_view_alignment(tmp_path):
    cfg = TINY.replace(train={"method": "simclr", "epochs": 1},
                       ssl={"proj_hidden_dim": 32, "proj_dim": 16})
    pretrain(cfg, tmp_path / "run", progress=False, monitor=OnlineMonitor(cfg, every=11))
    online = [r for r in _rows(tmp_path / "run") if "view_alignment" in r]
    assert [r["step"] for r in online] == [11, 22]
    assert all(0 <= r["view_alignment"] <= 4 for r in online)
    assert all(r["embedding_std_floor"] == pytest.approx(16 ** -0.5) for r in online)  # P = 16
    assert all(0 < r["embedding_std"] < 1 and 1 <= r["rankme"] <= 16 for r in online)
    # solo-learn's online classifier: one step on every batch's first-view features
    assert load_checkpoint(tmp_path / "run")["monitor"]["per_batch"] is True


def test_the_per_batch_classifier_learns_from_the_training_views(tmp_path):
    """SimCLR on digits: the classifier trained only on training batches' features (never on
    the monitor's subset) reaches well above chance on the test subset, and resumes exactly."""
    cfg = TINY.replace(train={"method": "simclr", "epochs": 2, "deterministic": True},
                       ssl={"proj_hidden_dim": 32, "proj_dim": 16})
    pretrain(cfg, tmp_path / "full", progress=False, monitor=OnlineMonitor(cfg, every=11))
    pretrain(cfg, tmp_path / "part", max_steps=15, progress=False,
             monitor=OnlineMonitor(cfg, every=11))
    pretrain(cfg, tmp_path / "part", progress=False, monitor=OnlineMonitor(cfg, every=11))
    full, part = _online(_rows(tmp_path / "full")), _online(_rows(tmp_path / "part"))
    assert full == part and sorted(full) == [11, 22, 33, 44]
    assert full[44]["online_linear_top1"] > 20  # 10 classes: chance is 10 %


class _Collapsing(Monitor):
    """Reports a collapse from step 4 on."""

    every = 2

    def measure(self, method, step):
        return {"embedding_std": 0.0 if step >= 4 else 0.1}

    def collapse(self, values):
        return "embedding std 0" if values["embedding_std"] == 0 else None


@pytest.mark.parametrize("stop", [False, True])
def test_a_collapse_is_one_warning_recorded_in_the_summary_and_stops_when_asked(tmp_path, stop):
    out = io.StringIO()
    cfg = TINY.replace(train={"epochs": 1, "stop_on_collapse": stop})
    result = pretrain(cfg, tmp_path / "run", progress=False, monitor=_Collapsing(),
                      console=Console(file=out, width=200))
    warnings = [ln for ln in out.getvalue().splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: the representation collapsed at step 4: embedding std 0"
                        + ("; stopping (--stop-on-collapse)" if stop else "")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["collapse"] == {"step": 4, "reason": "embedding std 0"}
    assert result.step == (4 if stop else 22) and result.finished is not stop
    assert load_checkpoint(tmp_path / "run")["extra"]["collapse"]["step"] == 4
    from evals.encoders import load_source

    assert load_source(tmp_path / "run").pretrain["pretrain_collapse_step"] == 4  # in eval rows


def test_pretrain_shows_the_online_evaluation_by_default_on_labelled_data(
        monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_micro_patch2",
                             "--img-size", "8", "--epochs", "1", "--batch-size", "256",
                             "--precision", "fp32", "--out", str(tmp_path / "run"))
    assert code == 0, err
    last = _rows(tmp_path / "run")[-1]
    assert all(k in last for k in ONLINE)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_micro_patch2",
                           "--img-size", "8", "--epochs", "1", "--batch-size", "256",
                           "--no-online-eval", "--out", str(tmp_path / "off"))
    assert code == 0 and "online_knn_top1" not in _rows(tmp_path / "off")[-1]
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--online-every", "0",
                           "--out", str(tmp_path / "bad"))
    assert code == 2 and err.strip() == "error: --online-every must be >= 1, got 0"
    assert not (tmp_path / "bad").exists()
