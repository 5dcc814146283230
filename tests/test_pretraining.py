"""``mae_bench.app.pretraining``: the one pretraining entry of the application and the one
writer of failed rows (a stopped pretraining's own row, a sweep point's rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mae_bench.app.pretraining import PretrainingFailed, failure_rows, pretrain_run
from mae_bench.config import RunConfig
from mae_bench.errors import TrainingError
from mae_bench.methods.registry import METHODS, resolve_config
from mae_bench.results import read_results
from mae_bench.training.checkpoint import CheckpointSaveError

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(method: str = "mae") -> RunConfig:
    return resolve_config(RunConfig().replace(
        model={"arch": "vit_micro_patch2"}, mae={"mask_ratio": 0.6},
        train={"method": method, "epochs": 3.0, "seed": 7}))


def test_a_pretraining_row_carries_the_run_the_step_and_the_methods_own_knobs():
    (row,) = failure_rows(_cfg(), Path("runs/r1"), "non-finite loss (nan) at step 4", step=4,
                          fields={"pretrain_epochs": 3.0})
    assert {k: row[k] for k in ("run_id", "method", "arch", "dataset", "protocol", "metric",
                                "value", "status", "error", "seed", "checkpoint", "step",
                                "pretrain_epochs", "mask_ratio")} == {
        "run_id": "r1", "method": "mae", "arch": "vit_micro_patch2", "dataset": "digits",
        "protocol": "pretrain", "metric": "loss", "value": None, "status": "failed",
        "error": "non-finite loss (nan) at step 4", "seed": 7, "checkpoint": "r1", "step": 4,
        "pretrain_epochs": 3.0, "mask_ratio": 0.6}


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"mae", "simmim", "ibot", "data2vec2"}))
def test_rows_of_methods_without_a_mask_ratio_carry_none(method):
    (row,) = failure_rows(resolve_config(_cfg(method)), Path("r"), "boom")
    assert "mask_ratio" not in row and "step" not in row and row["method"] == method


@pytest.mark.parametrize(("method", "ratio"), [("simmim", 0.6), ("ibot", 0.3),
                                               ("data2vec2", 0.8)])
def test_rows_of_the_masked_siblings_carry_their_own_mask_ratio(method, ratio):
    cfg = RunConfig().replace(train={"method": method})  # no mask ratio set: the method's own
    (row,) = failure_rows(resolve_config(cfg), Path("r"), "boom")
    assert row["mask_ratio"] == ratio and row["method"] == method


def test_evaluation_rows_are_one_per_protocol_and_given_fields_win():
    rows = failure_rows(_cfg(), Path("p"), "TrainingError: x", protocols=("knn", "linear"),
                        fields={"sweep": "mask-ratio", "mask_ratio": 0.5})
    assert [(r["protocol"], r["metric"]) for r in rows] == [("knn", "top1"), ("linear", "top1")]
    assert {r["mask_ratio"] for r in rows} == {0.5} and {r["sweep"] for r in rows} == {
        "mask-ratio"}


def _failing_engine(monkeypatch, error: TrainingError) -> list[Path]:
    import mae_bench.methods.engine as engine

    calls: list[Path] = []

    def pretrain(cfg, run_dir, **kw):
        calls.append(Path(run_dir))
        raise error

    monkeypatch.setattr(engine, "pretrain", pretrain)
    return calls


def test_a_stopped_pretraining_is_recorded_once_and_raised_with_where(tmp_path, monkeypatch):
    calls = _failing_engine(monkeypatch, TrainingError("non-finite loss (nan) at step 3", 3))
    with pytest.raises(PretrainingFailed) as info:
        pretrain_run(_cfg(), tmp_path / "run", results_dir=tmp_path / "results", progress=False)
    failed = info.value
    assert calls == [tmp_path / "run"]
    assert failed.recorded == tmp_path / "results" / "results.jsonl" and failed.step == 3
    assert str(failed) == (f"non-finite loss (nan) at step 3 (recorded as a failed row in "
                           f"{tmp_path / 'results' / 'results.jsonl'})")
    assert str(failed.error) == "non-finite loss (nan) at step 3"
    rows = read_results(tmp_path / "results")
    assert len(rows) == 1 and rows.iloc[0]["step"] == 3 and rows.iloc[0]["run_id"] == "run"


def test_no_store_or_a_full_disk_records_nothing(tmp_path, monkeypatch):
    _failing_engine(monkeypatch, TrainingError("loss is nan at step 1", 1))
    with pytest.raises(PretrainingFailed) as info:
        pretrain_run(_cfg(), tmp_path / "run", results_dir=None, progress=False)
    assert info.value.recorded is None and str(info.value) == "loss is nan at step 1"
    _failing_engine(monkeypatch, CheckpointSaveError("no space left on device", 5))
    with pytest.raises(PretrainingFailed) as info:
        pretrain_run(_cfg(), tmp_path / "run", results_dir=tmp_path / "results",
                     progress=False)
    assert info.value.recorded is None and info.value.label == "error: "  # printed as before
    assert not (tmp_path / "results").exists()
