"""Contrastive and self-distillation baselines (SimCLR, MoCo v3, BYOL, DINO): one Method per file.

They implement the Method contract (``mae_bench.methods.method``) and plug into the same
engine as MAE; ``mae_bench.methods.registry.METHODS`` is the one place that registers them.
Shared pieces: ``heads``
(MLP / DINO heads), ``losses``, ``ema`` (teacher momentum), ``views`` (the augmentation recipes).

Learning rate: each recipe was made at a large batch (MoCo v3's ViT recipe, used by SimCLR, MoCo
v3 and BYOL here: blr 1.5e-4 at 4,096; DINO: blr 5e-4 at 1,024). The baselines carry that lr to
the run's batch by the square-root rule (``lr_scaling: sqrt``, ``lr_ref_batch``; see
``mae_bench.config.peak_lr``), the rule for Adam-type optimisers (Malladi et al. 2022): the
linear rule leaves a batch of 128 a 32nd of MoCo v3's lr, which a run of a few hundred steps
never recovers from (BYOL on CIFAR-10 with both rules: results/compare-cifar10.md, "Second
pass"). ``--lr`` or ``train.lr_scaling: linear`` restores the papers' rule.
"""
