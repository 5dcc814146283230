"""The training loop: exact resume, schedules, parameter groups, non-finite loss, run folder."""

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from mae_bench.config import RunConfig, warmup_epochs
from mae_bench.data import jpeg_region
from mae_bench.data.pipeline import jpeg_decoder
from mae_bench.errors import ConfigError, TrainingError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import MAE, METHODS, build_method, resolve_config
from mae_bench.training.checkpoint import load_checkpoint
from mae_bench.training.runtime import cpu_has_fast_bf16, lr_at, param_groups, resolve_precision

# digits at its native 8 px: 1437 training images -> 22 steps of 64 per epoch
TINY = RunConfig().replace(
    model={"arch": "vit_micro_patch2", "img_size": 8},
    train={"epochs": 2, "batch_size": 64, "log_every": 1, "deterministic": True},
)


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = pretrain(TINY, tmp_path / "full", progress=False)
    assert full.finished and full.step == 44
    part = pretrain(TINY, tmp_path / "part", max_steps=7, progress=False)
    assert not part.finished and part.step == 7
    assert load_checkpoint(tmp_path / "part")["step"] == 7
    # resume in a new process, through the CLI, from the run folder alone
    subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--resume",
                    str(tmp_path / "part"), "--no-progress"], check=True, capture_output=True)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 44 and a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][pid]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"],
                                                                         sb["exp_avg_sq"])
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    steps_b = [r["step"] for r in mb]
    assert len(steps_b) == len(set(steps_b)), "a resumed run logged a step twice"
    assert [(r["step"], r["loss"]) for r in ma] == [(r["step"], r["loss"]) for r in mb]


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"mae"}))
def test_every_baseline_resumes_exactly_in_a_new_process(tmp_path, method):
    """Stopped mid-epoch and resumed by a new process: parameters, optimizer state, EMA teachers,
    DINO's center (all in the state dict) and every logged loss equal an uninterrupted run's."""
    cfg = TINY.replace(train={"method": method, "epochs": 0.5},  # 11 steps
                       ssl={"proj_hidden_dim": 64, "proj_dim": 32, "out_dim": 128,
                            "queue_size": 256, "num_prototypes": 32})
    pretrain(cfg, tmp_path / "full", progress=False)
    pretrain(cfg, tmp_path / "part", max_steps=4, progress=False)
    subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--resume",
                    str(tmp_path / "part"), "--no-progress"], check=True, capture_output=True)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 11
    assert a["model"].keys() == b["model"].keys()
    teachers = [t for t, _ in build_method(cfg, 1, 8).teacher_pairs]  # none for SimCLR
    assert all(any(k.startswith(t + ".") for k in a["model"]) for t in teachers)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, sa in a["optimizer"]["state"].items():
        assert torch.equal(sa["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"])
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [(r["step"], r["loss"]) for r in ma] == [(r["step"], r["loss"]) for r in mb]


def test_damaged_checkpoint_falls_back_to_previous_and_replays(tmp_path, capsys):
    full = tmp_path / "full"
    pretrain(TINY, full, progress=False)
    run = tmp_path / "run"
    pretrain(TINY, run, progress=False)  # checkpoint.pt at step 44, checkpoint.prev.pt at 22
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # torn by a crash or a full disk
    pretrain(TINY, run, progress=False, console=Console(stderr=True, width=400))
    err = capsys.readouterr().err
    assert "is truncated or corrupted" in err and "resumed from checkpoint.prev.pt" in err
    damaged = list(run.glob("checkpoint.damaged-*.pt"))
    assert len(damaged) == 1 and damaged[0].read_bytes() == data[: len(data) // 3]
    a, b = load_checkpoint(full), load_checkpoint(run)
    assert a["step"] == b["step"] == 44
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["step"] for r in _metrics(run)] == list(range(1, 45))


def test_run_folder_contents(tmp_path):
    res = pretrain(TINY.replace(train={"epochs": 1}), tmp_path / "r", progress=False)
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= files
    # the method's defaults are resolved and recorded (MAE: AdamW, blr 1.5e-4, weight decay
    # 0.05)
    assert RunConfig.from_yaml(tmp_path / "r" / "config.yaml") == TINY.replace(
        train={"epochs": 1, "blr": 1.5e-4, "weight_decay": 0.05, "optimizer": "adamw"},
        mae={"mask_ratio": 0.75})
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["effective_batch"] == 64
    assert math.isclose(run["peak_lr"], 1.5e-4 * 64 / 256)
    rows = _metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == list(range(1, 23))
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert res.final_loss == rows[-1]["loss"]
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["format_version"] == 1 and ckpt["method"] == "mae"
    assert RunConfig.from_dict(ckpt["config"]) == TINY.replace(
        train={"epochs": 1, "blr": 1.5e-4, "weight_decay": 0.05, "optimizer": "adamw"},
        mae={"mask_ratio": 0.75})


def test_accumulation_counts_optimizer_steps(tmp_path):
    cfg = TINY.replace(train={"epochs": 1, "batch_size": 32, "accum_iter": 2})
    res = pretrain(cfg, tmp_path / "r", progress=False)
    assert res.step == 22 and res.total_steps == 22  # 44 micro-batches of 32
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["effective_batch"] == 64


def test_resume_with_another_config_is_refused(tmp_path):
    pretrain(TINY, tmp_path / "r", max_steps=2, progress=False)
    before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"another config \(mae.mask_ratio: 0.75 -> 0.5\)"):
        pretrain(TINY.replace(mae={"mask_ratio": 0.5}), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        pretrain(TINY, tmp_path / "r", resume=False, progress=False)
    assert (tmp_path / "r" / "config.yaml").read_text() == before


class _NanAfter30(MAE):
    """MAE whose loss turns NaN from optimizer step 31 on."""

    def __init__(self, *args):
        super().__init__(*args)
        self.done = 0

    def on_step_end(self, step, total_steps):
        self.done = step

    def forward(self, batch):
        out = super().forward(batch)
        if self.done >= 30:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_loss_names_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "nan30", _NanAfter30)
    cfg = TINY.replace(train={"method": "nan30"})
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 31"):
        pretrain(cfg, tmp_path / "r", progress=False)
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt["step"] == 22  # the end of epoch 1, saved before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert max(r["step"] for r in _metrics(tmp_path / "r")) == 30


class _NanFrom3(MAE):
    """MAE whose loss turns NaN from optimizer step 3 on (counted across a resume)."""

    def forward(self, batch):
        out = super().forward(batch)
        if batch.step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_cli_non_finite_loss_records_a_failed_row_and_keeps_the_checkpoint(
        tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli

    from mae_bench.results import read_results

    monkeypatch.setitem(METHODS, "nan3", _NanFrom3)
    run, results = tmp_path / "run", tmp_path / "results"
    args = ["pretrain", "--method", "nan3", "--arch", "vit_micro_patch2", "--batch-size", "32",
            "--epochs", "1", "--log-every", "1", "--no-progress", "--out", str(run),
            "--results-dir", str(results)]
    code, _, _ = run_cli(monkeypatch, capsys, *args, "--max-steps", "2")
    assert code == 0 and load_checkpoint(run)["step"] == 2
    good = (run / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *args)  # resumes; step 3 is NaN
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "non-finite loss (nan) at step 3" in lines[0]
    assert "failed row" in lines[0]
    assert (run / "checkpoint.pt").read_bytes() == good  # the last good checkpoint, untouched
    rows = read_results(results)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["status"], row["protocol"], row["method"], row["step"]) == \
        ("failed", "pretrain", "nan3", 3)
    assert "at step 3" in row["error"] and row["run_id"] == "run"


def test_too_few_images_for_one_step(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one optimizer step needs"):
        pretrain(TINY.replace(train={"batch_size": 4096}), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_lr_schedule_values():
    kw = {"steps_per_epoch": 10, "epochs": 10, "warmup_epochs": 2, "peak_lr": 1.0,
          "min_lr": 0.1}
    assert lr_at(0, **kw) == 0.0
    assert math.isclose(lr_at(10, **kw), 0.5)  # half way through the warmup
    assert math.isclose(lr_at(20, **kw), 1.0)  # warmup done: the peak
    assert math.isclose(lr_at(60, **kw), 0.1 + 0.9 * 0.5)  # cosine half way
    assert math.isclose(lr_at(100, **kw), 0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(20, 100))


def test_warmup_floor_lengthens_the_default_warmup_up_to_half_the_run():
    t = RunConfig().replace(train={"epochs": 10}).train
    assert warmup_epochs(t, 100) == 0.5  # 5 % of the run, no floor
    floor = RunConfig().replace(train={"epochs": 10, "warmup_min_steps": 250}).train
    assert warmup_epochs(floor, 100) == 2.5  # 250 steps of 100 per epoch
    assert warmup_epochs(floor, 10) == 5.0  # 25 epochs wanted: capped at half the run
    assert warmup_epochs(floor, 10_000) == 0.5  # long runs: 5 % is already longer
    assert warmup_epochs(floor) == 0.5  # steps per epoch unknown: no floor
    given = RunConfig().replace(train={"epochs": 10, "warmup_epochs": 1.0,
                                       "warmup_min_steps": 250}).train
    assert warmup_epochs(given, 100) == 1.0  # an explicit --warmup-epochs wins
    # DINO asks for the floor (its EMA horizon); MAE and the other baselines do not
    assert resolve_config(RunConfig().replace(train={"method": "dino"})).train.warmup_min_steps \
        == 250
    for name in ("mae", "simclr", "mocov3", "byol"):
        assert resolve_config(RunConfig().replace(
            train={"method": name})).train.warmup_min_steps is None


def test_engine_follows_the_warmup_floor(tmp_path):
    cfg = TINY.replace(train={"warmup_min_steps": 10, "blr": 1e-3, "epochs": 3})
    result = pretrain(cfg, tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text()
            .splitlines()]
    steps_per_epoch = result.total_steps // 3
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["warmup_epochs"] == 10 / steps_per_epoch
    peak = run["peak_lr"]
    # the lr logged for step s is the one its update used: s-1 of 10 warm-up steps
    for row in rows:
        expected = lr_at(row["step"] - 1, steps_per_epoch, 3, 10 / steps_per_epoch, peak, 0.0)
        assert math.isclose(row["lr"], expected, rel_tol=1e-9, abs_tol=1e-12), row
    assert math.isclose(rows[4]["lr"], peak * 4 / 10)


def test_param_groups_skip_biases_norms_tokens():
    method = build_method(TINY, 1, 8)
    decay, no_decay = param_groups(method, 0.05, method.no_weight_decay())
    name_of = {id(p): n for n, p in method.named_parameters()}
    decay_names = {name_of[id(p)] for p in decay["params"]}
    no_decay_names = {name_of[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"mae.cls_token", "mae.mask_token", "mae.norm.weight", "mae.blocks.0.norm1.weight",
            "mae.blocks.0.attn.qkv.bias", "mae.decoder_embed.bias"} <= no_decay_names
    assert {"mae.blocks.0.attn.qkv.weight", "mae.patch_embed.proj.weight",
            "mae.decoder_pred.weight"} <= decay_names
    assert not any("pos_embed" in n for n in decay_names | no_decay_names)  # fixed, no grad
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_streamed_image_folder_trains_through_workers(tmp_path, monkeypatch):
    """Large image folders stream through DataLoader workers; the loop is the same."""
    import functools

    import numpy as np
    from PIL import Image

    from mae_bench.data import StreamingDataset, load_dataset
    from mae_bench.methods import engine

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # odd size
                Image.fromarray(pixels).save(folder / f"{i}.png")
    streamed = functools.partial(load_dataset, max_in_memory_bytes=0)
    monkeypatch.setattr(engine, "load_dataset", streamed)
    assert isinstance(streamed("imagefolder", "train", tmp_path / "data"), StreamingDataset)
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch4", "img_size": 16},
        data={"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "num_workers": 2},
        train={"epochs": 2, "batch_size": 8, "log_every": 1},
    )
    res = pretrain(cfg, tmp_path / "run", progress=False)
    assert res.finished and res.step == 6  # 24 images / 8 per step x 2 epochs
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "run"))


@pytest.mark.parametrize("pipeline", ["device-resize", "device-decode", pytest.param(
    "dali", marks=pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                     reason="NVIDIA DALI has no wheel for this platform"))])
def test_streamed_folder_resumes_exactly_with_crops_cut_in_workers(tmp_path, pipeline):
    """``--stream`` reads a small JPEG folder from its files; the workers decode and cut, the
    device resizes (or decodes too). Crops are drawn per sample, so a run stopped mid-epoch and
    resumed equals an uninterrupted one, weights and losses; run.json names the pipeline."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = tmp_path / "data" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (20 + i, 28 - i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch4", "img_size": 16},
        data={"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "num_workers": 0,
              "stream": True, "pipeline": pipeline},
        train={"epochs": 2, "batch_size": 4, "log_every": 1})
    pretrain(cfg, tmp_path / "full", progress=False)
    pretrain(cfg, tmp_path / "part", max_steps=3, progress=False)
    res = pretrain(cfg, tmp_path / "part", progress=False)
    assert res.finished and res.step == 8
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [(r["step"], r["loss"]) for r in ma] == [(r["step"], r["loss"]) for r in mb]
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["data_pipeline"] == run["segments"][-1]["data_pipeline"] == pipeline
    assert run["jpeg_decoder"] == jpeg_decoder(pipeline)
    if pipeline == "device-resize":  # the region decoder where cc can build it
        assert run["jpeg_decoder"] == f"in the workers: {jpeg_region.describe()}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_at_a_step_boundary_and_resume_continues(tmp_path, sig, code):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_bench", "pretrain", "--arch", "vit_micro_patch2",
         "--img-size", "8", "--batch-size", "64", "--epochs", "50", "--log-every", "1",
         "--no-progress", "--device", "cpu", "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    ckpt = load_checkpoint(run)
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, ckpt["step"] + 1))  # saved at the last logged step
    assert f"{signal.Signals(sig).name} at step {ckpt['step']}: checkpoint saved" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback

    stopped = ckpt["step"]
    subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--resume", str(run),
                    "--max-steps", str(stopped + 2), "--no-progress"], check=True,
                   capture_output=True)
    assert [r["step"] for r in _metrics(run)] == list(range(1, stopped + 3))
    assert load_checkpoint(run)["step"] == stopped + 2


def test_the_plan_is_a_function_of_the_config_and_the_data_size():
    from mae_bench.methods.engine import plan_run

    cfg = resolve_config(TINY.replace(train={"accum_iter": 2, "batch_size": 32}))
    plan = plan_run(cfg, 1437, world_size=2)
    # 1437 images / 2 processes / 32 = 22 micro-batches (a multiple of 2): 11 steps per epoch
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.eff_batch) == \
        (22, 11, 22, 128)
    assert plan.warm_epochs == warmup_epochs(cfg.train, 11)
    assert [plan.lr(s) for s in (0, 5, 21)] == [
        lr_at(s, 11, 2, plan.warm_epochs, plan.peak_lr, cfg.train.min_lr) for s in (0, 5, 21)]
    with pytest.raises(ConfigError, match=r"digits/train has 100 images, fewer than one "
                       r"optimizer step needs \(32 x 2 accumulation x 2 processes\)"):
        plan_run(cfg, 100, world_size=2)
