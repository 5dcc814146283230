"""Runtime helpers every layer above the core may use without pulling in the training loop:
device and precision choice, autocast, seeding, parameter groups (one no-weight-decay rule) and
the learning-rate schedule.

Precision names (``PRECISIONS``) live in ``mae_bench.config``; ``resolve_precision`` is the one
place that turns ``auto`` into a concrete precision for a device.
"""

from __future__ import annotations

import math
import os
import platform
import random
from collections.abc import Collection, Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mae_bench.config import PRECISIONS
from mae_bench.errors import ConfigError

# --- device, precision, seeds ----------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; "
                          "use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX). Without them torch
    emulates bf16 matmuls, orders of magnitude slower than fp32, so a bf16 step loses to fp32
    (measured in results/pretrain-cpu.md, "Throughput: ViT-Tiny/4, 32 px, batch 256, per
    precision")."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def device_name(device: torch.device) -> str:
    """A readable name: the GPU's, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware runs it fast, else fp32. fp16 needs a GPU.

    Raises:
        ConfigError: an unknown name, or fp16 without a CUDA device.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        # No reason given: a grad scaler is one for training only, and this serves every
        # command (k-NN features too).
        raise ConfigError(f"--precision fp16 needs a CUDA device; on {device.type} use bf16 or "
                          "fp32")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --- optimizer and schedule ------------------------------------------------------------------


def exempt_from_weight_decay(name: str, param: Tensor, skip: Collection[str] = ()) -> bool:
    """The one rule for which parameters get no weight decay (pretraining and fine-tuning):
    vectors and scalars (norm weights, biases), anything named ``*.bias``, and the names in
    ``skip`` (a model's ``no_weight_decay()``: tokens, position embeddings)."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on weight matrices, none where
    ``exempt_from_weight_decay`` says so (biases, norm parameters, and ``no_decay_names``:
    tokens, position embeddings)."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exempt_from_weight_decay(name, p, skip):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, peak_lr: float,
          min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_epochs`` then half-cycle cosine to ``min_lr`` at the end of ``epochs``."""
    t = step / steps_per_epoch  # position in epochs
    if t < warmup_epochs:
        return peak_lr * t / warmup_epochs
    progress = (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """The weight decay of optimizer step ``step`` (0-based): a half cosine from ``start`` at
    step 0 to ``end`` at ``total_steps`` (DINO's and iBOT's ``cosine_scheduler``, I-JEPA's
    ``CosineWDSchedule``)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of the groups that decay (their first value was > 0: weight
    matrices, not biases, norms or tokens) to ``weight_decay``."""
    for group in optimizer.param_groups:
        if group.setdefault("wd_scale", 1.0 if group["weight_decay"] > 0 else 0.0):
            group["weight_decay"] = weight_decay * group["wd_scale"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to ``lr`` times the group's ``lr_scale`` (layer-wise decay;
    1 when the group has none). The one place a step's lr reaches the optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
