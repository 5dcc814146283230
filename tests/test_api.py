"""Tests for the Python API (mae_bench/app/api.py): ``mae_bench.evaluate`` returns the rows the
CLI appends, for a source string, a run folder, an ``nn.Module`` and a plain callable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

import mae_bench
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError, DataError
from mae_bench.methods.engine import pretrain

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


def test_a_run_is_evaluated_on_its_own_data_as_the_cli_does(monkeypatch, capsys, tmp_path):
    """A run pretrained on an image folder: evaluate(RUN) reads that folder (not CIFAR-10), and
    its rows are the rows of ``mae-bench eval --checkpoint RUN`` without --dataset."""
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "home"))
    monkeypatch.setenv("MAE_BENCH_DATA", str(tmp_path / "no-data"))  # no CIFAR-10 to find
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "gray" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                    tmp_path / "gray" / split / c / f"{i}.png")
    cfg = TINY.replace(data={"dataset": "imagefolder", "data_dir": str(tmp_path / "gray")},
                       train={"batch_size": 8})
    pretrain(cfg, tmp_path / "run", max_steps=1, progress=False)
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                           str(tmp_path / "run"), "--k", "3", "--precision", "fp32",
                           "--no-progress", "--results-dir", str(tmp_path / "cli"))
    assert code == 0, err
    want = [json.loads(line) for line in (tmp_path / "cli" / "results.jsonl").read_text()
            .splitlines()]
    got = mae_bench.evaluate(tmp_path / "run", protocols=("knn",), k=(3,), precision="fp32")
    assert set(got["dataset"]) == {"imagefolder"}
    assert set(got["data_dir"]) == {str((tmp_path / "gray").resolve())}
    assert comparable(got.to_dict("records")) == comparable(want)


def test_errors_name_the_api_arguments_not_the_cli_options(monkeypatch, tmp_path):
    monkeypatch.setenv("MAE_BENCH_DATA", str(tmp_path / "no-data"))
    with pytest.raises(DataError) as err:
        mae_bench.evaluate(Flat(), dataset="cifar10", protocols="knn")
    assert str(err.value).startswith("default data dir (pass data_dir= or set MAE_BENCH_DATA) ")
    assert "--" not in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(
            "k=5000 is more neighbours than the 1437 training images; use k= values <= 1437, "
            "e.g. k=10")):
        mae_bench.evaluate("pixels", dataset="digits", protocols="knn", k=(5000,),
                           cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=re.escape(
            "hub:someone/models:tiny runs the code of github.com/someone/models, which "
            "torch.hub does not trust yet; pass trust_repo=True if you trust that repository")):
        mae_bench.evaluate("hub:someone/models:tiny", dataset="digits", protocols="knn")


def test_progress_is_reported_when_asked(capsys, tmp_path):
    """Quiet by default; progress=True draws bars on stderr; a callable gets the reports."""
    cache = str(tmp_path / "cache")
    mae_bench.evaluate("pixels", dataset="digits", protocols="knn", k=(5,), cache_dir=cache,
                       use_cache=False)
    assert capsys.readouterr().err == ""
    mae_bench.evaluate("pixels", dataset="digits", protocols="knn", k=(5,), cache_dir=cache,
                       use_cache=False, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"features train .* 1437/1437", err) and "features test" in err
    calls: list[tuple[str, int, int]] = []
    mae_bench.evaluate("pixels", dataset="digits", protocols="knn", k=(5,), cache_dir=cache,
                       use_cache=False, progress=lambda *report: calls.append(report))
    assert calls[-1] == ("features test", 360, 360)
    assert ("features train", 1437, 1437) in calls
    assert all(0 <= done <= total for _, done, total in calls)


def test_integer_columns_stay_integers(tmp_path):
    """k is on the accuracy rows only: the column is nullable Int64, not float64."""
    rows = mae_bench.evaluate("pixels", dataset="digits", protocols="knn", k=(5, 20),
                              cache_dir=str(tmp_path / "cache"))
    assert str(rows["k"].dtype) == "Int64"
    assert rows["k"].dropna().tolist() == [5, 5, 20, 20]
    assert rows.loc[rows["metric"] == "map@r", "k"].isna().all()
    assert rows["eval_seed"].dtype == np.int64  # columns every row has: plain integers


def test_the_package_root_exposes_evaluate_lazily():
    from mae_bench.app.api import evaluate

    assert mae_bench.evaluate is evaluate
    with pytest.raises(AttributeError, match="no attribute 'evaluat'"):
        mae_bench.evaluat  # noqa: B018


def test_evaluate_into_a_store_skips_what_is_there(tmp_path, run_dir):
    """Issue 28, item 2, through the API: with a results_dir, an evaluation already stored is
    not run or appended again (its stored numbers come back); force=True runs it again."""
    kw = dict(dataset="digits", protocols=("knn",), k=(5,), precision="fp32", device="cpu",
              results_dir=str(tmp_path / "res"), cache_dir=str(tmp_path / "cache"))
    first = mae_bench.evaluate(str(run_dir), **kw)
    store = tmp_path / "res" / "results.jsonl"
    lines = store.read_text().splitlines()
    assert len(lines) == len(first) == 6
    again = mae_bench.evaluate(str(run_dir), **kw)
    assert store.read_text().splitlines() == lines
    assert list(again["value"]) == list(first["value"])
    mae_bench.evaluate(str(run_dir), force=True, **kw)
    assert len(store.read_text().splitlines()) == 12
