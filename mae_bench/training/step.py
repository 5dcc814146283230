"""THE training step, shared by pretraining (``mae_bench.methods.engine``), fine-tuning, MAE's
linear probe and ``mae-bench speed``.

One optimizer step is ``accum_iter`` micro-batches. Each runs its forward under autocast (and its
loss, when given apart, in fp32 outside it), divides the loss by ``accum_iter`` and backpropagates
it (through the fp16 grad scaler when there is one); under DistributedDataParallel every
micro-batch but a step's last runs in ``no_sync()``, so gradients are all-reduced once per step.
The last micro-batch of a step then: sets the step's learning rate on every parameter group
(times the group's ``lr_scale``), calls ``before_optimizer_step``, unscales, clips the gradient
norm (optional), steps the optimizer (and the scaler), clears the gradients, and calls
``on_step_end``.

A step never waits for the device: the loss (and every other scalar the forward returns) stays a
device tensor in a buffer; ``flush`` reads the buffered steps at once (at a log line, at the end
of an epoch), averages them over processes and raises ``TrainingError`` naming the first step
whose loss is not finite.

Core layer: this module imports only torch and core modules, never the engine, methods, evals or
the app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mae_bench.errors import TrainingError
from mae_bench.training.distributed import all_reduce_mean
from mae_bench.training.runtime import autocast, set_lr, set_weight_decay

# What a forward (or its loss function) returns: the loss, or a dict with "loss" and any other
# 0-d tensors to log (a method's extra metrics).
StepOutput = Tensor | Mapping[str, Tensor]


class StepHooks(Protocol):
    """What a training step calls around the update (``mae_bench.methods.method.Method`` has
    both)."""

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Gradients of step ``step`` (0-based) are complete; nothing is clipped or updated."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Step ``step`` (counted from 1) has updated the parameters (EMA teachers follow)."""


def grad_scaler(precision: str) -> torch.amp.GradScaler | None:
    """The grad scaler a precision needs: fp16 (CUDA) has one, bf16 and fp32 none."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


class StepScalars:
    """Per-step scalars (the loss, a method's other 0-d outputs) kept as device tensors, so that
    no step syncs the device; ``flush`` reads them all at once.

    Args:
        loss_name: how the loss is named in the non-finite error ("loss", "fine-tuning loss").
        advice: what the non-finite error tells the user to do.
    """

    def __init__(self, loss_name: str = "loss",
                 advice: str = "lower the learning rate or use fp32") -> None:
        self.loss_name = loss_name
        self.advice = advice
        self._micro: dict[str, list[Tensor]] = {}  # this step's micro-batches, per key
        self._steps: dict[str, list[Tensor]] = {}  # one mean per finished step, per key
        self._last_step = 0  # number (from 1) of the last finished step

    def __len__(self) -> int:
        """Finished steps not flushed yet."""
        return len(self._steps.get("loss", ()))

    def add_micro(self, out: Mapping[str, Tensor]) -> None:
        """Keep a micro-batch's 0-d outputs (detached; no sync)."""
        for k, v in out.items():
            if v.ndim == 0:
                self._micro.setdefault(k, []).append(v.detach())

    def end_step(self, step: int) -> None:
        """Step ``step`` (from 1) is done: its value is the mean over its micro-batches."""
        for k, vs in self._micro.items():
            self._steps.setdefault(k, []).append(torch.stack(vs).float().mean())
        self._micro = {}
        self._last_step = step

    def flush(self, check: bool = True) -> dict[str, Tensor]:
        """The buffered steps' values, averaged over processes (the same on every rank, so all
        stop on a bad loss together), then emptied.

        Args:
            check: raise on a non-finite loss.

        Returns:
            key -> [S] float CPU tensor, one value per step since the last flush ({} if none).

        Raises:
            TrainingError: with ``check``, a non-finite loss; the message and ``step`` name the
                first bad step (counted from 1).
        """
        if not self._steps:
            return {}
        dev = self._steps["loss"][0].device  # NCCL reduces device tensors only
        values = {k: all_reduce_mean(torch.stack(v).to(dev)).cpu()  # [S]
                  for k, v in self._steps.items()}
        self._steps = {}
        if check:
            losses = values["loss"]  # [S]
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                first = self._last_step - len(losses) + 1 + int(bad[0])
                raise TrainingError(f"non-finite {self.loss_name} ({float(losses[bad[0]])}) at "
                                    f"step {first}; {self.advice}", step=first)
        return values


class TrainStep:
    """One optimizer step over ``accum_iter`` micro-batches (see the module docstring).

    Args:
        module: what the forward runs: the model, or its DistributedDataParallel wrapper (then
            non-final micro-batches run in ``no_sync()``). Its parameters are clipped.
        optimizer: built on the module's parameters (groups may carry an ``lr_scale``).
        lr_schedule: optimizer step (0-based) -> learning rate.
        wd_schedule: optimizer step (0-based) -> weight decay of the decayed groups; None: the
            optimizer's stays as built.
        device: where the forward runs (autocast's device type).
        precision: "fp32", "bf16" or "fp16" (resolved: not "auto").
        accum_iter: micro-batches per optimizer step.
        scaler: the fp16 grad scaler (``grad_scaler``), or None.
        clip_grad: clip the gradient norm of ``module``'s parameters to this; None: no clipping.
        hooks: ``before_optimizer_step`` / ``on_step_end`` (a ``Method``), or None.
        total_steps: the run's optimizer steps, passed to the hooks.
        step: optimizer steps already done (a resumed run).
        loss_name, advice: the words of the non-finite error (``StepScalars``).

    Attributes:
        step: optimizer steps done.
        lr: the learning rate of the last step (0.0 before the first).
        scalars: the buffered per-step scalars.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_schedule: Callable[[int], float], *, device: torch.device,
                 precision: str = "fp32", accum_iter: int = 1,
                 scaler: torch.amp.GradScaler | None = None, clip_grad: float | None = None,
                 hooks: StepHooks | None = None, total_steps: int = 1, step: int = 0,
                 loss_name: str = "loss",
                 advice: str = "lower the learning rate or use fp32",
                 wd_schedule: Callable[[int], float] | None = None) -> None:
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {accum_iter}")
        self.module, self.optimizer, self.lr_schedule = module, optimizer, lr_schedule
        self.wd_schedule = wd_schedule
        self.device, self.precision, self.accum_iter = device, precision, accum_iter
        self.scaler, self.clip_grad, self.hooks = scaler, clip_grad, hooks
        self.total_steps, self.step, self.lr = total_steps, step, 0.0
        self.scalars = StepScalars(loss_name, advice)
        self._micro = 0  # micro-batches of the current step done
        optimizer.zero_grad(set_to_none=True)  # no stale gradient reaches the first step

    def micro_batch(self, forward: Callable[[], Any],
                    loss: Callable[[Any], StepOutput] | None = None) -> bool:
        """Run one micro-batch; the last of a step's ``accum_iter`` also updates the parameters.

        Args:
            forward: runs the model under autocast; returns the loss (a 0-d tensor, or a dict
                with "loss" and other 0-d tensors to log) when ``loss`` is None, else anything.
            loss: turns ``forward``'s result into the loss (or dict) in fp32, outside autocast
                (fine-tuning's cross-entropy, the probe's fp32 head).

        Returns:
            True when this micro-batch completed an optimizer step.
        """
        self._micro += 1
        boundary = self._micro == self.accum_iter
        ddp = isinstance(self.module, nn.parallel.DistributedDataParallel)
        sync = self.module.no_sync() if ddp and not boundary else nullcontext()
        with sync:
            with autocast(self.device, self.precision):
                result = forward()
            out = _as_dict(result if loss is None else loss(result))
        scaled = out["loss"] / self.accum_iter  # [] the step's loss is the micro-batch mean
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.scalars.add_micro(out)
        if not boundary:
            return False
        self._micro = 0
        self._update()
        return True

    def _update(self) -> None:
        """The optimizer step at the end of an accumulation: lr, hooks, clip, update."""
        self.lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, self.lr)
        if self.wd_schedule is not None:
            set_weight_decay(self.optimizer, self.wd_schedule(self.step))
        if self.hooks is not None:
            self.hooks.before_optimizer_step(self.step, self.total_steps)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.hooks is not None:
            self.hooks.on_step_end(self.step, self.total_steps)
        self.scalars.end_step(self.step)

    def flush(self, check: bool = True) -> dict[str, Tensor]:
        """The per-step scalars since the last flush (``StepScalars.flush``): one device sync.

        Raises:
            TrainingError: with ``check``, a non-finite loss, naming the first bad step.
        """
        return self.scalars.flush(check)

    def check_finite(self) -> None:
        """Flush, raising ``TrainingError`` if a buffered step's loss is not finite."""
        self.flush(check=True)


def _as_dict(output: StepOutput) -> dict[str, Tensor]:
    if isinstance(output, Tensor):
        return {"loss": output}
    if "loss" not in output:
        raise KeyError(f"a training forward must return 'loss'; got keys {sorted(output)}")
    return dict(output)
