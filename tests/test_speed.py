"""``mae-bench speed`` and its pieces: it runs and records what it measured, with no assertion
on any timing (this machine is shared). FLOP counts against a hand count: tests/test_flops.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from cli_helpers import run_cli

from mae_bench.app.speed import matmul_peak, measure_side_by_side
from mae_bench.app.speed_eval import knn_speed, synthetic_features
from mae_bench.app.speed_run import MASK_TOKENS, SpeedSpec, cases, run_speed
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.registry import build_method
from mae_bench.models.attention import attention_layers, choose_attention, set_attention
from mae_bench.results import read_results

TINY = dict(arch="vit_micro_patch4", batch_size=4, steps=1, warmup=0, rounds=1,
            train_images=16, eval_images=8, knn_train=200, knn_test=40, probe=False)


def test_speed_command_measures_every_configuration_and_records_rows(tmp_path, monkeypatch,
                                                                     capsys):
    code, out, err = run_cli(
        monkeypatch, capsys, "speed", "--methods", "mae,simclr", "--arch", "vit_micro_patch4",
        "--batch-size", "4", "--steps", "1", "--warmup", "0", "--rounds", "1",
        "--train-images", "16", "--eval-images", "8", "--knn-train", "200", "--knn-test", "40",
        "--no-probe", "--results-dir", str(tmp_path / "r"), "--markdown", str(tmp_path / "s.md"),
        "--no-progress")
    assert code == 0, err
    assert "measuring the matmul peak" not in err and "training measured in" not in err
    df = read_results(tmp_path / "r" / "results.jsonl")
    assert set(df["protocol"]) == {"speed"} and df["run_id"].nunique() == 1
    train = df[df["metric"] == "train_img_per_s"]
    assert len(train) == 4  # mae, simclr, mae [M], mae on the other attention path
    assert (train["value"] > 0).all()
    assert train["encoder_mask_tokens"].eq(True).sum() == 1
    assert set(train["attention"]) == {"fused", "math"}
    metrics = set(df["metric"])
    assert {"gflops_per_image", "tflops", "mfu", "loader_ratio", "peak_tflops",
            "mae_speedup_vs_mask_tokens", "mae_flop_ratio_vs_mask_tokens", "knn_speedup",
            "knn_agreement", "extract_img_per_s"} <= metrics
    flops = df[df["metric"] == "gflops_per_image"].set_index("method")["value"]
    ratio = df.loc[df["metric"] == "mae_flop_ratio_vs_mask_tokens", "value"].item()
    mae_rows = df[(df["metric"] == "gflops_per_image") & (df["method"] == "mae")]
    with_tokens = mae_rows[mae_rows["encoder_mask_tokens"].eq(True)]["value"].item()
    without = mae_rows[mae_rows["encoder_mask_tokens"].isna()]["value"]
    assert without.nunique() == 1  # the FLOP count does not depend on the attention path
    assert ratio == pytest.approx(with_tokens / without.iloc[0])
    assert flops["simclr"] > 0
    text = (tmp_path / "s.md").read_text()
    assert "mae-bench speed --methods mae,simclr" in text and "| mae [M] |" in text
    assert "MAE vs. mask tokens in the encoder" in text and "k-NN on 200 x 40" in text
    assert "host allocator: " in text  # what the allocator did: it changes CPU speed


@pytest.mark.parametrize("args, message", [
    (("--methods", "mae,foo"), "error: unknown method 'foo'; valid: "),
    (("--arch", "vit_nope"), "error: unknown"),
    (("--batch-size", "1"), "error: --batch-size must be >= 2, got 1"),
    (("--mask-ratio", "1.0"), "error: --mask-ratio must be strictly between 0 and 1, got 1.0"),
    (("--precisions", "fp16", "--device", "cpu"), "error: --precision fp16 needs a CUDA"),
    (("--knn-train", "0"), "error: --knn-train and --knn-test must both be 0"),
    (("--img-size", "30"), "error: --img-size 30 is not divisible by vit_tiny_patch4's patch"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args,
                                                      message):
    code, out, err = run_cli(monkeypatch, capsys, "speed", *args, "--results-dir",
                             str(tmp_path / "r"))
    assert code == 2
    assert err.strip().startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_cases_add_mask_tokens_and_extra_precisions_for_mae_only():
    found = cases(SpeedSpec(methods=("mae", "byol"), precisions=("fp32", "bf16"), device="cpu"))
    assert list(found) == ["mae", "byol", MASK_TOKENS, "mae bf16"]
    assert found[MASK_TOKENS].mae.encoder_mask_tokens is True
    assert found["mae bf16"].train.precision == "bf16"
    assert found["byol"].train.precision == "fp32"
    assert list(cases(SpeedSpec(methods=("simclr",), device="cpu"))) == ["simclr"]


def test_side_by_side_gives_every_configuration_its_numbers():
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(12, dtype=torch.long)
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch4"},
                              train={"batch_size": 4, "device": "cpu"})
    info = _synthetic_info()
    got = measure_side_by_side({"a": cfg, "b": cfg.replace(train={"attention": "math"})},
                               images, labels, info, steps=2, warmup=0, rounds=2)
    for s in got.values():
        assert len(s.step_seconds) == 4 and s.batch_size == 4
        assert s.images_per_second == pytest.approx(4 / s.seconds_per_step)
        assert s.loader_images_per_second > 0
        assert s.tflops == pytest.approx(s.gflops_per_image * s.images_per_second / 1e3)
    assert got["b"].attention == "math"
    assert got["a"].gflops_per_image == got["b"].gflops_per_image


def test_attention_choice_sets_every_layer_and_keeps_the_result():
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch4"})
    method = build_method(cfg, 3, 32)
    layers = attention_layers(method)
    assert len(layers) == 3  # 2 encoder blocks + 1 decoder block
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    set_attention(method, "math")
    assert all(layer.path == "math" for layer in layers)
    loss_math = method.mae(x, 0.75, noise)[0]
    assert not any(layer.fused_attn for layer in layers)
    assert choose_attention(method, "fused", 65, torch.device("cpu"), "fp32") == "fused"
    assert all(layer.path == "fused" for layer in layers)
    assert method.mae(x, 0.75, noise)[0].item() == pytest.approx(loss_math.item(), rel=1e-5)
    # auto: the rule, per call; the returned kernel is the rule's for the whole image
    assert choose_attention(method, "auto", 65, torch.device("cpu"), "bf16") == "math"
    assert choose_attention(method, "auto", 65, torch.device("cpu"), "fp32") == "fused"
    assert all(layer.path == "auto" for layer in layers)
    with pytest.raises(ConfigError, match="unknown attention path 'flash'"):
        choose_attention(method, "flash", 65, torch.device("cpu"), "fp32")


def test_attention_config_is_validated_and_recorded(tmp_path):
    from mae_bench.config import validate
    from mae_bench.methods.engine import pretrain

    with pytest.raises(ConfigError, match="unknown attention path 'flash'; valid: auto, fused"):
        validate(RunConfig().replace(train={"attention": "flash"}))
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"},
                              train={"batch_size": 8, "attention": "math", "device": "cpu"})
    pretrain(cfg, tmp_path / "run", max_steps=1, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["attention"] == "math"
    assert RunConfig().digest() == RunConfig().replace(train={"attention": None}).digest()


def test_knn_speed_compares_the_same_predictions():
    feats = synthetic_features(300, 50, 16, seed=1)
    k = knn_speed(*feats, repeats=1)
    assert k.agreement == 100.0  # exact search both ways on well-separated float32 sims
    assert k.top1_faiss == k.top1_torch
    assert k.speedup == pytest.approx(k.torch_seconds / k.faiss_seconds)
    assert k.backend == "faiss-cpu"


def test_matmul_peak_is_a_rate_of_the_right_size():
    assert matmul_peak(torch.device("cpu"), "fp32", sizes=(32, 64), repeats=2) > 0


def test_run_speed_rows_carry_the_case_knobs():
    o = run_speed(SpeedSpec(methods=("mae",), device="cpu", **TINY))
    df = pd.DataFrame(o.rows)
    mfu = df[df["metric"] == "mfu"]
    peak = df.loc[df["metric"] == "peak_tflops", "value"].item()
    tflops = df[df["metric"] == "tflops"].set_index("attention")["value"]
    assert mfu.set_index("attention")["value"].to_dict() == pytest.approx(
        (100 * tflops / peak).to_dict())
    assert set(df.loc[df["metric"] == "train_img_per_s", "mask_ratio"]) == {0.75}


def _synthetic_info():
    from mae_bench.data import DatasetInfo

    return DatasetInfo(name="synthetic", description="", channels=3, img_size=32,
                       num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, splits=("train",),
                       needs_data_dir=False, formats="-", how_to_get="-")


def test_resume_keeps_the_attention_path_the_run_started_with(tmp_path):
    """A run records its attention setting; "auto" is the rule, a pure function of the run's
    settings, so a resume replays the same kernels. A checkpoint from before the rule recorded
    the kernel its start-up timing picked: a resume under auto must keep that kernel."""
    from mae_bench.methods.engine import pretrain

    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"},
                              train={"batch_size": 8, "epochs": 1, "device": "cpu",
                                     "precision": "fp32"})
    pretrain(cfg, tmp_path / "run", max_steps=1, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["attention"], run["attention_kernel"]) == ("auto", "fused")  # fp32 CPU: fused
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["extra"]["attention"] == "auto"
    ckpt["extra"]["attention"] = "math"  # as an older, timed run recorded it
    torch.save(ckpt, ckpt_path)
    pretrain(cfg, tmp_path / "run", max_steps=2, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["attention"], run["attention_kernel"]) == ("math", "math")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["extra"]["attention"] == "math"


def test_spread_and_the_busy_warning():
    from mae_bench.app.speed import TrainSpeed
    from mae_bench.app.speed_run import busy_warning

    def speed(steps):
        return TrainSpeed(10.0, 0.1, 1.0, 8, "cpu", "fp32", step_seconds=tuple(steps))

    quiet = speed([0.100, 0.101, 0.099, 0.100, 0.102, 0.100, 0.101, 0.100])
    busy = speed([0.10, 0.30, 0.11, 0.29, 0.10, 0.31, 0.12, 0.30])
    assert quiet.spread == pytest.approx(1.0, abs=0.03)
    assert busy.spread > 2
    assert speed([0.1, 0.2, 0.3]).spread is None  # too few steps to say
    assert busy_warning({"mae": quiet}) is None
    warning = busy_warning({"mae": quiet, "simclr": busy})
    assert warning.startswith("warning: the machine was busy") and "'simclr'" in warning
