"""``mae_bench.app.campaign``: the one loop behind compare and sweep, driven here by a campaign
of its own, with the engine and the evaluation replaced by recorders."""

from __future__ import annotations

from pathlib import Path

import pytest

import mae_bench.app.campaign as campaign_module
from mae_bench.app.campaign import Campaign, Todo, run_campaign
from mae_bench.app.evaluation import EvalSpec
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError, TrainingError


class _Recorder(Campaign[str]):
    """Runs named by letters: "skip" is complete, "done" needs no training, "nan" stops
    training, "bad" fails its evaluation with a ConfigError; every hook is logged."""

    recoverable = (TrainingError,)

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def label(self, run: str) -> str:
        return run

    def start(self, index: int, total: int, run: str) -> Todo | None:
        self.events.append(f"start {index}/{total} {run}")
        if run == "skip":
            return None
        if run == "done":
            return Todo(None, Path(run))
        return Todo(RunConfig().replace(train={"method": "mae"}), Path(run))

    def evaluations(self, run: str):
        self.events.append(f"evaluations {run}")
        yield f"eval {run}", EvalSpec(protocol="knn", checkpoint=run)

    def succeeded(self, run: str) -> None:
        self.events.append(f"ok {run}")

    def failed(self, run: str, err: BaseException) -> str:
        self.events.append(f"failed {run}: {type(err).__name__}")
        return str(err)


@pytest.fixture
def events(monkeypatch) -> list[str]:
    import mae_bench.methods.engine as engine

    seen: list[str] = []

    def pretrain(cfg, run_dir, **kw):
        seen.append(f"pretrain {run_dir}")
        if str(run_dir) == "nan":
            raise TrainingError("loss is nan at step 2", 2)

    def run_eval(spec, progress=None):
        seen.append(f"run_eval {spec.checkpoint}")
        if spec.checkpoint == "bad":
            raise ConfigError("--results-dir r: full")

    monkeypatch.setattr(engine, "pretrain", pretrain)
    monkeypatch.setattr(campaign_module, "run_eval", run_eval)
    return seen


def test_each_run_is_planned_trained_evaluated_and_reported_in_order(events):
    logs: list[str] = []
    out = run_campaign(_Recorder(events), ["a", "skip", "done", "nan", "b"], log=logs.append,
                       progress=False)
    assert events == [
        "start 1/5 a", "pretrain a", "evaluations a", "run_eval a", "ok a",
        "start 2/5 skip",
        "start 3/5 done", "evaluations done", "run_eval done", "ok done",
        "start 4/5 nan", "pretrain nan", "failed nan: TrainingError",  # the engine's own error
        "start 5/5 b", "pretrain b", "evaluations b", "run_eval b", "ok b"]
    assert out.trained == ["a", "b"]
    assert out.evaluated == ["a/knn", "done/knn", "b/knn"]
    assert out.failed == ["nan: loss is nan at step 2"]
    assert logs == ["eval a", "eval done", "eval b"]


def test_a_failure_the_campaign_does_not_survive_stops_it(events):
    with pytest.raises(ConfigError, match="full"):
        run_campaign(_Recorder(events), ["a", "bad", "b"], log=lambda _: None, progress=False)
    assert events[-2:] == ["evaluations bad", "run_eval bad"]  # no "ok bad", no run "b"
