"""The contract of what watches a pretraining while it runs (the methods layer's side).

The one training loop (``mae_bench.methods.engine``) calls a ``Monitor`` every ``every``
optimizer steps and at the run's last step, between two steps, with the method it trains. The
monitor measures what it likes (``evals/online.py``: an online linear classifier, a k-NN monitor
and representation health on fixed subsets of the train and test splits) without touching the
method's parameters, gradients, BatchNorm statistics, mode or random streams, and returns
scalars that the loop writes into that step's ``metrics.jsonl`` row, TensorBoard and the
progress line. ``collapse`` says, in words, when the values show a collapsed representation:
the loop prints one ``warning:`` line, records the step in ``summary.json`` and stops only
when the run asked (``--stop-on-collapse``). A monitor's own state (a classifier's weights)
travels in the checkpoint, so a resumed run measures exactly what an uninterrupted one does.

It is a contract here, implemented a layer up (protocols: k-NN and features live there), and
handed to ``pretrain`` by the application.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from mae_bench.methods.method import Method


class Monitor(abc.ABC):
    """Measures a method between optimizer steps; see the module docstring."""

    every: int = 1  # optimizer steps between measurements (and the last step)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the loop measures after optimizer step ``step`` (counted from 1): a pure
        function of the step, so a resumed run measures at the same steps."""
        return step % self.every == 0 or step == total_steps

    def start(self, *, device: torch.device, precision: str, img_size: int,
              steps_per_epoch: int, images_per_epoch: int) -> None:
        """Called once before training with where and how the run trains (this process's
        device under torchrun) and its plan: a monitor that measures in whole epochs sets
        ``every`` here."""
        return

    def observe(self, method: Method, labels: torch.Tensor) -> None:
        """After every micro-batch's forward: what the method computed on it
        (``method.train_features``) and the batch's labels [N] (-1: unknown)."""
        return

    @abc.abstractmethod
    def measure(self, method: Method, step: int) -> dict[str, float]:
        """Scalars for the metrics row of optimizer step ``step``."""

    def collapse(self, values: dict[str, float]) -> str | None:
        """Why ``values`` show a collapsed representation, in words; None when they do not."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (a resumed run)."""
        return
