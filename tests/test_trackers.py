"""Experiment trackers (``mae_bench/methods/trackers.py``): wandb in its offline mode (no
network, no account) receives the config, every metrics row with the online evaluation, and the
summary, and a resumed run continues the same wandb run; a missing package or an unknown name is
one line before anything is written."""

from __future__ import annotations

import json
import sys

from cli_helpers import run_cli

from evals.online import OnlineMonitor
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain

TINY = RunConfig().replace(
    model={"arch": "vit_micro_patch2", "img_size": 8},
    train={"epochs": 1, "batch_size": 64, "log_every": 5, "precision": "fp32",
           "device": "cpu", "tracker": "wandb"})


class _FakeRun:
    def __init__(self, calls: list, **init) -> None:
        self.calls, self.summary = calls, {}
        calls.append(("init", init))

    def log(self, row, step):
        self.calls.append(("log", step, row))

    def finish(self):
        self.calls.append(("finish", dict(self.summary)))


class _FakeWandb:
    """What the tracker calls, recorded."""

    def __init__(self) -> None:
        self.calls: list = []

    def init(self, **kw):
        return _FakeRun(self.calls, **kw)

    def Settings(self, **kw):  # noqa: N802 (wandb's name)
        return kw


def test_wandb_gets_the_config_every_row_and_the_summary(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    pretrain(TINY, run, progress=False, monitor=OnlineMonitor(TINY, every=11))
    (kind, init), *rest = fake.calls
    assert kind == "init" and init["config"]["train"]["tracker"] == "wandb"
    assert init["name"] == "run" and init["resume"] == "allow" and init["dir"] == str(run)
    logged = [(step, row) for kind, step, row in (c for c in rest if c[0] == "log")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in logged] == [r["step"] for r in rows]  # every row, at its step
    assert logged[-1][1]["online_knn_top1"] == rows[-1]["online_knn_top1"]
    assert "time" not in logged[-1][1]
    assert rest[-1][0] == "finish" and rest[-1][1]["finished"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert rest[-1][1]["final_loss"] == summary["final_loss"]


def test_wandb_offline_writes_the_run_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    """The real package, offline: the run's record holds our metric names and config keys, and
    the resumed segment logs to the same run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    pretrain(TINY, run, max_steps=11, progress=False, monitor=OnlineMonitor(TINY, every=11))
    pretrain(TINY, run, progress=False, monitor=OnlineMonitor(TINY, every=11))
    records = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2 and records[0].name == records[1].name  # one id, two segments
    data = records[0].read_bytes() + records[1].read_bytes()
    for key in (b"online_knn_top1", b"online_linear_top1", b"loss", b"mask_ratio"):
        assert key in data, key


def test_a_missing_package_or_unknown_tracker_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--tracker", "wandb",
                           "--out", str(tmp_path / "a"))
    assert code == 2 and err.strip() == ("error: --tracker wandb needs the wandb package: "
                                         "pip install 'mae-bench[wandb]'")
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--tracker", "comet",
                           "--out", str(tmp_path / "b"))
    assert code == 2 and err.strip() == ("error: unknown tracker 'comet'; valid: none, "
                                         "tensorboard, wandb")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
