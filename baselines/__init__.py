"""Contrastive and self-distillation baselines (SimCLR, MoCo v3, BYOL, DINO): one Method per file.

They plug into the same engine and Method registry as MAE (see mae_bench/methods.py); importing
this package registers them. Shared pieces: ``heads`` (MLP / DINO heads), ``losses``, ``ema``
(teacher momentum), ``views`` (the augmentation recipes).
"""

from baselines import byol, dino, mocov3, simclr  # noqa: F401  (registration)
