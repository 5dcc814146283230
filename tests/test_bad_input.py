"""Issue 7's bad-input checklist, through the real command line.

Every refused input must give: exit code 2, exactly one stderr line (``error: ...``) naming the
bad value (and, where the message has one, the fix), no traceback, and nothing written: the test
compares a listing of every folder involved (run folders, results store, caches, ``$HOME``)
before and after. Images that issue [1/6] says to convert or skip are checked through the real
loader and the CLI.
"""

from __future__ import annotations

import io
import json
import logging
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.methods.engine import pretrain
from mae_bench.models.mae import MaskedAutoencoder

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                            train={"epochs": 1, "batch_size": 64})
RNG = np.random.default_rng(7)


class PickledArgs:
    """A custom class inside a checkpoint: loading it needs full (unsafe) unpickling."""

    def __init__(self, **values):
        self.__dict__.update(values)


# --------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _sandbox(tmp_path: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every default location (cwd-relative runs/ and results/, ~/.cache, $MAE_BENCH_CACHE)
    points inside tmp_path, so the before/after listing sees any write."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    # matplotlib's own font cache is not mae-bench writing; keep it out of the listing
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "mpl"))


def listing(*roots: Path) -> dict[str, tuple[bool, int, int] | None]:
    """path -> (is folder, size, mtime) for each root and everything below it."""
    seen: dict[str, tuple[bool, int, int] | None] = {}
    for root in roots:
        if not root.exists():
            seen[str(root)] = None
            continue
        for p in (root, *root.rglob("*")):
            st = p.stat()
            seen[str(p)] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return seen


def changes(before: dict, after: dict) -> list[str]:
    return [f"{'created' if p not in before else 'removed' if p not in after else 'changed'} {p}"
            for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """run_cli, but an exception escaping ``main`` is reported as what a shell would show
    (a traceback, exit code 1) instead of erroring the test."""
    try:
        return run_cli(monkeypatch, capsys, *args)
    except Exception as exc:
        captured = capsys.readouterr()
        return 1, captured.out, captured.err + "".join(traceback.format_exception(exc))


def refused(monkeypatch, capsys, watch: list[Path], *args: str) -> str:
    """Run ``mae-bench ARGS``, check the four rules of issue 7, return the error line."""
    before = listing(*watch)
    code, _, err = cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if "Traceback" in err:
        problems.append("traceback")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} stderr lines")
    problems += changes(before, listing(*watch))
    assert not problems, f"mae-bench {' '.join(args)}: {'; '.join(problems)}\nstderr:\n{err}"
    return lines[0]


def names(line: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in line]
    assert not missing, f"{missing} not in: {line}"


def eval_args(tmp_path: Path, *args: str) -> list[str]:
    return ["eval", *args, "--no-progress", "--results-dir", str(tmp_path / "res"),
            "--cache-dir", str(tmp_path / "cache")]


def pretrain_args(tmp_path: Path, *args: str) -> list[str]:
    return ["pretrain", "--arch", "vit_micro_patch2", "--batch-size", "32", "--epochs", "1",
            "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run"), *args]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny) MAE run on digits: 8-px, 1 channel, vit_micro_patch2."""
    path = tmp_path_factory.mktemp("run") / "mae-micro"
    pretrain(MICRO, path, max_steps=2, progress=False)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, run_dir: Path) -> Path:
    """Checkpoint files that are bad in one way each (and two unsafe-but-legit ones)."""
    d = tmp_path_factory.mktemp("ckpts")
    real = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    raw = (run_dir / "checkpoint.pt").read_bytes()
    (d / "notes.txt").write_text("these are my notes, not a checkpoint\n")
    (d / "random.pt").write_bytes(bytes(RNG.integers(1, 128, 512, dtype=np.uint8)))
    (d / "pickle-garbage.pt").write_bytes(b"\x80\x02" + bytes(RNG.integers(0, 256, 512,
                                                                          dtype=np.uint8)))
    (d / "zip-garbage.pt").write_bytes(b"PK\x03\x04" + bytes(RNG.integers(0, 256, 512,
                                                                         dtype=np.uint8)))
    with zipfile.ZipFile(d / "other.zip.pt", "w") as z:  # a valid zip, not from torch.save
        z.writestr("readme.txt", "hello")
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, d / "foreign.pt")
    torch.save(real | {"model": {k: v for i, (k, v) in enumerate(real["model"].items()) if i}},
               d / "missing-weights.pt")
    torch.save({k: v for k, v in real.items() if k != "extra"}, d / "no-extra.pt")
    torch.save(real | {"args": PickledArgs(lr=1e-3)}, d / "unsafe-run.pt")
    mae = MaskedAutoencoder(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                            decoder_num_heads=2)
    torch.save({"model": mae.state_dict(), "args": PickledArgs(model="mae_micro")},
               d / "unsafe-official.pth")
    (d / "empty-run").mkdir()
    return d


# --------------------------------------------------------------------------------- names


@pytest.mark.parametrize("args, bad, fix", [
    (["pretrain", "--method", "nope"], "'nope'", "valid methods: barlowtwins, byol"),
    (["pretrain", "--dataset", "nope"], "'nope'", "valid names: digits"),
    (["pretrain", "--arch", "nope"], "'nope'", "vit_micro_patch2"),
    (["pretrain", "--mask-strategy", "nope"], "nope", "random"),
    (["eval", "--protocol", "nope", "--checkpoint", "pixels"], "'nope'",
     "valid: knn, linear, fewshot, finetune, partial-finetune"),
    (["eval", "--protocol", "knn", "--checkpoint", "pixels", "--dataset", "nope"], "'nope'",
     "valid names: digits"),
    (["eval", "--protocol", "knn", "--checkpoint", "random", "--arch", "nope"], "'nope'",
     "vit_micro_patch2"),
], ids=["pretrain-method", "pretrain-dataset", "pretrain-arch", "pretrain-mask-strategy",
        "eval-protocol", "eval-dataset", "eval-arch"])
def test_unknown_names(monkeypatch, capsys, tmp_path, args, bad, fix):
    extra = ["--out", str(tmp_path / "run"), "--no-progress"] if args[0] == "pretrain" else [
        "--results-dir", str(tmp_path / "res"), "--no-progress"]
    names(refused(monkeypatch, capsys, [tmp_path], *args, *extra), bad, fix)


def test_unknown_arch_for_a_run_checkpoint(monkeypatch, capsys, tmp_path, run_dir):
    line = refused(monkeypatch, capsys, [tmp_path, run_dir],
                   *eval_args(tmp_path, "--protocol", "knn", "--checkpoint", str(run_dir),
                              "--arch", "nope"))
    names(line, "'nope'", "vit_micro_patch2")


# --------------------------------------------------------------------------------- data folders


def png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def small_images(folder: Path, classes: list[str], per_class: int, size: int = 8) -> None:
    for c in classes:
        for i in range(per_class):
            png(folder / c / f"{i:03d}.png", RNG.integers(0, 256, (size, size, 3), np.uint8))


def bad_layout(kind: str, root: Path) -> Path:
    """A data folder that is wrong in one way; returns the path to pass as --data-dir."""
    if kind == "missing":
        return root / "no-such-folder"
    root.mkdir()
    if kind == "file":
        (root / "data.bin").write_bytes(b"\0" * 16)
        return root / "data.bin"
    if kind == "images-in-root":  # no train/ or test/, no class folders
        small_images(root, [""], 3)
    elif kind == "no-class-folders":  # train/*.png
        small_images(root / "train", [""], 3)
        small_images(root / "test", [""], 3)
    elif kind == "only-test":
        small_images(root / "test", ["a", "b"], 2)
    elif kind == "no-images":
        (root / "train/a").mkdir(parents=True)
        (root / "train/a/readme.txt").write_text("no images here")
        (root / "test/a").mkdir(parents=True)
    elif kind == "broken-tar":
        (root / "train.tar").write_bytes(b"\0" * 10)
        (root / "test.tar").write_bytes(b"\0" * 10)
    elif kind == "broken-tar-gz":
        (root / "train.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
        (root / "test.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    elif kind == "readme-only":
        (root / "README.txt").write_text("the data will be here")
    elif kind == "wrong-classes":
        small_images(root / "train", ["cat", "dog"], 2)
        small_images(root / "test", ["cat", "dog"], 2)
    elif kind == "garbage-batches":
        (root / "cifar-10-batches-py").mkdir()
        for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                     "data_batch_5", "test_batch", "batches.meta"):
            (root / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    elif kind == "garbage-archive":
        (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    # "empty": the folder exists and holds nothing
    return root


LAYOUTS = [  # (dataset, kind, fix)
    ("imagefolder", "missing", "get it: your own images"),
    ("imagefolder", "file", "pass the folder that holds it"),
    ("imagefolder", "empty", "get it: your own images"),
    ("imagefolder", "images-in-root", "expected train/ and test/ (or val/) class folders"),
    ("imagefolder", "no-class-folders", "<class>/<image>"),
    ("imagefolder", "only-test", "train"),
    ("imagefolder", "no-images", "<class>/<image>"),
    ("imagefolder", "broken-tar", "re-create it"),
    ("imagefolder", "broken-tar-gz", "re-create it"),
    ("cifar10", "missing", "cifar-10-python.tar.gz"),
    ("cifar10", "empty", "cifar-10-python.tar.gz"),
    ("cifar10", "readme-only", "expected cifar-10-batches-py/"),
    ("cifar10", "wrong-classes", "cifar10 classes"),
    ("cifar10", "garbage-batches", "re-download it"),
    ("cifar10", "garbage-archive", "cifar-10-python.tar.gz"),
]


@pytest.mark.parametrize("command", ["pretrain", "eval"])
@pytest.mark.parametrize("dataset, kind, fix", LAYOUTS,
                         ids=[f"{d}-{k}" for d, k, _ in LAYOUTS])
def test_bad_data_folder(monkeypatch, capsys, tmp_path, command, dataset, kind, fix):
    data_dir = bad_layout(kind, tmp_path / "data")
    common = ("--dataset", dataset, "--data-dir", str(data_dir))
    args = (pretrain_args(tmp_path, *common) if command == "pretrain" else
            eval_args(tmp_path, "--protocol", "knn", "--checkpoint", "pixels", *common))
    line = refused(monkeypatch, capsys, [tmp_path], *args)
    names(line, str(data_dir), fix)


# --------------------------------------------------------------------------------- mask ratio


# digits at 8 px with 2-px patches: 16 patches; int(16 * (1 - r)) patches stay visible
@pytest.mark.parametrize("args, bad, fix", [
    (["--mask-ratio", "1.0"], "1.0", "strictly between 0 and 1"),
    (["--mask-ratio", "0.0"], "0.0", "strictly between 0 and 1"),
    (["--mask-ratio", "-0.5"], "-0.5", "strictly between 0 and 1"),
    (["--mask-ratio", "nan"], "nan", "strictly between 0 and 1"),
    (["--mask-ratio", "0.95"], "mask_ratio=0.95 leaves 0 of 16", "0 < mask_ratio <= 0.9375"),
    (["--mask-ratio", "1e-17"], "leaves 16 of 16", "0 < mask_ratio <= 0.9375"),  # none masked
    (["--img-size", "16", "--mask-ratio", "0.99"], "mask_ratio=0.99 leaves 0 of 64",
     "0 < mask_ratio <= 0.9843"),
    (["--mask-strategy", "block", "--mask-ratio", "0.95"], "0.95", "0.9375"),
], ids=["one", "zero", "negative", "nan", "no-visible", "no-masked", "no-visible-64", "block"])
def test_mask_ratio_without_visible_or_masked_patch(monkeypatch, capsys, tmp_path, args, bad,
                                                    fix):
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(tmp_path, *args))
    names(line, bad, fix)


def test_visualize_mask_ratio_without_visible_patch(monkeypatch, capsys, tmp_path, run_dir):
    line = refused(monkeypatch, capsys, [tmp_path, run_dir], "visualize", "--checkpoint",
                   str(run_dir), "--mask-ratio", "1.0", "--out", str(tmp_path / "grid.png"))
    names(line, "1.0", "0 < mask_ratio <= 0.9375")


def test_mask_ratio_on_an_image_folder_writes_no_cache(monkeypatch, capsys, tmp_path):
    """The ratio is only checkable once the image size is known; decoding an image folder to
    learn it must not leave a decode cache behind when the run is then refused."""
    small_images(tmp_path / "data/train", ["a", "b"], 20)
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(
        tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
        "--mask-ratio", "0.95"))
    names(line, "mask_ratio=0.95", "0 < mask_ratio <= 0.9375")


# --------------------------------------------------------------------------------- image size


@pytest.mark.parametrize("args, bad, fix", [
    (["--img-size", "9"], "image size 9", "multiple of 2"),
    (["--arch", "vit_micro_patch4", "--img-size", "10"], "image size 10", "multiple of 4"),
    (["--arch", "vit_base_patch16"], "vit_base_patch16", "multiple of 16"),  # digits: 8 px
    (["--img-size", "0"], "got 0", "must be > 0"),
    (["--img-size", "-8"], "got -8", "must be > 0"),
], ids=["9-patch2", "10-patch4", "digits-patch16", "zero", "negative"])
def test_image_size_not_divisible_by_patch(monkeypatch, capsys, tmp_path, args, bad, fix):
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(tmp_path, *args))
    names(line, bad, fix)


def test_eval_random_encoder_patch_does_not_divide_images(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, [tmp_path], *eval_args(
        tmp_path, "--protocol", "knn", "--checkpoint", "random", "--arch", "vit_base_patch16"))
    names(line, "vit_base_patch16", "pick a preset whose patch size divides it")


def test_image_folder_of_odd_sizes_refuses_without_writing(monkeypatch, capsys, tmp_path):
    """All images 31x47: the data set's image size is 31, which 2-px patches do not divide."""
    for c in ("a", "b"):
        for i in range(20):
            png(tmp_path / f"data/train/{c}/{i}.png", RNG.integers(0, 256, (47, 31, 3), np.uint8))
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(
        tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")))
    names(line, "31", "multiple of 2")


# --------------------------------------------------------------------------------- checkpoints


BAD_FILES = {  # file in ckpts: (eval's fix, visualize's fix)
    "does-not-exist.pt": ("expected a run folder, a checkpoint file, 'pixels' or 'random'", ""),
    "empty-run": ("holds no checkpoint.pt", "has no checkpoint.pt"),
    "notes.txt": ("give a run folder", "give a run folder"),
    "random.pt": ("give a run folder", "give a run folder"),
    "pickle-garbage.pt": ("give a run folder", "give a run folder"),
    "zip-garbage.pt": ("falls back to checkpoint.prev.pt", "falls back to checkpoint.prev.pt"),
    "other.zip.pt": ("give a run folder", "give a run folder"),
    "truncated.pt": ("falls back to checkpoint.prev.pt", "falls back to checkpoint.prev.pt"),
    "tensor.pt": ("a 'model' entry; give a run folder", "a 'model' entry; give a run folder"),
    "foreign.pt": ("neither a mae-bench checkpoint nor an official MAE", "not a mae-bench run"),
    "missing-weights.pt": ("weights do not fit its config", "weights do not fit its config"),
    "no-extra.pt": ("no extra.channels", "no extra.channels"),  # 'extra' entry removed
    "unsafe-run.pt": ("--trust-checkpoint", "--trust-checkpoint"),
    "unsafe-official.pth": ("--trust-checkpoint", "--trust-checkpoint"),
}


@pytest.mark.parametrize("command", ["eval", "visualize"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_checkpoint_file(monkeypatch, capsys, tmp_path, ckpts, command, name):
    fix = BAD_FILES[name][command == "visualize"]
    path = ckpts / name
    args = (eval_args(tmp_path, "--protocol", "knn", "--checkpoint", str(path))
            if command == "eval" else
            ["visualize", "--checkpoint", str(path), "--out", str(tmp_path / "grid.png")])
    line = refused(monkeypatch, capsys, [tmp_path, ckpts], *args)
    names(line, str(path), fix)


@pytest.mark.parametrize("arch", ["vit_tiny_patch2", "vit_micro_patch4"])
def test_checkpoint_of_another_architecture(monkeypatch, capsys, tmp_path, run_dir, arch):
    line = refused(monkeypatch, capsys, [tmp_path, run_dir], *eval_args(
        tmp_path, "--protocol", "knn", "--checkpoint", str(run_dir), "--arch", arch))
    names(line, str(run_dir), "holds a vit_micro_patch2 encoder", f"not --arch {arch}",
          "drop --arch or pass the matching one")


def test_trusted_checkpoint_still_checks_the_architecture(monkeypatch, capsys, tmp_path, ckpts):
    path = ckpts / "unsafe-official.pth"
    line = refused(monkeypatch, capsys, [tmp_path, ckpts], *eval_args(
        tmp_path, "--protocol", "knn", "--checkpoint", str(path), "--arch", "vit_tiny_patch2",
        "--trust-checkpoint"))
    names(line, str(path), "not --arch vit_tiny_patch2")


def test_checkpoint_channels_differ_from_the_data(monkeypatch, capsys, tmp_path, run_dir):
    """A 1-channel (digits) encoder asked to embed 3-channel images."""
    small_images(tmp_path / "data/train", ["a", "b"], 5)
    small_images(tmp_path / "data/test", ["a", "b"], 2)
    line = refused(monkeypatch, capsys, [tmp_path, run_dir], *eval_args(
        tmp_path, "--protocol", "knn", "--checkpoint", str(run_dir), "--dataset", "imagefolder",
        "--data-dir", str(tmp_path / "data")))
    names(line, "takes 1-channel images but imagefolder has 3", "evaluate on a data set with 1")


@pytest.mark.parametrize("command, name", [("eval", "unsafe-run.pt"),
                                           ("eval", "unsafe-official.pth"),
                                           ("visualize", "unsafe-run.pt")])
def test_trust_checkpoint_lets_a_legit_unsafe_checkpoint_through(
        monkeypatch, capsys, tmp_path, ckpts, command, name):
    """The refusal above says "pass --trust-checkpoint": doing so must work."""
    path = ckpts / name
    if command == "eval":
        args = eval_args(tmp_path, "--protocol", "knn", "--checkpoint", str(path), "--k", "5",
                         "--trust-checkpoint")
    else:
        args = ["visualize", "--checkpoint", str(path), "--out", str(tmp_path / "grid.png"),
                "--trust-checkpoint"]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    if command == "visualize":
        assert (tmp_path / "grid.png").is_file()
        return
    rows = [json.loads(r) for r in (tmp_path / "res/results.jsonl").read_text().splitlines()]
    method = "official-mae" if name.endswith(".pth") else "mae"
    assert {r["method"] for r in rows} == {method}
    assert {r["arch"] for r in rows} == {"vit_micro_patch2"}
    assert all(0 <= r["value"] <= 100 for r in rows)


@pytest.mark.parametrize("name, fix", [
    ("no-such-run", "no run folder with a config.yaml there"),
    ("notes.txt", ""),
    ("truncated.pt", ""),
])
def test_resume_from_a_bad_checkpoint(monkeypatch, capsys, tmp_path, run_dir, ckpts, name, fix):
    """--resume RUN where RUN's only checkpoint.pt is not a checkpoint (or RUN is missing)."""
    run = tmp_path / "resume"
    if name != "no-such-run":
        run.mkdir()
        (run / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
        (run / "checkpoint.pt").write_bytes((ckpts / name).read_bytes())
    line = refused(monkeypatch, capsys, [tmp_path, run_dir], "pretrain", "--resume", str(run),
                   "--no-progress")
    names(line, str(run), fix)


# --------------------------------------------------------------------------------- --features


def write_features(folder: Path, **override) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_features": RNG.normal(size=(30, 8)), "train_labels": np.arange(30) % 3,
              "test_features": RNG.normal(size=(12, 8)), "test_labels": np.arange(12) % 3}
    for name, value in (arrays | override).items():
        if isinstance(value, bytes):
            (folder / f"{name}.npy").write_bytes(value)
        elif value is not None:
            np.save(folder / f"{name}.npy", value)
    return folder


FEATURES = {  # id: (override, bad value in the message)
    "train-rows-vs-labels": ({"train_labels": np.arange(29) % 3}, "29 labels"),
    "test-rows-vs-labels": ({"test_labels": np.arange(13) % 3}, "13 labels"),
    "train-vs-test-dims": ({"test_features": np.zeros((12, 7))}, "7"),
    "1d-features": ({"train_features": np.zeros(30)}, "(30,)"),
    "3d-features": ({"test_features": np.zeros((12, 2, 4))}, "(12, 2, 4)"),
    "2d-labels": ({"train_labels": np.zeros((30, 1), np.int64)}, "(30, 1)"),
    "float-labels": ({"test_labels": np.zeros(12)}, "float64"),
    "empty-features": ({"train_features": np.zeros((0, 8)), "train_labels": np.zeros(0, int)},
                       "(0, 8)"),
    "nan-features": ({"train_features": np.full((30, 8), np.nan)}, "NaN"),
    "negative-labels": ({"train_labels": np.arange(30) % 3 - 1}, "negative"),
    "missing-file": ({"test_labels": None}, "test_labels.npy"),
    "text-as-npy": ({"test_features": b"1,2,3\n4,5,6\n"}, "test_features.npy"),
    "pickled-objects": ({"train_features": np.array([{"a": 1}] * 30, dtype=object)},
                        "train_features.npy"),
}


@pytest.mark.parametrize("case", list(FEATURES))
def test_bad_feature_files(monkeypatch, capsys, tmp_path, case):
    override, bad = FEATURES[case]
    folder = write_features(tmp_path / "emb", **override)
    line = refused(monkeypatch, capsys, [tmp_path], *eval_args(
        tmp_path, "--protocol", "knn", "--features", str(folder)))
    names(line, "--features", bad)


def test_feature_folder_that_does_not_exist(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, [tmp_path], *eval_args(
        tmp_path, "--protocol", "linear", "--features", str(tmp_path / "nope")))
    names(line, str(tmp_path / "nope"), "train_features.npy")


# --------------------------------------------------------------------------------- images


def encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


NOISE = RNG.integers(0, 256, (64, 64, 3), np.uint8)
UNREADABLE = {  # file name: contents
    "empty.jpg": b"",
    "truncated.jpg": encoded(NOISE, "JPEG", quality=90)[:1500],
    "truncated.png": encoded(NOISE, "PNG")[:1500],
    "text.jpg": b"hello, I am a text file with a .jpg name\n",
}


def good_split(split_dir: Path, n: int) -> None:
    for i in range(n):
        png(split_dir / f"c{i % 2}" / f"{i:03d}.png", np.full((8, 8, 3), i, np.uint8))


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_image_is_skipped_logged_and_counted(tmp_path, caplog, name):
    good_split(tmp_path / "data/train", 100)
    (tmp_path / "data/train/c0" / name).write_bytes(UNREADABLE[name])
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        ds = load_dataset("imagefolder", "train", tmp_path / "data", cache_dir=tmp_path / "c")
    assert len(ds) == 100 and ds.bad_images == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and name in warned[0]


def odd_bands() -> np.ndarray:
    """31 wide, 47 high: red rows 0-14, green 15-31, blue 32-46."""
    img = np.zeros((47, 31, 3), np.uint8)
    img[:15, :, 0], img[15:32, :, 1], img[32:, :, 2] = 255, 255, 255
    return img


def write_convertible(folder: Path) -> dict[str, np.ndarray]:
    """One image per mode issue [1/6] converts; all 8x8 but the 31x47 one."""
    rgb = RNG.integers(0, 256, (8, 8, 3), np.uint8)
    gray = RNG.integers(0, 256, (8, 8), np.uint8)
    rgba = RNG.integers(0, 256, (8, 8, 4), np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    png(folder / "a-rgb.png", rgb)
    png(folder / "b-gray.png", gray)
    (folder / "c-gray.jpg").write_bytes(encoded(gray, "JPEG", quality=100))
    png(folder / "d-rgba.png", rgba)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(folder / "e-cmyk.jpg", quality=95)
    png(folder / "f-odd.png", odd_bands())
    return {"rgb": rgb, "gray": gray, "rgba": rgba}


def test_cmyk_gray_rgba_and_odd_sizes_are_converted(tmp_path):
    ref = write_convertible(tmp_path / "data/train/a")
    ds = load_dataset("imagefolder", "train", tmp_path / "data", cache_dir=tmp_path / "c")
    assert ds.images.shape == (6, 3, 8, 8) and ds.bad_images == 0
    got = [img.numpy().transpose(1, 2, 0).astype(int) for img in ds.images]  # [8, 8, 3] each
    assert np.array_equal(got[0], ref["rgb"])
    assert np.array_equal(got[1], np.repeat(ref["gray"][..., None], 3, axis=2))
    assert np.abs(got[2] - ref["gray"][..., None]).max() <= 8  # JPEG q100, gray -> 3 equal ch.
    assert (got[2][..., 0] == got[2][..., 1]).all() and (got[2][..., 1] == got[2][..., 2]).all()
    assert np.array_equal(got[3], ref["rgba"][..., :3])  # alpha dropped, colours kept
    assert np.abs(got[4] - [0, 255, 255]).max() <= 6  # pure cyan ink -> RGB cyan
    # 31x47 -> shorter side 8 (8x12), centre crop rows 2..9 of 12: red, green, blue bands
    odd = got[5]
    assert np.abs(odd[0] - [255, 0, 0]).max() <= 8 and np.abs(odd[7] - [0, 0, 255]).max() <= 8
    assert np.abs(odd[3:5] - [0, 255, 0]).max() <= 8


def test_cli_pretrains_on_a_folder_with_odd_images_and_one_bad_file(monkeypatch, capsys,
                                                                     tmp_path, caplog):
    good_split(tmp_path / "data/train", 100)
    write_convertible(tmp_path / "data/train/c0")
    (tmp_path / "data/train/c1/broken.jpg").write_bytes(UNREADABLE["truncated.jpg"])
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        code, out, err = cli(monkeypatch, capsys, *pretrain_args(
            tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")))
    assert code == 0, err
    assert (tmp_path / "run/checkpoint.pt").is_file() and "imagefolder" in out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unreadable = [w for w in warned if "unreadable" in w]  # the other: 4 colour files in gray
    assert len(unreadable) == 1 and "broken.jpg" in unreadable[0] and len(warned) == 2


@pytest.mark.parametrize("command", ["pretrain", "eval"])
def test_too_many_bad_images_is_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path,
                                                            caplog, command):
    """In a shell the per-file warnings (logging's last-resort handler) print above the error
    line; under pytest the log capture takes them, so they are checked through caplog."""
    good_split(tmp_path / "data/train", 100)
    good_split(tmp_path / "data/test", 10)
    for name in ("empty.jpg", "text.jpg"):
        (tmp_path / "data/train/c1" / name).write_bytes(UNREADABLE[name])
    common = ("--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"))
    args = (pretrain_args(tmp_path, *common) if command == "pretrain" else
            eval_args(tmp_path, "--protocol", "knn", "--checkpoint", "pixels", *common))
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        line = refused(monkeypatch, capsys, [tmp_path], *args)
    names(line, "2 of 102 images", str(tmp_path / "data/train"), "over 1 %",
          "fix or remove the files")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "empty.jpg" in warned and "text.jpg" in warned


# --------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("args, fix", [
    (["--set", "train.epochs=five"], "train.epochs must be a number (float), got 'five'"),
    (["--set", "train.epochs=[1, 2]"], "train.epochs must be a number (float), got [1, 2] "
                                       "(a list)"),
    (["--set", "train.batch_size=2.5"], "train.batch_size must be an integer (int)"),
    (["--set", "mae.norm_pix_loss=maybe"], "mae.norm_pix_loss must be true or false (bool)"),
    (["--set", "model.img_size=8.5"], "model.img_size must be an integer (int) or null"),
    (["--set", "train.epoch=3"], "unknown key(s) epoch in config section 'train'"),
    (["--set", "trian.epochs=3"], "unknown config section 'trian'"),
    (["--set", "train.epochs"], "expected SECTION.KEY=VALUE"),
    (["--epochs", "3", "--set", "train.epochs=4"], "train.epochs is given twice"),
], ids=["word-for-float", "list-for-float", "float-for-int", "word-for-bool",
        "float-for-optional-int", "unknown-key", "unknown-section", "no-value", "twice"])
def test_bad_set_values(monkeypatch, capsys, tmp_path, args, fix):
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(tmp_path, *args))
    names(line, fix)


YAML_TYPES = {  # YAML text: the fix in the message
    "train: {epochs: five}\n": "train.epochs must be a number (float), got 'five' (a string)",
    "train: {epochs: [1, 2]}\n": "train.epochs must be a number (float), got [1, 2] (a list)",
    "ssl: {teacher_temp: yes}\n": "ssl.teacher_temp must be a number (float) or null, got True",
    "data: {num_workers: 1.5}\n": "data.num_workers must be an integer (int), got 1.5",
    "train: 5\n": "config section 'train' must be a mapping of keys to values, got an integer",
    "- train\n- mae\n": "a run config must be a mapping of sections, got a list",
}


@pytest.mark.parametrize("command", ["pretrain", "compare", "sweep"])
@pytest.mark.parametrize("text", list(YAML_TYPES), ids=["word", "list", "bool-for-float",
                                                          "float-for-int", "section", "top"])
def test_config_file_of_wrong_types(monkeypatch, capsys, tmp_path, command, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    args = {"pretrain": pretrain_args(tmp_path, "--config", str(cfg)),
            "compare": ["compare", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"),
                        "--results-dir", str(tmp_path / "res"), "--no-progress"],
            "sweep": ["sweep", "mask-ratio", "--config", str(cfg), "--runs-dir",
                      str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"),
                      "--no-progress"]}[command]
    line = refused(monkeypatch, capsys, [tmp_path], *args)
    names(line, f"config file {cfg}: ", YAML_TYPES[text])


@pytest.mark.parametrize("args, fix", [
    (["compare", "--set", "train.device=cpu"], "train.device is set by --device here"),
    (["compare", "--set", "train.epochs=2"], "set by --epochs / --budget-minutes here"),
    (["compare", "--set", "ssl.momentum=high"], "ssl.momentum must be a number (float) or null"),
    (["sweep", "mask-ratio", "--set", "mae.mask_ratio=0.5"],
     "mae.mask_ratio is set by the swept knob mask-ratio (--values) here"),
    (["sweep", "epochs", "--values", "1", "--set", "train.seed=3"], "set by --seeds here"),
], ids=["compare-own-option", "compare-epochs", "compare-type", "sweep-knob", "sweep-seed"])
def test_set_on_compare_and_sweep(monkeypatch, capsys, tmp_path, args, fix):
    line = refused(monkeypatch, capsys, [tmp_path], *args, "--runs-dir", str(tmp_path / "runs"),
                   "--results-dir", str(tmp_path / "res"), "--no-progress")
    names(line, fix)


# ----------------------------------------------------------------- issue 28: the data side, told


def test_mnist_on_an_image_folder_suggests_imagefolder(monkeypatch, capsys, tmp_path):
    small_images(tmp_path / "data/train", ["0", "1"], 2)
    small_images(tmp_path / "data/test", ["0", "1"], 1)
    line = refused(monkeypatch, capsys, [tmp_path], *pretrain_args(
        tmp_path, "--dataset", "mnist", "--data-dir", str(tmp_path / "data")))
    names(line, f"{tmp_path / 'data'} does not hold mnist: expected train-images-idx3-ubyte",
          "it holds imagefolder data (--dataset imagefolder)")


def test_eval_rows_count_skipped_images_and_each_is_warned_once(monkeypatch, capsys, tmp_path,
                                                               caplog):
    good_split(tmp_path / "data/train", 100)
    good_split(tmp_path / "data/test", 10)
    (tmp_path / "data/train/c0/broken.jpg").write_bytes(UNREADABLE["truncated.jpg"])
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        code, _, err = cli(monkeypatch, capsys, *eval_args(
            tmp_path, "--protocol", "knn", "--k", "5", "--checkpoint", "pixels", "--dataset",
            "imagefolder", "--data-dir", str(tmp_path / "data")))
    assert code in (0, None), err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "broken.jpg" in warned[0]  # train is read again for test
    rows = [json.loads(line) for line in (tmp_path / "res/results.jsonl").read_text().splitlines()]
    assert rows and {r.get("skipped_images") for r in rows} == {1}
    good_split(tmp_path / "clean/train", 20)
    good_split(tmp_path / "clean/test", 4)
    code, _, err = cli(monkeypatch, capsys, *eval_args(
        tmp_path, "--protocol", "knn", "--k", "5", "--checkpoint", "pixels", "--dataset",
        "imagefolder", "--data-dir", str(tmp_path / "clean")))
    clean = [r for r in map(json.loads, (tmp_path / "res/results.jsonl").read_text().splitlines())
             if r.get("data_dir", "").endswith("clean")]
    assert code in (0, None) and clean and all("skipped_images" not in r for r in clean), err


# --- messages that name the real cause (issue 28, item 16) ------------------------------------

def test_results_of_a_missing_folder_names_that_folder(monkeypatch, capsys, tmp_path):
    store = tmp_path / "nope"
    line = refused(monkeypatch, capsys, [tmp_path], "results", "--results-dir", str(store))
    assert line == (f"error: no results at {store / 'results.jsonl'} (there is no folder "
                    f"{store}); run `mae-bench eval ...` with --results-dir {store} first")


def test_fewshot_names_the_label_fraction_that_leaves_one_sample(monkeypatch, capsys,
                                                                 tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    np.save(feats / "train_features.npy", rng.normal(size=(1600, 4)).astype(np.float32))
    np.save(feats / "train_labels.npy", np.repeat([0, 1], [900, 700]))
    np.save(feats / "test_features.npy", rng.normal(size=(10, 4)).astype(np.float32))
    np.save(feats / "test_labels.npy", np.arange(10) % 2)
    line = refused(monkeypatch, capsys, [tmp_path], *eval_args(
        tmp_path, "--protocol", "fewshot", "--features", str(feats), "--label-fraction",
        "0.001"))
    assert line == ("error: --label-fraction 0.001 leaves 1 training sample of class 1 (of its "
                    "700), but the fast probe picks its weight decay on a validation split that "
                    "needs 2 per class; use --label-fraction 0.0029 or more")
    code, _, err = cli(monkeypatch, capsys, *eval_args(
        tmp_path, "--protocol", "fewshot", "--features", str(feats), "--label-fraction",
        "0.0029"))
    assert code in (0, None), err  # the fraction it suggests works


def test_fp16_on_a_cpu_gives_no_training_reason_for_knn(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, [tmp_path], *eval_args(
        tmp_path, "--protocol", "knn", "--checkpoint", "pixels", "--precision", "fp16",
        "--device", "cpu"))
    assert line == "error: --precision fp16 needs a CUDA device; on cpu use bf16 or fp32"
