"""Training cost of a method: FLOPs per image per step (counted by torch.utils.flop_counter)
and measured images per second, with the engine's own pieces (views, method, AdamW).

``compare`` uses these for its cost columns and to give every method the same wall-clock
budget; ``mae-bench speed`` (issue 6) builds its tables on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_bench.augment import BatchViews
from mae_bench.config import RunConfig, validate
from mae_bench.data import load_dataset
from mae_bench.engine import (
    autocast,
    build_optimizer,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from mae_bench.methods import Batch, Method, build_method, resolve_config


@dataclass(frozen=True)
class TrainSpeed:
    """One method's measured training cost.

    Attributes:
        images_per_second: training throughput (forward, backward, AdamW step and the batched
            augmentation; data already in memory).
        seconds_per_step: mean wall time of one step at ``batch_size``.
        gflops_per_image: forward + backward GFLOPs per image per step (all views, teachers
            included; the optimizer update is not counted).
        batch_size: images per measured step.
        device: where it ran.
        precision: fp32 | bf16 | fp16.
    """

    images_per_second: float
    seconds_per_step: float
    gflops_per_image: float
    batch_size: int
    device: str
    precision: str


def train_step_flops(method: Method, batch: Batch) -> int:
    """FLOPs of one training step's forward and backward pass on ``batch`` (no update)."""
    counter = FlopCounterMode(display=False)
    with counter:
        method(batch)["loss"].backward()
    method.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure_training(cfg: RunConfig, steps: int = 3, warmup: int = 1,
                     flops_batch: int = 2) -> TrainSpeed:
    """Time ``steps`` training steps of ``cfg`` (after ``warmup`` untimed ones) on real batches
    of its data set, and count its FLOPs per image on a batch of ``flops_batch``.

    The method is a throwaway copy: nothing is written and no run is changed.
    """
    validate(cfg)
    cfg = resolve_config(cfg)
    t = cfg.train
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    dataset = load_dataset(cfg.data.dataset, cfg.data.split, cfg.data.data_dir)
    info = dataset.info
    img_size = cfg.model.img_size or info.img_size
    with torch.random.fork_rng(devices=[]):
        seed_everything(t.seed)
        method = build_method(cfg, info.channels, img_size).to(device).train()
        views = [BatchViews(s, info.mean, info.std) for s in method.view_specs()]
        optimizer = build_optimizer(method, t.weight_decay, device)
        gen = torch.Generator(device=device).manual_seed(t.seed)
        n = min(t.batch_size, len(dataset))

        def batch(size: int) -> Batch:
            idx = torch.randint(0, len(dataset), (size,), generator=torch.Generator())
            images, labels = _images(dataset, idx)
            images = images.to(device)
            return Batch([v(images, gen) for v in views], labels.to(device), gen, 0, 100)

        flops = train_step_flops(method, batch(flops_batch)) / flops_batch
        timed = 0.0
        for i in range(warmup + steps):
            b = batch(n)
            _sync(device)
            start = time.perf_counter()
            with autocast(device, precision):
                loss = method(b)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.on_step_end(1, 100)
            _sync(device)
            if i >= warmup:
                timed += time.perf_counter() - start
    per_step = timed / steps
    return TrainSpeed(n / per_step, per_step, flops / 1e9, n, str(device), precision)


def _images(dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "images"):  # in memory
        return dataset.images.index_select(0, idx), dataset.labels.index_select(0, idx)
    from mae_bench.augment import eval_resize

    size = dataset.info.img_size
    pairs = [dataset[int(i)] for i in idx]
    images = torch.stack([eval_resize(img.unsqueeze(0), size)[0].to(torch.uint8)
                          for img, _ in pairs])
    return images, torch.tensor([label for _, label in pairs])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
