"""Tests for evals/features.py and evals/encoders.py: pooling, extraction, the feature cache,
and resolving --checkpoint (runs, official checkpoints, the pixels / random references)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evals.encoders import load_source, model_for
from evals.features import (
    dataset_fingerprint,
    extract_features,
    features_for,
    load_cached,
    pool_tokens,
)
from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.models.mae import build_mae

TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 64})

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "mae-micro"
    pretrain(TINY, path, max_steps=3, progress=False)
    return path


def test_pool_tokens():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # [N, 1+L, D]
    assert torch.equal(pool_tokens(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pool_tokens(tokens, "mean"), (tokens[:, 1] + tokens[:, 2]) / 2)
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        pool_tokens(tokens, "max")


def test_run_source_holds_the_trained_encoder(run_dir):
    from mae_bench.training.checkpoint import load_checkpoint

    source = load_source(run_dir)
    assert (source.kind, source.method, source.arch) == ("run", "mae", "vit_micro_patch2")
    assert source.pretrain["mask_ratio"] == 0.75
    assert source.pretrain["pretrain_dataset"] == "digits"
    assert source.pretrain["pretrain_epochs"] == pytest.approx(3 / 22, abs=1e-3)
    model = load_checkpoint(run_dir)["model"]
    encoder = model_for(source)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model[f"mae.{key}"]), key
    # The fine-tuning layout drops the pretrained final norm and adds fc_norm + a fresh head.
    ft = source.build(global_pool="avg", num_classes=10)
    assert torch.equal(ft.blocks[1].mlp.fc2.weight, model["mae.blocks.1.mlp.fc2.weight"])
    assert ft.head.out_features == 10 and not hasattr(ft.norm, "weight")
    scratch = source.build(global_pool="avg", num_classes=10, pretrained=False)
    assert not torch.equal(scratch.blocks[1].mlp.fc2.weight, ft.blocks[1].mlp.fc2.weight)


def test_official_checkpoint_and_arch_check(tmp_path):
    mae = build_mae("vit_micro_patch2", img_size=8, in_chans=1)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_pretrain.pth")
    source = load_source(tmp_path / "mae_pretrain.pth")
    assert (source.kind, source.arch, source.method) == ("official", "vit_micro_patch2",
                                                         "official-mae")
    assert source.vit_kwargs["img_size"] == 8 and source.vit_kwargs["in_chans"] == 1
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model_for(source).forward_features(x), mae.eval().forward_features(x))
    with pytest.raises(CheckpointError, match="not --arch vit_tiny_patch2"):
        load_source(tmp_path / "mae_pretrain.pth", arch="vit_tiny_patch2")


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such run folder or file"):
        load_source(tmp_path / "nope")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_source(tmp_path / "junk.pt")
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a mae-bench checkpoint nor an official"):
        load_source(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="needs --arch"):
        load_source("random")


def test_random_reference_is_seeded():
    a = load_source("random", arch="vit_micro_patch2", img_size=8, channels=1, seed=0)
    b = load_source("random", arch="vit_micro_patch2", img_size=8, channels=1, seed=0)
    c = load_source("random", arch="vit_micro_patch2", img_size=8, channels=1, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    wa, wb, wc = (model_for(s).blocks[0].attn.qkv.weight for s in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pixels_are_normalised_flattened_images(digits):
    train, _ = digits
    feats, labels = extract_features(None, train, pools=("cls",), batch_size=100)
    x = feats["cls"]
    assert x.shape == (len(train), 64) and torch.equal(labels, train.labels)
    mean, std = train.info.mean[0], train.info.std[0]
    expected = (train.images[5].float().flatten() / 255 - mean) / std
    assert torch.allclose(x[5], expected, atol=1e-5)


def test_extraction_is_batch_independent_and_gives_both_pools(digits):
    train, _ = digits
    source = load_source("random", arch="vit_micro_patch2", img_size=8, channels=1)
    enc = model_for(source)
    a, _ = extract_features(enc, train, pools=("cls", "mean"), batch_size=1000)
    b, _ = extract_features(enc, train, pools=("mean",), batch_size=37)
    assert torch.allclose(a["mean"], b["mean"], atol=1e-5)
    direct = enc.forward_features((train.images[:3].float() / 255 - train.info.mean[0])
                                  / train.info.std[0])
    assert torch.allclose(a["cls"][:3], direct[:, 0], atol=1e-5)


def test_cache_hit_and_invalidation(tmp_path, digits, run_dir):
    train, _ = digits
    source = load_source(run_dir)
    kw = {"dataset_name": "digits", "split": "train", "cache_dir": tmp_path}
    first = features_for(source, train, pool="cls", **kw)
    assert not first.cached
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one pass caches both poolings
    again = features_for(source, train, pool="cls", **kw)
    other_pool = features_for(source, train, pool="mean", **kw)
    assert again.cached and other_pool.cached and torch.equal(again.features, first.features)
    assert not torch.equal(other_pool.features, first.features)
    # Other weights, other data, another split name: each is a miss.
    changed = dataclasses.replace(source, state={k: v + 0.01 for k, v in source.state.items()})
    changed.fingerprint = "different"
    assert not features_for(changed, train, pool="cls", **kw).cached
    fewer = dataclasses.replace(train, images=train.images[:100], labels=train.labels[:100])
    assert dataset_fingerprint(fewer) != dataset_fingerprint(train)
    assert not features_for(source, fewer, pool="cls", **kw).cached
    assert not features_for(source, train, pool="cls", **(kw | {"split": "test"})).cached
    assert len(list(tmp_path.glob("*.npz"))) == 8
    # A damaged entry counts as a miss and is rewritten; use_cache=False never reads it.
    victim = sorted(tmp_path.glob("*.npz"))[0]
    victim.write_bytes(b"garbage")
    assert load_cached(tmp_path, victim.stem) is None
    assert not features_for(source, train, pool="cls", use_cache=False, **kw).cached


@pytest.mark.multiprocess
def test_streamed_image_folder_features(tmp_path):
    """Image folders too large for memory stream through DataLoader workers, in order."""
    import numpy as np
    from PIL import Image

    from mae_bench.data import StreamingDataset

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = tmp_path / "data" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")
    ds = load_dataset("imagefolder", "train", tmp_path / "data", max_in_memory_bytes=0)
    assert isinstance(ds, StreamingDataset)
    source = load_source("random", arch="vit_micro_patch4", img_size=16, channels=3)
    one, labels = extract_features(model_for(source), ds, pools=("mean",), batch_size=4,
                                   num_workers=0)
    two, labels2 = extract_features(model_for(source), ds, pools=("mean",), batch_size=3,
                                    num_workers=2)
    assert one["mean"].shape == (10, 32) and torch.equal(labels, ds.labels)
    assert torch.equal(labels, labels2) and torch.allclose(one["mean"], two["mean"], atol=1e-5)


def test_precision_and_attention_kernel_are_in_the_cache_key(tmp_path, digits, run_dir):
    """bf16 features are never served to an fp32 evaluation (issue 28, item 1): the precision
    and the attention kernel it makes the rule pick are part of the cache key."""
    train, _ = digits
    source = load_source(run_dir)
    kw = {"dataset_name": "digits", "split": "train", "cache_dir": tmp_path, "pool": "cls",
          "device": torch.device("cpu")}
    bf16 = features_for(source, train, precision="bf16", **kw)
    fp32 = features_for(source, train, precision="fp32", **kw)
    assert not bf16.cached and not fp32.cached
    assert not torch.allclose(bf16.features, fp32.features, atol=1e-4)  # bf16's rounding
    again = features_for(source, train, precision="fp32", **kw)
    assert again.cached and torch.equal(again.features, fp32.features)
    assert len(list(tmp_path.glob("*.npz"))) == 4  # (cls, mean) x (bf16, fp32)
    from evals.features import attention_kernel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [attention_kernel(source, d, p) for d, p in (
        (cpu, "fp32"), (cpu, "bf16"), (cuda, "bf16"), (cuda, "fp16"))] == [
        "fused", "math", "fused", "fused"]  # mae_bench.models.attention.rule_path's table
    # Pixels pass through no encoder: one entry serves every precision.
    pixels = load_source("pixels")
    assert attention_kernel(pixels, cpu, "bf16") is None
    assert not features_for(pixels, train, precision="fp32", **kw).cached
    assert features_for(pixels, train, precision="bf16", **kw).cached


def test_a_data_sets_hash_is_computed_once_until_its_pixels_change(monkeypatch):
    """An evaluation asks for the hash for its identity and for each feature cache key: the
    pixels are hashed once per object, and an in-place change is seen (version counters)."""
    import evals.features as features

    train = load_dataset("digits", "train")
    calls = []
    real = features.hashlib.blake2b
    monkeypatch.setattr(features.hashlib, "blake2b", lambda **kw: calls.append(1) or real(**kw))
    first = dataset_fingerprint(train)
    assert dataset_fingerprint(train) == first and len(calls) == 1
    train.images[0, 0, 0, 0] += 1  # in place: the same object, other pixels
    changed = dataset_fingerprint(train)
    assert changed != first and len(calls) == 2
    train.images[0, 0, 0, 0] -= 1
    assert dataset_fingerprint(train) == first  # the content decides, not the object
