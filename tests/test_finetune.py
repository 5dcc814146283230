"""Fine-tuning: layer-wise lr decay groups, partial freezing, the schedule actually applied, and
short runs on the embedded digits set (8 px, 10 classes) with a depth-2 micro ViT."""

from __future__ import annotations

import math

import pytest
import torch
from recipe_helpers import run_finetune as finetune
from torch.optim.optimizer import register_optimizer_step_pre_hook

from evals.finetune import freeze_for_partial, layer_id, param_groups_lrd
from mae_bench.data import load_dataset
from mae_bench.errors import ConfigError, DataError, TrainingError
from mae_bench.models.vit import build_vit
from mae_bench.training.runtime import exempt_from_weight_decay, lr_at, param_groups

DEPTH = 2  # vit_micro_patch2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def micro(seed: int = 0):
    torch.manual_seed(seed)
    model = build_vit("vit_micro_patch2", img_size=8, in_chans=1, num_classes=10,
                      global_pool="avg", drop_path_rate=0.1)
    assert len(model.blocks) == DEPTH
    return model


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# A run small enough for a test: 256 images, 8 steps of 32.
QUICK = {"epochs": 1, "batch_size": 32, "train_indices": torch.arange(256)}


def test_layer_id():
    assert [layer_id(n, DEPTH) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                         "blocks.0.norm1.weight", "blocks.1.mlp.fc2.bias",
                                         "fc_norm.weight", "norm.bias", "head.weight")] == \
        [0, 0, 0, 1, 2, 3, 3, 3]
    assert layer_id("blocks.11.attn.qkv.weight", 12) == 12


def test_param_groups_lrd_scales_and_decay():
    model = micro()
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75)
    # Hand-computed scales for depth 2: 0.75 ** (3 - layer).
    expected_scale = {"patch_embed": 0.421875, "cls_token": 0.421875, "blocks.0": 0.5625,
                      "blocks.1": 0.75, "fc_norm": 1.0, "head": 1.0}
    where: dict[str, dict] = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            assert name not in where, f"{name} is in two groups"
            where[name] = g
    assert "pos_embed" not in where  # fixed sin-cos embedding: not trained
    assert set(where) == trainable(model) == {n for n, _ in model.named_parameters()} - {
        "pos_embed"}
    # Each trainable tensor exactly once, by identity.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    for name, g in where.items():
        prefix = next(k for k in expected_scale if name.startswith(k))
        assert g["lr_scale"] == pytest.approx(expected_scale[prefix]), name
    no_decay = {n for n, g in where.items() if g["weight_decay"] == 0.0}
    assert no_decay == {n for n, p in model.named_parameters()
                        if p.requires_grad and (p.ndim == 1 or n == "cls_token")}
    assert {"cls_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "head.bias",
            "fc_norm.weight"} <= no_decay
    assert where["blocks.1.attn.qkv.weight"]["weight_decay"] == 0.05
    assert where["patch_embed.proj.weight"]["weight_decay"] == 0.05
    assert len(groups) == 2 * (DEPTH + 2)  # every layer has weights and biases


def test_fine_tuning_and_pretraining_share_one_no_weight_decay_rule():
    model = micro()
    decay, no_decay = param_groups(model, 0.05, model.no_weight_decay())
    pretrain_exempt = {id(p) for p in no_decay["params"]}
    finetune_exempt = {id(p) for g in param_groups_lrd(model, 0.05) if g["weight_decay"] == 0.0
                       for p in g["params"]}
    assert finetune_exempt == pretrain_exempt
    assert len(decay["params"]) > 0 and len(no_decay["params"]) > 0
    # a 2-D ".bias" and a 0-d parameter are exempt too; a plain matrix is not
    rule = exempt_from_weight_decay
    assert rule("x.bias", torch.zeros(2, 2)) and rule("scale", torch.zeros(()))
    assert rule("cls_token", torch.zeros(1, 1, 4), {"cls_token"})
    assert not rule("blocks.0.attn.qkv.weight", torch.zeros(4, 4))


def test_freeze_for_partial():
    model = micro()
    freeze_for_partial(model, 1)
    assert trainable(model) == {n for n, _ in model.named_parameters()
                                if n.startswith(("blocks.1.", "fc_norm.", "head."))}
    groups = param_groups_lrd(model, 0.05)
    assert {n for g in groups for n in g["param_names"]} == trainable(model)
    freeze_for_partial(model, 0)
    assert trainable(model) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    freeze_for_partial(model, DEPTH)  # = full fine-tuning; unfreezes again
    assert trainable(model) == {n for n, _ in model.named_parameters()} - {"pos_embed"}
    for bad in (-1, DEPTH + 1):
        with pytest.raises(ConfigError, match=rf"must be in 0\.\.2 .* got {bad}$"):
            freeze_for_partial(model, bad)


def test_partial_finetune_trains_only_the_last_block(digits):
    model = micro()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = finetune(model, *digits, partial_blocks=1, **QUICK)
    assert math.isfinite(out["top1"]) and math.isfinite(out["train_loss"])
    for name, p in model.named_parameters():
        if name.startswith(("blocks.1.", "fc_norm.", "head.")):
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_finetune_learns_digits(digits):
    # No augmentation and a constant lr: a randomly initialised ViT leaves its initial plateau
    # within two epochs (measured over seeds 0-4: top-1 39-58 %).
    out = finetune(micro(), *digits, epochs=2, batch_size=16, lr=1e-3, min_lr=1e-3,
                   warmup_epochs=0, mixup=0.0, cutmix=0.0, crop_scale=(1.0, 1.0), hflip=0.0)
    assert set(out) == {"top1", "top5", "train_loss", "train_seconds", "epochs"}
    assert out["top1"] > 25.0  # chance: 10 %
    assert out["top1"] <= out["top5"] <= 100.0
    assert out["train_loss"] < 2.25  # chance: ln 10 = 2.30
    assert out["epochs"] == 2.0 and out["train_seconds"] > 0


def test_finetune_same_seed_same_result(digits):
    # The default recipe: Mixup + CutMix (numpy / random RNG), crops, drop path (torch RNG).
    runs = []
    for seed in (0, 0, 1):
        model = micro()
        out = finetune(model, *digits, seed=seed, **QUICK)
        runs.append((out, model.state_dict()))
    (a, sa), (b, sb), (c, _) = runs
    assert all(math.isfinite(v) for v in a.values())
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert a["train_loss"] == b["train_loss"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert c["train_loss"] != a["train_loss"]  # the seed matters


def test_lr_schedule_applied(digits):
    seen: list[list[tuple[float, float]]] = []

    def record(optimizer, args, kwargs):
        seen.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        finetune(micro(), *digits, epochs=2, batch_size=32, blr=2e-3, min_lr=1e-5,
                 train_indices=torch.arange(128))
    finally:
        handle.remove()
    steps_per_epoch, epochs = 128 // 32, 2
    assert len(seen) == steps_per_epoch * epochs
    peak = 2e-3 * 32 / 256
    warmup = 1 / steps_per_epoch  # 5 % of 2 epochs is under one step: one step of warmup
    for step, groups in enumerate(seen):
        want = lr_at(step, steps_per_epoch, epochs, warmup, peak, 1e-5)
        for lr, scale in groups:
            assert lr == pytest.approx(want * scale, rel=1e-12, abs=1e-15)
    assert seen[0][0][0] == 0.0  # warmup starts at 0
    assert seen[1][-1][0] == pytest.approx(peak)  # head group at full peak after warmup
    assert {s for _, s in seen[1]} == {0.75**3, 0.75**2, 0.75, 1.0}


def test_nonfinite_loss_names_the_step(digits):
    model = micro()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite fine-tuning loss \(nan\) at step 1; ") \
            as err:
        finetune(model, *digits, **QUICK)
    assert err.value.step == 1  # counted from 1, as pretraining counts


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"batch_size": 1, "mixup": 0.0, "cutmix": 0.0}, "batch_size must be >= 2, got 1"),
    ({"batch_size": 33}, "batch_size 33 is odd"),
    ({"batch_size": 512}, "256 training images are fewer than one batch of 512"),
    ({"layer_decay": 0.0}, r"layer_decay must be in \(0, 1\], got 0.0"),
    ({"img_size": 16}, "img_size 16 differs from the model's 8"),
    ({"partial_blocks": 3}, r"must be in 0\.\.2 .* got 3"),
    ({"erase": 1.5}, r"erase must be a probability in \[0, 1\], got 1.5"),
    ({"rand_augment": "rand-m11"}, r"RandAugment policy 'rand-m11': m must be in 0..10"),
    ({"precision": "fp8"}, "unknown precision 'fp8'; valid: auto, bf16, fp16, fp32"),
    ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"),
])
def test_bad_arguments(digits, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        finetune(micro(), *digits, **{**QUICK, **kwargs})


def test_bad_train_indices(digits):
    with pytest.raises(DataError, match=r"train_indices must lie in 0\.\.1436"):
        finetune(micro(), *digits, epochs=1, batch_size=2, train_indices=torch.tensor([0, 5000]))


def test_head_bn_standardises_the_pooled_features_before_the_head(digits):
    """The recipe's head BatchNorm (no affine) sits between fc_norm and the head: in training
    each feature of a batch has mean 0 and variance 1 at the head's input."""
    from torch import nn

    model = micro()
    dim = model.embed_dim
    seen = []
    model.head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    finetune(model, digits[0], digits[1], epochs=1, batch_size=64, mixup=0, cutmix=0,
             crop_scale=(1, 1), head_bn=True, train_indices=torch.arange(128))
    bn = [m for m in model.fc_norm.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == 1 and not bn[0].affine
    first = seen[0]  # the first training batch: [64, 32]
    assert first.shape == (64, dim)
    assert torch.allclose(first.float().mean(0), torch.zeros(dim), atol=2e-2)
    assert torch.allclose(first.float().var(0, unbiased=False), torch.ones(dim), atol=5e-2)


def test_random_erasing_reaches_the_training_batches(digits, monkeypatch):
    import evals.finetune as ft

    seen = []
    real = ft.random_erasing

    def spy(x, p, generator):
        before = x.clone()
        out = real(x, p, generator)
        seen.append(float((out != before).flatten(1).any(dim=1).float().mean()))
        return out

    monkeypatch.setattr(ft, "random_erasing", spy)
    finetune(micro(), *digits, **{**QUICK, "erase": 1.0})
    assert len(seen) == 256 // 32  # every step's batch went through it
    assert min(seen) > 0.9  # p = 1: (nearly) every image of every batch erased


def test_rand_augment_reaches_the_training_batches(digits, monkeypatch):
    import mae_bench.data.augment as augment

    seen = []
    real = augment.rand_augment

    def spy(x, spec, fill, generator):
        out = real(x, spec, fill, generator)
        seen.append((spec.name(), float((out != x).flatten(1).any(dim=1).float().mean())))
        return out

    monkeypatch.setattr(augment, "rand_augment", spy)
    finetune(micro(), *digits, **{**QUICK, "rand_augment": "rand-m9-n1-p1-inc1"})
    assert len(seen) == 256 // 32  # every step's batch went through it
    assert {name for name, _ in seen} == {"rand-m9-mstd0-n1-p1-inc1"}
    assert sum(changed for _, changed in seen) / len(seen) > 0.6  # p = 1: most images changed
