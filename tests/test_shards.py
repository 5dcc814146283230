"""WebDataset-style tar shards: the writer round-trips, the epoch order follows the shards and
replays exactly, loading and resuming give the right samples, bad input is one line
(mae_bench/data/shards.py, mae_bench/data/shard_writer.py, mae_bench/cli/shard.py)."""

from __future__ import annotations

import inspect
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from mae_bench.data import load_dataset
from mae_bench.data.loader import TrainBatches
from mae_bench.data.shard_writer import DEFAULT_SAMPLES_PER_SHARD, write_shards
from mae_bench.data.shards import ShardDataset, expand_pattern, shard_epoch_order
from mae_bench.errors import DataError, MaeBenchError

CLASSES = ["ant", "bee", "cat", "dog"]
SIZE = 12  # every image: TrainBatches without views stacks them as decoded


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps every test away from the real ~/.cache and $MAE_BENCH_* folders."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))


def image_folder(root: Path, train: int = 32, test: int = 8) -> dict[bytes, int]:
    """train/ and test/ class folders of PNG and JPEG files; returns {file bytes: label}."""
    rng = np.random.default_rng(7)
    labels = {}
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            c = i % len(CLASSES)
            path = root / split / CLASSES[c] / f"{split}{i}.{('png', 'jpg', 'JPEG')[i % 3]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = "PNG" if path.suffix == ".png" else "JPEG"
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(path, fmt)
            labels[path.read_bytes()] = c
    return labels


def members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, dict[bytes, int]]:
    """SHARDS/train-*.tar (6 a shard) and SHARDS/test-*.tar, and the source's bytes -> label."""
    labels = image_folder(tmp_path / "images")
    for split in ("train", "test"):
        write_shards(tmp_path / "images" / split, tmp_path / "shards", split, classes=CLASSES,
                     max_samples_per_shard=6)
    return tmp_path / "shards", labels


def tar_of(path: Path, files: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- the writer ------------------------------------------------------------------------------


def test_the_writer_round_trips_every_image_and_label_once(written):
    shards, labels = written
    train = sorted(shards.glob("train-*.tar"))
    assert [p.name for p in train] == [f"train-{i:06d}.tar" for i in range(6)]  # 32 = 5 * 6 + 2
    samples = [m for p in train for m in members(p)]
    images = [(n, b) for n, b in samples if not n.endswith(".cls")]
    assert len(images) == 32 and len(samples) == 64
    for (name, data), (cls_name, cls) in zip(samples[::2], samples[1::2], strict=True):
        key, ext = name.split(".")
        assert cls_name == f"{key}.cls" and ext in ("png", "jpg", "jpeg")  # lower case
        assert labels[data] == int(cls)  # original bytes, the source's class
    assert len({b for _, b in images}) == 32  # each image once
    train_sources = {b for b, _ in labels.items()} - {b for p in shards.glob("test-*.tar")
                                                      for _, b in members(p)}
    assert {b for _, b in images} == train_sources
    assert (shards / "classes.txt").read_text() == "ant\nbee\ncat\ndog\n"
    # the shuffle mixes the classes: no shard holds one class only
    assert all(len({c for n, c in members(p) if n.endswith(".cls")}) > 1 for p in train[:-1])


def test_the_writer_is_deterministic_and_respects_the_byte_limit(tmp_path, written):
    shards, _ = written
    again = write_shards(tmp_path / "images" / "train", tmp_path / "again", "train",
                         classes=CLASSES, max_samples_per_shard=6)
    assert [p.read_bytes() for p in again] == \
        [p.read_bytes() for p in sorted(shards.glob("train-*.tar"))]
    other = write_shards(tmp_path / "images" / "train", tmp_path / "seed1", "train",
                         classes=CLASSES, max_samples_per_shard=6, seed=1)
    assert other[0].read_bytes() != again[0].read_bytes()
    with tarfile.open(tmp_path / "train.tar", "w") as tf:  # the same folder as a tar
        tf.add(tmp_path / "images" / "train", "train")
    from_tar = write_shards(tmp_path / "train.tar", tmp_path / "from-tar", "train",
                            max_samples_per_shard=6)
    assert [p.read_bytes() for p in from_tar] == [p.read_bytes() for p in again]
    small = write_shards(tmp_path / "images" / "train", tmp_path / "small", "train",
                         max_bytes=3000)
    sizes = [sum(len(b) for n, b in members(p) if not n.endswith(".cls")) for p in small]
    assert len(small) > 4 and max(sizes) <= 3000 and sum(len(members(p)) for p in small) == 64


def test_the_writer_never_replaces_shards_silently(tmp_path, written):
    shards, _ = written
    before = {p: p.read_bytes() for p in shards.iterdir()}
    with pytest.raises(MaeBenchError) as err:
        write_shards(tmp_path / "images" / "train", shards, "train", classes=CLASSES)
    assert str(err.value) == (f"{shards} already holds 6 train-*.tar shard(s); pass --overwrite "
                              "to replace them, or choose another --out")
    with pytest.raises(DataError, match=r"^class folders of .*/images/train are not among the "
                                        r"2 classes of the train split: cat, dog; use the same "
                                        r"classes$"):
        write_shards(tmp_path / "images" / "train", tmp_path / "x", "train", classes=CLASSES[:2])
    assert {p: p.read_bytes() for p in shards.iterdir()} == before
    assert not list(shards.glob(".*"))  # no temporary file left
    fewer = write_shards(tmp_path / "images" / "train", shards, "train", classes=CLASSES,
                         max_samples_per_shard=20, overwrite=True)
    assert sorted(shards.glob("train-*.tar")) == fewer and len(fewer) == 2  # stale ones removed


# --- the epoch order -------------------------------------------------------------------------

SHARD_SIZES = [5, 7, 3, 9, 6]  # 30 samples; shard s holds indices starts[s] .. starts[s+1]-1


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_each_rank_gets_an_equal_disjoint_slice_that_replays(world_size):
    for epoch in (0, 1):
        parts = [shard_epoch_order(SHARD_SIZES, 5, epoch, r, world_size, buffer_size=4)
                 for r in range(world_size)]
        flat = torch.cat(parts).tolist()
        assert [len(p) for p in parts] == [30 // world_size] * world_size
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(30))
        again = [shard_epoch_order(SHARD_SIZES, 5, epoch, r, world_size, buffer_size=4)
                 for r in range(world_size)]
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    base = shard_epoch_order(SHARD_SIZES, 5, 0)
    assert sorted(base.tolist()) == list(range(30))  # one process: every sample once
    assert not torch.equal(base, shard_epoch_order(SHARD_SIZES, 5, 1))  # another epoch
    assert not torch.equal(base, shard_epoch_order(SHARD_SIZES, 6, 0))  # another seed


def shard_runs(order: list[int]) -> list[list[int]]:
    """``order`` cut where it leaves a shard."""
    starts = np.cumsum([0, *SHARD_SIZES])
    shard = np.searchsorted(starts, order, side="right") - 1
    cuts = [0, *[k for k in range(1, len(order)) if shard[k] != shard[k - 1]], len(order)]
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def test_a_buffer_of_one_keeps_the_shard_stream():
    for epoch in range(3):
        order = shard_epoch_order(SHARD_SIZES, 2, epoch, buffer_size=1).tolist()
        runs = shard_runs(order)
        assert sorted(len(r) for r in runs) == sorted(SHARD_SIZES)  # each shard in one piece
        assert all(r == list(range(r[0], r[0] + len(r))) for r in runs)  # in file order
        two = torch.cat([shard_epoch_order(SHARD_SIZES, 2, epoch, r, 2, buffer_size=1)
                         for r in range(2)]).tolist()
        assert two == order  # the ranks' slices are consecutive pieces of one stream
    orders = {tuple(len(r) for r in shard_runs(shard_epoch_order(SHARD_SIZES, 2, e, buffer_size=1)
                                               .tolist())) for e in range(6)}
    assert len(orders) > 1  # the shards come in another order per epoch


def test_the_buffer_moves_a_sample_only_as_far_as_it_holds():
    stream = shard_epoch_order(SHARD_SIZES, 9, 0, buffer_size=1).tolist()
    order = shard_epoch_order(SHARD_SIZES, 9, 0, buffer_size=4).tolist()
    assert order != stream and sorted(order) == sorted(stream)
    # a sample leaves the buffer only after it entered: at most 3 places early
    assert all(stream.index(x) <= k + 3 for k, x in enumerate(order))


def test_pattern_expansion():
    assert expand_pattern("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_pattern("{8..10}") == ["8", "9", "10"]
    assert expand_pattern("{0..1}-{01..02}") == ["0-01", "0-02", "1-01", "1-02"]
    with pytest.raises(DataError, match=r"^a-\{a\.\.b\}\.tar: unsupported pattern; use "):
        expand_pattern("a-{a..b}.tar")
    with pytest.raises(DataError, match="runs backwards"):
        expand_pattern("a-{3..1}.tar")


# --- loading and training batches ------------------------------------------------------------


def test_a_folder_and_a_pattern_load_the_same_samples(written, tmp_path):
    shards, labels = written
    ds = load_dataset("shards", "train", shards)
    pattern = load_dataset("shards", "train", shards / "train-{000000..000005}.tar")
    assert isinstance(ds, ShardDataset) and len(ds) == len(pattern) == 32
    assert ds.classes == CLASSES and ds.info.num_classes == 4 and ds.info.img_size == 224
    assert ds.info.mean == (0.485, 0.456, 0.406)
    assert [ds._read(i) for i in range(32)] == [pattern._read(i) for i in range(32)]
    assert [labels[ds._read(i)] for i in range(32)] == ds.labels.tolist()
    assert ds.where(7) == f"{shards}/train-000001.tar:{members(shards / 'train-000001.tar')[2][0]}"
    test = load_dataset("shards", "test", shards / "train-{000000..000005}.tar")
    assert len(test) == 8 and [labels[test._read(i)] for i in range(8)] == test.labels.tolist()
    # a pattern of test shards is the test split; the train split is then train-*.tar beside
    assert len(load_dataset("shards", "test", shards / "test-{000000..000001}.tar")) == 8
    assert len(load_dataset("shards", "train", shards / "test-{000000..000001}.tar")) == 32


def test_train_batches_give_the_right_labels_and_resume_exactly(written):
    shards, labels = written
    assert load_dataset("shards", "train", shards).buffer_size == 1000  # the default
    ds = load_dataset("shards", "train", shards, shuffle_buffer=5)  # --shuffle-buffer 5
    assert ds.buffer_size == 5
    decoded = {b: torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB")))
               .permute(2, 0, 1) for b in labels}
    batches = TrainBatches(ds, batch_size=4, micro_per_epoch=8, seed=3)
    full = list(batches.epoch(2))
    order = ds.epoch_order(3, 2, 0, 1)
    assert len(full) == 8
    for k, (images, got) in enumerate(full):
        idx = order[4 * k:4 * k + 4].tolist()
        assert got.tolist() == [labels[ds._read(i)] for i in idx]
        assert torch.equal(images, torch.stack([decoded[ds._read(i)] for i in idx]))
    tail = list(batches.epoch(2, start=5))
    assert len(tail) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(tail, full[5:], strict=True))
    assert not torch.equal(torch.cat([y for _, y in full]),
                           torch.cat([y for _, y in batches.epoch(3)]))


@pytest.mark.multiprocess
def test_workers_read_the_same_batches(written):
    shards, _ = written
    ds = load_dataset("shards", "train", shards)
    one = list(TrainBatches(ds, 4, 8, seed=1).epoch(0))
    two = list(TrainBatches(ds, 4, 8, seed=1, num_workers=2).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(one, two, strict=True))


def test_the_index_is_cached_per_shard_and_redone_when_one_changes(written, monkeypatch):
    import mae_bench.data.shards as shards_module

    shards, _ = written
    first = load_dataset("shards", "train", shards)
    indexed = []
    real = shards_module._index_shard
    monkeypatch.setattr(shards_module, "_index_shard", lambda p: indexed.append(p) or real(p))
    again = load_dataset("shards", "train", shards)
    assert indexed == [] and again._members.tolist() == first._members.tolist()
    assert torch.equal(again.labels, first.labels)
    changed = shards / "train-000002.tar"
    changed.write_bytes(changed.read_bytes())  # same bytes, a new mtime
    load_dataset("shards", "train", shards)
    assert indexed == [changed]


def test_classes_json_gives_names_and_statistics(written):
    shards, _ = written
    (shards / "classes.txt").unlink()
    (shards / "classes.json").write_text('{"classes": ["a", "b", "c", "d", "e"], "mean": [0.5, '
                                         '0.5, 0.5], "std": [0.25, 0.25, 0.25], "img_size": 64}')
    ds = load_dataset("shards", "train", shards)
    assert ds.classes == ["a", "b", "c", "d", "e"] and ds.info.num_classes == 5
    assert (ds.info.mean, ds.info.std, ds.info.img_size) == ((0.5,) * 3, (0.25,) * 3, 64)
    (shards / "classes.json").unlink()  # no class list: the numbers up to the largest label
    assert load_dataset("shards", "test", shards).classes == ["0", "1", "2", "3"]


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    shard = tar_of(tmp_path / "s" / "train-000000.tar",
                   [("a.png", png(10)), ("a.cls", b"0"), ("b.png", b"not a png"), ("b.cls", b"1"),
                    ("c.png", png(30)), ("c.cls", b"1\n")])
    ds = load_dataset("shards", "train", shard.parent)
    assert ds.labels.tolist() == [0, 1, 1] and ds.classes == ["0", "1"]
    image, label = ds[1]  # unreadable: the next readable sample instead
    assert label == 1 and int(image[0, 0, 0]) == 30
    assert (ds.bad_images, ds.seen_images) == (1, 2)


# --- bad input: one line naming the path and the fix -----------------------------------------


def load_error(data_dir: Path | str) -> str:
    with pytest.raises(DataError) as err:
        load_dataset("shards", "train", data_dir)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_folder_or_pattern_without_shards(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("no shards here")
    assert load_error(tmp_path / "d") == (
        f"{tmp_path}/d does not hold shards: expected train-*.tar and test-*.tar (or val-*.tar) "
        "shards of KEY.jpg + KEY.cls, or a pattern DIR/train-{000000..000099}.tar; get it: write "
        "them from an image folder: mae-bench shard DIR --out SHARDS")
    assert load_error(tmp_path / "d" / "train-{005..009}.tar") == (
        f"{tmp_path}/d/train-{{005..009}}.tar matches no shard: none of train-005.tar .. "
        f"train-009.tar is in {tmp_path}/d; check the pattern's prefix and range")
    tar_of(tmp_path / "d" / "train-005.tar", [("a.png", png()), ("a.cls", b"0")])
    assert load_error(tmp_path / "d" / "train-{005..009}.tar") == (
        f"{tmp_path}/d/train-{{005..009}}.tar: 4 of the 5 shards it names are missing "
        "(train-006.tar, train-007.tar, train-008.tar, ...); fix the range or restore them")
    assert load_error(tmp_path / "nowhere" / "train-{0..1}.tar") == (
        f"data dir {tmp_path}/nowhere for shards does not exist; get it: write them from an "
        "image folder: mae-bench shard DIR --out SHARDS")
    # braces mean nothing to the other data sets: their messages are unchanged
    with pytest.raises(DataError, match=r"^data dir .*/d/train-\{0\.\.1\}\.tar for imagefolder "
                                        r"does not exist; get it: "):
        load_dataset("imagefolder", "train", tmp_path / "d" / "train-{0..1}.tar")


def test_an_unreadable_or_truncated_tar(tmp_path):
    shard = tmp_path / "d" / "train-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"garbage " * 200)
    assert load_error(shard.parent) == (
        f"{shard} is not a readable tar archive (invalid header); re-create it (mae-bench "
        "shard) or remove it")
    tar_of(shard, [("a.png", png(1)), ("a.cls", b"0"), ("b.png", png(2)), ("b.cls", b"1")])
    whole = shard.read_bytes()
    shard.write_bytes(whole[:530])  # inside a.png's data
    assert load_error(shard.parent) == (
        f"{shard} is not a readable tar archive (truncated inside a.png); re-create it "
        "(mae-bench shard) or remove it")
    shard.write_bytes(whole[:2048] + b"\xff" * 512 + whole[2560:])  # b.png's header overwritten
    assert load_error(shard.parent) == (  # tarfile itself would stop there without a word
        f"{shard} is not a readable tar archive (no valid header or end marker at byte 2048: "
        "truncated or corrupt); re-create it (mae-bench shard) or remove it")


def test_an_image_without_a_label_and_a_label_that_is_no_integer(tmp_path):
    shard = tar_of(tmp_path / "d" / "train-000000.tar",
                   [("x/a.png", png()), ("x/a.cls", b"0"), ("x/b.png", png()), ("x/c.png", png()),
                    ("x/c.cls", b"1")])
    assert load_error(shard.parent) == (
        f"{shard}: sample x/b has an image (x/b.png) but no x/b.cls label; every sample needs "
        "its class as KEY.cls (mae-bench shard writes them)")
    tar_of(shard, [("a.png", png()), ("a.cls", b"cat")])
    assert load_error(shard.parent) == (
        f"{shard}:a.cls holds b'cat', not a class label; a .cls member holds a non-negative "
        "integer in ASCII, e.g. b'3'")
    tar_of(shard, [("a.png", png()), ("a.cls", b"4")])
    (shard.parent / "classes.txt").write_text("zero\none\n")
    assert load_error(shard.parent) == (
        f"{shard}:a.png has label 4, but {shard.parent}/classes.txt lists 2 classes (0..1); "
        "fix the label or the class list")


# --- the command -----------------------------------------------------------------------------


def test_shard_command_writes_both_splits_and_they_load(monkeypatch, capsys, tmp_path):
    labels = image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", str(tmp_path / "images"), "--out",
                              str(out), "--samples-per-shard", "10", "--no-progress")
    assert code == 0
    assert stdout.splitlines()[0] == f"train: 4 shard(s), train-000000.tar .. train-000003.tar " \
                                     f"in {out}"
    test = load_dataset("shards", "test", out)
    assert [labels[test._read(i)] for i in range(8)] == test.labels.tolist()
    # again, without --overwrite: refused, nothing changed
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(tmp_path / "images"), "--out",
                           str(out), "--split", "test")
    assert code == 2 and err == (f"error: {out} already holds 1 test-*.tar shard(s); pass "
                                 "--overwrite to replace them, or choose another --out\n")
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, _, _ = run_cli(monkeypatch, capsys, "shard", str(tmp_path / "images"), "--out",
                         str(out), "--split", "train", "--overwrite", "--no-progress")
    assert code == 0 and len(list(out.glob("train-*.tar"))) == 1


@pytest.mark.parametrize("args, message", [
    (["--split", "val"], "error: --split must be one of train, test, all, got 'val'"),
    (["--samples-per-shard", "0"], "error: --samples-per-shard must be at least 1, got 0"),
    (["--data", "missing"], "error: {tmp}/missing is not a folder; pass an image-folder data "
                            "dir holding train/ and test/ (or val/) class folders"),
    (["--data", "only-train", "--split", "test"], "error: {tmp}/only-train has no test split; "
                                                  "expected train/ and test/ (or val/) class "
                                                  "folders"),
])
def test_shard_command_usage_errors(monkeypatch, capsys, tmp_path, args, message):
    (tmp_path / "only-train" / "train" / "a").mkdir(parents=True)
    image_folder(tmp_path / "images", train=4, test=4)
    data = str(tmp_path / "images")
    if args[0] == "--data":
        data, args = str(tmp_path / args[1]), args[2:]
    code, _, err = run_cli(monkeypatch, capsys, "shard", data, "--out", str(tmp_path / "o"), *args)
    assert code == 2 and err == message.format(tmp=tmp_path) + "\n"
    assert not (tmp_path / "o").exists()


def test_shard_command_help_and_default(monkeypatch, capsys):
    from mae_bench.cli.shard import shard

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(monkeypatch, capsys, "shard", "--help")
    assert code == 0 and "Usage: mae-bench shard [OPTIONS] DATA_DIR" in out
    assert "--samples-per-shard" in out and "<bool>" not in out
    default = inspect.signature(shard).parameters["samples_per_shard"].default
    assert default == DEFAULT_SAMPLES_PER_SHARD
