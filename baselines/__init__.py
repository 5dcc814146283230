"""Contrastive and self-distillation baselines (SimCLR, MoCo v3, BYOL, DINO): one Method per file.

They plug into the same engine and Method registry as MAE (see mae_bench/methods.py).
"""
