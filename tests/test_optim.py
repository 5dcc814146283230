"""The recipes' optimizers (``mae_bench/training/optim.py``): LARS against hand-written references
of solo-learn's ``solo/utils/lars.py`` and MAE's ``util/lars.py`` and against lightly 1.6.0's
LARS on identical tensors, zero norms, SGD against torch's, the knobs ``resolve_config`` records,
the CLI's one-line refusals, and a LARS run that resumes exactly."""

import copy
import json
import math

import pytest
import torch
import yaml
from cli_helpers import run_cli
from torch import Tensor, nn

from evals.lars import LARS as mae_probe_lars
from evals.lars import MAE_PROBE_OPTIONS
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import resolve_config
from mae_bench.training.checkpoint import load_checkpoint
from mae_bench.training.optim import LARS, build_optimizer
from mae_bench.training.runtime import param_groups, set_lr

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# a matrix, a convolution kernel, a bias and a norm weight; float64 so references agree to 1e-12
SHAPES = [(4, 3), (2, 3, 3, 3), (4,), (3,)]
# lr 0 (the first warmup step), then steps where clipping binds (1e-3) and where it does not (0.5)
LRS = [0.0, 0.5, 1e-3, 0.2, 0.05]


def _rand(seed: int, *shape: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _params() -> list[Tensor]:
    return [_rand(i, *s) for i, s in enumerate(SHAPES)]


def _grads(step: int) -> list[Tensor]:
    return [_rand(100 + 10 * step + i, *s) for i, s in enumerate(SHAPES)]


def _run(opt_params: list[nn.Parameter], opt: torch.optim.Optimizer) -> list[Tensor]:
    """Step ``opt`` through LRS with _grads; the parameters after the last step."""
    for step, lr in enumerate(LRS):
        for p, g in zip(opt_params, _grads(step), strict=True):
            p.grad = g.clone()
        set_lr(opt, lr)
        opt.step()
    return [p.detach().clone() for p in opt_params]


# ------------------------------------------------------ references, written from their sources


def solo_reference(wd: float, eta: float, clip: bool, exclude: bool, momentum: float = 0.9,
                   eps: float = 1e-8) -> list[Tensor]:
    """solo-learn's LARS (from Lightning Bolts), written out with Python control flow: the ratio
    eta ||p|| / (||g|| + wd ||p|| + eps), only when both norms are non-zero (and then with weight
    decay), clipped as min(ratio / lr, 1); vectors skipped when ``exclude``; momentum buffer
    started at the first update."""
    ps, bufs = _params(), [None] * len(SHAPES)
    for step, lr in enumerate(LRS):
        for i, (p, g) in enumerate(zip(ps, _grads(step), strict=True)):
            d = g
            if p.ndim != 1 or not exclude:
                p_norm, g_norm = p.norm().item(), g.norm().item()
                if p_norm != 0 and g_norm != 0:
                    ratio = eta * p_norm / (g_norm + p_norm * wd + eps)
                    if clip:
                        ratio = min(ratio / lr if lr else math.inf, 1.0)
                    d = (g + wd * p) * ratio
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            ps[i] = p - lr * bufs[i]
    return ps


def mae_reference(wd: float, eta: float, momentum: float = 0.9) -> list[Tensor]:
    """MAE's util/lars.py: matrices get u = g + wd p scaled by eta ||p|| / ||u|| (1 at a zero
    norm), vectors plain SGD; the buffer starts at zero."""
    ps = _params()
    bufs = [torch.zeros_like(p) for p in ps]
    for step, lr in enumerate(LRS):
        for i, (p, g) in enumerate(zip(ps, _grads(step), strict=True)):
            u = g
            if p.ndim > 1:
                u = g + wd * p
                p_norm, u_norm = p.norm().item(), u.norm().item()
                u = u * (eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
            bufs[i] = momentum * bufs[i] + u
            ps[i] = p - lr * bufs[i]
    return ps


def _assert_close(got: list[Tensor], want: list[Tensor]) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"parameter {i}")


# ---------------------------------------------------------------------------------- LARS


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("clip", [True, False])
def test_lars_equals_solo_learn_formula(clip, exclude, wd):
    params = [nn.Parameter(p) for p in _params()]
    opt = LARS([{"params": params, "weight_decay": wd}], eta=0.02, clip_lr=clip,
               exclude_bias_n_norm=exclude)
    got = _run(params, opt)
    _assert_close(got, solo_reference(wd, 0.02, clip, exclude))
    # every parameter moved
    assert not any(torch.equal(a, b) for a, b in zip(got, _params(), strict=True))


def test_clipping_and_exclusion_change_the_update():
    """The options are not no-ops on these tensors (else the test above proves little)."""
    base = solo_reference(0.1, 0.02, clip=True, exclude=True)
    for other in (solo_reference(0.1, 0.02, clip=False, exclude=True),
                  solo_reference(0.1, 0.02, clip=True, exclude=False)):
        assert not torch.allclose(base[0], other[0]) or not torch.allclose(base[2], other[2])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_mae_probe_variant_equals_mae_formula(wd):
    a = [nn.Parameter(p) for p in _params()]
    b = [nn.Parameter(p) for p in _params()]
    got_probe = _run(a, mae_probe_lars(a, weight_decay=wd, momentum=0.9, trust_coefficient=0.001))
    got_core = _run(b, LARS(b, weight_decay=wd, eta=0.001, **MAE_PROBE_OPTIONS))
    want = mae_reference(wd, 0.001)
    _assert_close(got_probe, want)
    _assert_close(got_core, want)
    assert type(mae_probe_lars(a)) is LARS  # one LARS class


def test_mae_and_solo_ratios_differ_under_weight_decay():
    # ||g + wd p|| < ||g|| + wd ||p||: the two variants are different optimizers
    mae, solo = mae_reference(0.1, 0.02), solo_reference(0.1, 0.02, clip=False, exclude=True)
    assert not torch.allclose(mae[0], solo[0])


def test_lars_equals_lightly_on_a_models_param_groups():
    """lightly 1.6.0's LARS skips the ratio on groups with weight decay 0; on param_groups'
    split (matrices decayed, biases and norms not) that is exclude_bias_n_norm, unclipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    twin = copy.deepcopy(model)
    cfg = RunConfig().replace(train={"optimizer": "lars", "weight_decay": 1e-3,
                                     "lars_eta": 0.02, "lars_clip_lr": False}).train
    ours = build_optimizer(model, cfg, CPU)
    from lightly.utils.lars import LARS as LightlyLARS  # test-only reference

    theirs = LightlyLARS(param_groups(twin, 1e-3), lr=0.0, momentum=0.9, trust_coefficient=0.02)
    x = _rand(7, 8, 2, 6, 6)
    for lr in (0.0, 0.3, 0.1, 0.05):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            set_lr(opt, lr)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_zero_norms_give_finite_steps_as_each_reference():
    zero = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    still = nn.Parameter(torch.full((2, 3), 2.0, dtype=torch.float64))  # its gradient is 0
    for trust_norm, eps in (("sum", 1e-8), ("update", 0.0)):
        z, s = nn.Parameter(zero.detach().clone()), nn.Parameter(still.detach().clone())
        opt = LARS([z, s], lr=0.1, weight_decay=0.5, eta=0.02, trust_norm=trust_norm, eps=eps)
        z.grad, s.grad = torch.ones_like(z), torch.zeros_like(s)
        opt.step()
        # ||p|| = 0: ratio 1, a plain SGD step (not 0, which would freeze it forever)
        assert torch.equal(z.detach(), torch.full((2, 3), -0.1, dtype=torch.float64))
        if trust_norm == "sum":  # solo-learn: ||g|| = 0 skips weight decay too, no step
            assert torch.equal(s.detach(), still.detach())
        else:  # MAE: u = wd p, ratio eta / wd, so p -= lr eta p
            torch.testing.assert_close(s.detach(), still.detach() * (1 - 0.1 * 0.02))


def test_lars_follows_the_groups_lr_scale():
    """The engine sets lr through set_lr (times a group's lr_scale); clipping uses that lr."""
    a = [nn.Parameter(p) for p in _params()]
    b = [nn.Parameter(p) for p in _params()]
    scaled = LARS([{"params": a, "lr_scale": 0.25}], eta=0.02, clip_lr=True)
    plain = LARS(b, eta=0.02, clip_lr=True)
    for step, lr in enumerate(LRS):
        for params in (a, b):
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = g.clone()
        set_lr(scaled, lr)
        set_lr(plain, lr * 0.25)
        scaled.step()
        plain.step()
    _assert_close([p.detach() for p in a], [p.detach() for p in b])


@pytest.mark.parametrize("kwargs, bad", [({"eta": 0.0}, "eta=0.0"), ({"eta": -1.0}, "eta=-1.0"),
                                         ({"momentum": 1.0}, "momentum=1.0"),
                                         ({"trust_norm": "max"}, "trust_norm='max'")])
def test_lars_refuses_bad_settings(kwargs, bad):
    with pytest.raises(ValueError, match=f"bad LARS settings: .*{bad}"):
        LARS([nn.Parameter(torch.ones(2, 2))], **kwargs)


# ----------------------------------------------------------------------- build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()


def test_sgd_equals_torch_sgd_with_decay_on_matrices_only():
    model = _model()
    twin = copy.deepcopy(model)
    cfg = RunConfig().replace(train={"optimizer": "sgd", "weight_decay": 0.05,
                                     "sgd_momentum": 0.8}).train
    ours = build_optimizer(model, cfg, CPU)
    assert isinstance(ours, torch.optim.SGD)
    assert [(g["weight_decay"], g["momentum"], [p.ndim for p in g["params"]])
            for g in ours.param_groups] == [(0.05, 0.8, [2, 2]), (0.0, 0.8, [1, 1, 1, 1])]
    decay = [twin[0].weight, twin[2].weight]
    rest = [twin[0].bias, twin[1].weight, twin[1].bias, twin[2].bias]
    ref = torch.optim.SGD([{"params": decay, "weight_decay": 0.05},
                           {"params": rest, "weight_decay": 0.0}], lr=0.0, momentum=0.8)
    x = _rand(3, 8, 5)
    for lr in (0.1, 0.3, 0.05):
        for net, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            net(x).square().mean().backward()
            set_lr(opt, lr)
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_build_optimizer_picks_the_configured_optimizer():
    model = _model()
    cfg = RunConfig().replace(train={"weight_decay": 0.05})
    adamw = build_optimizer(model, cfg.train, CPU)  # optimizer None: AdamW, as before the knob
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    lars = build_optimizer(model, cfg.replace(train={"optimizer": "lars"}).train, CPU)
    assert isinstance(lars, LARS)
    assert {k: lars.defaults[k] for k in ("eta", "clip_lr", "exclude_bias_n_norm", "momentum")} \
        == {"eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True, "momentum": 0.9}


# ------------------------------------------------------------------------ config and CLI


def test_resolve_fills_the_optimizers_knobs():
    base = RunConfig().replace(train={"method": "simclr"})
    lars = resolve_config(base.replace(train={"optimizer": "lars"})).train
    assert (lars.optimizer, lars.sgd_momentum, lars.lars_eta, lars.lars_clip_lr) == \
        ("lars", 0.9, 0.02, True)
    sgd = resolve_config(base.replace(train={"optimizer": "sgd", "sgd_momentum": 0.5})).train
    assert (sgd.sgd_momentum, sgd.lars_eta, sgd.lars_clip_lr) == (0.5, None, None)
    adamw = resolve_config(base.replace(train={"optimizer": "adamw"})).train
    assert (adamw.sgd_momentum, adamw.lars_eta, adamw.lars_clip_lr) == (None, None, None)
    kept = resolve_config(base.replace(train={"optimizer": "lars", "lars_eta": 0.05,
                                              "lars_clip_lr": False})).train
    assert (kept.lars_eta, kept.lars_clip_lr) == (0.05, False)


def test_a_run_from_before_the_knob_resolves_to_adamw_and_keeps_its_digest():
    resolved = resolve_config(RunConfig())
    old = resolved.override({"train.optimizer": None})  # what an old config.yaml holds
    assert old.train.optimizer is None and resolved.train.optimizer == "adamw"
    assert resolve_config(old) == resolved
    assert old.digest() == resolved.digest()


@pytest.mark.parametrize("args, line", [
    (["--optimizer", "lars", "--lars-eta", "0"],
     "error: --lars-eta (the LARS trust coefficient) must be > 0, got 0.0"),
    (["--optimizer", "adam"], "error: unknown optimizer 'adam'; valid: adamw, lars, sgd"),
])
def test_cli_refuses_bad_optimizer_settings_in_one_line(monkeypatch, capsys, tmp_path, args,
                                                        line):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--method", "simclr", "--arch",
                           "vit_micro_patch2", "--out", str(tmp_path / "run"), "--no-progress",
                           *args)
    assert code == 2
    assert [ln for ln in err.splitlines() if ln.strip()] == [line]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- resume


def test_resumed_lars_run_equals_uninterrupted_run(tmp_path):
    """Momentum buffers are in the checkpoint: a LARS run stopped after 3 of 7 steps and
    resumed ends with the weights, buffers and losses of one that never stopped."""
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch2", "img_size": 8},
        train={"method": "simclr", "optimizer": "lars", "lr": 1.0, "epochs": 0.3,
               "batch_size": 64, "log_every": 1, "deterministic": True},
        ssl={"proj_hidden_dim": 32, "proj_dim": 16})
    try:
        full = pretrain(cfg, tmp_path / "full", progress=False)
        part = pretrain(cfg, tmp_path / "part", max_steps=3, progress=False)
        assert (full.step, part.step) == (7, 3)
        pretrain(cfg, tmp_path / "part", progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 7
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, sa in a["optimizer"]["state"].items():
        assert torch.equal(sa["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    losses = [[(row["step"], row["loss"]) for row in map(json.loads, (
        tmp_path / run / "metrics.jsonl").read_text().splitlines())] for run in ("full", "part")]
    assert len(losses[0]) == 7 and losses[0] == losses[1]
    train = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["train"]
    assert {k: train[k] for k in ("optimizer", "sgd_momentum", "lars_eta", "lars_clip_lr")} == \
        {"optimizer": "lars", "sgd_momentum": 0.9, "lars_eta": 0.02, "lars_clip_lr": True}
