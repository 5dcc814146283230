"""The command line: one-line errors with exit code 2 and nothing written; the happy paths."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from cli_helpers import run_cli
from PIL import Image

from mae_bench.config import RunConfig

TINY = ["--arch", "vit_micro_patch2", "--img-size", "8", "--batch-size", "64", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet-1m"], "unknown dataset 'imagenet-1m'"),
    (["--arch", "vit_gigantic"], "vit_gigantic"),
    (["--method", "supervised"],
     "unknown method 'supervised'; valid methods: barlowtwins, byol, data2vec2, dino, ibot, "
     "ijepa, mae, mocov2, mocov3, nnclr, simclr, simmim, simsiam, swav, vicreg"),
    (["--mask-ratio", "0.99"], "mask_ratio=0.99"),
    (["--mask-ratio", "1.5"], "--mask-ratio must be strictly between 0 and 1, got 1.5"),
    (["--img-size", "9"], "image size 9 is not divisible by the patch size 2"),
    (["--mask-strategy", "checkers"], "checkers"),
    (["--mask-strategy", "grid", "--mask-ratio", "0.6"], "0.6"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
])
def test_pretrain_usage_errors(monkeypatch, capsys, tmp_path, args, message):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--out", str(out_dir), *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()  # nothing written


def test_missing_data_dir_is_named(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--dataset", "cifar10",
                           "--data-dir", str(missing), "--out", str(tmp_path / "run"))
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1


def test_bad_config_file(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochz: 3}\n")
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--config", str(cfg))
    assert code == 2 and "unknown key(s) epochz" in err


def test_visualize_missing_checkpoint(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint",
                           str(tmp_path / "nothing"))
    assert code == 2 and "nothing does not exist" in err


def test_pretrain_resume_and_visualize(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                           "--max-steps", "3", "--out", str(run))
    assert code in (0, None) and "stopped at step 3/44" in out
    # the same command again resumes automatically and finishes
    code, out, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                           "--out", str(run))
    assert code in (0, None) and "finished" in out
    summary = (run / "summary.json").read_text()
    # once more: nothing left to do; the result and the run's record stay as they were
    code, out2, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                            "--out", str(run))
    assert code in (0, None) and "finished" in out2
    assert out2.split("final loss ")[1][:6] == out.split("final loss ")[1][:6]
    assert (run / "summary.json").read_text() == summary
    png = tmp_path / "grid.png"
    code, out, _ = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(run),
                           "--out", str(png), "--num-images", "3")
    assert code in (0, None) and png.stat().st_size > 1000
    with Image.open(png) as im:
        width, height = im.size
    assert width == 800 and height == 600  # 4 columns x 3 rows at 2 inches, 100 dpi


def test_datasets_lists_every_dataset(monkeypatch, capsys):
    from mae_bench.data import DATASETS

    code, out, _ = run_cli(monkeypatch, capsys, "datasets")
    assert code in (0, None)
    for name in DATASETS:
        assert name in out
    digits_row = next(line for line in out.splitlines() if "digits" in line)
    assert "yes" in digits_row


@pytest.mark.multiprocess
def test_python_dash_m_is_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--mask-ratio" in res.stdout and "--resume" in res.stdout


# ------------------------------------------------------ options generated from the run config


def pretrain_config(monkeypatch, capsys, *args):
    """The RunConfig ``mae-bench pretrain ARGS`` would train (the engine is replaced)."""
    import mae_bench.methods.engine

    seen = []

    def fake_pretrain(cfg, run_dir, **_):
        seen.append(cfg)
        return SimpleNamespace(finished=True, step=0, total_steps=0, final_loss=None,
                               images_per_second=None, train_seconds=0.0, device="cpu",
                               precision="fp32")

    monkeypatch.setattr(mae_bench.methods.engine, "pretrain", fake_pretrain)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", *args)
    assert code in (0, None), err
    return seen[0]


def pretrain_command():
    import typer

    from mae_bench.cli import app

    return typer.main.get_command(app).commands["pretrain"]


def test_every_config_field_has_a_generated_option_with_its_help():
    from mae_bench.config import KNOBS

    params = {p.name: p for p in pretrain_command().params}
    for knob in KNOBS:
        param = params[f"{knob.section}__{knob.key}"]
        assert param.help == knob.help
        names = [*param.opts, *param.secondary_opts]
        assert all(flag in names for flag in knob.flags), (knob.name, names)
        if knob.value_type is bool:
            assert f"--no-{knob.key.replace('_', '-')}" in names
    old = ["--method", "--dataset", "--data-dir", "--arch", "--img-size", "--epochs",
           "--batch-size", "--accum-iter", "--blr", "--lr", "--min-lr", "--weight-decay",
           "--warmup-epochs", "--warmup-min-steps", "--mask-ratio", "--mask-strategy",
           "--norm-pix-loss", "--no-norm-pix-loss", "--decoder-depth", "--decoder-dim",
           "--decoder-heads", "--temperature", "--momentum", "--proj-dim", "--out-dim",
           "--local-crops", "--seed", "--precision", "--device", "--attention",
           "--deterministic", "--no-deterministic", "--num-workers", "--log-every",
           "--save-every", "--config", "--out", "--resume", "--max-steps", "--progress",
           "--no-progress", "--results-dir"]  # every option pretrain had before
    accepted = {o for p in params.values() for o in (*p.opts, *p.secondary_opts)}
    assert set(old) <= accepted and "--set" in accepted


@pytest.mark.multiprocess
def test_pretrain_help_lists_every_field():
    from mae_bench.config import KNOBS

    res = subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "250"})
    for knob in KNOBS:
        for flag in knob.flags:
            assert flag in res.stdout, flag
    from mae_bench.cli.config_options import PANELS

    for title in PANELS:  # each names the YAML sections of its fields
        assert f"─ {title} ─" in res.stdout
    assert {k.name for k in KNOBS} == {name for names in PANELS.values() for name in names}
    assert "--set" in res.stdout and "[default: 128]" in res.stdout


def test_no_options_give_the_default_config(monkeypatch, capsys):
    cfg = pretrain_config(monkeypatch, capsys)
    assert cfg == RunConfig() and cfg.digest() == "a620a7f83f88"


@pytest.mark.parametrize("forms", [
    (["--decoder-dim", "64"], ["--decoder-embed-dim", "64"],
     ["--set", "model.decoder_embed_dim=64"]),
    (["--decoder-heads", "4"], ["--decoder-num-heads", "4"],
     ["--set", "model.decoder_num_heads=4"]),
    (["--epochs", "5"], ["--set", "train.epochs=5"], ["--set", "train.epochs=5.0"]),
    (["--blr", "1e-3"], ["--set", "train.blr=1e-3"], ["--set", "train.blr=0.001"]),
    (["--no-norm-pix-loss"], ["--set", "mae.norm_pix_loss=false"]),
    (["--data-dir", "/x/y"], ["--set", "data.data_dir=/x/y"]),
    (["--temperature", "0.1"], ["--set", "ssl.temperature=0.1"]),
    (["--teacher-temp", "0.07"], ["--set", "ssl.teacher_temp=0.07"]),
    (["--no-norm-last-layer"], ["--set", "ssl.norm_last_layer=false"]),
])
def test_old_flag_generated_option_and_set_agree(monkeypatch, capsys, forms):
    cfgs = [pretrain_config(monkeypatch, capsys, *args) for args in forms]
    assert cfgs[0] != RunConfig()
    assert all(c == cfgs[0] and c.digest() == cfgs[0].digest() for c in cfgs)


def test_config_file_values_survive_options_not_given(monkeypatch, capsys, tmp_path):
    """The generated options have the fields' defaults (for the help), but only values typed
    on the command line override --config; --set and options override it."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {batch_size: 32, epochs: 3}\nmae: {norm_pix_loss: false}\n"
                    "model: {decoder_embed_dim: 48}\n")
    cfg = pretrain_config(monkeypatch, capsys, "--config", str(path))
    assert cfg == RunConfig.from_yaml(path)
    assert cfg.train.batch_size == 32 and cfg.mae.norm_pix_loss is False
    cfg = pretrain_config(monkeypatch, capsys, "--config", str(path), "--batch-size", "16",
                          "--set", "model.decoder_embed_dim=null", "--norm-pix-loss")
    assert cfg == RunConfig.from_yaml(path).replace(train={"batch_size": 16}).override(
        {"model.decoder_embed_dim": None, "mae.norm_pix_loss": True})


def test_a_field_given_twice_is_an_error(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--epochs", "3", "--set",
                           "train.epochs=4", "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: train.epochs is given twice (--epochs 3.0 and "
                                        "--set train.epochs=4)")
    assert not (tmp_path / "run").exists()


def test_an_option_that_shadows_a_field_is_refused_at_import():
    from typing import Annotated, Any

    import typer

    from mae_bench.cli.config_options import with_config_options

    def command(epochs: Annotated[int, typer.Option()] = 1, **knobs: Any) -> None: ...

    with pytest.raises(TypeError, match=r"\['--epochs'\] are also config fields"):
        with_config_options(command)


def test_sweep_set_reaches_every_point(monkeypatch, capsys, tmp_path):
    """--set and the same value in --config give the same points (run folders carry the
    config digest); without it the points differ."""
    path = tmp_path / "c.yaml"
    path.write_text("ssl: {teacher_temp: 0.07}\n")
    common = ["sweep", "mask-ratio", "--values", "0.5", "--dry-run", "--runs-dir",
              str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]
    folders = []
    for extra in (["--set", "ssl.teacher_temp=0.07"], ["--config", str(path)], []):
        code, out, err = run_cli(monkeypatch, capsys, *common, *extra)
        assert code in (0, None), err
        folders.append(next(w for w in out.split() if w.startswith("mask-ratio=0.5-seed0-")))
    assert folders[0] == folders[1] != folders[2]
    assert not (tmp_path / "runs").exists()


# --- help, version, progress layout, Ctrl-C (issue 28, items 13, 14, 16) ---------------------

HELP_COMMANDS = ["", "pretrain", "datasets", "visualize", "eval", "export", "compare", "results",
                 "sweep", "report", "speed"]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_shows_no_type_after_a_flag(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(monkeypatch, capsys, *command.split(), "--help")
    assert code == 0 and "--help" in out
    assert "<bool>" not in out  # --help, --progress, --pretrained... take no value


def test_help_text_is_not_read_as_markup(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--help")
    assert code == 0 and "pip install 'mae-bench[hf]')" in out


def test_version(monkeypatch, capsys):
    from mae_bench.version import __version__

    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert (code, out, err) == (0, f"mae-bench {__version__}\n", "")


@pytest.mark.parametrize("command, usage", [
    ("export", "Usage: mae-bench export [OPTIONS] CHECKPOINT"),
    ("sweep", "Usage: mae-bench sweep [OPTIONS] KNOB"),
])
def test_usage_line_names_the_argument(monkeypatch, capsys, command, usage):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0 and out.splitlines()[1].strip() == usage


def test_pretrain_help_at_80_columns_is_grouped_and_short(monkeypatch, capsys):
    from mae_bench.config import KNOBS

    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(monkeypatch, capsys, "pretrain", "--help")
    lines = out.splitlines()
    options = sum(line.startswith("│ --") for line in lines)
    assert code == 0 and options >= len(KNOBS) + 7
    # Before the panels were regrouped, the --no- column of a few switches squeezed every help
    # text of their section into ~20 columns: 299 lines, 5.2 an option. At most 4 an option
    # keeps each help text at a readable width.
    assert len(lines) <= 4 * options, len(lines)
    titles = [line.split("─ ", 1)[1].split(" ─")[0] for line in lines if line.startswith("╭─ ")]
    assert titles[:3] == ["Options", "Everyday (train., data., model.)",
                          "MAE and its masked siblings (mae., model.)"]
    assert titles[-1] == "Switches (data., mae., model., ssl., train.)"
    assert out.index("--method") < out.index("--mask-ratio") < out.index("--blr")


def _rendered(progress, width: int) -> str:
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), force_terminal=True)
    console.print(progress.get_renderable())
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_pretrain_progress_line_keeps_counts_elapsed_and_eta(width):
    from mae_bench.methods.engine import _progress

    bar = _progress(None, True)
    bar.add_task("mae imagefolder", total=35616, completed=47, loss="0.4021", lr="1.50e-04",
                 ips="1234")
    line = _rendered(bar, width).rstrip("\n")
    assert "\n" not in line and len(line) <= width
    assert "   47/35616 " in line and line.endswith(" 0:00:00 ETA -:--:--"), line
    assert "loss 0.4" in line  # the rest gives way: cut with an ellipsis, never wrapped


def test_eval_bars_keep_counts_and_eta_at_80_columns():
    from rich.progress import Progress as Bars

    from mae_bench.cli.common import TaskBars

    bars = Bars(*TaskBars().bars.columns)
    bars.add_task("fast probe fits on the training features of a long name", total=10000,
                  completed=12)
    line = _rendered(bars, 80).rstrip("\n")
    assert "\n" not in line and line.endswith("   12/10000 -:--:--"), line


def test_compare_log_rounds_budget_sized_epochs():
    from mae_bench.app.compare import epochs_shown

    assert [epochs_shown(13.2709, 20.0), epochs_shown(0.0123456, 5.0),
            epochs_shown(1234.56, 60.0), epochs_shown(2.5, None)] == [
        "~13.3", "~0.0123", "~1235", "2.5"]


def test_fast_probe_reports_each_fit():
    import torch

    from evals.fast_probe import fast_linear_probe

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.arange(40) % 2
    calls = []
    fast_linear_probe(x, y, x[:6], y[:6], weight_decays=(1e-2, 1e-3, 1e-4),
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 3 searched, then the refit


def test_ctrl_c_says_interrupted_and_exits_130(monkeypatch, capsys, tmp_path):
    import mae_bench.app.evaluation as evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "run_eval", interrupted)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                             "pixels", "--results-dir", str(tmp_path / "res"))
    assert (code, out, err) == (130, "", "interrupted\n")
    assert not (tmp_path / "res").exists()
