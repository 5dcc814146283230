"""The Method contract, looped over the whole registry (MAE and every baseline), plus the
baselines' method-level invariances: teachers get no gradient and follow their schedule exactly,
SimCLR / MoCo v3 are symmetric in the two views, DINO's temperature warm-up and multi-crop."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from cli_helpers import run_cli

from baselines.dino import teacher_temperature
from baselines.ema import cosine_momentum
from mae_bench.config import RunConfig
from mae_bench.data.augment import BatchViews
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import (
    METHODS,
    Batch,
    build_method,
    method_from_checkpoint,
    resolve_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 16
SMALL_HEADS = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 24}


def _cfg(name: str, **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": "vit_micro_patch4", "img_size": IMG},
                               train={"method": name, "epochs": 2},
                               ssl={**SMALL_HEADS, **ssl})


def _batch(method, n: int = 6, seed: int = 0, step: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)
    views = [BatchViews(s, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(images, g)
             for s in method.view_specs()]
    return Batch(views, torch.full((n,), -1), torch.Generator().manual_seed(seed + 1), step, 10)


def test_registry_has_mae_and_every_baseline():
    assert {"mae", "simclr", "mocov3", "byol", "dino"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract(name):
    torch.manual_seed(0)
    method = build_method(_cfg(name), 3, IMG)
    method.train()
    batch = _batch(method)
    out = method(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())
    # every frozen parameter (teachers, fixed position embeddings) got none
    assert all(p.grad is None for p in method.parameters() if not p.requires_grad)
    # the encoder is a parameter-sharing part of the method, not a copy
    enc_ids = {id(p) for p in method.encoder.parameters()}
    assert enc_ids <= {id(p) for p in method.parameters()}

    # checkpoint round trip: plain tensors, weights_only load, same loss in a fresh instance
    buf = io.BytesIO()
    torch.save({"model": method.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["model"]
    torch.manual_seed(123)
    fresh = build_method(_cfg(name), 3, IMG)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(state)
    fresh.train()
    method.zero_grad()
    with torch.no_grad():
        again = _batch(method, seed=5)
        a = method(again)["loss"]
        b = fresh(_batch(fresh, seed=5))["loss"]
    assert torch.equal(a, b)
    assert any(not torch.equal(before[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_symmetric_in_the_two_views(name):
    torch.manual_seed(0)
    method = build_method(_cfg(name), 3, IMG).train()
    batch = _batch(method)
    swapped = Batch(batch.views[::-1], batch.labels, batch.generator)
    with torch.no_grad():
        assert torch.allclose(method(batch)["loss"], method(swapped)["loss"], atol=1e-6)


TEACHERS = {"mocov3": [("momentum_backbone", "backbone"), ("momentum_projector", "projector")],
            "byol": [("target_backbone", "backbone"), ("target_projector", "projector")],
            "dino": [("teacher_backbone", "backbone"), ("teacher_head", "head")]}


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_gets_no_gradient_and_follows_the_schedule_exactly(name):
    torch.manual_seed(0)
    method = build_method(_cfg(name), 3, IMG).train()
    assert method.teacher_pairs == TEACHERS[name]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(_batch(method))["loss"].backward()
    for teacher, _ in TEACHERS[name]:
        module = getattr(method, teacher)
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    opt.step()
    old = {t: [p.clone() for p in getattr(method, t).parameters()] for t, _ in TEACHERS[name]}
    method.on_step_end(3, 10)
    base = method.base_momentum
    # after step 3 (from 1): MoCo v3 updates before the forward of iteration 3 with m(3 / K);
    # BYOL and DINO after optimizer step 2 (from 0) with m(2 / K)
    m = cosine_momentum(3 if name == "mocov3" else 2, 10, base)
    assert base < m < 1
    for teacher, student in TEACHERS[name]:
        t_params = list(getattr(method, teacher).parameters())
        s_params = list(getattr(method, student).parameters())
        changed = 0
        for t_old, t_new, s in zip(old[teacher], t_params, s_params, strict=True):
            if s.requires_grad:
                assert torch.allclose(t_new, m * t_old + (1 - m) * s, atol=1e-6, rtol=0)
                changed += not torch.equal(t_new, t_old)
            else:  # fixed parts (position embedding, MoCo v3's frozen patch projection)
                assert torch.equal(t_new, t_old) and torch.equal(t_new, s)
        assert changed > 0


def test_teacher_starts_equal_to_the_student():
    torch.manual_seed(0)
    method = build_method(_cfg("byol"), 3, IMG)
    for t, s in zip(method.target_backbone.parameters(), method.backbone.parameters(),
                    strict=True):
        assert torch.equal(t, s)


def test_mocov3_freezes_the_patch_projection_by_default_only():
    frozen = build_method(_cfg("mocov3"), 3, IMG)
    assert not any(p.requires_grad for p in frozen.backbone.patch_embed.parameters())
    trained = build_method(_cfg("mocov3", freeze_patch_embed=False), 3, IMG)
    assert all(p.requires_grad for p in trained.backbone.patch_embed.parameters())


def test_dino_teacher_temperature_warmup():
    assert teacher_temperature(0.0, 0.04, 0.07, 10) == pytest.approx(0.04)
    # main_dino.py's np.linspace(0.04, 0.07, 10): the final value at epoch 9, not 10
    assert teacher_temperature(4.5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert teacher_temperature(5.0, 0.04, 0.07, 10) == pytest.approx(0.04 + 0.03 * 5 / 9)
    assert teacher_temperature(9.0, 0.04, 0.07, 10) == pytest.approx(0.07)
    assert teacher_temperature(10.0, 0.04, 0.07, 10) == pytest.approx(0.07)
    assert teacher_temperature(50.0, 0.04, 0.07, 10) == pytest.approx(0.07)
    assert teacher_temperature(0.0, 0.04, 0.07, 0) == pytest.approx(0.07)
    method = build_method(_cfg("dino", teacher_temp=0.07), 3, IMG).train()
    temps = [float(method(_batch(method, step=s))["teacher_temp"]) for s in (0, 10)]
    # 2 epochs, warm-up 10 % of them = 0.2 epochs; step 0 -> 0.04, the end -> 0.07
    assert temps == pytest.approx([0.04, 0.07])
    # the default (main_dino.py's): 0.04 throughout
    method = build_method(_cfg("dino"), 3, IMG).train()
    temps = [float(method(_batch(method, step=s))["teacher_temp"]) for s in (0, 10)]
    assert temps == pytest.approx([0.04, 0.04])


def test_dino_multicrop_runs_smaller_local_crops_through_the_student_only():
    torch.manual_seed(0)
    method = build_method(_cfg("dino", local_crops=2, local_crop_size=8), 3, IMG).train()
    specs = method.view_specs()
    assert [s.img_size for s in specs] == [IMG, IMG, 8, 8]
    assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
    out = method(_batch(method))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.backbone.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("center_init", ["zeros", "batch"])
def test_dino_center_moves_toward_the_teacher_mean(center_init):
    torch.manual_seed(0)
    method = build_method(_cfg("dino", center_init=center_init), 3, IMG).train()
    batch = _batch(method)
    assert torch.equal(method.loss.center, torch.zeros_like(method.loss.center))
    with torch.no_grad():
        teacher = [method.teacher_head(method.teacher_backbone.forward_features(v)[:, 0])
                   for v in batch.views[:2]]
        method(batch)
    mean = torch.cat(teacher).mean(0, keepdim=True)  # [1, K]
    # zeros (the paper): 0.9 x 0 + 0.1 x mean; batch: starts at the mean, the EMA keeps it
    expected = 0.1 * mean if center_init == "zeros" else mean
    assert torch.allclose(method.loss.center, expected, atol=1e-6)


def test_dino_freezes_the_last_layer_for_the_configured_epochs():
    method = build_method(_cfg("dino", freeze_last_layer_epochs=1.0), 3, IMG).train()
    method(_batch(method))["loss"].backward()
    last = method.head.last_layer.parametrizations.weight.original1
    assert last.grad is not None
    method.before_optimizer_step(4, 10)  # epoch 0.8 of 2: frozen
    assert last.grad is None
    method(_batch(method))["loss"].backward()
    method.before_optimizer_step(5, 10)  # epoch 1.0: trained again
    assert last.grad is not None


def test_resolve_config_fills_only_what_is_unset():
    cfg = resolve_config(RunConfig().replace(train={"method": "dino", "blr": 1e-3}))
    assert cfg.train.blr == 1e-3 and cfg.train.weight_decay == 0.04
    assert cfg.ssl.out_dim == 4096 and cfg.ssl.momentum == 0.996
    mae = resolve_config(RunConfig())
    assert (mae.train.blr, mae.train.weight_decay) == (1.5e-4, 0.05)
    assert resolve_config(cfg) == cfg


@pytest.mark.parametrize("name", ["simclr", "mocov3", "byol", "dino", "barlowtwins", "vicreg"])
def test_engine_trains_each_baseline_and_its_checkpoint_loads(tmp_path, name):
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": name, "epochs": 1, "batch_size": 32, "log_every": 1},
        ssl=SMALL_HEADS)
    result = pretrain(cfg, tmp_path / name, max_steps=3, progress=False)
    assert result.step == 3 and math.isfinite(result.final_loss)
    saved = RunConfig.from_yaml(tmp_path / name / "config.yaml")
    assert saved.train.blr is not None and saved.ssl.proj_dim == 16  # resolved, recorded
    # the method's own knobs too: its defaults, resolved into the recorded config
    own = {"barlowtwins": {"redundancy_weight": 5e-3},
           "vicreg": {"invariance_weight": 25.0, "variance_weight": 25.0,
                      "covariance_weight": 1.0}}.get(name, {})
    assert {k: getattr(saved.ssl, k) for k in own} == own
    from mae_bench.training.checkpoint import load_checkpoint

    loaded_cfg, method = method_from_checkpoint(load_checkpoint(tmp_path / name), name)
    assert loaded_cfg.train.method == name and method.encoder.embed_dim == 32


# --- what is particular to a method lives in its class ---------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_own_knobs_name_real_config_fields(name):
    """A misspelt field would switch the sweep's check off without a word."""
    fields = RunConfig().to_dict()
    for knob in METHODS[name].own_knobs:
        section, key = knob.split(".")
        assert key in fields[section], f"{name}: {knob}"


MASKED = ("mae", "simmim", "ijepa", "ibot", "data2vec2")


def test_only_the_masked_methods_own_the_mask_knobs_and_carry_them_in_rows():
    from mae_bench.app.sweep_knobs import SWEEP_KNOBS, check_method_has

    owners = {k.name: [m for m in METHODS if k.field in METHODS[m].own_knobs]
              for k in SWEEP_KNOBS.values()}  # in registry order, as the message names them
    owned = {name for name, who in owners.items() if who}
    assert owned == {"mask-ratio", "decoder-depth", "decoder-dim", "mask-strategy",
                     "norm-pix-loss", "encoder-mask-tokens", "mask-patch-size", "num-targets",
                     "target-scale", "num-masks"}
    assert owners["mask-ratio"] == ["mae", "simmim", "ibot", "data2vec2"]
    assert owners["num-targets"] == owners["target-scale"] == ["ijepa"]
    assert all(set(who) <= set(MASKED) for who in owners.values())
    for knob in owned:
        for method in owners[knob]:
            check_method_has(SWEEP_KNOBS[knob], method)
        with pytest.raises(ConfigError, match=f"^{knob} is a knob of {', '.join(owners[knob])}; "
                                              "--method byol does not have it$"):
            check_method_has(SWEEP_KNOBS[knob], "byol")
    check_method_has(SWEEP_KNOBS["epochs"], "byol")  # every method has the common knobs
    cfg = _cfg("mae").replace(mae={"mask_ratio": 0.6})
    assert METHODS["mae"].row_fields(cfg) == {"mask_ratio": 0.6}
    assert METHODS["simmim"].row_fields(cfg)["mask_ratio"] == 0.6
    assert all(METHODS[m].row_fields(cfg.replace(train={"method": m})) == {}
               for m in METHODS if m not in MASKED)
    # each masked method's own mask ratio where the user sets none
    ratios = {m: resolve_config(_cfg(m)).mae.mask_ratio for m in MASKED}
    assert ratios == {"mae": 0.75, "simmim": 0.6, "ijepa": 0.75, "ibot": 0.3, "data2vec2": 0.8}
    assert resolve_config(_cfg("simclr")).mae.mask_ratio == 0.75  # as every config before


def test_mae_checks_its_mask_ratio_once_when_built_not_every_step(monkeypatch):
    import mae_bench.methods.registry as registry
    import mae_bench.models.mae as mae_module

    calls: list[float] = []

    def counting(num_patches: int, ratio: float) -> None:
        calls.append(ratio)

    monkeypatch.setattr(registry, "validate_mask_ratio", counting)
    monkeypatch.setattr(mae_module, "validate_mask_ratio", counting)
    method = build_method(resolve_config(_cfg("mae")), 3, IMG)
    assert calls == [0.75]
    for step in range(3):
        method(_batch(method, step=step))["loss"].backward()
    assert calls == [0.75]  # the training forward runs unchecked ...
    method.mae(torch.randn(2, 3, IMG, IMG), mask_ratio=0.5)
    assert calls == [0.75, 0.5]  # ... the official forward checks a ratio given to it


# --- Barlow Twins and VICReg -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["barlowtwins", "vicreg"])
def test_barlow_twins_and_vicreg_are_symmetric_and_have_no_teacher(name):
    torch.manual_seed(0)
    method = build_method(_cfg(name), 3, IMG).train()
    assert method.teacher_pairs == []
    batch = _batch(method)
    swapped = Batch(batch.views[::-1], batch.labels, batch.generator)
    with torch.no_grad():
        assert torch.allclose(method(batch)["loss"], method(swapped)["loss"], rtol=1e-5)


def test_barlow_twins_and_vicreg_defaults_reach_their_heads_and_losses():
    barlow = resolve_config(RunConfig().replace(train={"method": "barlowtwins"}))
    assert (barlow.ssl.proj_hidden_dim, barlow.ssl.proj_dim) == (2048, 2048)
    assert barlow.ssl.redundancy_weight == 5e-3 and barlow.ssl.invariance_weight is None
    vicreg = resolve_config(RunConfig().replace(train={"method": "vicreg"}))
    assert (vicreg.ssl.invariance_weight, vicreg.ssl.variance_weight,
            vicreg.ssl.covariance_weight) == (25.0, 25.0, 1.0)
    assert vicreg.ssl.redundancy_weight is None
    method = build_method(_cfg("barlowtwins", redundancy_weight=0.02), 3, IMG)
    assert method.loss.redundancy_weight == 0.02
    # the official projectors: Linear -> BN -> ReLU twice, then a Linear without bias
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 32), (32, 16)]
    assert all(m.bias is None for m in linears)
    method = build_method(_cfg("vicreg", invariance_weight=2.0, variance_weight=3.0,
                               covariance_weight=4.0), 3, IMG)
    assert method.loss.weights == (2.0, 3.0, 4.0)
    assert method.projector[-1].bias is None and len(method.projector) == 7


def test_new_ssl_knobs_leave_the_other_methods_digests_unchanged():
    """Digests of resolved configs, measured before Barlow Twins' and VICReg's knobs existed:
    runs of the other methods are found again."""
    for method, digest in (("simclr", "f3f52572bbc8"), ("mae", "b9206bbc2ae1")):
        cfg = resolve_config(RunConfig().replace(train={"method": method}))
        assert cfg.digest() == digest, method
    barlow = resolve_config(RunConfig().replace(train={"method": "barlowtwins"}))
    assert barlow.digest() != barlow.replace(ssl={"redundancy_weight": 0.01}).digest()


@pytest.mark.parametrize("name, knobs", [
    ("barlowtwins", ["--redundancy-weight", "0.01"]),
    ("vicreg", ["--set", "ssl.variance_weight=30"]),
])
def test_cli_pretrains_barlow_twins_and_vicreg_on_digits_then_knn(monkeypatch, capsys,
                                                                  tmp_path, name, knobs):
    run = tmp_path / name
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--method", name, "--arch",
                           "vit_micro_patch2", "--img-size", "8", "--batch-size", "128",
                           "--epochs", "1", "--proj-hidden-dim", "64", "--proj-dim", "64",
                           *knobs, "--no-progress", "--out", str(run))
    assert code == 0, err
    saved = RunConfig.from_yaml(run / "config.yaml")
    assert (saved.train.method, saved.ssl.proj_dim) == (name, 64)
    assert (saved.ssl.redundancy_weight == 0.01 if name == "barlowtwins"
            else saved.ssl.variance_weight == 30.0)
    res = tmp_path / "res"
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                             str(run), "--k", "5", "--no-progress", "--results-dir", str(res),
                             "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    top1 = [r for r in rows if r["metric"] == "top1" and r.get("k") == 5]
    assert len(top1) == 1 and top1[0]["method"] == name and top1[0]["status"] == "ok"
    assert 10 < top1[0]["value"] <= 100  # percent, ten classes: above chance


@pytest.mark.parametrize("args, message", [
    (["--method", "barlowtwins", "--redundancy-weight", "0"],
     "ssl.redundancy_weight must be > 0, got 0"),
    (["--method", "vicreg", "--set", "ssl.covariance_weight=-1"],
     "ssl.covariance_weight must be > 0, got -1"),
    (["--method", "vicreg", "--invariance-weight", "0"],
     "ssl.invariance_weight must be > 0, got 0"),
])
def test_cli_refuses_non_positive_barlow_and_vicreg_weights(monkeypatch, capsys, tmp_path, args,
                                                            message):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_micro_patch2",
                           "--img-size", "8", "--no-progress", "--out", str(out_dir), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not out_dir.exists()


def test_maes_display_mask_is_the_mask_its_training_step_drops():
    """MAE draws its mask through the same ``display_mask`` hook as its siblings (what
    ``visualize`` asks of a masked method): the patches its forward drops for that noise."""
    from mae_bench.models.mae import masking_indices

    method = build_method(resolve_config(_cfg("mae")), 3, IMG)
    imgs = torch.zeros(5, 3, IMG, IMG)
    shown = method.display_mask(imgs, torch.Generator().manual_seed(4))
    noise = torch.rand(5, method.grid_size**2, generator=torch.Generator().manual_seed(4))
    want = masking_indices(noise, 0.75)[1].long().reshape(5, method.grid_size, method.grid_size)
    assert shown.dtype == torch.int64 and torch.equal(shown, want)
    assert int(shown.sum()) == 5 * (method.grid_size**2 - int(method.grid_size**2 * 0.25))
