"""The teachers' schedules against the official code's own arrays (issue 30, point 5): the EMA
momentum after every optimizer step of a whole small run (BYOL: deepmind's ``target_ema``; DINO:
``cosine_scheduler`` of its utils.py; MoCo v3: ``adjust_moco_momentum``), DINO's teacher
temperature at every epoch (main_dino.py's ``np.linspace`` warm-up), and BYOL's heads as
deepmind's ``networks.MLP`` (no output bias) with old runs still loading.

The reference arrays are written here as the official code builds them, in numpy, and compared
with what the engine actually applied (a spy on ``ema_update`` and on the DINO loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import baselines.base
from baselines.dino import teacher_temperature
from baselines.ema import ema_update, momentum_after_step
from baselines.losses import DINOLoss
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import build_method, method_from_checkpoint
from mae_bench.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_HEADS = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 24}


# --- the official schedules, as the official code builds them ---------------------------------


def deepmind_target_ema(global_step: int, base_ema: float, max_steps: int) -> float:
    """byol/utils/schedules.py: 1 - (1 - base) * cosine_decay(global_step)."""
    decay = 0.5 * (1 + np.cos(np.pi * min(global_step, max_steps) / max_steps))
    return float(1.0 - (1.0 - base_ema) * decay)


def dino_cosine_scheduler(base_value: float, final_value: float, epochs: int,
                          niter_per_ep: int) -> np.ndarray:
    """dino/utils.py's cosine_scheduler without warm-up (the momentum schedule's call)."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def dino_teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                               warmup_epochs: int, nepochs: int) -> np.ndarray:
    """main_dino.py's DINOLoss.teacher_temp_schedule, indexed by epoch."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))


def moco_v3_momentum(epoch: float, epochs: int, moco_m: float) -> float:
    """moco-v3 main_moco.py's adjust_moco_momentum (epoch fractional: epoch + i / iters)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


# --- pure functions -----------------------------------------------------------------------------


def test_momentum_after_each_step_is_deepmind_and_dino_arrays():
    total = 10
    ours = [momentum_after_step(k, total, 0.996, before_forward=False) for k in range(1, 11)]
    deepmind = [deepmind_target_ema(i, 0.996, total) for i in range(total)]
    dino = dino_cosine_scheduler(0.996, 1.0, epochs=2, niter_per_ep=5)
    np.testing.assert_allclose(ours, deepmind, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, dino, rtol=0, atol=1e-12)
    assert ours[0] == 0.996  # the first update uses the base momentum itself
    assert ours[-1] < 1 - 1e-5  # the last one still moves the teacher


def test_moco_v3_momentum_after_step_k_is_the_one_of_iteration_k():
    """MoCo v3 updates at the start of iteration i (before the forward): after i steps."""
    iters_per_epoch, epochs = 4, 3
    total = iters_per_epoch * epochs
    for k in range(1, total):
        official = moco_v3_momentum(k / iters_per_epoch, epochs, 0.99)
        assert abs(momentum_after_step(k, total, 0.99, before_forward=True) - official) < 1e-12
    assert momentum_after_step(total, total, 0.99, before_forward=True) == 1.0  # a no-op


@pytest.mark.parametrize("warmup,nepochs", [(30, 100), (10, 12), (3, 3), (2, 5), (1, 4),
                                            (0, 4)])
def test_teacher_temperature_at_every_epoch_is_main_dino_array(warmup, nepochs):
    official = dino_teacher_temp_schedule(0.04, 0.07, warmup, nepochs)
    ours = [teacher_temperature(float(e), 0.04, 0.07, warmup) for e in range(nepochs)]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)


def test_teacher_temperature_reaches_the_final_value_at_epoch_w_minus_1():
    assert abs(teacher_temperature(29.0, 0.04, 0.07, 30) - 0.07) < 1e-12  # not 0.069
    # within an epoch: between the two epochs' official values, linearly
    official = dino_teacher_temp_schedule(0.04, 0.07, 30, 40)
    mid = teacher_temperature(10.5, 0.04, 0.07, 30)
    assert abs(mid - (official[10] + official[11]) / 2) < 1e-12
    # a fractional warm-up shorter than an epoch still ramps over its own length
    assert teacher_temperature(0.1, 0.04, 0.07, 0.2) == pytest.approx(0.055)
    assert teacher_temperature(0.2, 0.04, 0.07, 0.2) == 0.07


# --- a whole small run through the engine -------------------------------------------------------


def _run(tmp_path, monkeypatch, method: str, epochs: int, **ssl) -> tuple[list[float], int]:
    """Pretrain a whole tiny run; return the momentum of every EMA update and the steps."""
    momenta: list[float] = []

    def spy(target, online, momentum):
        momenta.append(momentum)
        ema_update(target, online, momentum)

    monkeypatch.setattr(baselines.base, "ema_update", spy)
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": method, "epochs": epochs, "batch_size": 256, "log_every": 1000},
        ssl={**SMALL_HEADS, **ssl})
    result = pretrain(cfg, tmp_path / method, progress=False)
    pairs = len(build_method(cfg, 1, 8).teacher_pairs)
    assert len(momenta) == pairs * result.step
    return momenta[::pairs], result.step


@pytest.mark.parametrize("name,base", [("byol", 0.996), ("dino", 0.996)])
def test_engine_run_applies_the_official_momentum_array(tmp_path, monkeypatch, name, base):
    momenta, total = _run(tmp_path, monkeypatch, name, epochs=2)
    assert total >= 4
    deepmind = [deepmind_target_ema(i, base, total) for i in range(total)]
    np.testing.assert_allclose(momenta, deepmind, rtol=0, atol=1e-12)
    np.testing.assert_allclose(momenta, dino_cosine_scheduler(base, 1.0, 2, total // 2),
                               rtol=0, atol=1e-12)


def test_engine_run_applies_moco_v3s_momentum(tmp_path, monkeypatch):
    momenta, total = _run(tmp_path, monkeypatch, "mocov3", epochs=2)
    per_epoch = total // 2
    official = [moco_v3_momentum(k / per_epoch, 2, 0.99) for k in range(1, total)]
    np.testing.assert_allclose(momenta[:-1], official, rtol=0, atol=1e-12)
    assert momenta[-1] == 1.0


def test_engine_run_applies_main_dinos_teacher_temperature_per_epoch(tmp_path, monkeypatch):
    temps: list[float] = []
    forward = DINOLoss.forward

    def spy(self, student, teacher, temp):
        temps.append(temp)
        return forward(self, student, teacher, temp)

    monkeypatch.setattr(DINOLoss, "forward", spy)
    epochs, warmup = 4, 3
    _, total = _run(tmp_path, monkeypatch, "dino", epochs=epochs, teacher_temp=0.07,
                    warmup_teacher_temp=0.04, teacher_temp_warmup_epochs=float(warmup))
    assert len(temps) == total and total % epochs == 0
    per_epoch = total // epochs
    official = dino_teacher_temp_schedule(0.04, 0.07, warmup, epochs)
    at_epoch_start = temps[::per_epoch]
    np.testing.assert_allclose(at_epoch_start, official, rtol=0, atol=1e-12)
    # within an epoch: never outside the two official values, never going down
    assert all(b >= a for a, b in zip(temps, temps[1:], strict=False))
    assert max(temps) == 0.07


# --- BYOL's heads: deepmind's MLP, and runs from before still load ---------------------------


def _byol_cfg(**ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": "vit_micro_patch4", "img_size": 16},
                               train={"method": "byol", "epochs": 2},
                               ssl={"proj_hidden_dim": 32, "proj_dim": 16, **ssl})


def test_byol_heads_have_no_output_bias_by_default():
    method = build_method(_byol_cfg(), 3, 16)
    for name in ("projector", "predictor", "target_projector"):
        head = getattr(method, name)
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert head[-1].bias is None and head[0].bias is None, name
    old = build_method(_byol_cfg(head_output_bias=True), 3, 16)
    assert old.projector[-1].bias is not None and old.predictor[-1].bias is not None


def test_byol_old_config_keeps_its_digest():
    """Measured on the code before ``ssl.head_output_bias`` existed, for this resolved config."""
    old = _byol_cfg(momentum=0.996).replace(
        train={"blr": 1.5e-4, "weight_decay": 0.1, "lr_scaling": "sqrt", "lr_ref_batch": 4096})
    assert old.digest() == "18ed6fcea484"
    assert old.replace(ssl={"head_output_bias": False}).digest() != "18ed6fcea484"


def test_byol_run_from_before_the_knob_loads_for_eval_and_refuses_resume(tmp_path):
    run = tmp_path / "byol"
    new = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": "byol", "epochs": 1, "batch_size": 32, "log_every": 1},
        ssl=SMALL_HEADS)
    pretrain(new.replace(ssl={"head_output_bias": True}), run, max_steps=1, progress=False)
    ckpt = load_checkpoint(run)
    del ckpt["config"]["ssl"]["head_output_bias"]  # as a run written before the knob
    assert "projector.3.bias" in ckpt["model"]
    save_checkpoint(run, ckpt)

    loaded_cfg, method = method_from_checkpoint(load_checkpoint(run), str(run))
    assert loaded_cfg.ssl.head_output_bias is None
    torch.testing.assert_close(method.projector[3].bias, ckpt["model"]["projector.3.bias"])
    assert not method.target_projector[3].bias.requires_grad
    assert method.predictor[3].bias.requires_grad

    # No option brings the old heads back, so the message says what the run can still do.
    with pytest.raises(ConfigError, match=r"made before ssl\.head_output_bias existed "
                       r"\(ssl\.head_output_bias: None -> False\); this version cannot resume "
                       r"it: evaluate or export it"):
        pretrain(new, run, progress=False)


# --- the weight-decay schedule (train.weight_decay_end: DINO, iBOT, I-JEPA) ----------------------


def test_engine_run_applies_dinos_weight_decay_array_to_the_decayed_groups_only(tmp_path,
                                                                              monkeypatch):
    """dino/utils.py: wd_schedule = cosine_scheduler(weight_decay, weight_decay_end, epochs,
    niter_per_ep), applied to the regularized param group at iteration ``it``; the
    not-regularized group (biases, norms, tokens) keeps 0."""
    import mae_bench.training.step as step_module

    seen: list[tuple[float, ...]] = []
    original = step_module.set_weight_decay

    def spy(optimizer, weight_decay):
        original(optimizer, weight_decay)
        seen.append(tuple(g["weight_decay"] for g in optimizer.param_groups))

    monkeypatch.setattr(step_module, "set_weight_decay", spy)
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": "dino", "epochs": 2, "batch_size": 256, "log_every": 1000,
               "weight_decay": 0.04, "weight_decay_end": 0.4},
        ssl=SMALL_HEADS)
    result = pretrain(cfg, tmp_path / "dino", progress=False)
    total = result.step
    assert total >= 4 and len(seen) == total
    official = dino_cosine_scheduler(0.04, 0.4, 2, total // 2)
    np.testing.assert_allclose([s[0] for s in seen], official, rtol=0, atol=1e-12)
    assert all(s[1] == 0.0 for s in seen)  # the no-decay group


def test_without_weight_decay_end_the_weight_decay_stays_as_built(tmp_path, monkeypatch):
    import mae_bench.training.step as step_module

    calls: list[float] = []
    monkeypatch.setattr(step_module, "set_weight_decay", lambda o, wd: calls.append(wd))
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": "dino", "epochs": 1, "batch_size": 256, "log_every": 1000},
        ssl=SMALL_HEADS)
    pretrain(cfg, tmp_path / "dino", progress=False)
    assert calls == []
    assert RunConfig().replace(train={"weight_decay_end": None}).digest() == "a620a7f83f88"


def test_a_negative_weight_decay_end_is_one_error_line():
    from mae_bench.config import validate

    with pytest.raises(ConfigError, match=r"^--weight-decay-end must be >= 0, got -0.1$"):
        validate(RunConfig().replace(train={"weight_decay_end": -0.1}))
