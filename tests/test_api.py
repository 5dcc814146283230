"""Tests for the Python API (mae_bench/app/api.py): ``mae_bench.evaluate`` returns the rows the
CLI appends, for a source string, a run folder, an ``nn.Module`` and a plain callable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import run_cli

import mae_bench
from mae_bench.config import RunConfig
from mae_bench.engine import pretrain
from mae_bench.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 64})
# What differs between two evaluations of the same thing: when, how long, and the command line.
VOLATILE = ("timestamp", "eval_seconds", "command")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "mae-micro"
    pretrain(TINY, path, max_steps=3, progress=False)
    return path


def cli_rows(monkeypatch, capsys, tmp_path: Path, checkpoint: str, *extra: str) -> list[dict]:
    store = tmp_path / "cli"
    for protocol in ("knn", "linear"):
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", protocol,
                               "--checkpoint", checkpoint, "--dataset", "digits", *extra,
                               "--precision", "fp32", "--no-progress", "--results-dir",
                               str(store), "--cache-dir", str(tmp_path / "cache"))
        assert code == 0, err
    return [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE and not pd.isna(v)} for r in rows]


@pytest.mark.parametrize("kind", ["timm", "run"])
def test_evaluate_returns_the_cli_rows(monkeypatch, capsys, tmp_path, run_dir, kind):
    checkpoint, extra = (("timm:test_vit", {"img_size": 32}) if kind == "timm"
                         else (str(run_dir), {}))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    want = cli_rows(monkeypatch, capsys, tmp_path, checkpoint, *flags)
    got = mae_bench.evaluate(checkpoint, dataset="digits", protocols=("knn", "linear"),
                             precision="fp32", cache_dir=str(tmp_path / "cache2"), **extra)
    assert isinstance(got, pd.DataFrame) and len(got) == len(want) == 14
    assert comparable(got.to_dict("records")) == comparable(want)
    assert not (tmp_path / "results").exists()  # no results_dir: nothing written


class Flat(torch.nn.Module):
    """A user's own module: declares its input the timm way."""

    pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16 * 16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def test_evaluate_a_module_and_a_callable(tmp_path):
    cache = tmp_path / "cache"
    rows = mae_bench.evaluate(Flat(), dataset="digits", protocols="knn", k=(5,),
                              cache_dir=str(cache), results_dir=str(tmp_path / "res"))
    assert set(rows["method"]) == {"python"} and set(rows["pool"]) == {"model"}
    assert set(rows["img_size"]) == {16} and rows["arch"].iloc[0] == "Flat"
    stored = pd.read_json(tmp_path / "res" / "results.jsonl", lines=True)
    assert list(stored["value"]) == list(rows["value"])
    assert any(cache.iterdir())  # a module's features are cached under its weights' hash
    again = mae_bench.evaluate(Flat(), dataset="digits", protocols="knn", k=(5,),
                               cache_dir=str(cache))
    assert list(again["value"]) == list(rows["value"])

    def first_pixels(x: torch.Tensor) -> torch.Tensor:  # a plain function: never cached
        return x.flatten(1)[:, :32]

    other = tmp_path / "cache-fn"
    fn_rows = mae_bench.evaluate(first_pixels, dataset="digits", protocols=("knn",), k=(5,),
                                 cache_dir=str(other))
    assert fn_rows["checkpoint"].iloc[0].endswith("first_pixels") and not other.exists()


def test_evaluate_refuses_bad_options_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown option pools; valid: .*pool"):
        mae_bench.evaluate("pixels", dataset="digits", pools="cls")
    with pytest.raises(ConfigError, match="finetune trains a mae-bench ViT"):
        mae_bench.evaluate(Flat(), dataset="digits", protocols=("knn", "finetune"),
                           results_dir=str(tmp_path / "res"))
    assert not (tmp_path / "res").exists()  # the knn before it did not run either


def test_the_package_root_exposes_evaluate_lazily():
    from mae_bench.app.api import evaluate

    assert mae_bench.evaluate is evaluate
    with pytest.raises(AttributeError, match="no attribute 'evaluat'"):
        mae_bench.evaluat  # noqa: B018
