"""Checkpoints: atomic writes, clear errors on bad files, plain-value RNG state."""

import argparse
import random

import numpy as np
import pytest
import torch

from mae_bench.errors import CheckpointError
from mae_bench.training import checkpoint as ck


def _state(v: float) -> dict:
    return {"format_version": 1, "model": {"w": torch.full((3,), v)}, "step": int(v)}


def test_save_keeps_previous_and_loads_weights_only(tmp_path):
    ck.save_checkpoint(tmp_path, _state(1.0))
    ck.save_checkpoint(tmp_path, _state(2.0))
    assert torch.equal(ck.load_checkpoint(tmp_path)["model"]["w"], torch.full((3,), 2.0))
    prev = torch.load(tmp_path / ck.PREVIOUS, weights_only=True)
    assert prev["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ck.LATEST, ck.PREVIOUS])


def test_interrupted_save_leaves_previous_intact(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, _state(1.0))

    def half_write(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, _state(2.0))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LATEST]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="has no checkpoint.pt"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", "bad.pt is not a checkpoint"),
    (b"# README\nnot a checkpoint at all", "bad.pt is not a checkpoint"),
    (b"PK\x03\x04garbage", "bad.pt is truncated or corrupted"),
    (b"\x80\x02garbage", "bad.pt is truncated, corrupted or not a checkpoint"),
])
def test_garbage_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        ck.load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, _state(1.0))
    data = (tmp_path / ck.LATEST).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is truncated or corrupted"):
        ck.load_checkpoint(tmp_path / "cut.pt")


def test_not_a_dict_checkpoint(tmp_path):
    torch.save(torch.zeros(2), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' entry"):
        ck.load_checkpoint(tmp_path / "t.pt")


def test_unsafe_pickle_needs_trust(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        ck.load_checkpoint(path)
    assert ck.load_checkpoint(path, trust=True)["args"].lr == 1


def test_rng_state_round_trip_is_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = ck.rng_state()
    torch.save({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ck.set_rng_state(loaded)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def test_is_official_mae():
    official = {"model": {"patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 0}}
    assert ck.is_official_mae(official)
    assert not ck.is_official_mae({"format_version": 1, **official})
    assert not ck.is_official_mae({"model": {"w": 0}})
