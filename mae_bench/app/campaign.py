"""The one campaign loop behind ``mae-bench compare`` and ``mae-bench sweep``.

A campaign is a list of runs. For each one the loop asks the campaign what is left (``start``:
nothing, when the store already holds it; a pretraining, unless its folder holds the finished
run), pretrains through the one application entry (``mae_bench.app.pretraining.pretrain_run``),
evaluates what the campaign lists once the run is trained (``evaluations``: the rows may carry its
measured cost), and then tells the campaign how it went (``succeeded`` / ``failed``). A failure
of a kind the campaign survives (``recoverable``) is recorded by it and the loop goes on; any
other stops the campaign.

What differs between the commands (how a run is planned, named and logged, which failures it
survives, what is written beside the rows) lives in their ``Campaign``; the order of the steps
lives here, once. Under torchrun every rank runs the same loop: the campaigns' hooks broadcast
what rank 0 reads, so that every rank trains and evaluates the same runs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from mae_bench.app.evaluation import EvalSpec, run_eval
from mae_bench.app.pretraining import PretrainingFailed, pretrain_run
from mae_bench.config import RunConfig

Log = Callable[[str], None]
R = TypeVar("R")


@dataclass(frozen=True)
class Todo:
    """What is left of one run: its pretraining (``cfg`` None: nothing to train, the folder
    holds the finished run or the encoder needs none), then its evaluations."""

    cfg: RunConfig | None = None
    run_dir: Path | None = None


@dataclass
class CampaignOutcome:
    """What one call of ``run_campaign`` did, by the campaign's labels of its runs."""

    trained: list[str] = field(default_factory=list)  # runs pretrained (or resumed)
    evaluated: list[str] = field(default_factory=list)  # "label/protocol"
    failed: list[str] = field(default_factory=list)  # "label: message"


class Campaign(abc.ABC, Generic[R]):
    """The hooks one command gives the loop (see the module docstring)."""

    #: where a stopped pretraining is recorded as a failed row (None: ``failed`` records it)
    failure_store: str | None = None
    #: the failures a run records and the campaign survives
    recoverable: tuple[type[BaseException], ...] = ()

    @abc.abstractmethod
    def label(self, run: R) -> str:
        """How the outcome's lists name the run."""

    @abc.abstractmethod
    def start(self, index: int, total: int, run: R) -> Todo | None:
        """Log the run's first line; what is left of it, or None to skip it (complete)."""

    def evaluations(self, run: R) -> Iterable[tuple[str, EvalSpec]]:
        """(log line, evaluation) of what to evaluate, asked once the run is trained."""
        return ()

    def succeeded(self, run: R) -> None:
        """The run is trained and evaluated."""

    def failed(self, run: R, err: BaseException) -> str:
        """Record a recoverable failure (rank 0 writes); the one-line message to log. Raise to
        stop the campaign instead."""
        return str(err)


def run_campaign(campaign: Campaign[R], runs: Sequence[R], *, log: Log, progress: bool = True,
                 console=None, eval_progress=None) -> CampaignOutcome:
    """Run every run of ``campaign`` in order; record recoverable failures and go on."""
    out = CampaignOutcome()
    for index, run in enumerate(runs, 1):
        todo = campaign.start(index, len(runs), run)
        if todo is None:
            continue
        name = campaign.label(run)
        try:
            if todo.cfg is not None:
                pretrain_run(todo.cfg, todo.run_dir, results_dir=campaign.failure_store,
                             progress=progress, console=console)
                out.trained.append(name)
            for line, spec in campaign.evaluations(run):
                log(line)
                run_eval(spec, eval_progress)
                out.evaluated.append(f"{name}/{spec.protocol}")
        except campaign.recoverable as err:
            cause = err.error if isinstance(err, PretrainingFailed) else err
            message = campaign.failed(run, cause)
            out.failed.append(f"{name}: {message}")
            continue
        campaign.succeeded(run)
    return out
