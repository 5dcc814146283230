"""Tests for mae_bench/files.py: files get the mode a plain ``open()`` would give them (the umask
applies, so a group can share a store, a run folder, a cache), atomic writes and appends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mae_bench.files import append_whole, atomic_file, write_json_atomic

UMASKS = [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)]


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("mask", "expected"), UMASKS)
def test_new_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    with atomic_file(tmp_path / "a.bin", "wb") as fh:
        fh.write(b"x")
    write_json_atomic(tmp_path / "b.json", {"a": 1})
    append_whole(tmp_path / "c.jsonl", b"{}\n")
    with open(tmp_path / "plain.txt", "w") as fh:  # the reference: what open() gives
        fh.write("x")
    assert mode(tmp_path / "plain.txt") == expected
    names = ("a.bin", "b.json", "c.jsonl")
    assert {name: mode(tmp_path / name) for name in names} == dict.fromkeys(names, expected)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "summary.json"
    path.write_text("{}")
    path.chmod(0o640)  # as a user set it; open("w") would keep it too
    write_json_atomic(path, {"step": 2})
    assert mode(path) == 0o640 and path.read_text() == '{\n  "step": 2\n}'


@pytest.mark.parametrize(("mask", "expected"), UMASKS[:2])
def test_the_feature_cache_follows_the_umask(tmp_path, umask, mask, expected):
    from evals.features import load_cached, save_cached

    umask(mask)
    path = save_cached(tmp_path / "cache", "k" * 32, torch.ones(3, 2), torch.arange(3))
    assert mode(path) == expected
    features, labels = load_cached(tmp_path / "cache", "k" * 32)
    assert features.shape == (3, 2) and labels.tolist() == [0, 1, 2]


def test_a_run_folder_follows_the_umask_also_after_a_resume(tmp_path, umask):
    from mae_bench.config import RunConfig
    from mae_bench.methods.engine import pretrain

    umask(0o002)
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"},
                              train={"batch_size": 8, "epochs": 1, "device": "cpu",
                                     "log_every": 1})
    run = tmp_path / "run"
    pretrain(cfg, run, max_steps=1, progress=False)
    pretrain(cfg, run, max_steps=2, progress=False)  # resumes: rewrites metrics.jsonl first
    files = {p.name: mode(p) for p in run.iterdir() if p.is_file()}
    for name in ("config.yaml", "run.json", "summary.json", "checkpoint.pt", "metrics.jsonl"):
        assert files.get(name) == 0o664, (name, files)
    assert set(files.values()) == {0o664}, files


def test_an_export_follows_the_umask(tmp_path, umask):
    """safetensors' own writer makes model.safetensors 0600; an export is shared like a run."""
    from mae_bench.app.export import export_encoder
    from mae_bench.config import RunConfig
    from mae_bench.methods.engine import pretrain

    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"},
                              train={"batch_size": 8, "epochs": 1, "device": "cpu"})
    pretrain(cfg, tmp_path / "run", max_steps=1, progress=False)
    umask(0o002)
    export_encoder(tmp_path / "run", "timm", tmp_path / "timm")
    files = {p.name: mode(p) for p in (tmp_path / "timm").iterdir()}
    assert files == dict.fromkeys(("README.md", "config.json", "model.safetensors"), 0o664)
